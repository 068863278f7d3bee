"""
The wire rules shared by the sync and the async hook: endpoints, the vendor's envelope, the
mapping of codes to errors, what a record-info answer means, and the retry policy.

Both hooks call :func:`parse_envelope` on every answer, read record-info through
:func:`record_from_answer` and :func:`record_from_error`, and retry with the same
:class:`RetryPolicy`, so a 429 behaves the same in a worker and in the triggerer.

The codes, as :func:`error_for` maps them (docs/api-fidelity.md gives the source of each):

* 401, 402, 422, 505: permanent, the task fails at once with advice.
* 404, and on record-info the other two forms of "no such task" (HTTP 200 with code 422 saying
  the record does not exist; code 200 with ``data: null``): :class:`ImageCbTaskUnknown`, which a
  generate operator answers by retiring the remote task from its slot.
* 429, 455, 5xx: transient, retried with backoff inside the hook. A 429 to a submission that
  asks to wait longer than :data:`CAP_RETRY_AFTER` is a cap, not a burst:
  :class:`ImageCbRateCapped`, never retried (the generate operators stop submitting).
* 501 ("Generation Failed") on generate and record-info: an outcome, ``generation_failed``, never
  retried by the hook. A submission answered 501 created nothing, so resending it at once would
  only meet the same answer; the generate operators record the request as ended without a remote
  task, and the next try (a retry or a cleared rerun) sends it again.
* 408 (upstream gave no result for over 10 minutes): transient on record-info and the other
  calls (the status call is retried); on generate an outcome, ``internal_error``, not resent in
  that try. That last mapping is a guess: the vendor documents 408 only for tasks, and an error
  answer carries no ``taskId``, so nothing is known to have been created or charged.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import tenacity
from tenacity import RetryCallState

from imagecb_provider.exceptions import (
    ImageCbApiError,
    ImageCbAuthenticationError,
    ImageCbConnectionError,
    ImageCbFeatureDisabled,
    ImageCbGenerationFailedAnswer,
    ImageCbInsufficientCredits,
    ImageCbNotFound,
    ImageCbPermanentApiError,
    ImageCbProtocolError,
    ImageCbRateCapped,
    ImageCbRateLimited,
    ImageCbServerError,
    ImageCbSubmissionUpstreamTimeout,
    ImageCbTaskUnknown,
    ImageCbTransientApiError,
    ImageCbUnavailable,
    ImageCbUpstreamTimeout,
    ImageCbValidationError,
)
from imagecb_provider.models import Outcome, TaskRecord, TaskState, read_code

DEFAULT_BASE_URL = "https://api.kie.ai"
USER_AGENT = "airflow-provider-imagecb"
DEFAULT_TIMEOUT = 30.0
#: The vendor's documented account limit: about 20 new generation requests per 10 seconds.
DEFAULT_SUBMISSIONS_PER_10S = 20.0
#: A 429 to a submission asking to wait longer than this (seconds) is a cap, not a burst: six
#: windows of the documented 10-s limit. The vendor documents neither the header nor the caps'
#: answer; this threshold is the provider's choice.
CAP_RETRY_AFTER = 60.0

GENERATE_PATH = "/api/v1/flux/kontext/generate"
RECORD_INFO_PATH = "/api/v1/flux/kontext/record-info"
CREDIT_PATH = "/api/v1/chat/credit"
DOWNLOAD_URL_PATH = "/api/v1/common/download-url"

_ERROR_BY_CODE: dict[int, type[ImageCbApiError]] = {
    401: ImageCbAuthenticationError,
    402: ImageCbInsufficientCredits,
    404: ImageCbNotFound,
    422: ImageCbValidationError,
    429: ImageCbRateLimited,
    455: ImageCbUnavailable,
    505: ImageCbFeatureDisabled,
}
#: Codes that mean something of their own on one endpoint (see the module docstring).
_ERROR_BY_ENDPOINT_CODE: dict[tuple[str, int], type[ImageCbApiError]] = {
    (RECORD_INFO_PATH, 404): ImageCbTaskUnknown,
    (RECORD_INFO_PATH, 501): ImageCbGenerationFailedAnswer,
    (GENERATE_PATH, 501): ImageCbGenerationFailedAnswer,
    (GENERATE_PATH, 408): ImageCbSubmissionUpstreamTimeout,
}
#: The API's own calls; file downloads (any other "endpoint") keep the plain HTTP meaning of 408/501.
API_PATHS = (GENERATE_PATH, RECORD_INFO_PATH, CREDIT_PATH, DOWNLOAD_URL_PATH)

log = logging.getLogger(__name__)


def error_for(code: int, msg: str, endpoint: str, retry_after: float | None = None) -> ImageCbApiError:
    """
    Return the error class for an API ``code`` on ``endpoint`` (see the module docstring).

    Permanent ones fail at once; 429, 455, 5xx and 408 (but on generate) are retried; 501 on
    generate or record-info and 408 on generate are outcomes, never retried by the hook.

    :param code: the vendor's code (the body's, else the HTTP status).
    :param msg: the vendor's message.
    :param endpoint: the API path called, or the link shown for a file download.
    :param retry_after: seconds the answer asked to wait, if it said.
    """
    cls = _ERROR_BY_ENDPOINT_CODE.get((endpoint, code)) or _ERROR_BY_CODE.get(code)
    if code == 429 and endpoint == GENERATE_PATH and (retry_after or 0) > CAP_RETRY_AFTER:
        cls = ImageCbRateCapped
    if cls is None and code == 408 and endpoint in API_PATHS:
        cls = ImageCbUpstreamTimeout
    if cls is None:
        cls = ImageCbServerError if code >= 500 else ImageCbPermanentApiError
    return cls(code, msg, endpoint, retry_after=retry_after)


# A query string inside a text: a "?" that ends a word's path ("x.jpg?", "/p?") and the rest of
# that word, up to a space, a quote or a bracket. Prose ("ok? yes") has a space after its "?".
_QUERY = re.compile(r"""(?<=\S)\?[^\s"'<>()\[\]{}]+""")


