"""When the trigger polls each image: its own interval, its expected end, a few late polls, no more."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from imagecb_provider.callbacks.client import CallbackItem
from imagecb_provider.callbacks.watcher import CallbackInbox
from imagecb_provider.triggers.task import (
    EXPECTED_END_MARGIN,
    LATE_POLLS,
    ImageTaskTrigger,
    RenderTimes,
    _Wait,
)


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


@pytest.mark.parametrize(
    ("seen", "median"), [([], None), ([10.0], 10.0), ([10.0, 50.0, 12.0], 12.0), ([0.5], 0.5)]
)
def test_render_times_give_the_median_per_connection(seen, median):
    times = RenderTimes(keep=3)
    for seconds in [*seen, -1.0, 0.0]:  # nonsense durations (clock skew, second-wide stamps) are ignored
        times.observe("c", seconds)
    assert times.estimate("c") == median
    assert times.estimate("other") is None


def test_render_times_keep_only_the_latest():
    times = RenderTimes(keep=2)
    for seconds in (100.0, 10.0, 12.0):
        times.observe("c", seconds)
    assert times.estimate("c") == 11.0


async def test_a_callback_signed_or_not_only_makes_its_task_due_for_one_status_call():
    """
    No callback body ends a task: the vendor's signature covers only the task id and the timestamp.

    A signed body claiming success with an attacker's URL must not end the wait: its task is due
    at once, and the status call (record-info) says how it ended.
    """
    forged = {"resultImageUrl": "https://attacker.example/x.png", "originImageUrl": ""}

    def item(n: int, remote_task_id: str, signed: bool) -> CallbackItem:
        body = {"code": 200, "msg": "success", "data": {"taskId": remote_task_id, "info": forged}}
        return CallbackItem(n, remote_task_id, body, datetime.now(UTC), signed=signed, code=200)

    trigger = ImageTaskTrigger(remote_task_ids=["signed", "unsigned", "ended"], wait_mode="callback")
    wait = _Wait(["signed", "unsigned", "ended"], {}, default=1000.0, submitted={})
    del wait.pending["ended"]  # ended before its callback came: nothing to do
    inbox = CallbackInbox(["signed", "unsigned", "ended"])
    for n, (remote_task_id, signed) in enumerate([("signed", True), ("unsigned", False), ("ended", True)]):
        inbox.put(item(n, remote_task_id, signed))

    await trigger._take_callbacks(inbox, wait, pause=0.01)

    assert not wait.records  # nothing ended from a body
    assert sorted(wait.due(now=0.0)) == ["signed", "unsigned"]  # each confirmed by one status call
    assert wait.woken == {"signed", "unsigned"}


async def test_without_callbacks_the_wait_goes_back_to_polling_after_its_pause():
    """No callback comes (lost, or never sent): the safety-net poll must still get its turn."""
    trigger = ImageTaskTrigger(remote_task_ids=["a"], wait_mode="callback")
    wait = _Wait(["a"], {}, default=1000.0, submitted={})
    # A hang bound, not a timing: the pause is 0.01 s; waiting for a callback forever would hang.
    await asyncio.wait_for(trigger._take_callbacks(CallbackInbox(["a"]), wait, pause=0.01), timeout=30)
    assert wait.pending == {"a": 1000.0}
    assert not wait.records
