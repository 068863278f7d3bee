"""
Errors raised by the imagecb provider.

Two families, because Airflow must treat them differently:

* **API errors** come from a single HTTP call. Those a retry cannot fix (bad key, no credits,
  bad field, feature disabled, unknown task) derive from ``AirflowFailException`` so that
  Airflow fails the task at once instead of burning its retries; the transient ones are
  retried inside the hook and surface only once its attempts are spent.
* **Outcome answers** are API errors whose code says how a generation ended rather than what is
  wrong with the call (:class:`ImageCbOutcomeAnswer`): 501 ("Generation Failed") and 408 (upstream
  gave no result for over 10 minutes). A submission answered 501 or 408 created nothing (no
  ``taskId``): it is never resent by the hook's transient retry, and the generate operators settle
  that request with the outcome (``generation_failed``, ``internal_error``) instead. On
  record-info, 501 ends the task with ``generation_failed`` and 408 is retried as transient.
* **Task outcome errors** describe how a remote generation ended. Content-policy rejections
  fail at once (the same prompt is flagged again); the other failures are retryable, and a retry
  submits the request anew (``internal_error``, ``generation_failed``) or reconnects to it
  (``timeout``).

Messages never contain the API key or the webhook HMAC key: they are built only from the
vendor's ``msg``, the endpoint and the connection id.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException


def shortened(value: object, limit: int) -> str:
    """
    Return ``repr(value)``, cut to ``limit`` characters with an ellipsis: how errors show what they refused.

    :param value: the refused value.
    :param limit: the most characters shown.
    """
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[: limit - 3]}..."


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
        super().__init__(self.describe())

    def describe(self) -> str:
        """Return the error's text: what was answered where, then the advice."""
        text = f"imagecb API answered {self.code} on {self.endpoint}: {self.msg or 'no message'}"
        return f"{text}. {self.advice}" if self.advice else text


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


class ImageCbTaskUnknown(ImageCbNotFound):
    """
    Record-info named a remote task the API does not know, in any of the forms it answers so.

    The forms: HTTP or body code 404; HTTP 200 with body code 422 and a message saying the record
    (or task) does not exist; HTTP 200 with code 200 and ``data: null``. ``code`` is 404 whichever
    form came (the one code the rest of the provider reads as "unknown task"), and ``msg`` names
    the remote task and quotes what the API answered. A generate operator retires the task from
    its slot, so the next try submits that request anew instead of meeting the same answer.
    """

    advice = (
        "A remote task the API does not know (expired, or never created on this account) cannot be "
        "polled: a generate task retires it and submits that request anew on its next try; otherwise "
        "check the remote task id and the base URL of the connection"
    )

    def describe(self) -> str:
        # Not "answered 404": the API may have said it with a 200 or a 422; msg says which.
        return f"imagecb API on {self.endpoint}: {self.msg or 'unknown remote task'}. {self.advice}"


class ImageCbValidationError(ImageCbPermanentApiError):
    advice = "The API rejected a request field: fix the value named in the message"


class ImageCbFeatureDisabled(ImageCbPermanentApiError):
    advice = "This feature or model is disabled for the account: choose another model or ask the vendor"


class ImageCbTransientApiError(ImageCbApiError):
    """Rate limit, maintenance or server error: retried with backoff inside the hook."""


class ImageCbRateLimited(ImageCbTransientApiError):
    advice = "Rate limited (about 20 submissions per 10 s per account); the request was not queued"


class ImageCbRateCapped(ImageCbPermanentApiError):
    """
    The account refused submissions for longer than a burst: a per-key hourly, daily or total cap.

    Raised instead of :class:`ImageCbRateLimited` when a 429 asks to wait longer than
    :data:`~imagecb_provider.utils.limiter.CAP_RETRY_AFTER`, or when the same submission was
    refused with 429 through every attempt of the hook's retry policy (over 30 s, three windows of
    the documented 10-s limit). A generate task then stops submitting: its unsent requests end
    ``not_sent`` and the account is put on hold for every other task.
    """

    advice = (
        "The account refused submissions for longer than a burst (the key's hourly, daily or total "
        "cap, see the key's settings): nothing more is sent until it lifts; clear the run then, and "
        "only the requests never sent are sent"
    )


