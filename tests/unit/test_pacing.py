"""SubmissionPacer: no window of 10 s ever holds more than the limit, from one thread or many."""

from __future__ import annotations

import threading
import time

import pytest

from imagecb_provider.utils.pacing import SubmissionPacer, in_flight


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("limit", [20, 7, 300])
def test_no_ten_second_window_holds_more_than_the_limit(limit):
    clock = FakeClock()
    pacer = SubmissionPacer(limit, clock=clock, sleep=clock.sleep)
    sent = []
    for _ in range(limit * 3):
        pacer.wait()
        sent.append(clock.now)
        clock.now += 0.001  # the submission itself takes a moment
    for start in sent:
        assert sum(start <= t < start + 10 for t in sent) <= limit
    # and it is not slower than it must be: 3 x limit submissions in about 30 s
    assert sent[-1] - sent[0] == pytest.approx((limit * 3 - 1) * 10 / limit * 1.05, rel=0.01)


def test_the_first_submission_goes_at_once_and_slow_callers_are_not_delayed():
    clock = FakeClock()
    pacer = SubmissionPacer(20, clock=clock, sleep=clock.sleep)
    assert pacer.wait() == 0.0
    clock.now += 5.0  # the caller was busy for longer than the interval
    assert pacer.wait() == 0.0
    assert clock.slept == []
    assert pacer.wait() == pytest.approx(0.525)


def test_a_limit_must_be_positive():
    with pytest.raises(ValueError, match="per_10s"):
        SubmissionPacer(0)


def test_threads_sharing_a_pacer_never_send_before_their_turn():
    """Each call reserves its own moment, one interval after the last: the k-th send is never early."""
    pacer = SubmissionPacer(2000)  # 5.25 ms apart, real time
    sent: list[float] = []
    lock = threading.Lock()

    def send() -> None:
        for _ in range(15):
            pacer.wait()
            with lock:
                sent.append(time.monotonic())

    threads = [threading.Thread(target=send) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent.sort()
    assert len(sent) == 60
    # A busy machine may wake a thread late, never early: so no 10 s holds more than the limit.
    assert all(at >= started + k * pacer.interval - 0.001 for k, at in enumerate(sent))


@pytest.mark.parametrize(
    ("per_10s", "cap", "expected"),
    [(20, 16, 1), (40, 16, 1), (200, 16, 4), (2000, 16, 16), (2000, 4, 4), (10_000, 1, 1)],
)
def test_requests_overlap_only_when_the_rate_lets_several_go_out_in_a_quarter_second(per_10s, cap, expected):
    assert in_flight(SubmissionPacer(per_10s).interval, cap) == expected
