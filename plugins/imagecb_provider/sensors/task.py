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

from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID, ImageCbHook
from imagecb_provider.links import GeneratedImageLink
from imagecb_provider.triggers.task import DEFAULT_POLL_INTERVAL, EVENT_DONE, task_event
from imagecb_provider.utils.waiting import ImageTaskWaitMixin, check_failure_mode, check_positive

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_TIMEOUT = timedelta(minutes=30)


class ImageTaskSensor(ImageTaskWaitMixin, BaseSensorOperator):
    """
    Wait until the remote task ``remote_task_id`` ends, then return its result.

    :param remote_task_id: the API's task id (templated, e.g. an upstream XCom).
    :param imagecb_conn_id: the ``imagecb`` connection.
    :param poke_interval: seconds between status calls (default 30).
    :param timeout: how long to wait (default 30 minutes).
    :param deferrable: wait in the triggerer (default); otherwise ``mode`` (``poke`` or
        ``reschedule``) decides how the worker waits.
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
        poke_interval: float | timedelta = DEFAULT_POLL_INTERVAL,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        deferrable: bool = True,
        failure_mode: str = "raise",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            poke_interval=check_positive("poke_interval", poke_interval),
            timeout=check_positive("timeout", timeout),
            **kwargs,
        )
        self.remote_task_id = remote_task_id
        self.imagecb_conn_id = imagecb_conn_id
        self.deferrable = deferrable
        self.failure_mode = check_failure_mode(failure_mode)
        self._polls = 0

    @cached_property
    def hook(self) -> ImageCbHook:
        return ImageCbHook(imagecb_conn_id=self.imagecb_conn_id)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        return self.wait_for_remote_task(
            context, self._submission(), poll_interval=float(self.poke_interval), timeout=float(self.timeout)
        )

    def poke(self, context: Context) -> PokeReturnValue | bool:
        record = self.hook.get_task(self.remote_task_id)
        self._polls += 1
        self.log.info(
            "Image task %s is %s (status call %d)", self.remote_task_id, record.state.value, self._polls
        )
        if not record.is_terminal:
            return False
        event = task_event(
            EVENT_DONE,
            remote_task_id=self.remote_task_id,
            polls=self._polls,
            record=record,
            submission=self._submission(),
        )
        return PokeReturnValue(is_done=True, xcom_value=self.execute_complete(context, event))

    def _submission(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the result needs about the submission; the sensor only knows what the record tells."""
        return {
            "remote_task_id": self.remote_task_id,
            "request": params or {},
            "submitted_at": None,
            "polls": 0,
        }
