"""
The wire rules shared by the sync and the async hook: endpoints, the vendor's envelope, the
mapping of codes to errors, and the retry policy.

Both hooks call :func:`parse_envelope` on every answer and retry with the same
:class:`RetryPolicy`, so a 429 behaves the same in a worker and in the triggerer.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
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
    ImageCbInsufficientCredits,
    ImageCbNotFound,
    ImageCbPermanentApiError,
    ImageCbProtocolError,
    ImageCbRateLimited,
    ImageCbServerError,
    ImageCbTransientApiError,
    ImageCbUnavailable,
    ImageCbValidationError,
)

DEFAULT_BASE_URL = "https://api.kie.ai"
USER_AGENT = "airflow-provider-imagecb"
DEFAULT_TIMEOUT = 30.0
#: The vendor's documented account limit: about 20 new generation requests per 10 seconds.
DEFAULT_SUBMISSIONS_PER_10S = 20.0

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

log = logging.getLogger(__name__)


def error_for(code: int, msg: str, endpoint: str, retry_after: float | None = None) -> ImageCbApiError:
    """The error class for an API ``code``: permanent ones fail at once, 429/455/5xx are retried."""
    cls = _ERROR_BY_CODE.get(code)
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
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        from datetime import datetime

        return max((parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def parse_envelope(status: int, body: bytes | str, headers: Mapping[str, str] | None, endpoint: str) -> Any:
    """
    Return the ``data`` of a successful answer, or raise the error it carries.

    The vendor often answers errors as HTTP 200 with the real code in the body, and sometimes
    as a real HTTP status: the body ``code`` is the truth when present, the status otherwise.
    """
    retry_after = parse_retry_after(headers)
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    if not isinstance(payload, dict) or "code" not in payload:
        if status >= 400:
            raise error_for(status, f"HTTP {status} without the API's JSON envelope", endpoint, retry_after)
        raise ImageCbProtocolError(
            f"imagecb API answered HTTP {status} on {endpoint} with a body that is not its JSON envelope; "
            "check the base URL (host) of the connection"
        )
    try:
        code = int(payload["code"])
    except (TypeError, ValueError):
        code = status
    if code == 200:
        return payload.get("data")
    raise error_for(code, str(payload.get("msg") or ""), endpoint, retry_after)


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