def without_query(text: str) -> str:
    """
    Return a URL, or a text holding URLs, fit for a message or a log: every query string dropped.

    Pre-signed file links carry their signature in the query (``X-Amz-Signature=...``). This is the
    one helper every message or log line that may hold a file link goes through: the hooks' errors,
    the retry log, the archive's lines.

    :param text: one URL (all after its first ``?`` goes), or any text (the query of each URL in it goes).
    """
    if not any(c.isspace() for c in text):
        return text.partition("?")[0]
    return _QUERY.sub("", text)


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """``Retry-After`` as seconds, from either of its forms (delta seconds or an HTTP date)."""
    value = (headers or {}).get("Retry-After") or (headers or {}).get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None  # "nan" would sleep forever
    try:
        from datetime import datetime

        return max((parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def parse_envelope(status: int, body: bytes | str, headers: Mapping[str, str] | None, endpoint: str) -> Any:
    """
    Return the ``data`` of a successful answer, or raise the error it carries.

    The vendor often answers errors as HTTP 200 with the real code in the body, and sometimes
    as a real HTTP status: the body ``code`` is the truth when it is a number (or a numeric
    string), the status otherwise. Whatever the body holds, only an
    :class:`~imagecb_provider.exceptions.ImageCbError` is raised.

    :param status: the HTTP status.
    :param body: the raw body.
    :param headers: the answer's headers (``Retry-After`` is read).
    :param endpoint: the API path called, for the error and the code mapping.
    """
    retry_after = parse_retry_after(headers)
    try:
        payload = json.loads(body) if body else None
    except (ValueError, RecursionError):  # RecursionError: a body nested thousands deep
        payload = None
    if not isinstance(payload, dict) or "code" not in payload:
        if status >= 400:
            raise error_for(status, f"HTTP {status} without the API's JSON envelope", endpoint, retry_after)
        raise ImageCbProtocolError(
            f"imagecb API answered HTTP {status} on {endpoint} with a body that is not its JSON envelope; "
            "check the base URL (host) of the connection"
        )
    code = read_code(payload["code"])
    msg = _message(payload.get("msg"))
    if code is None:
        if status >= 400:
            code = status
        else:
            raise ImageCbProtocolError(
                f"imagecb API answered HTTP {status} on {endpoint} with an envelope whose code is not a "
                "number; check the base URL (host) of the connection"
            )
    if code == 200:
        return payload.get("data")
    raise error_for(code, msg, endpoint, retry_after)


def _message(value: Any) -> str:
    """The envelope's ``msg`` as text; ``null`` and the string ``"null"`` are no message."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "null"):
        return ""
    return str(value)


# --------------------------------------------------------------------------- record-info
# A 422 on record-info that says there is no such record, in any case: "The record does not exist"
# (third-party clients' report), "record is null" (the vendor's own 422 text on a sister endpoint,
# the 4o Image download-url), "Task not found", "task ... doesn't exist".
_NO_SUCH_RECORD = re.compile(
    r"\b(?:record|task)(?:s|id|_id)?\b.*(?:\bnot\s+(?:exists?|found)|n['\u2019]t\s+exists?|\bis\s+null\b)",
    re.IGNORECASE | re.DOTALL,
)


def record_from_answer(data: Any, remote_task_id: str) -> TaskRecord:
    """
    Read the ``data`` of a successful record-info answer for ``remote_task_id`` as a record.

    ``data: null`` (or the string ``"null"``) is how the API answers for a task it does not know
    in one of its forms: :class:`ImageCbTaskUnknown`, naming the task. Any other ``data`` is read
    by :meth:`TaskRecord.from_record_info`, which raises only ``ImageCbProtocolError``.

    :param data: what :func:`parse_envelope` returned.
    :param remote_task_id: the task asked for.
    """
    if data is None or (isinstance(data, str) and data.strip().lower() in ("", "null")):
        raise ImageCbTaskUnknown(
            404,
            f"remote task {remote_task_id} is unknown to the API: record-info answered code 200, data null",
            RECORD_INFO_PATH,
        )
    return TaskRecord.from_record_info(data)


def record_from_error(error: ImageCbApiError, remote_task_id: str) -> TaskRecord:
    """
    Turn the error a record-info call for ``remote_task_id`` raised into what it means; raise it.

    * 404, or a 422 whose message says the record or task does not exist: raises
      :class:`ImageCbTaskUnknown` naming the remote task and quoting the answer.
    * any other 422: raises :class:`ImageCbValidationError`, its message naming the remote task.
    * 501: returns the task's record, ended ``generation_failed`` (code 501, the vendor's message).
    * anything else: raises ``error`` as it is.

    :param error: the error the call raised (already scrubbed of secrets).
    :param remote_task_id: the task asked for.
    """
    if isinstance(error, ImageCbNotFound) or (
        isinstance(error, ImageCbValidationError) and _NO_SUCH_RECORD.search(error.msg or "")
    ):
        said = f"code {error.code}" + (f" ({error.msg})" if error.msg else "")
        raise ImageCbTaskUnknown(
            404,
            f"remote task {remote_task_id} is unknown to the API: record-info answered {said}",
            error.endpoint,
            retry_after=error.retry_after,
        ) from None
    if isinstance(error, ImageCbValidationError):
        raise ImageCbValidationError(
            error.code,
            f"{error.msg or 'validation error'} (record-info of remote task {remote_task_id})",
            error.endpoint,
            retry_after=error.retry_after,
        ) from None
    if isinstance(error, ImageCbGenerationFailedAnswer):
        return TaskRecord(
            task_id=remote_task_id,
            state=TaskState.GENERATE_FAILED,
            outcome=Outcome.GENERATION_FAILED,
            code=error.code,
            message=error.msg,
        )
    raise error


# ------------------------------------------------------------------------------- retries
RETRYABLE_ERRORS = (ImageCbTransientApiError, ImageCbConnectionError)


@dataclass(frozen=True)
class RetryPolicy:
    """
    Bounded exponential backoff with jitter for transient API errors.

    ``Retry-After`` from the API wins over the computed backoff (capped at
    ``max_retry_after``). ``sleep`` replaces the real sleep, so tests can record the waits
    instead of spending them; it may be a plain function or a coroutine function.
    """

    max_attempts: int = 6
    initial_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 1.0
    max_retry_after: float = 600.0
    sleep: Callable[[float], Any] | None = None

    def wait_seconds(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception()  # tenacity waits only after an attempt ended
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        backoff = tenacity.wait_exponential_jitter(
            multiplier=self.initial_delay, max=self.max_delay, jitter=self.jitter
        )
        return backoff(retry_state)

    def _common(self, retry_on: tuple[type[BaseException], ...]) -> dict[str, Any]:
        return {
            "stop": tenacity.stop_after_attempt(self.max_attempts),
            "wait": self.wait_seconds,
            "retry": tenacity.retry_if_exception_type(retry_on),
            "reraise": True,
            "before_sleep": self._log_retry,
        }

    def retrying(self, retry_on: tuple[type[BaseException], ...] = RETRYABLE_ERRORS) -> tenacity.Retrying:
        kwargs = self._common(retry_on)
        if self.sleep is not None:
            kwargs["sleep"] = self.sleep
        return tenacity.Retrying(**kwargs)

    def async_retrying(
        self, retry_on: tuple[type[BaseException], ...] = RETRYABLE_ERRORS
    ) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(sleep=self._async_sleep, **self._common(retry_on))

    async def _async_sleep(self, seconds: float) -> None:
        if self.sleep is None:
            await asyncio.sleep(seconds)
            return
        result = self.sleep(seconds)
        if inspect.isawaitable(result):
            await result

    def _log_retry(self, retry_state: RetryCallState) -> None:
        # before_sleep runs once tenacity has the attempt's outcome and the next wait
        # The error text may hold a file link: never its pre-signed query.
        log.warning(
            "imagecb API call failed (%s); attempt %d of %d, retrying in %.1f s",
            without_query(str(retry_state.outcome.exception())),
            retry_state.attempt_number,
            self.max_attempts,
            retry_state.next_action.sleep,
        )


DEFAULT_RETRY_POLICY = RetryPolicy()
