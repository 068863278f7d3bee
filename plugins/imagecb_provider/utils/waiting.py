"""
What the generate operators and the task sensor share: waiting for remote tasks (deferred to
:class:`ImageTaskTrigger`, or the same trigger run inline in the worker), checking the waiting
arguments and the connection, and turning outcomes into the returned results or, with
``failure_mode="raise"``, into the outcome's exception.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from logging import Logger
from typing import TYPE_CHECKING, Any, Protocol

from imagecb_provider.exceptions import OUTCOME_ERRORS, ImageCbConfigurationError, ImageCbError
from imagecb_provider.hooks.protocol import error_for
from imagecb_provider.models import Outcome, parse_timestamp
from imagecb_provider.triggers.task import (
    DEFAULT_POLL_INTERVAL,
    DEFAULT_SAFETY_POLL_INTERVAL,
    WAIT_MODES,
    ImageTaskTrigger,
)

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.triggers.base import BaseTrigger

    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings, ImageCbHook

FAILURE_MODES = ("raise", "return")
#: How long past its own deadline the trigger may run before Airflow's deferral timeout fires:
#: the trigger's timeout event is the normal path (it is retryable); Airflow's is the backstop.
DEFERRAL_GRACE = 120.0
#: Outcomes whose error a retry may fix; the others fail the task at once. An upload that failed
#: is one: the retry uploads again (free) and nothing was charged.
RETRYABLE_OUTCOMES = frozenset(
    {Outcome.INTERNAL_ERROR, Outcome.GENERATION_FAILED, Outcome.TIMEOUT, Outcome.UPLOAD_FAILED}
)


class WaitingTask(Protocol):
    """What :class:`ImageTaskWaitMixin` needs of the operator it is mixed into."""

    imagecb_conn_id: str
    deferrable: bool
    failure_mode: str
    wait_mode: str
    log: Logger

    def defer(self, *, trigger: BaseTrigger, method_name: str, timeout: timedelta | None = None) -> None: ...


def check_positive(name: str, value: float | str | timedelta) -> float:
    """Seconds from a number, a rendered template string or a timedelta; must be above zero."""
    try:
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    except (TypeError, ValueError):
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive number of seconds")
    return seconds


def check_choice(name: str, value: str, choices: Sequence[str], meaning: str) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: must be {meaning}")
    return value


def check_bool(name: str, value: bool | str) -> bool:
    """A flag, or the text a rendered template gives for one (``"True"``, ``"false"``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"{name}={value!r}: must be true or false")


def check_failure_mode(value: str) -> str:
    return check_choice(
        "failure_mode", value, FAILURE_MODES, "'raise' (fail the task) or 'return' (return the result)"
    )


def check_wait_mode(value: str) -> str:
    return check_choice(
        "wait_mode", value, WAIT_MODES, "'poll' (status calls) or 'callback' (woken by the vendor's callback)"
    )


def default_poll_interval(wait_mode: str) -> float:
    """30 s when polling; 5 minutes when polling is only the safety net of callback mode."""
    return DEFAULT_SAFETY_POLL_INTERVAL if wait_mode == "callback" else DEFAULT_POLL_INTERVAL


def connection_settings(hook: ImageCbHook) -> ImageCbConnectionSettings:
    """
    Return the settings of the hook's connection; one that is not defined fails at once, naming it.

    Airflow's own error (``The conn_id ... isn't defined``) is retried like any error, and says
    neither what type of connection is wanted nor how to make one.

    :param hook: the hook whose ``imagecb_conn_id`` to read.
    :raises ImageCbConfigurationError: no connection of that id in any secrets backend, or one
        without an API key or with an invalid extra.
    """
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return hook.settings
    except AirflowNotFoundException:
        conn_id = hook.imagecb_conn_id
        conn_json = json.dumps({"conn_type": "imagecb", "password": "<API key>"})
        raise ImageCbConfigurationError(
            f"Connection {conn_id!r} is not defined. Create it (type imagecb, the API key as password): "
            f"airflow connections add {conn_id} --conn-json '{conn_json}', or set the environment "
            f"variable AIRFLOW_CONN_{conn_id.upper()} to that JSON; or point imagecb_conn_id at a "
            "connection that exists. Nothing was submitted"
        ) from None


