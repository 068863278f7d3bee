"""
What the generate operator and the task sensor share: waiting for a remote task (deferred to
:class:`ImageTaskTrigger`, or the same trigger run inline in the worker) and turning the wait's
single event into the result dict and, with ``failure_mode="raise"``, into an exception.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from imagecb_provider.exceptions import OUTCOME_ERRORS, ImageCbError
from imagecb_provider.hooks.protocol import error_for
from imagecb_provider.models import Outcome, TaskRecord, build_result, parse_timestamp
from imagecb_provider.triggers.task import EVENT_DONE, EVENT_ERROR, ImageTaskTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

FAILURE_MODES = ("raise", "return")
#: How long past its own deadline the trigger may run before Airflow's deferral timeout fires:
#: the trigger's timeout event is the normal path (it is retryable); Airflow's is the backstop.
DEFERRAL_GRACE = 120.0


def check_positive(name: str, value: float | str | timedelta) -> float:
    """Seconds from a number, a rendered template string or a timedelta; must be above zero."""
    try:
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    except (TypeError, ValueError):
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive number of seconds")
    return seconds


def check_failure_mode(value: str) -> str:
    if value not in FAILURE_MODES:
        raise ValueError(
            f"failure_mode={value!r}: must be 'raise' (fail the task) or 'return' (return the result)"
        )
    return value


async def _first_event(trigger: ImageTaskTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise ImageCbError("the image task trigger ended without an event")  # pragma: no cover


def error_from_event(event: dict[str, Any]) -> ImageCbError:
    """Rebuild the API error a trigger reported, so it fails (or retries) the task as it would have."""
    if event.get("code") is not None:
        return error_for(int(event["code"]), event.get("msg") or "", event.get("endpoint") or "")
    return ImageCbError(event.get("message") or "the image task trigger reported an error")


class ImageTaskWaitMixin:
    """
    Wait for a remote task and settle its outcome; used by operators with these attributes:
    ``imagecb_conn_id``, ``deferrable``, ``failure_mode`` and ``log``.
    """

    imagecb_conn_id: str
    deferrable: bool
    failure_mode: str

    def wait_for_remote_task(
        self, context: Context, submission: dict[str, Any], *, poll_interval: float, timeout: float
    ) -> Any:
        """
        Defer to the trigger (or run it inline) and finish in :meth:`execute_complete`.

        ``submission`` describes what was sent (``remote_task_id``, ``request``,
        ``submitted_at``, ``polls`` so far); the trigger hands it back in its event, so the
        result can be built after the deferral even without ``task_state_store``.
        """
        trigger = ImageTaskTrigger(
            remote_task_id=submission["remote_task_id"],
            deadline=time.time() + timeout,
            imagecb_conn_id=self.imagecb_conn_id,
            poll_interval=poll_interval,
            submission=submission,
        )
        if self.deferrable:
            self.defer(  # type: ignore[attr-defined]
                trigger=trigger,
                method_name="execute_complete",
                timeout=timedelta(seconds=timeout + poll_interval + DEFERRAL_GRACE),
            )
        return self.execute_complete(context, asyncio.run(_first_event(trigger)))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger fired: build the result, then return it or raise by outcome."""
        submission = event.get("submission") or {"remote_task_id": event.get("remote_task_id")}
        polls = int(submission.get("polls", 0)) + int(event.get("polls", 0))
        if event["status"] == EVENT_ERROR:
            self.on_remote_task_error(context, event)
            raise error_from_event(event)
        record = TaskRecord.from_dict(event["record"]) if event.get("record") else None
        outcome = record.outcome if event["status"] == EVENT_DONE and record else Outcome.TIMEOUT
        result = build_result(
            remote_task_id=submission["remote_task_id"],
            outcome=outcome,
            record=record,
            request=submission.get("request") or (record.params if record else {}),
            submitted_at=submission.get("submitted_at"),
            polls=polls,
            via="poll",
        )
        return self.settle(context, result)

    def settle(self, context: Context, result: dict[str, Any]) -> dict[str, Any]:
        """Log the outcome, then return the result or raise the outcome's error."""
        submitted = parse_timestamp(result["submitted_at"])
        ended = parse_timestamp(result["completed_at"]) or datetime.now(UTC)
        self.log.info(  # type: ignore[attr-defined]
            "Image task %s ended: %s after %s and %d status calls (submitted %s, completed %s)%s",
            result["task_id"],
            result["outcome"],
            f"{(ended - submitted).total_seconds():.0f} s" if submitted else "an unknown time",
            result["polls"],
            result["submitted_at"],
            result["completed_at"],
            f": {result['message']}" if result["message"] else "",
        )
        self.on_settled(context, result)
        if result["outcome"] == Outcome.SUCCESS or self.failure_mode == "return":
            return result
        error = OUTCOME_ERRORS[result["outcome"]]
        raise error(
            f"Image task {result['task_id']} ended with {result['outcome']}: {result['message']}", result
        )

    # Hooks for subclasses that keep durable state.
    def on_settled(self, context: Context, result: dict[str, Any]) -> None:
        """Called once the outcome is known, before returning or raising."""

    def on_remote_task_error(self, context: Context, event: dict[str, Any]) -> None:
        """Called when the wait ended with an API error instead of an outcome."""