class ImageCbUnavailable(ImageCbTransientApiError):
    advice = "The service is unavailable or in maintenance; try again later"


class ImageCbServerError(ImageCbTransientApiError):
    advice = "Server error on the API side; try again later"


class ImageCbOutcomeAnswer(ImageCbApiError):
    """
    An answer whose code tells how a generation ended, not what is wrong with the call (501, 408).

    :attr outcome: the outcome name (``models.Outcome``) the request or task ends with.
    """

    outcome: str = ""


class ImageCbGenerationFailedAnswer(ImageCbOutcomeAnswer):
    """
    Code 501 ("Generation Failed") on generate or record-info: never retried by the hook.

    On a submission nothing was created (no ``taskId``), so the request ends ``generation_failed``
    and the next try (or a cleared rerun) may send it again; resending it at once would only meet
    the same answer (one prompt answered 501 was sent 12 times over 2 tries before this mapping).
    """

    outcome = "generation_failed"
    advice = "The generation failed on the vendor's side; a later try may send the request again"


class ImageCbUpstreamTimeout(ImageCbOutcomeAnswer, ImageCbTransientApiError):
    """Code 408 (upstream gave no result for over 10 minutes) on a status call: retried as transient."""

    outcome = "internal_error"
    advice = "The vendor's upstream gave no result in time; the call is retried"


class ImageCbSubmissionUpstreamTimeout(ImageCbOutcomeAnswer):
    """
    Code 408 answered to a submission: the request ends ``internal_error``, not resent in this try.

    A guess, as the vendor documents 408 only for tasks: like every error answer it carries no
    ``taskId``, so nothing the provider could poll (or be charged for) is known to exist. Resending
    at once could meet the same upstream wait; the next try sends it again.
    """

    outcome = "internal_error"
    advice = "The vendor's upstream gave no result in time; the next try sends the request again"


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


class ImageCbMalformedAnswer(ImageCbProtocolError, ValueError):
    """
    An answer in the API's envelope whose fields are not of the documented form.

    A ``ValueError`` too, so code that refuses a malformed body as a bad value (the callback
    receiver) refuses this one the same way.

    :param where: what carried it (``"a record-info answer"``, ``"a callback body"``).
    :param field: the field, as the vendor names it (``"response.resultImageUrl"``).
    :param value: the refused value (shown shortened).
    :param expected: what the field should hold, in words.
    """

    def __init__(self, where: str, field: str, value: object, expected: str) -> None:
        self.where = where
        self.field = field
        shown = shortened(value, 60)
        super().__init__(f"Refused {where}: its {field} is {shown}, expected {expected}")


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
        shown = shortened(value, 80)
        super().__init__(f"Invalid {field}={shown}: {allowed}")


class InvalidInputImage(InvalidGenerationRequest):
    """
    An input image that cannot be sent: missing, not a PNG, JPEG or WEBP image, or too large.

    Raised while the file is read, before anything is uploaded or submitted, so nothing is spent;
    a retry would read the same file, so the task fails at once.

    :param source: the file as shown (a path or URL without query or credentials).
    :param reason: what is wrong with it, in words.
    :param fix: what to do about it, in words.
    """

    def __init__(self, source: str, reason: str, fix: str) -> None:
        self.source = source
        self.reason = reason
        self.fix = fix
        self.field, self.value, self.allowed = "input_image", source, f"{reason}; {fix}"
        # Not InvalidGenerationRequest's text: a path cut at 80 characters would lose its file name.
        super(InvalidGenerationRequest, self).__init__(
            f"Invalid input_image {shortened(source, 400)}: {reason}; {fix}"
        )


class InputImageUnavailable(ImageCbError):
    """An input image's store failed the read (credentials, bucket, network): retryable, nothing was sent."""


