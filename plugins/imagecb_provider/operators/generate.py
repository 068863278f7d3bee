"""
Generate images and wait for them, without ever paying for one twice.

``ImageGenerateOperator`` makes one image; ``ImageBatchGenerateOperator`` makes a list of them
in one task: it submits every request (paced under the account's rate limit) and defers once, to
one trigger that watches all of them, so a batch costs a few task runs per group of images
instead of several per image. Both record each submission in ``task_state_store`` before the
wait; see :mod:`imagecb_provider.utils.generation` for what a retry or a cleared rerun does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from imagecb_provider.exceptions import InvalidGenerationRequest
from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID, ImageCbHook
from imagecb_provider.links import GeneratedImageLink
from imagecb_provider.models import GenerationRequest, Outcome
from imagecb_provider.utils.generation import GenerationMixin
from imagecb_provider.utils.pacing import DEFAULT_MAX_IN_FLIGHT
from imagecb_provider.utils.waiting import (
    ImageTaskWaitMixin,
    check_bool,
    check_failure_mode,
    check_positive,
    check_wait_mode,
    connection_settings,
    default_poll_interval,
)

if TYPE_CHECKING:
    from airflow.sdk import Context, ObjectStoragePath

DEFAULT_TIMEOUT = timedelta(minutes=30)
#: Every request field is an argument of ``ImageGenerateOperator`` with the same name.
_REQUEST_ARGS = GenerationRequest.field_names()


class _GenerateBase(GenerationMixin, ImageTaskWaitMixin, BaseOperator):
    """The waiting arguments both generate operators share (see their docstrings)."""

    operator_extra_links = (GeneratedImageLink(),)
    #: A batch rerun keeps what succeeded; a single image cleared from the UI is made anew.
    reuse_successes = False

    def __init__(
        self,
        *,
        imagecb_conn_id: str = DEFAULT_CONN_ID,
        deferrable: bool | str = True,
        wait_mode: str = "poll",
        poll_interval: float | str | None = None,
        timeout: float | timedelta | str = DEFAULT_TIMEOUT,
        failure_mode: str = "raise",
        resubmit_outcomes: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.imagecb_conn_id = imagecb_conn_id
        self.deferrable = deferrable if _is_templated(deferrable) else check_bool("deferrable", deferrable)
        self.wait_mode = wait_mode if _is_templated(wait_mode) else check_wait_mode(wait_mode)
        if poll_interval is None:
            poll_interval = default_poll_interval(wait_mode)
        # Both may come from DAG params ("{{ params.poll_interval }}"): checked now when literal,
        # else after rendering.
        self.poll_interval = (
            poll_interval if _is_templated(poll_interval) else check_positive("poll_interval", poll_interval)
        )
        self.timeout = timeout if _is_templated(timeout) else check_positive("timeout", timeout)
        self.failure_mode = check_failure_mode(failure_mode)
        self.resubmit_outcomes = _check_outcomes(resubmit_outcomes)

    @cached_property
    def hook(self) -> ImageCbHook:
        return ImageCbHook(imagecb_conn_id=self.imagecb_conn_id)

    def generate(self, context: Context, *, submit: bool = True) -> Any:
        """
        Check the arguments and the setup, then submit and wait (see :class:`GenerationMixin`).

        Before anything is sent: the rendered arguments must be valid, the connection must exist,
        and in callback mode its ``callback_base_url`` must lead to the receiver; otherwise the task
        fails naming the fix.

        :param submit: ``False`` only plans and submits, without waiting.
        """
        # The arguments first: a bad rendered value is the DAG's fault, whatever the deployment.
        wait_mode = check_wait_mode(self.wait_mode)
        check_bool("deferrable", self.deferrable)
        self.generation_requests()
        settings = connection_settings(self.hook)
        if wait_mode == "callback":
            from imagecb_provider.callbacks.client import check_receiver

            self.log.info("Callback mode: callbacks go to %s", check_receiver(settings))
        return super().generate(context, submit=submit)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Describe this run for OpenLineage: the requests (and inlets) read, the remote tasks made."""
        from imagecb_provider.utils.openlineage import generation_lineage

        return generation_lineage(
            conn_id=self.imagecb_conn_id,
            inlets=self.inlets,
            requests=self.generation_requests,
            task_instance=task_instance,
        )


