"""
``ImageGenerateOperator``: submit one image and wait for it, without ever paying for it twice.

The remote task id is written to Airflow's ``task_state_store`` before the wait starts. A later
try of the same task instance (after a worker crash, a triggerer restart or a timeout) finds it
there and reconnects instead of submitting again; only a stored task that failed, or one whose
try already finished (a rerun cleared from the UI asks for a new image), leads to a new
submission.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID, ImageCbHook
from imagecb_provider.links import GeneratedImageLink
from imagecb_provider.models import GenerationRequest, Outcome
from imagecb_provider.triggers.task import DEFAULT_POLL_INTERVAL, EVENT_DONE, task_event
from imagecb_provider.utils.waiting import ImageTaskWaitMixin, check_failure_mode, check_positive

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_TIMEOUT = timedelta(minutes=30)
#: ``task_state_store`` key; renaming it would orphan the remote tasks of in-flight retries.
STATE_KEY = "imagecb_submission"

#: Every request field is an operator argument of the same name.
_REQUEST_ARGS = GenerationRequest.field_names()


class SubmissionLedger:
    """
    The task instance's record of its remote submission, kept in ``task_state_store``.

    Keyed by (run, task, map index), so a value written in try 1 is read in try 2. Where the
    store is absent the ledger is a no-op and the operator warns that a retry will submit anew.
    """

    def __init__(self, context: Context) -> None:
        self._store = context.get("task_state_store")

    @property
    def available(self) -> bool:
        return self._store is not None

    def load(self) -> dict[str, Any] | None:
        entry = self._store.get(STATE_KEY) if self._store is not None else None
        return dict(entry) if isinstance(entry, Mapping) else None

    def save(self, entry: dict[str, Any]) -> None:
        if self._store is not None:
            self._store.set(STATE_KEY, entry)

    def finish(self) -> None:
        """Mark the submission as settled by a finished try: the next run makes a new image."""
        entry = self.load()
        if entry is not None and not entry.get("finished"):
            self.save({**entry, "finished": True})


class ImageGenerateOperator(ImageTaskWaitMixin, BaseOperator):
    """
    Generate (or edit) one image and return its result.

    Every request field of the API is an argument (snake_case) and templated; ``request`` takes
    them as one mapping instead (handy with ``.expand(request=...)``), explicit arguments
    winning. The request is validated before anything is sent: at DAG parse time when no
    argument is templated, else right after rendering.

    :param prompt: what to draw (or, with ``input_image``, how to edit it).
    :param request: request fields as a mapping of snake_case keys.
    :param imagecb_conn_id: the ``imagecb`` connection.
    :param deferrable: wait in the triggerer (default) instead of holding a worker slot.
    :param poll_interval: seconds between status calls (default 30, the vendor's advice).
    :param timeout: how long one try waits before failing with ``ImageTaskTimeout`` (retryable:
        the retry reconnects to the same remote task).
    :param failure_mode: ``"raise"`` maps failed outcomes to exceptions; ``"return"`` returns the
        result whatever the outcome, for a downstream branch.
    :param wait_for_completion: ``False`` submits only and returns the remote task id, for an
        ``ImageTaskSensor`` downstream.
    :return: the result dict (see DESIGN.md), or the remote task id without waiting.
    """

    template_fields: Sequence[str] = (
        *_REQUEST_ARGS,
        "request",
        "imagecb_conn_id",
        "poll_interval",
        "timeout",
    )
    template_fields_renderers = {"request": "json", "prompt": "md"}
    operator_extra_links = (GeneratedImageLink(),)
    ui_color = "#f4d9ff"

    def __init__(
        self,
        *,
        prompt: str | None = None,
        request: Mapping[str, Any] | None = None,
        enable_translation: bool | None = None,
        upload_cn: bool | None = None,
        input_image: str | None = None,
        aspect_ratio: str | None = None,
        output_format: str | None = None,
        prompt_upsampling: bool | None = None,
        model: str | None = None,
        callback_url: str | None = None,
        safety_tolerance: int | None = None,
        watermark: str | None = None,
        imagecb_conn_id: str = DEFAULT_CONN_ID,
        deferrable: bool = True,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        failure_mode: str = "raise",
        wait_for_completion: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prompt = prompt
        self.request = request
        self.enable_translation = enable_translation
        self.upload_cn = upload_cn
        self.input_image = input_image
        self.aspect_ratio = aspect_ratio
        self.output_format = output_format
        self.prompt_upsampling = prompt_upsampling
        self.model = model
        self.callback_url = callback_url
        self.safety_tolerance = safety_tolerance
        self.watermark = watermark
        self.imagecb_conn_id = imagecb_conn_id
        self.deferrable = deferrable
        # Both may come from DAG params ("{{ params.poll_interval }}"): checked now when literal,
        # else after rendering.
        self.poll_interval = (
            poll_interval if _is_templated(poll_interval) else check_positive("poll_interval", poll_interval)
        )
        self.timeout = timeout if _is_templated(timeout) else check_positive("timeout", timeout)
        self.failure_mode = check_failure_mode(failure_mode)
        self.wait_for_completion = wait_for_completion
        if not _is_templated({"request": request, **{name: getattr(self, name) for name in _REQUEST_ARGS}}):
            self.generation_request()  # a bad literal fails the DAG import, long before any credit

    # ----------------------------------------------------------------------- request
    def _request_fields(self) -> dict[str, Any]:
        explicit = {name: getattr(self, name) for name in _REQUEST_ARGS if getattr(self, name) is not None}
        return {**dict(self.request or {}), **explicit}

    def generation_request(self) -> GenerationRequest:
        """The validated request built from the (rendered) arguments."""
        return GenerationRequest.from_dict(self._request_fields())

    @cached_property
    def hook(self) -> ImageCbHook:
        return ImageCbHook(imagecb_conn_id=self.imagecb_conn_id)

    # ----------------------------------------------------------------------- execute
    def execute(self, context: Context) -> Any:
        request = self.generation_request()
        ledger = SubmissionLedger(context)
        if not ledger.available:
            self.log.warning(
                "task_state_store is not available: a retry of this task cannot reconnect to the "
                "image already submitted and will submit (and pay for) a new one"
            )
        submission = ledger.load()
        if submission and not submission.get("finished"):
            if not self.wait_for_completion:
                self.log.info(
                    "Image task %s was already submitted by an earlier try", submission["remote_task_id"]
                )
                ledger.finish()
                return submission["remote_task_id"]
            resumed = self._resume(context, submission, ledger)
            if resumed is not None:
                return resumed
        submission = self._submit(request, ledger)
        if not self.wait_for_completion:
            ledger.finish()
            return submission["remote_task_id"]
        return self._wait(context, submission)

    def _wait(self, context: Context, submission: dict[str, Any]) -> Any:
        return self.wait_for_remote_task(
            context,
            submission,
            poll_interval=check_positive("poll_interval", self.poll_interval),
            timeout=check_positive("timeout", self.timeout),
        )

    def _submit(self, request: GenerationRequest, ledger: SubmissionLedger) -> dict[str, Any]:
        remote_task_id = self.hook.submit(request)
        submission = {
            "remote_task_id": remote_task_id,
            "request": request.to_payload(include_callback=False),
            "submitted_at": datetime.now(UTC).isoformat(),
            "polls": 0,
            "finished": False,
        }
        ledger.save(submission)
        self.log.info("Submitted %r as image task %s", _shorten(request.prompt), remote_task_id)
        return submission

    def _resume(self, context: Context, submission: dict[str, Any], ledger: SubmissionLedger) -> Any:
        """Reconnect to the stored remote task; ``None`` means it failed and a new one is needed."""
        remote_task_id = submission["remote_task_id"]
        record = self.hook.get_task(remote_task_id)
        submission = {**submission, "polls": int(submission.get("polls", 0)) + 1}
        ledger.save(submission)
        if not record.is_terminal:
            self.log.info(
                "Reconnecting to image task %s, submitted by an earlier try; still generating", remote_task_id
            )
            return self._wait(context, submission)
        if record.outcome == Outcome.SUCCESS:
            self.log.info(
                "Image task %s, submitted by an earlier try, already succeeded: no new submission",
                remote_task_id,
            )
            event = task_event(
                EVENT_DONE, remote_task_id=remote_task_id, polls=0, record=record, submission=submission
            )
            return self.execute_complete(context, event)
        self.log.warning(
            "Image task %s from an earlier try ended with %s: submitting a new one",
            remote_task_id,
            record.outcome,
        )
        return None

    # ------------------------------------------------------------------ durable hooks
    def on_settled(self, context: Context, result: dict[str, Any]) -> None:
        # A timeout that will be retried keeps the submission open, so the retry reconnects.
        if result["outcome"] != Outcome.TIMEOUT or self.failure_mode == "return":
            SubmissionLedger(context).finish()

    def on_remote_task_error(self, context: Context, event: dict[str, Any]) -> None:
        if event.get("code") == 404:  # the remote task is gone: nothing left to reconnect to
            SubmissionLedger(context).finish()


def _is_templated(value: Any) -> bool:
    """Whether a value is still a Jinja template or an XCom reference (then validated after rendering)."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_is_templated(item) for item in value.values())
    return not isinstance(value, int | float | bool | timedelta | type(None))


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
