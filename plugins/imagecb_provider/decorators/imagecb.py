"""
``@task.imagecb``: a TaskFlow function computes the request, the task generates the image.

The decorated function returns the request: a prompt string, or a mapping of request fields in
snake_case (as :class:`~imagecb_provider.models.GenerationRequest` and the arguments of
:class:`~imagecb_provider.operators.generate.ImageGenerateOperator` name them). The task is an
``ImageGenerateOperator`` in every other respect: it submits, waits (deferrable by default),
reconnects on a retry through the same submission ledger, and returns the same result dict.

Input images
------------
``input_image`` takes what ``ImageGenerateOperator`` takes: a public ``http(s)`` link, or a file
uploaded when the request is sent (a local path, a ``file://``, ``s3://``, ``gs://``... URL, an
``ObjectStoragePath``, kept in the request as its URL string). So edits chain: the function of
the next step returns ``{"prompt": ..., "input_image": archived["files"][0]["path"]}``, the path
an ``ImageArchiveOperator`` wrote the previous image to.

When the request is computed
----------------------------
The function is called while the task's templates are rendered, before ``execute``. So the
request is a rendered field (``request``) that Airflow stores before anything is submitted: the
UI's *Rendered Template* tab shows it during the wait, and it names what a failed try asked for.

A retry must ask for the same image, or the submission ledger sees a changed request and pays
for a new one. The first try of a run therefore keeps its validated request in
``task_state_store`` (key :data:`REQUEST_STATE_KEY`): its retries, and its own resumption after
the wait, take that request instead of calling the function again. A rerun cleared from the UI
calls the function anew (the upstream data may have changed). A request that fails validation
is not kept: the task fails at once, naming the field, before any credit is spent.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk.bases.decorator import (
    DecoratedOperator,
    TaskDecorator,
    determine_kwargs,
    task_decorator_factory,
)
from airflow.sdk.definitions._internal.types import SET_DURING_EXECUTION, ArgNotSet
from airflow.sdk.definitions.context import context_merge

from imagecb_provider.exceptions import InvalidGenerationRequest
from imagecb_provider.models import GenerationRequest
from imagecb_provider.operators.generate import ImageGenerateOperator, _is_templated
from imagecb_provider.utils.generation import is_new_run

if TYPE_CHECKING:
    import jinja2
    from airflow.sdk import Context

#: ``task_state_store`` key of the request the first try of a run computed.
REQUEST_STATE_KEY = "imagecb_taskflow_request"
#: Stands in for the prompt when the decorator's literal request fields are checked at parse time.
_PROMPT_PLACEHOLDER = "prompt computed at run time"
_RETURN_TYPES = "a prompt (a string) or a mapping of request fields (snake_case)"


class _ImageGenerateDecoratedOperator(DecoratedOperator, ImageGenerateOperator):
    """
    Call the Python callable for the request, then generate it as ``ImageGenerateOperator`` does.

    :param python_callable: the function that returns the request.
    :param op_args: positional arguments of the function (templated).
    :param op_kwargs: keyword arguments of the function (templated).
    :param kwargs: ``ImageGenerateOperator`` arguments; request fields given here win over the
        function's (e.g. ``aspect_ratio`` for every mapped instance).
    """

    template_fields: Sequence[str] = (
        *DecoratedOperator.template_fields,
        *ImageGenerateOperator.template_fields,
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {
        **DecoratedOperator.template_fields_renderers,
        **ImageGenerateOperator.template_fields_renderers,
    }
    custom_operator_name: str = "@task.imagecb"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            request=SET_DURING_EXECUTION,
            **kwargs,
        )
        self._check_literal_fields()

    def _check_literal_fields(self) -> None:
        """Fail the DAG import on a bad literal request field given to the decorator itself."""
        given = {name: getattr(self, name) for name in GenerationRequest.field_names()}
        given = {name: value for name, value in given.items() if value is not None}
        if given and not _is_templated(given):
            GenerationRequest.from_dict({"prompt": _PROMPT_PLACEHOLDER, **given})

    def _do_render_template_fields(
        self,
        parent: Any,
        template_fields: Iterable[str],
        context: Context,
        jinja_env: jinja2.Environment,
        seen_oids: set[int],
    ) -> None:
        """Render the fields, then compute the request (also for a mapped instance, rendered here)."""
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)
        if parent is self:
            self._set_request(context)

    def _set_request(self, context: Context) -> None:
        """Take the request this run already validated, or call the function and keep its answer."""
        store = context.get("task_state_store")
        ti = context.get("ti")
        kept = store.get(REQUEST_STATE_KEY) if store is not None else None
        if _applies(kept, context):
            self.log.info("Using the request computed in try %s of this run", kept["try_number"])
            self.request = kept["request"]
            return
        self.request = _as_request(self._call_function(context))
        try:
            self.request = self.generation_requests()[0].to_dict()
        except InvalidGenerationRequest:
            return  # left as returned, for the rendered field; execute fails on it before sending
        if store is not None and ti is not None:
            store.set(REQUEST_STATE_KEY, {"try_number": ti.try_number, "request": self.request})

    def _call_function(self, context: Context) -> Any:
        context_merge(context, self.op_kwargs)
        kwargs = determine_kwargs(self.python_callable, self.op_args, context)
        return self.python_callable(*self.op_args, **kwargs)

    def generation_requests(self) -> list[GenerationRequest]:
        """The one validated request: the function's answer, with the decorator's fields winning."""
        if not isinstance(self.request, Mapping):
            raise InvalidGenerationRequest(
                "request", self.request, f"the @task.imagecb function must return {_RETURN_TYPES}"
            )
        return super().generation_requests()

    def execute(self, context: Context) -> Any:
        if isinstance(self.request, ArgNotSet):  # called without rendering (e.g. directly in a test)
            self._set_request(context)
        return super().execute(context)


def _as_request(returned: Any) -> Any:
    """A prompt string becomes ``{"prompt": ...}``; a mapping a dict; anything else is left to fail."""
    if isinstance(returned, str):
        return {"prompt": returned}
    if isinstance(returned, Mapping):
        return dict(returned)
    return returned


def _applies(kept: Any, context: Context) -> bool:
    """Whether a kept request belongs to this run: a retry, or the same try resuming after its wait."""
    if not isinstance(kept, Mapping) or not isinstance(kept.get("request"), Mapping):
        return False
    ti = context.get("ti")
    return not is_new_run(context) or kept.get("try_number") == getattr(ti, "try_number", None)


def imagecb_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """
    Wrap a function that returns an image request into an image generation task.

    Registered as ``@task.imagecb``. The function's return value is the request: a prompt
    string, or a mapping of snake_case request fields. The task then behaves exactly like
    ``ImageGenerateOperator`` (deferrable by default; ``wait_mode``, ``poll_interval``,
    ``timeout``, ``failure_mode``, ``retries``...) and returns the result dict. It maps like any
    TaskFlow task (``.partial()``, ``.expand()``).

    :param python_callable: the function to decorate.
    :param multiple_outputs: push the result's keys as separate XComs (default ``False``: the
        result dict is one XCom, whatever the function's return annotation says).
    :param kwargs: ``ImageGenerateOperator`` and ``BaseOperator`` arguments.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=bool(multiple_outputs),
        decorated_operator_class=_ImageGenerateDecoratedOperator,
        **kwargs,
    )
