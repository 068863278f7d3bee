"""
``ImageTaskSensor``: wait for a remote image task submitted elsewhere.

Typical use: ``ImageGenerateOperator(wait_for_completion=False)`` submits and returns the remote
task id; this sensor waits for it. It gives the same result dict and the same outcome handling
as the operator, with the prompt and request read back from the task's record.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from imagecb_provider.exceptions import ImageCbConfigurationError, InvalidRemoteTaskId
from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID, ImageCbHook
from imagecb_provider.links import GeneratedImageLink
from imagecb_provider.models import Outcome, TaskRecord, build_result, remote_task_id
from imagecb_provider.triggers.task import EVENT_ERROR
from imagecb_provider.utils.waiting import (
    ImageTaskWaitMixin,
    check_failure_mode,
    check_positive,
    check_wait_mode,
    default_poll_interval,
    error_from_event,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_TIMEOUT = timedelta(minutes=30)


class ImageTaskSensor(ImageTaskWaitMixin, BaseSensorOperator):
    """
    Wait until the remote task ``remote_task_id`` ends, then return its result.

    :param remote_task_id: the API's task id (templated, e.g. an upstream XCom): 1 to 128 letters,
        digits, ``_`` or ``-``. Any other rendered value fails the task at once, before any status call.
    :param imagecb_conn_id: the ``imagecb`` connection.
    :param poke_interval: seconds between status calls (default 30; 300 in callback mode, where
        polling is only the safety net).
    :param timeout: how long to wait (default 30 minutes).
    :param deferrable: wait in the triggerer (default); otherwise ``mode`` (``poke`` or
        ``reschedule``) decides how the worker waits.
    :param wait_mode: ``"poll"`` or ``"callback"`` (woken by the callback the submitter asked
        for; deferrable only).
    :param failure_mode: ``"raise"`` or ``"return"``, as for ``ImageGenerateOperator``.
    """

    template_fields: Sequence[str] = ("remote_task_id", "imagecb_conn_id")
    operator_extra_links = (GeneratedImageLink(),)
    ui_color = "#e8d9ff"

    def __init__(
        self,
        *,
        remote_task_id: str,
        imagecb_conn_id: str = DEFAULT_CONN_ID,
        poke_interval: float | timedelta | None = None,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        deferrable: bool = True,
        wait_mode: str = "poll",
        failure_mode: str = "raise",
        **kwargs: Any,
    ) -> None:
        wait_mode = check_wait_mode(wait_mode)
        if poke_interval is None:
            poke_interval = default_poll_interval(wait_mode)
        super().__init__(
            poke_interval=check_positive("poke_interval", poke_interval),
            timeout=check_positive("timeout", timeout),
            **kwargs,
        )
        self.remote_task_id = remote_task_id
        self.imagecb_conn_id = imagecb_conn_id
        self.deferrable = deferrable
        self.wait_mode = wait_mode
        self.failure_mode = check_failure_mode(failure_mode)
        self._polls = 0

    @cached_property
    def hook(self) -> ImageCbHook:
        return ImageCbHook(imagecb_conn_id=self.imagecb_conn_id)

    def _checked_remote_task_id(self) -> str:
        """Return the rendered ``remote_task_id``, or fail with :class:`ImageCbConfigurationError`."""
        try:
            return remote_task_id(self.remote_task_id, "the rendered remote_task_id of ImageTaskSensor")
        except InvalidRemoteTaskId as error:
            # A retry would render the same value: fail at once (a configuration error), no status call.
            raise ImageCbConfigurationError(
                f"Invalid remote_task_id: {error}. Fix the template or the upstream value"
            ) from error

    def execute(self, context: Context) -> Any:
        self._checked_remote_task_id()
        if not self.deferrable:
            return super().execute(context)
        return self.wait_for_remote_tasks(
            context,
            [self.remote_task_id],
            poll_interval=float(self.poke_interval),
            timeout=float(self.timeout),
        )

    def poke(self, context: Context) -> PokeReturnValue | bool:
        record = self.hook.get_task(self._checked_remote_task_id())
        self._polls += 1
        self.log.info(
            "Image task %s is %s (status call %d)", self.remote_task_id, record.state.value, self._polls
        )
        if not record.is_terminal:
            return False
        return PokeReturnValue(is_done=True, xcom_value=self._settle(record, self._polls, "poll"))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger fired: return the result or raise by outcome."""
        if event["status"] == EVENT_ERROR:
            raise error_from_event(event["error"])
        data = event["records"].get(self.remote_task_id)
        record = TaskRecord.from_dict(data) if data else None
        via = event["via"].get(self.remote_task_id, "poll")
        return self._settle(record, int(event["polls"].get(self.remote_task_id, 0)), via)

    def _settle(self, record: TaskRecord | None, polls: int, via: str) -> dict[str, Any]:
        """The result of the ended task (``None``: still generating at the deadline)."""
        result = build_result(
            remote_task_id=self.remote_task_id,
            outcome=record.outcome if record and record.outcome else Outcome.TIMEOUT,
            record=record,
            request=record.params if record else {},
            submitted_at=None,
            polls=polls,
            via=via,
        )
        self.log_outcome(result)
        return self.deliver([result])[0]