class ImageGenerateOperator(_GenerateBase):
    """
    Generate (or edit) one image and return its result.

    Every request field of the API is an argument (snake_case) and templated; ``request`` takes
    them as one mapping instead (handy with ``.expand(request=...)``), explicit arguments
    winning. The request is validated before anything is sent: at DAG parse time when no
    argument is templated, else right after rendering.

    :param prompt: what to draw (or, with ``input_image``, how to edit it).
    :param input_image: the image to edit: a public ``http(s)`` link (sent as it is), or a file
        read on the worker and uploaded through the vendor's File Upload API when the request is
        sent: a local path, a ``file://``, ``s3://``, ``gs://``... URL (``scheme://conn_id@...``
        names the Airflow connection), or an ``ObjectStoragePath``; e.g. the ``files[].path`` of
        an ``ImageArchiveOperator`` result, to edit an image made upstream. A file is checked
        (exists, a PNG, JPEG or WEBP image, at most 10 MiB) before anything is sent; a refused
        one raises :class:`~imagecb_provider.exceptions.InvalidInputImage` (no retry), an upload
        that fails through its retries ends ``upload_failed`` (retryable). Each content is
        uploaded once while its link lives, whatever the retries, resubmissions and reruns.
    :param request: request fields as a mapping of snake_case keys.
    :param imagecb_conn_id: the ``imagecb`` connection.
    :param deferrable: wait in the triggerer (default) instead of holding a worker slot.
    :param wait_mode: ``"poll"`` (status calls every ``poll_interval``) or ``"callback"`` (woken
        by the vendor's callback through the receiver on the API server; polling every
        ``poll_interval`` only as a safety net). Callback mode needs the connection extra
        ``callback_base_url``.
    :param poll_interval: seconds between status calls (default 30 when polling, 300 in callback
        mode).
    :param timeout: how long one try waits before its outcome is ``timeout`` (retryable: the
        retry reconnects to the same remote task).
    :param failure_mode: ``"raise"`` maps failed outcomes to exceptions; ``"return"`` returns the
        result whatever the outcome, for a downstream branch.
    :param resubmit_outcomes: outcomes (e.g. ``["internal_error"]``) after which the request is
        submitted once more within the same try.
    :param wait_for_completion: ``False`` submits only and returns the remote task id, for an
        ``ImageTaskSensor`` downstream. A submission that ends uncertain (its answer lost or not
        usable), not sent (the account refused it) or whose input image was not uploaded has no
        id to return: it raises with ``failure_mode="raise"``, else returns ``None``.
    :return: the result dict, or the remote task id without waiting.
    """

    template_fields: Sequence[str] = (
        *_REQUEST_ARGS,
        "request",
        "imagecb_conn_id",
        "poll_interval",
        "timeout",
        "wait_mode",
    )
    template_fields_renderers = {"request": "json", "prompt": "md"}
    ui_color = "#f4d9ff"
    #: One request: a refused input file fails the task at once, naming it (nothing else goes on).
    raise_invalid_input = True

    def __init__(
        self,
        *,
        prompt: str | None = None,
        request: Mapping[str, Any] | None = None,
        enable_translation: bool | None = None,
        upload_cn: bool | None = None,
        input_image: str | os.PathLike[str] | ObjectStoragePath | None = None,
        aspect_ratio: str | None = None,
        output_format: str | None = None,
        prompt_upsampling: bool | None = None,
        model: str | None = None,
        callback_url: str | None = None,
        safety_tolerance: int | None = None,
        watermark: str | None = None,
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
        self.wait_for_completion = wait_for_completion
        if not _is_templated({"request": request, **{name: getattr(self, name) for name in _REQUEST_ARGS}}):
            self.generation_requests()  # a bad literal fails the DAG import, long before any credit

    def generation_requests(self) -> list[GenerationRequest]:
        """The one validated request built from the (rendered) arguments."""
        explicit = {name: getattr(self, name) for name in _REQUEST_ARGS if getattr(self, name) is not None}
        return [GenerationRequest.from_dict({**dict(self.request or {}), **explicit})]

    def execute(self, context: Context) -> Any:
        if not self.wait_for_completion:
            entry = self.generate(context, submit=False)
            if entry.slots[0].outcome in (
                Outcome.SUBMISSION_UNCERTAIN,
                Outcome.NOT_SENT,
                Outcome.UPLOAD_FAILED,
            ):
                # No id to hand on to a sensor: report the outcome (raised with failure_mode="raise").
                self._finish(context, entry)
                return None
            return entry.slots[0].remote_task_id
        return self.generate(context)

    def present(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """One request, one result."""
        return results[0]


class ImageBatchGenerateOperator(_GenerateBase):
    """
    Generate a list of images in one task and return one result per request, in order.

    It submits every request, paced under the account's rate limit (the connection extra
    ``submissions_per_10s``), records each in ``task_state_store``, and defers once to one
    trigger that waits for all of them. Each result is exactly what ``ImageGenerateOperator``
    returns, plus ``earlier`` (the remote tasks replaced by a resubmission). Put every task that
    submits in the pool ``imagecb_submissions``, whose slots the connection extra
    ``submission_slots`` gives (each task paces at its share), so the account's limit holds across
    tasks; a deferred task does not hold its pool slot.

    A retry reconnects to every stored remote task; a rerun cleared from the UI submits anew only
    the requests that did not succeed (successes are reused, timeouts reconnected to).

    :param requests: the requests, each a mapping of snake_case request fields (templated). An
        ``input_image`` takes the forms ``ImageGenerateOperator`` takes; a refused or failed
        upload ends only that request ``upload_failed`` (nothing sent for it), the others go on.
    :param group_label: what this group works on, for the UI (e.g. ``"lines 2-51"``); use it as the
        mapped instance's name with ``map_index_template="{{ task.group_label }}"``.
    :param imagecb_conn_id: the ``imagecb`` connection.
    :param deferrable: wait in the triggerer (default) instead of holding a worker slot
        (templated, e.g. from a DAG param).
    :param wait_mode: ``"poll"`` or ``"callback"``, as for ``ImageGenerateOperator``.
    :param poll_interval: seconds between status calls of each image (default 30; 300 in
        callback mode).
    :param timeout: how long one wait lasts; images still generating then end with ``timeout``.
    :param failure_mode: ``"raise"`` fails the task when an image failed (a retryable outcome wins,
        so Airflow retries, and the retry resubmits only the failed ones); ``"return"`` returns
        every result, for routing downstream.
    :param resubmit_outcomes: outcomes after which a request is submitted once more within the
        same try (the batch DAG uses ``internal_error`` and ``generation_failed``).
    :param max_in_flight: the most submissions waiting for their answers at once (default 16),
        when the account's rate lets several go out within 0.25 s; at the documented 20 per 10 s
        one is. A crash of the task can leave at most this many ``submission_uncertain``.
    :return: the list of result dicts, in request order.
    """

    template_fields: Sequence[str] = (
        "requests",
        "group_label",
        "imagecb_conn_id",
        "poll_interval",
        "timeout",
        "wait_mode",
        "deferrable",
    )
    template_fields_renderers = {"requests": "json"}
    ui_color = "#ecd2ff"
    reuse_successes = True

    def __init__(
        self,
        *,
        requests: Sequence[Mapping[str, Any]] | str,
        group_label: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.requests = requests
        self.group_label = group_label
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight!r}: must be a positive integer")
        self.max_in_flight = max_in_flight
        if not _is_templated(requests):
            self.generation_requests()

    def generation_requests(self) -> list[GenerationRequest]:
        """Every request, validated; a bad one is named by its position and field."""
        if isinstance(self.requests, str | bytes) or not isinstance(self.requests, Sequence):
            raise InvalidGenerationRequest(
                "requests", self.requests, "must be a list of request mappings (snake_case fields)"
            )
        validated = []
        for position, fields in enumerate(self.requests):
            if not isinstance(fields, Mapping):
                raise InvalidGenerationRequest(f"requests[{position}]", fields, "must be a mapping of fields")
            try:
                validated.append(GenerationRequest.from_dict(fields))
            except InvalidGenerationRequest as error:
                raise InvalidGenerationRequest(
                    f"requests[{position}].{error.field}", error.value, error.allowed
                ) from None
        return validated

    def execute(self, context: Context) -> list[dict[str, Any]]:
        return self.generate(context)

    def present(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return results


def _check_outcomes(outcomes: Sequence[str]) -> tuple[str, ...]:
    known = {o.value for o in Outcome} - {Outcome.SUCCESS.value}
    bad = [o for o in outcomes if o not in known]
    if bad or isinstance(outcomes, str):
        raise ValueError(f"resubmit_outcomes={outcomes!r}: must be a list of {', '.join(sorted(known))}")
    return tuple(outcomes)


def _is_templated(value: Any) -> bool:
    """Whether a value is still a Jinja template or an XCom reference (then validated after rendering)."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_is_templated(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_is_templated(item) for item in value)
    return not isinstance(value, int | float | bool | timedelta | type(None))
