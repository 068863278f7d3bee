"""
Keeping submissions under the account's rate limit.

The limit (about 20 new generations per 10 s) is per account, not per task. Every task that
submits paces itself at the steady rate, never in a burst, and the DAG puts those tasks in one
Airflow pool of a single slot that only the submitting phase holds (a deferred task does not hold
a pool slot). So one task submits at a time, each at the account's rate, and the gap between two
tasks (at least one scheduling round) keeps the spacing: no 429 in the normal case, and the
hook still backs off on a 429 (honouring ``Retry-After``) when another client shares the key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from imagecb_provider.hooks.protocol import DEFAULT_SUBMISSIONS_PER_10S

#: The pool every submitting task of the batch DAG runs in; create it with one slot.
SUBMISSION_POOL = "imagecb_submissions"
#: Spacing above the exact limit, for clock and network jitter between client and API.
MARGIN = 0.05


class SubmissionPacer:
    """
    Space calls evenly so that no window of 10 s holds more than ``per_10s`` of them.

    :param per_10s: the account's limit (the connection extra ``submissions_per_10s``).
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

    def wait(self) -> float:
        """Block until the next submission may go out; returns the seconds waited."""
        now = self._clock()
        waited = 0.0
        if self._last is not None:
            waited = max(0.0, self._last + self.interval - now)
            if waited:
                self._sleep(waited)
        self._last = now + waited
        return waited


_PACERS: dict[tuple[str, float], SubmissionPacer] = {}
_PACERS_LOCK = threading.Lock()


def pacer_for(conn_id: str, per_10s: float) -> SubmissionPacer:
    """The process's pacer for one connection: tasks run one after another in a process share it."""
    with _PACERS_LOCK:
        return _PACERS.setdefault((conn_id, per_10s), SubmissionPacer(per_10s))
