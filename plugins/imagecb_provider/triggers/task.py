"""
``ImageTaskTrigger``: wait for one remote image task, or many, without holding a worker slot.

A thousand waits share one triggerer event loop, so ``run`` only ever awaits: status calls go
through :class:`ImageCbAsyncHook` (one pooled session per loop) and waits are ``asyncio``
sleeps. Every remote task is polled on its own schedule, jittered so a batch submitted in one
burst does not poll in lockstep. In callback mode the vendor's callbacks, relayed by the
receiver, end each wait within about a second, and polling stays as a slow safety net. The
trigger never submits anything: the triggerer may run it twice.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager, nullcontext
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from imagecb_provider.exceptions import ImageCbApiError, ImageCbError
from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID, SHARED_SESSIONS, ImageCbAsyncHook
from imagecb_provider.hooks.protocol import RETRYABLE_ERRORS
from imagecb_provider.models import Outcome, TaskRecord
from imagecb_provider.models import remote_task_id as checked_remote_task_id

DEFAULT_POLL_INTERVAL = 30.0
#: In callback mode polling is only a safety net for a callback that never comes.
DEFAULT_SAFETY_POLL_INTERVAL = 300.0
DEFAULT_JITTER = 0.1
#: Status calls in flight at once for one trigger (a batch's due polls go out together).
MAX_CONCURRENT_POLLS = 8
#: An image expected to be done is polled this long after its expected end ...
EXPECTED_END_MARGIN = 1.0
#: ... and, while it is late, this many more times, a tenth of its render time apart (at least 2 s),
#: before the regular interval takes over: at most this many + 1 extra status calls per image.
LATE_POLLS = 2

WAIT_MODES = ("poll", "callback")

#: ``status`` values of the single event the trigger fires.
EVENT_DONE = "done"
EVENT_TIMEOUT = "timeout"
EVENT_ERROR = "error"


def task_event(
    status: str,
    *,
    records: Mapping[str, TaskRecord],
    polls: Mapping[str, int],
    via: Mapping[str, str] | None = None,
    error: dict[str, Any] | None = None,
    echo: Any = None,
) -> dict[str, Any]:
    """
    The payload of the one event a wait ends with.

    ``records`` holds the remote tasks that ended (all of them when ``status`` is ``done``),
    ``polls`` the status calls made per remote task, ``via`` how each ending was learned
    (``poll`` or ``callback``), ``error`` the API error that ended the wait early, and ``echo``
    whatever the waiting task handed the trigger to get back.
    """
    return {
        "status": status,
        "records": {remote_id: record.to_dict() for remote_id, record in records.items()},
        "polls": dict(polls),
        "via": dict(via or {}),
        "error": error,
        "echo": echo,
    }


def error_details(error: ImageCbError, remote_task_id: str) -> dict[str, Any]:
    """What an event says about the API error that ended a wait (never the key: messages hold none)."""
    details: dict[str, Any] = {
        "remote_task_id": remote_task_id,
        "message": str(error),
        "error_type": type(error).__name__,
    }
    if isinstance(error, ImageCbApiError):
        details.update(code=error.code, msg=error.msg, endpoint=error.endpoint)
    return details


#: How many recent render times per connection the estimate is the median of.
RENDER_TIMES_KEPT = 64


class RenderTimes:
    """
    How long images of one connection took to render lately, shared by every trigger of a process.

    A triggerer runs all its triggers in one process, so what the first group of a batch learns
    lets the later groups poll each image when it should be done, instead of up to a whole poll
    interval later: at most one extra status call per image when the guess is early.
    """

    def __init__(self, keep: int = RENDER_TIMES_KEPT) -> None:
        self._seconds: dict[str, deque[float]] = {}
        self._keep = keep

    def observe(self, conn_id: str, seconds: float) -> None:
        if seconds > 0:
            self._seconds.setdefault(conn_id, deque(maxlen=self._keep)).append(seconds)

    def estimate(self, conn_id: str) -> float | None:
        seen = self._seconds.get(conn_id)
        return statistics.median(seen) if seen else None

    def clear(self) -> None:
        """Forget every render time learned, as a fresh process would (tests start each case so)."""
        self._seconds.clear()


RENDER_TIMES = RenderTimes()


class ImageTaskTrigger(BaseTrigger):
    """
    Wait until every remote task in ``remote_task_ids`` has ended, or until ``deadline``.

    Fires exactly one event (see :func:`task_event`): ``done`` with every record;
    ``timeout`` with the records of those that ended when the deadline came (an event rather
    than a raise: a trigger that raises fails the task without retries); or ``error`` for an
    API error no retry can fix. Transient errors (429, 455, 5xx, network) are ridden out until
    the deadline.

    :param remote_task_ids: the API's task ids (``remote_task_id`` takes a single one); each must be
        of the strict form, or :class:`~imagecb_provider.exceptions.InvalidRemoteTaskId` is raised.
    :param deadline: Unix time after which the wait ends with a timeout event. Absolute, so a
        trigger rebuilt after a triggerer restart keeps the same deadline.
    :param imagecb_conn_id: the ``imagecb`` connection; only its id is held, never the key.
    :param poll_interval: seconds between status calls of one remote task (the vendor
        recommends 30; in callback mode, the safety-net interval, 300 by default).
    :param jitter: relative spread of each interval (0.1 means ±10 %).
    :param first_poll_at: Unix time of each task's first status call; by default one interval
        from now. A task reconnected to after a retry is polled at once.
    :param submitted_at: Unix time each task was submitted; with the render times seen lately,
        it lets a task be polled when it should be done rather than up to an interval later.
    :param wait_mode: ``poll``, or ``callback`` to be woken by the vendor's callbacks.
    :param echo: JSON-safe data handed back in the event, free of secrets (deferral kwargs do
        not reach ``execute_complete`` under ``dags test``).
    """

    def __init__(
        self,
        remote_task_ids: Iterable[str] | None = None,
        deadline: float = 0.0,
        imagecb_conn_id: str = DEFAULT_CONN_ID,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        jitter: float = DEFAULT_JITTER,
        first_poll_at: Mapping[str, float] | None = None,
        wait_mode: str = "poll",
        echo: Any = None,
        remote_task_id: str | None = None,
        submitted_at: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        ids = list(remote_task_ids or ()) + ([remote_task_id] if remote_task_id is not None else [])
        if not ids:
            raise ValueError("ImageTaskTrigger needs at least one remote task id")
        # Checked here, where the triggerer rebuilds a trigger from its stored kwargs as well.
        ids = [checked_remote_task_id(i, "the remote task ids of ImageTaskTrigger") for i in ids]
        if wait_mode not in WAIT_MODES:
            raise ValueError(f"wait_mode={wait_mode!r}: must be one of {', '.join(WAIT_MODES)}")
        self.remote_task_ids = list(dict.fromkeys(ids))
        self.deadline = float(deadline)
        self.imagecb_conn_id = imagecb_conn_id
        self.poll_interval = float(poll_interval)
        self.jitter = float(jitter)
        self.first_poll_at = {k: float(v) for k, v in (first_poll_at or {}).items()}
        self.submitted_at = {k: float(v) for k, v in (submitted_at or {}).items()}
        self.wait_mode = wait_mode
        self.echo = echo

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "remote_task_ids": self.remote_task_ids,
                "deadline": self.deadline,
                "imagecb_conn_id": self.imagecb_conn_id,
                "poll_interval": self.poll_interval,
                "jitter": self.jitter,
                "first_poll_at": self.first_poll_at,
                "submitted_at": self.submitted_at,
                "wait_mode": self.wait_mode,
                "echo": self.echo,
            },
        )

    def _hook(self) -> ImageCbAsyncHook:
        return ImageCbAsyncHook(imagecb_conn_id=self.imagecb_conn_id)

    def _interval(self) -> float:
        return self.poll_interval * random.uniform(1 - self.jitter, 1 + self.jitter)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self._hook()
        wait = _Wait(
            self.remote_task_ids, self.first_poll_at, time.time() + self._interval(), self.submitted_at
        )
        self.log.info(
            "Waiting for %d image task(s) (%s): a status call every %.3g s (±%.0f %%) per task",
            len(wait.pending),
            self.wait_mode,
            self.poll_interval,
            self.jitter * 100,
        )
        async with SHARED_SESSIONS.use(), self._callbacks(hook) as inbox:
            while wait.pending:
                error = await self._poll_due(hook, wait)
                if error is not None:
                    yield TriggerEvent(self._event(EVENT_ERROR, wait, error=error))
                    return
                if not wait.pending:
                    break
                if time.time() >= self.deadline:
                    self.log.warning(
                        "%d of %d image task(s) still generating at the deadline",
                        len(wait.pending),
                        len(self.remote_task_ids),
                    )
                    yield TriggerEvent(self._event(EVENT_TIMEOUT, wait))
                    return
                if inbox is None:  # callbacks wake the tasks in callback mode: no guessing there
                    wait.expect(RENDER_TIMES.estimate(self.imagecb_conn_id), time.time())
                pause = max(0.0, min(wait.next_due(), self.deadline) - time.time())
                await self._take_callbacks(inbox, wait, pause)
        self.log.info("All %d image task(s) ended", len(self.remote_task_ids))
        yield TriggerEvent(self._event(EVENT_DONE, wait))

    async def _poll_due(self, hook: ImageCbAsyncHook, wait: _Wait) -> dict[str, Any] | None:
        """Poll every task whose time has come; an API error no retry can fix ends the wait."""
        due = wait.due(time.time())
        slots = asyncio.Semaphore(MAX_CONCURRENT_POLLS)

        async def poll(remote_task_id: str) -> dict[str, Any] | None:
            async with slots:
                wait.polls[remote_task_id] += 1
                try:
                    record = await hook.get_task(remote_task_id)
                except RETRYABLE_ERRORS as error:
                    self.log.warning("Status call for %s failed, will try again: %s", remote_task_id, error)
                    record = None
                except ImageCbError as error:
                    return error_details(error, remote_task_id)
            if record is not None and record.is_terminal:
                self._ended(
                    wait, remote_task_id, record, "callback" if remote_task_id in wait.woken else "poll"
                )
                self._learn(wait, remote_task_id, record)
            else:
                estimate = RENDER_TIMES.estimate(self.imagecb_conn_id)
                wait.reschedule(remote_task_id, time.time(), self._interval(), estimate)
            return None

        errors = [e for e in await asyncio.gather(*(poll(remote_id) for remote_id in due)) if e]
        return errors[0] if errors else None

    def _ended(self, wait: _Wait, remote_task_id: str, record: TaskRecord, via: str) -> None:
        if wait.end(remote_task_id, record, via):
            self.log.info(
                "Image task %s ended: %s (via %s; %d of %d ended)",
                remote_task_id,
                record.outcome,
                via,
                len(wait.records),
                len(self.remote_task_ids),
            )

    def _learn(self, wait: _Wait, remote_task_id: str, record: TaskRecord) -> None:
        """Remember how long a successful image took (the API's own clock, else ours)."""
        if record.outcome != Outcome.SUCCESS:
            return  # failures often end early: they would make the guess too short
        if record.created_at and record.completed_at:
            seconds = (record.completed_at - record.created_at).total_seconds()
        elif remote_task_id in wait.submitted:
            seconds = time.time() - wait.submitted[remote_task_id]
        else:
            return
        RENDER_TIMES.observe(self.imagecb_conn_id, seconds)

    @asynccontextmanager
    async def _callbacks(self, hook: ImageCbAsyncHook) -> AsyncIterator[Any]:
        """The callback inbox of the pending tasks (callback mode), or nothing to wait on."""
        if self.wait_mode != "callback":
            async with nullcontext() as nothing:
                yield nothing
            return
        from imagecb_provider.callbacks.watcher import CallbackWatcher

        watcher = CallbackWatcher.for_connection(await hook.settings())
        async with watcher.subscribe(self.remote_task_ids) as inbox:
            yield inbox

    async def _take_callbacks(self, inbox: Any, wait: _Wait, pause: float) -> None:
        """Sleep ``pause`` seconds, or until callbacks arrive for pending tasks."""
        if inbox is None:
            await asyncio.sleep(pause)
            return
        for item in await inbox.get(timeout=pause):
            if item.remote_task_id not in wait.pending:
                continue
            # A callback only wakes its task: one status call reads the outcome and the URLs. Even
            # a signed body is not used, since the vendor's signature covers only the task id and
            # the timestamp, not what the body says happened.
            wait.pending[item.remote_task_id] = 0.0
            wait.woken.add(item.remote_task_id)

    def _event(self, status: str, wait: _Wait, *, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return task_event(
            status, records=wait.records, polls=wait.polls, via=wait.via, error=error, echo=self.echo
        )


class _Wait:
    """The state of one wait: when each pending task is next polled, and what has ended."""

    def __init__(
        self,
        remote_task_ids: list[str],
        first_poll_at: Mapping[str, float],
        default: float,
        submitted: Mapping[str, float],
    ):
        self.pending: dict[str, float] = {i: first_poll_at.get(i, default) for i in remote_task_ids}
        self.submitted = dict(submitted)
        self.records: dict[str, TaskRecord] = {}
        self.polls: dict[str, int] = dict.fromkeys(remote_task_ids, 0)
        self.via: dict[str, str] = {}
        self.woken: set[str] = set()  # told by an unsigned callback: the next status call confirms
        self._late_polls: dict[str, int] = {}  # tasks polled at their expected end: late polls left

    def expect(self, render_seconds: float | None, now: float) -> None:
        """Poll each task when it should be done, if that is before its next scheduled poll."""
        if render_seconds is None:
            return
        for remote_id, at in self.pending.items():
            if remote_id in self._late_polls or remote_id not in self.submitted:
                continue
            expected = self.submitted[remote_id] + render_seconds + EXPECTED_END_MARGIN
            if expected < at:
                self.pending[remote_id] = max(expected, now)
                self._late_polls[remote_id] = LATE_POLLS

    def reschedule(self, remote_id: str, now: float, interval: float, render_seconds: float | None) -> None:
        """The next poll of a task still generating: soon while it is late, else one interval on."""
        left = self._late_polls.get(remote_id, 0)
        if left and render_seconds:
            self._late_polls[remote_id] = left - 1
            self.pending[remote_id] = now + min(interval, max(2.0, render_seconds / 10))
        else:
            self.pending[remote_id] = now + interval

    def due(self, now: float) -> list[str]:
        return [remote_id for remote_id, at in self.pending.items() if at <= now]

    def next_due(self) -> float:
        return min(self.pending.values())

    def end(self, remote_task_id: str, record: TaskRecord, via: str) -> bool:
        """Record an ending; ``False`` when that task had already ended (a duplicate)."""
        if self.pending.pop(remote_task_id, None) is None:
            return False
        self.records[remote_task_id] = record
        self.via[remote_task_id] = via
        return True
