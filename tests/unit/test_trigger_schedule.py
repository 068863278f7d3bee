"""When the trigger polls each image: its own interval, its expected end, a few late polls, no more."""

from __future__ import annotations

import pytest

from imagecb_provider.triggers.task import EXPECTED_END_MARGIN, LATE_POLLS, RenderTimes, _Wait


def _wait(**submitted: float) -> _Wait:
    return _Wait(list(submitted), {}, default=30.0, submitted=submitted)


def test_without_an_estimate_every_task_keeps_its_interval():
    wait = _wait(a=0.0, b=1.0)
    wait.expect(None, now=0.0)
    assert wait.pending == {"a": 30.0, "b": 30.0}
    wait.reschedule("a", now=30.0, interval=30.0, render_seconds=None)
    assert wait.pending["a"] == 60.0


def test_a_task_is_polled_at_its_expected_end_then_a_few_times_late_then_by_interval():
    wait = _wait(a=0.0, b=5.0)
    wait.expect(20.0, now=1.0)
    assert wait.pending == {"a": 20.0 + EXPECTED_END_MARGIN, "b": 25.0 + EXPECTED_END_MARGIN}
    now = wait.pending["a"]
    gaps = []
    for _ in range(LATE_POLLS + 2):  # still generating at every poll
        wait.reschedule("a", now=now, interval=30.0, render_seconds=20.0)
        gaps.append(round(wait.pending["a"] - now, 6))
        now = wait.pending["a"]
        wait.expect(20.0, now=now)  # a task is never given a second expected end
    assert gaps == [2.0] * LATE_POLLS + [30.0, 30.0]


def test_an_expected_end_after_the_next_poll_changes_nothing_and_past_ones_poll_now():
    wait = _Wait(["a", "b"], {"a": 5.0}, default=30.0, submitted={"a": 0.0, "b": -100.0})
    wait.expect(20.0, now=10.0)
    assert wait.pending["a"] == 5.0  # its first poll comes sooner anyway
    assert wait.pending["b"] == 10.0  # it should be done already: poll now, not in the past
    assert "a" not in wait._late_polls  # later, when its poll is rescheduled, it may still be expected


@pytest.mark.parametrize(("seen", "median"), [([], None), ([10.0], 10.0), ([10.0, 50.0, 12.0], 12.0)])
def test_render_times_give_the_median_per_connection(seen, median):
    times = RenderTimes(keep=3)
    for seconds in [*seen, -1.0]:  # a nonsense duration is ignored
        times.observe("c", seconds)
    assert times.estimate("c") == median
    assert times.estimate("other") is None


def test_render_times_keep_only_the_latest():
    times = RenderTimes(keep=2)
    for seconds in (100.0, 10.0, 12.0):
        times.observe("c", seconds)
    assert times.estimate("c") == 11.0
