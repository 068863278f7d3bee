"""
Keeping submissions under the account's rate limit, from every task that submits.

The limit (about 20 new generations per 10 s) is per account, not per task. The mechanism is an
Airflow pool with a per-slot share of the rate:

* every submitting task runs in the pool ``imagecb_submissions`` (``airflow db migrate`` creates it
  with one slot). A deferred task does not hold its slot, so only submitting phases count;
* the connection extra ``submission_slots`` (default 1) says how many slots that pool has, and
  each task paces its own submissions at ``submissions_per_10s / submission_slots``, never in a
  burst. So however many tasks submit at once, on whichever executor and worker, the account
  sees at most its limit;
* within a task, up to :func:`in_flight` requests may wait for their answers at once: as many as
  the task's share lets go out in :data:`IN_FLIGHT_WINDOW`, at most the operator's
  ``max_in_flight``. At the documented 20 per 10 s that is one, as before.

Why a pool and not a limiter in the metadata database or in Redis: an Airflow 3 task cannot reach
the metadata database (only the execution API, which has no atomic counter), and Redis is not in
every deployment. The scheduler enforces a pool on every executor and worker, and needs nothing new.
The hook still backs off on a 429 (honouring ``Retry-After``) when another client shares the key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from imagecb_provider.hooks.protocol import DEFAULT_SUBMISSIONS_PER_10S

#: The pool every submitting task of the batch DAG runs in (``airflow db migrate`` creates it).
SUBMISSION_POOL = "imagecb_submissions"
#: Spacing above the exact limit, for clock and network jitter between client and API.
MARGIN = 0.05
#: Requests overlap in flight only when the rate lets several go out in this time (a typical
#: answer time): at the documented 20 per 10 s one request is in flight at a time.
IN_FLIGHT_WINDOW = 0.25
#: The operators' default ``max_in_flight``: the most submissions a crash can leave uncertain.
DEFAULT_MAX_IN_FLIGHT = 16


class SubmissionPacer:
    """
    Space calls evenly so that no window of 10 s holds more than ``per_10s`` of them.

    Safe to share between threads: each call reserves the next free moment, then waits for it.

    :param per_10s: this task's share of the account's limit.
    :param clock: a monotonic clock, replaceable in tests.
    :param sleep: how to wait, replaceable in tests.
    """

    def __init__(
        self,
        per_10s: float = DEFAULT_SUBMISSIONS_PER_10S,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if per_10s <= 0:
            raise ValueError(f"per_10s={per_10s!r}: must be a positive number of submissions")
        self.interval = 10.0 / per_10s * (1 + MARGIN)
        self._clock = clock
        self._sleep = sleep
        self._last: float | None = None
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Block until the next submission may go out; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            at = now if self._last is None else max(now, self._last + self.interval)
            self._last = at
        waited = at - now
        if waited:
            self._sleep(waited)
        return waited


def in_flight(interval: float, max_in_flight: int) -> int:
    """
    How many submissions of one task may wait for their answers at once.

    :param interval: the task's pacing interval in seconds (:attr:`SubmissionPacer.interval`).
    :param max_in_flight: the operator's cap, the most a crash may leave ``submission_uncertain``.
    """
    return max(1, min(int(max_in_flight), int(IN_FLIGHT_WINDOW / interval)))


_PACERS: dict[tuple[str, float], SubmissionPacer] = {}
_PACERS_LOCK = threading.Lock()


def pacer_for(conn_id: str, per_10s: float) -> SubmissionPacer:
    """
    The process's pacer for one connection: tasks (and threads) of a process share it.

    :param conn_id: the connection.
    :param per_10s: the task's share of the account's limit (see the module's docstring).
    """
    with _PACERS_LOCK:
        return _PACERS.setdefault((conn_id, per_10s), SubmissionPacer(per_10s))
