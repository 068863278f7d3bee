"""
``ImageTaskTrigger``: wait for one remote image task without holding a worker slot.

A thousand of these share one triggerer event loop, so ``run`` only ever awaits: the status call
goes through :class:`ImageCbAsyncHook` (aiohttp, connection read in a thread) and the wait is
``asyncio.sleep``. Each poll is jittered so that a batch submitted in one burst does not poll in
lockstep. The trigger never submits anything: the triggerer may run it twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from imagecb_provider.exceptions import ImageCbApiError, ImageCbError
from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID, ImageCbAsyncHook
from imagecb_provider.hooks.protocol import RETRYABLE_ERRORS
from imagecb_provider.models import TaskRecord

DEFAULT_POLL_INTERVAL = 30.0
DEFAULT_JITTER = 0.1

#: ``status`` values of the single event the trigger fires.
EVENT_DONE = "done"
EVENT_TIMEOUT = "timeout"
EVENT_ERROR = "error"


def task_event(
    status: str,
    *,
    remote_task_id: str,
    polls: int,
    record: TaskRecord | None = None,
    submission: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """
    The payload of the one event a wait ends with; also built directly by an operator that finds
    the task already ended, so every ending goes through the same ``execute_complete``.
    """
    return {
        "status": status,
        "polls": polls,
        "remote_task_id": remote_task_id,
        "record": record.to_dict() if record else None,
        "submission": submission or {},
    }


class ImageTaskTrigger(BaseTrigger):
    """
    Poll a remote task every ``poll_interval`` seconds (± ``jitter``) until it ends or ``deadline``.

    Fires exactly one event: ``{"status": "done", "record": ...}`` with the normalized
    :class:`TaskRecord`, ``{"status": "timeout", ...}`` when the task is still generating at the
    deadline (an event rather than a raise: a trigger that raises fails the task without
    retries), or ``{"status": "error", ...}`` for an API error no retry can fix. Transient errors
    (429, 455, 5xx, network) are ridden out until the deadline. Every event carries ``polls``,
    the number of status calls made.

    :param remote_task_id: the API's task id.
    :param deadline: Unix time after which the wait ends with a timeout event. Absolute, so a
        trigger rebuilt after a triggerer restart keeps the same deadline.
    :param imagecb_conn_id: the ``imagecb`` connection; only its id is held, never the key.
    :param poll_interval: seconds between status calls (the vendor recommends 30).
    :param jitter: relative spread of each interval (0.1 means ±10 %).
    :param submission: what the waiting task needs back with the event (remote id, request
        payload, submission time, polls so far): JSON-safe and free of secrets. It rides in the
        event because deferral kwargs do not reach ``execute_complete`` under ``dags test``.
    """

    def __init__(
        self,
        remote_task_id: str,
        deadline: float,
        imagecb_conn_id: str = DEFAULT_CONN_ID,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        jitter: float = DEFAULT_JITTER,
        submission: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.submission = submission or {}
        self.remote_task_id = remote_task_id
        self.deadline = float(deadline)
        self.imagecb_conn_id = imagecb_conn_id
        self.poll_interval = float(poll_interval)
        self.jitter = float(jitter)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "remote_task_id": self.remote_task_id,
                "deadline": self.deadline,
                "imagecb_conn_id": self.imagecb_conn_id,
                "poll_interval": self.poll_interval,
                "jitter": self.jitter,
                "submission": self.submission,
            },
        )

    def _hook(self) -> ImageCbAsyncHook:
        return ImageCbAsyncHook(imagecb_conn_id=self.imagecb_conn_id)

    def _next_wait(self) -> float:
        spread = random.uniform(1 - self.jitter, 1 + self.jitter)
        return max(0.0, min(self.poll_interval * spread, self.deadline - time.time()))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self._hook()
        started = time.monotonic()
        polls = 0
        last_state: str | None = None
        record: TaskRecord | None = None
        self.log.info(
            "Waiting for image task %s: a status call every %.3g s (±%.0f %%)",
            self.remote_task_id,
            self.poll_interval,
            self.jitter * 100,
        )
        while True:
            await asyncio.sleep(self._next_wait())
            polls += 1
            try:
                record = await hook.get_task(self.remote_task_id)
            except RETRYABLE_ERRORS as error:
                self.log.warning(
                    "Status call %d for %s failed, will try again: %s", polls, self.remote_task_id, error
                )
            except ImageCbError as error:
                yield TriggerEvent(self._error_event(error, polls))
                return
            elapsed = time.monotonic() - started
            if record is not None and record.state.value != last_state:
                last_state = record.state.value
                self.log.info(
                    "Image task %s is %s (status call %d, %.0f s)",
                    self.remote_task_id,
                    last_state,
                    polls,
                    elapsed,
                )
            if record is not None and record.is_terminal:
                yield TriggerEvent(self._event(EVENT_DONE, polls, record))
                return
            if time.time() >= self.deadline:
                self.log.warning(
                    "Image task %s still generating at the deadline (%.0f s)", self.remote_task_id, elapsed
                )
                yield TriggerEvent(self._event(EVENT_TIMEOUT, polls, record))
                return

    def _event(self, status: str, polls: int, record: TaskRecord | None = None) -> dict[str, Any]:
        return task_event(
            status, remote_task_id=self.remote_task_id, polls=polls, record=record, submission=self.submission
        )

    def _error_event(self, error: ImageCbError, polls: int) -> dict[str, Any]:
        event = {**self._event(EVENT_ERROR, polls), "message": str(error), "error_type": type(error).__name__}
        if isinstance(error, ImageCbApiError):
            event.update(code=error.code, msg=error.msg, endpoint=error.endpoint)
        return event