class InvalidRemoteTaskId(ImageCbProtocolError, ValueError):
    """
    A remote task id that is not of the one strict form, wherever it came from.

    :param where: what carried it (``"the submit answer"``, ``"a callback body"``, ...).
    :param value: the refused value (shown shortened, never used).
    """

    def __init__(self, where: str, value: object) -> None:
        self.where = where
        shown = shortened(value, 40)
        super().__init__(
            f"Refused the remote task id {shown} from {where}: a remote task id is 1 to 128 letters, "
            "digits, '_' or '-'"
        )


class ImageCbArchiveTargetRefused(ImageCbError, AirflowFailException):
    """
    A file the archive will not write: its name is not a remote task id, or its path leaves the destination.

    Nothing was written for it. A retry would meet the same id, so the task fails at once.

    :param remote_task_id: what the file would have been named after (shown shortened, never used).
    :param destination: the archive's destination folder.
    :param reason: why, in words.
    """

    def __init__(self, remote_task_id: object, destination: object, reason: str) -> None:
        self.remote_task_id = remote_task_id
        self.destination = str(destination)
        self.reason = reason
        shown = shortened(remote_task_id, 40)
        super().__init__(
            f"Refused to archive remote task id {shown} into {self.destination}: {reason}; "
            "nothing was written"
        )


class ImageCbArchiveUnavailable(ImageCbError):
    """An object store refused or failed the destination check (credentials, bucket, network): retryable."""


class ImageCbDownloadRefused(ImageCbError, AirflowFailException):
    """A file link (or a redirect) this connection does not download from; fails at once, never retried."""


class ImageCbReceiverUnreachable(ImageCbError):
    """
    The callback receiver did not answer its health check (network error, timeout, 5xx); nothing was sent.

    Retryable, unlike :class:`~imagecb_provider.exceptions.ImageCbConfigurationError` (an answer
    that proves the URL wrong): the API server may be restarting.
    """


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
    """
    Internal error (500), upstream timeout (408) or create-task failure on the vendor side.

    Also a submission answered 408 (nothing created). Retryable: a retry submits the request anew.
    """

    outcome = "internal_error"


class ImageGenerationFailed(ImageTaskFailed):
    """
    The generation failed (501 in a record, a callback, or the answer to a submission).

    Often transient, so retryable: a retry submits the request anew.
    """

    outcome = "generation_failed"


class ImageTaskTimeout(ImageTaskFailed):
    """Still generating at the deadline; a retry reconnects to the same remote task."""

    outcome = "timeout"


class ImageSubmissionUncertain(ImageTaskFailed, ImageCbSubmissionUncertain):
    """A submission whose answer was lost, settled as an outcome: fails at once, never resent."""

    outcome = "submission_uncertain"


class ImageNotSent(ImageTaskFailed, AirflowFailException):
    """
    The request was never sent: the account refused submissions (no credits, or a cap).

    Fails at once: a retry minutes later would meet the same refusal. Nothing was created or
    charged, so a rerun cleared once the account allows it again sends the request.
    """

    outcome = "not_sent"


class ImageUploadFailed(ImageTaskFailed):
    """
    The request was never sent: its input image was refused before the upload, or not uploaded.

    Refused: the file is missing, not a PNG, JPEG or WEBP image, or too large (a single-image
    operator raises :class:`InvalidInputImage` instead, at once; a batch ends that request only).
    Not uploaded: the upload API or the object store failed through every retry. Nothing was
    generated or charged. Retryable: a retry reads the file and uploads it again (free), the
    batch's other requests reconnected to, so a transient outage or a file put right meanwhile
    costs one retry.
    """

    outcome = "upload_failed"


#: Outcome name -> the error an operator raises for it with ``failure_mode="raise"``.
OUTCOME_ERRORS: dict[str, type[ImageTaskFailed]] = {
    cls.outcome: cls
    for cls in (
        ImageContentPolicyViolation,
        ImageInternalError,
        ImageGenerationFailed,
        ImageTaskTimeout,
        ImageSubmissionUncertain,
        ImageNotSent,
        ImageUploadFailed,
    )
}