def error_from_event(details: Mapping[str, Any]) -> ImageCbError:
    """Rebuild the API error a trigger reported, so it fails (or retries) the task as it would have."""
    if details.get("code") is not None:
        return error_for(int(details["code"]), details.get("msg") or "", details.get("endpoint") or "")
    return ImageCbError(details.get("message") or "the image task trigger reported an error")


async def _first_event(trigger: ImageTaskTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise ImageCbError("the image task trigger ended without an event")  # pragma: no cover


class ImageTaskWaitMixin:
    """Wait for remote tasks in the triggerer (or inline) and deliver outcomes."""

    def wait_for_remote_tasks(
        self: WaitingTask,
        context: Context,
        remote_task_ids: Sequence[str],
        *,
        poll_interval: float,
        timeout: float,
        first_poll_at: Mapping[str, float] | None = None,
        submitted_at: Mapping[str, float] | None = None,
        echo: Any = None,
    ) -> Any:
        """
        Defer to :class:`ImageTaskTrigger` (or run it inline) and finish in ``execute_complete``.

        :param remote_task_ids: the remote tasks to wait for, together.
        :param poll_interval: seconds between status calls of one task.
        :param timeout: seconds from now until the wait ends with a timeout event.
        :param first_poll_at: Unix time of each task's first status call (default: one interval).
        :param submitted_at: Unix time each task was submitted (to poll it when it should be done).
        :param echo: JSON-safe data the event hands back to ``execute_complete``.
        """
        trigger = ImageTaskTrigger(
            remote_task_ids=remote_task_ids,
            deadline=time.time() + timeout,
            imagecb_conn_id=self.imagecb_conn_id,
            poll_interval=poll_interval,
            first_poll_at=first_poll_at,
            submitted_at=submitted_at,
            wait_mode=self.wait_mode,
            echo=echo,
        )
        if self.deferrable:
            self.defer(
                trigger=trigger,
                method_name="execute_complete",
                timeout=timedelta(seconds=timeout + poll_interval + DEFERRAL_GRACE),
            )
        return self.execute_complete(context, asyncio.run(_first_event(trigger)))  # type: ignore[attr-defined]

    def log_outcome(self: WaitingTask, result: Mapping[str, Any]) -> None:
        """One line per ended image: outcome, how long it took, how it was learned."""
        submitted = parse_timestamp(result["submitted_at"])
        ended = parse_timestamp(result["completed_at"]) or datetime.now(UTC)
        self.log.info(
            "%s ended: %s after %s, %d status call(s), via %s%s",
            f"Image task {result['task_id']}"
            if result["task_id"]
            else f"Request {str(result['prompt'])[:60]!r} (no remote task id)",
            result["outcome"],
            # the API's clock, not ours, stamps the end: never report a negative duration
            f"{max((ended - submitted).total_seconds(), 0.0):.0f} s" if submitted else "an unknown time",
            result["polls"],
            result["via"],
            f": {result['message']}" if result["message"] else "",
        )

    def deliver(self: WaitingTask, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """
        Return the results, or with ``failure_mode="raise"`` raise the error of the failures.

        When several requests failed, a retryable outcome (internal error, generation failed,
        timeout, upload failed) wins, so that Airflow retries; content-policy rejections and uncertain
        submissions alone fail the task at once.
        """
        failed = [r for r in results if r["outcome"] != Outcome.SUCCESS]
        if not failed or self.failure_mode == "return":
            return results
        retryable = [r for r in failed if r["outcome"] in RETRYABLE_OUTCOMES]
        first = (retryable or failed)[0]
        error = OUTCOME_ERRORS[first["outcome"]]
        if len(results) == 1:
            message = f"Image task {first['task_id']} ended with {first['outcome']}: {first['message']}"
        else:
            counts = ", ".join(f"{n} {o}" for o, n in _count(failed).items())
            message = f"{len(failed)} of {len(results)} images failed ({counts}); first: {first['message']}"
        raise error(message, first)


def _count(results: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    return counts
