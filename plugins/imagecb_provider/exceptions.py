"""
Errors raised by the imagecb provider.

Two families, because Airflow must treat them differently:

* **API errors** come from a single HTTP call. Those a retry cannot fix (bad key, no credits,
  bad field, feature disabled, unknown task) derive from ``AirflowFailException`` so that
  Airflow fails the task at once instead of burning its retries; the transient ones are
  retried inside the hook and surface only once its attempts are spent.
* **Task outcome errors** describe how a remote generation ended. Content-policy rejections
  fail at once (the same prompt is flagged again); the other failures are retryable.

Messages never contain the API key or the webhook HMAC key: they are built only from the
vendor's ``msg``, the endpoint and the connection id.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException


class ImageCbError(AirflowException):
    """Base class of every error this provider raises."""


# --------------------------------------------------------------------------------- API errors
class ImageCbApiError(ImageCbError):
    """
    The API answered a call with a non-200 code (in the body or as the HTTP status).

    :param code: the vendor code (body ``code`` when present, else the HTTP status).
    :param msg: the vendor's message, shown as is.
    :param endpoint: the API path that was called.
    """

    #: What the user should do about it; subclasses say it plainly.
    advice: str = ""

    def __init__(self, code: int, msg: str, endpoint: str, *, retry_after: float | None = None) -> None:
        self.code = code
        self.msg = msg
        self.endpoint = endpoint
        self.retry_after = retry_after
        text = f"imagecb API answered {code} on {endpoint}: {msg or 'no message'}"
        if self.advice:
            text = f"{text}. {self.advice}"
        super().__init__(text)


class ImageCbPermanentApiError(ImageCbApiError, AirflowFailException):
    """An API error that no retry can fix: the task fails at once."""


class ImageCbAuthenticationError(ImageCbPermanentApiError):
    advice = (
        "The API key was refused: set a valid key as the password of the imagecb connection "
        "(see the connection id in the task log)"
    )


class ImageCbInsufficientCredits(ImageCbPermanentApiError):
    advice = "The account has run out of credits: top it up, then clear the task to run it again"


class ImageCbNotFound(ImageCbPermanentApiError):
    advice = "The task id is unknown to the API: check the remote task id, or the base URL of the connection"


class ImageCbValidationError(ImageCbPermanentApiError):
    advice = "The API rejected a request field: fix the value named in the message"


class ImageCbFeatureDisabled(ImageCbPermanentApiError):
    advice = "This feature or model is disabled for the account: choose another model or ask the vendor"


class ImageCbTransientApiError(ImageCbApiError):
    """Rate limit, maintenance or server error: retried with backoff inside the hook."""


class ImageCbRateLimited(ImageCbTransientApiError):
    advice = "Rate limited (about 20 submissions per 10 s per account); the request was not queued"


class ImageCbUnavailable(ImageCbTransientApiError):
    advice = "The service is unavailable or in maintenance; try again later"


class ImageCbServerError(ImageCbTransientApiError):
    advice = "Server error on the API side; try again later"


class ImageCbConnectionError(ImageCbError):
    """The API could not be reached or the connection broke before a full answer arrived."""


class ImageCbSubmissionUncertain(ImageCbError, AirflowFailException):
    """
    A submission was sent but its answer was lost, so the task may exist and be charged.

    The API has no idempotency key and no way to list tasks, so resubmitting automatically could
    pay for the same image twice: the task fails and a person decides (clear it to resubmit).
    """


class ImageCbLinkExpired(ImageCbError):
    """A file link was refused (expired pre-signed URL, 401/403/404/410): get a fresh one."""


class ImageCbCorruptFile(ImageCbError):
    """A downloaded file is not a whole image (bad signature, truncated, empty)."""


class ImageCbConfigurationError(ImageCbError, AirflowFailException):
    """The connection or an argument is set up wrongly; nothing was sent."""


class ImageCbProtocolError(ImageCbError):
    """The API answered something that is not its JSON envelope (wrong base URL or a proxy page)."""


class InvalidGenerationRequest(ImageCbError, AirflowFailException, ValueError):
    """
    A request field is invalid; raised before any HTTP call, so no credit is spent.

    :param field: the snake_case field name, as the operator argument is named.
    :param value: the rejected value.
    :param allowed: what would be accepted, in words.
    """

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = f"{shown[:77]}..."
        super().__init__(f"Invalid {field}={shown}: {allowed}")


class InvalidRemoteTaskId(ImageCbProtocolError, ValueError):
    """
    A remote task id that is not of the one strict form, wherever it came from.

    :param where: what carried it (``"the submit answer"``, ``"a callback body"``, ...).
    :param value: the refused value (shown shortened, never used).
    """

    def __init__(self, where: str, value: object) -> None:
        self.where = where
        shown = repr(value)
        if len(shown) > 40:
            shown = f"{shown[:37]}..."
        super().__init__(
            f"Refused the remote task id {shown} from {where}: a remote task id is 1 to 128 letters, "
            "digits, '_' or '-'"
        )


# ------------------------------------------------------------------------ task outcome errors
class ImageTaskFailed(ImageCbError):
    """
    A remote generation task ended without an image.

    :param result: the JSON-safe result dict of the task (see ``models.build_result``).
    """

    outcome: str = ""

    def __init__(self, message: str, result: dict | None = None) -> None:
        self.result = result or {}
        super().__init__(message)


class ImageContentPolicyViolation(ImageTaskFailed, AirflowFailException):
    """The prompt was flagged by the content policy; retrying the same prompt cannot help."""

    outcome = "content_policy"


class ImageInternalError(ImageTaskFailed):
    """Internal error, upstream timeout or create-task failure on the vendor side: retryable."""

    outcome = "internal_error"


class ImageGenerationFailed(ImageTaskFailed):
    """The generation itself failed; often transient, so retryable."""

    outcome = "generation_failed"


class ImageTaskTimeout(ImageTaskFailed):
    """Still generating at the deadline; a retry reconnects to the same remote task."""

    outcome = "timeout"


class ImageSubmissionUncertain(ImageTaskFailed, ImageCbSubmissionUncertain):
    """A submission whose answer was lost, settled as an outcome: fails at once, never resent."""

    outcome = "submission_uncertain"


#: Outcome name -> the error an operator raises for it with ``failure_mode="raise"``.
OUTCOME_ERRORS: dict[str, type[ImageTaskFailed]] = {
    cls.outcome: cls
    for cls in (
        ImageContentPolicyViolation,
        ImageInternalError,
        ImageGenerationFailed,
        ImageTaskTimeout,
        ImageSubmissionUncertain,
    )
}
