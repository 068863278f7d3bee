"""
Typed views of what goes to and comes back from the image API.

``GenerationRequest`` validates every field before any HTTP call (a bad value must never cost a
credit) and accepts the strings that Jinja templating and CSV files produce for booleans and
integers. ``TaskRecord`` is the one normalized shape of a task, whether it was read from
record-info or from a callback body, so that operators, triggers and sensors share one
outcome mapping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from imagecb_provider.exceptions import ImageCbMalformedAnswer, InvalidGenerationRequest, InvalidRemoteTaskId

# The vendor documents ids such as "task12345" and "task_flux-2_1765175490366": letters, digits,
# "_" and "-". Nothing else is ever used as a file name, a URL part or a database key.
REMOTE_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def remote_task_id(value: object, where: str) -> str:
    """
    Return ``value`` if it is a remote task id of the strict form, or raise :class:`InvalidRemoteTaskId`.

    :param value: what claims to be a remote task id.
    :param where: what carried it, for the error text.
    """
    if isinstance(value, str) and REMOTE_TASK_ID.fullmatch(value):
        return value
    raise InvalidRemoteTaskId(where, value)


ASPECT_RATIOS = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")
OUTPUT_FORMATS = ("jpeg", "png")
MODELS = ("flux-kontext-pro", "flux-kontext-max")
MAX_PROMPT_LENGTH = 5000
MAX_WATERMARK_LENGTH = 200
SAFETY_TOLERANCE_GENERATE = (0, 6)
SAFETY_TOLERANCE_EDIT = (0, 2)
#: Object-store schemes an ``input_image`` may name besides a local path: read through
#: ``ObjectStoragePath`` when the request is sent (its filesystem package must be installed then).
INPUT_IMAGE_SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hdfs", "webhdfs")
#: The longest ``input_image`` taken (a path or a URL; PATH_MAX on Linux).
MAX_INPUT_IMAGE_SOURCE_LENGTH = 4096
INPUT_IMAGE_FORMS = (
    "an absolute http:// or https:// URL, a local path, a file://, s3://, gs://, az://... URL, "
    "or an ObjectStoragePath"
)
# Query keys of signed links and of keys: a link carrying one would keep a credential in the
# request, and so in every result, XCom and manifest line.
_SECRET_QUERY_KEYS = frozenset(
    {
        "signature",
        "sig",
        "token",
        "access_token",
        "api_key",
        "apikey",
        "key",
        "password",
        "secret",
        "awsaccesskeyid",
        "googleaccessid",
    }
)
_SECRET_QUERY_PREFIXES = ("x-amz-", "x-goog-")

_TRUE_STRINGS = {"true", "1", "yes", "y", "on"}
_FALSE_STRINGS = {"false", "0", "no", "n", "off"}
# ASCII digits only: str.isdigit() is also true of "²", on which int() raises a bare ValueError;
# 18 digits keep int() far from its 4300-digit limit.
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,18}")


class Outcome(StrEnum):
    """How a remote task ended; the names are part of the public contract (DESIGN.md)."""

    SUCCESS = "success"
    CONTENT_POLICY = "content_policy"
    INTERNAL_ERROR = "internal_error"
    GENERATION_FAILED = "generation_failed"
    TIMEOUT = "timeout"
    #: The submission was sent but its answer was lost: it may exist and be charged, so it is
    #: never resent automatically (the API has no idempotency key).
    SUBMISSION_UNCERTAIN = "submission_uncertain"
    #: Never sent: the account refused submissions (credits ran out, or a cap that lasts longer
    #: than a burst), so nothing was created or charged; the next try or a cleared rerun sends it.
    NOT_SENT = "not_sent"
    #: Never sent: its input image (a file, not a link) was refused before the upload (missing, not
    #: an image, too large) or the upload failed after its retries. Nothing was generated or charged;
    #: the next try or a cleared rerun reads and uploads it again.
    UPLOAD_FAILED = "upload_failed"


class TaskState(StrEnum):
    """The vendor's successFlag values, named; ``FAILED`` is what a failed callback tells."""

    GENERATING = "generating"
    SUCCESS = "success"
    CREATE_FAILED = "create_failed"
    GENERATE_FAILED = "generate_failed"
    FAILED = "failed"


_STATE_BY_SUCCESS_FLAG = {
    0: TaskState.GENERATING,
    1: TaskState.SUCCESS,
    2: TaskState.CREATE_FAILED,
    3: TaskState.GENERATE_FAILED,
}

# Error code -> outcome; the code wins over successFlag when both are present.
_OUTCOME_BY_CODE = {
    200: Outcome.SUCCESS,
    400: Outcome.CONTENT_POLICY,
    408: Outcome.INTERNAL_ERROR,
    500: Outcome.INTERNAL_ERROR,
    501: Outcome.GENERATION_FAILED,
}
_OUTCOME_BY_FAILED_STATE = {
    TaskState.CREATE_FAILED: Outcome.INTERNAL_ERROR,
    TaskState.GENERATE_FAILED: Outcome.GENERATION_FAILED,
    TaskState.FAILED: Outcome.GENERATION_FAILED,
}


# ------------------------------------------------------------------------- field coercion
def _as_bool(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS | _FALSE_STRINGS:
        return value.strip().lower() in _TRUE_STRINGS
    if value == "":
        return None
    raise InvalidGenerationRequest(name, value, "expected true or false")


def _as_int(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidGenerationRequest(name, value, "expected a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        return int(value.strip())
    raise InvalidGenerationRequest(name, value, "expected a whole number")


def _as_choice(name: str, value: Any, choices: tuple[str, ...]) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise InvalidGenerationRequest(name, value, f"must be one of {', '.join(choices)}")


def _as_http_url(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        parts = urlsplit(text)
        if parts.scheme in ("http", "https") and parts.netloc and not any(c.isspace() for c in text):
            return text
    raise InvalidGenerationRequest(name, value, "must be an absolute http:// or https:// URL")


def _as_input_image(value: Any) -> str | None:
    """
    Check the form of ``input_image``; return the string the request keeps (and is fingerprinted by).

    Only the form: the file is read, checked and uploaded when the request is sent, before any
    credit is spent. An ``http(s)`` link is kept as it is. A local path (absolute, or relative to
    the worker's working directory) or an object-store URL is kept as written; an
    ``ObjectStoragePath`` as its URL (its ``conn_id`` as ``scheme://conn_id@bucket/...``), so the
    request stays JSON-safe. A credential is never kept: ``user:password@`` (or any user on an
    http link), a query key of a signature or a token, or an ``ObjectStoragePath``'s storage
    options are refused, and the refusal shows the value without them.
    """
    if value is None or value == "":
        return None
    text = _input_image_text(value)
    if (
        not text
        or len(text) > MAX_INPUT_IMAGE_SOURCE_LENGTH
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
    ):
        raise InvalidGenerationRequest(
            "input_image",
            _shown_source(text),
            f"must be {INPUT_IMAGE_FORMS}, of at most {MAX_INPUT_IMAGE_SOURCE_LENGTH} characters "
            "without control characters",
        )
    if "://" not in text:
        if text[:5].lower() == "data:":
            raise InvalidGenerationRequest(
                "input_image",
                text[:40],
                "a data: URI is not taken: write the image to a file and give its path",
            )
        return text  # a local path
    scheme = text.partition("://")[0].lower()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - reading it is the check (a port that is no number raises)
    except ValueError:
        raise InvalidGenerationRequest(
            "input_image", _shown_source(text), f"must be {INPUT_IMAGE_FORMS}"
        ) from None
    if scheme in ("http", "https"):
        if parts.scheme != scheme or not parts.hostname or any(c.isspace() for c in text):
            raise InvalidGenerationRequest("input_image", _shown_source(text), f"must be {INPUT_IMAGE_FORMS}")
        _refuse_credentials(text, parts, connection_id_allowed=False)
        return text
    if scheme not in INPUT_IMAGE_SCHEMES or parts.scheme != scheme:
        raise InvalidGenerationRequest("input_image", _shown_source(text), f"must be {INPUT_IMAGE_FORMS}")
    _refuse_credentials(text, parts, connection_id_allowed=True)
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise InvalidGenerationRequest(
            "input_image",
            _shown_source(text),
            "an object-store URL takes no query or fragment: give the object's plain URL (its "
            "connection gives the access)",
        )
    local = scheme == "file"
    if (local and parts.netloc not in ("", "localhost")) or (not local and not parts.hostname):
        where = "an absolute path (file:///...)" if local else f"a bucket or host ({scheme}://bucket/key)"
        raise InvalidGenerationRequest("input_image", _shown_source(text), f"the URL must name {where}")
    if not parts.path.strip("/"):
        raise InvalidGenerationRequest(
            "input_image", _shown_source(text), "must name a file, not a bucket or root"
        )
    return text


def _input_image_text(value: Any) -> str:
    """``input_image`` as a string: an ``ObjectStoragePath`` as its URL, a ``PathLike`` as its path."""
    if isinstance(value, str):
        return value.strip()
    if hasattr(value, "protocol") and hasattr(value, "path"):  # an ObjectStoragePath
        if getattr(value, "storage_options", None):
            raise InvalidGenerationRequest(
                "input_image",
                _shown_source(value),
                "an ObjectStoragePath's storage options cannot be kept in the request (they may hold "
                "credentials): give it a conn_id instead",
            )
        return str(value)
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        if isinstance(path, str):
            return path
    raise InvalidGenerationRequest("input_image", f"a {type(value).__name__}", f"must be {INPUT_IMAGE_FORMS}")


def _refuse_credentials(text: str, parts: Any, *, connection_id_allowed: bool) -> None:
    """
    Refuse a URL that carries a credential, naming the field but never showing it.

    :param text: the URL.
    :param parts: its ``urlsplit``.
    :param connection_id_allowed: a bare ``name@`` is an Airflow connection id (object stores),
        not a credential.
    """
    user, at, _ = parts.netloc.rpartition("@")
    if at and (":" in user or not connection_id_allowed):
        raise InvalidGenerationRequest(
            "input_image",
            _shown_source(text),
            "must not carry credentials (user:password@ or user@): they would be kept in the task's "
            "results, XCom and manifest; use a public link, or an object-store URL read with its "
            "Airflow connection",
        )
    keys = {key.strip().lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if keys & _SECRET_QUERY_KEYS or any(key.startswith(_SECRET_QUERY_PREFIXES) for key in keys):
        raise InvalidGenerationRequest(
            "input_image",
            _shown_source(text),
            "must not carry a signature or a token in its query (a signed link): it would be kept in "
            "the task's results, XCom and manifest; give the object's s3:// or gs:// URL instead (read "
            "with its connection and uploaded), or a public link",
        )


def _shown_source(source: Any) -> str:
    """An input image as a refusal may show it: no credentials, query or fragment."""
    from imagecb_provider.utils.inputs import display_name  # inputs imports the hooks, which import models

    try:
        return display_name(source)
    except Exception:  # a value display_name cannot read is shown by its type only
        return f"a {type(source).__name__}"


# ----------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class GenerationRequest:
    """
    One submission to ``POST /api/v1/flux/kontext/generate``, in snake_case.

    Unset (``None``) fields are left out of the payload so that the API applies its own
    defaults; in edit mode (``input_image`` set) an omitted aspect ratio keeps the input's.

    ``input_image`` is the image to edit: a public ``http(s)`` link (sent as it is), or a file the
    task reads and uploads when it sends the request: a local path, a ``file://``, ``s3://``,
    ``gs://``... URL (:data:`INPUT_IMAGE_SCHEMES`), or an ``ObjectStoragePath`` (kept as its URL
    string). Here only its form is checked (:func:`_as_input_image`); the request, its payload and
    its fingerprint (:func:`request_key`) hold that source, never the temporary upload link, which
    only the request actually sent carries (:meth:`with_input_link`).
    """

    prompt: str
    enable_translation: bool | None = None
    upload_cn: bool | None = None
    input_image: str | None = None
    aspect_ratio: str | None = None
    output_format: str | None = None
    prompt_upsampling: bool | None = None
    model: str | None = None
    callback_url: str | None = None
    safety_tolerance: int | None = None
    watermark: str | None = None

    def __post_init__(self) -> None:
        normalized = {
            "prompt": self._checked_prompt(self.prompt),
            "enable_translation": _as_bool("enable_translation", self.enable_translation),
            "upload_cn": _as_bool("upload_cn", self.upload_cn),
            "input_image": _as_input_image(self.input_image),
            "aspect_ratio": _as_choice("aspect_ratio", self.aspect_ratio, ASPECT_RATIOS),
            "output_format": _as_choice("output_format", self.output_format, OUTPUT_FORMATS),
            "prompt_upsampling": _as_bool("prompt_upsampling", self.prompt_upsampling),
            "model": _as_choice("model", self.model, MODELS),
            "callback_url": _as_http_url("callback_url", self.callback_url),
            "watermark": self._checked_watermark(self.watermark),
        }
        normalized["safety_tolerance"] = self._checked_tolerance(
            _as_int("safety_tolerance", self.safety_tolerance), editing=normalized["input_image"] is not None
        )
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    @staticmethod
    def _checked_prompt(prompt: Any) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidGenerationRequest("prompt", prompt, "must be a non-empty string")
        if len(prompt) > MAX_PROMPT_LENGTH:
            raise InvalidGenerationRequest(
                "prompt", prompt, f"is {len(prompt)} characters long; at most {MAX_PROMPT_LENGTH} are allowed"
            )
        return prompt.strip()

    @staticmethod
    def _checked_watermark(watermark: Any) -> str | None:
        if watermark is None or watermark == "":
            return None
        if not isinstance(watermark, str) or len(watermark) > MAX_WATERMARK_LENGTH:
            raise InvalidGenerationRequest(
                "watermark", watermark, f"must be a string of at most {MAX_WATERMARK_LENGTH} characters"
            )
        return watermark

    @staticmethod
    def _checked_tolerance(value: int | None, *, editing: bool) -> int | None:
        if value is None:
            return None
        low, high = SAFETY_TOLERANCE_EDIT if editing else SAFETY_TOLERANCE_GENERATE
        if not low <= value <= high:
            mode = "when editing (input_image set)" if editing else "when generating"
            raise InvalidGenerationRequest("safety_tolerance", value, f"must be {low} to {high} {mode}")
        return value

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationRequest:
        """Build from snake_case keys (a CSV row, a JSONL line, DAG params); unknown keys are errors."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise InvalidGenerationRequest(
                unknown[0],
                data[unknown[0]],
                f"is not a request field; known fields: {', '.join(cls.field_names())}",
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The snake_case fields that are set (what ``from_dict`` takes back)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_payload(self, *, include_callback: bool = True) -> dict[str, Any]:
        """
        The API's camelCase body, unset fields omitted.

        ``inputImage`` is the request's own ``input_image``: for a file, its source (the path or
        URL given), which the operators replace with its upload link only in the request they send.
        """
        payload = {
            _CAMEL_CASE[name]: value
            for name, value in self.to_dict().items()
            if include_callback or name != "callback_url"
        }
        return payload

    def with_callback(self, callback_url: str | None) -> GenerationRequest:
        return dataclasses.replace(self, callback_url=callback_url)

    def with_input_link(self, link: str) -> GenerationRequest:
        """
        This request with ``input_image`` replaced by the link its file was uploaded to: what is sent.

        The link is set as it is, past the form check of a source: the hook has checked it
        (https, no credentials) and it may carry the upload service's own query. It never goes
        into a fingerprint, a result or a log: only into the submission.

        :param link: the upload's ``downloadUrl``.
        """
        sent = dataclasses.replace(self)
        object.__setattr__(sent, "input_image", link)
        return sent


_CAMEL_CASE = {
    "prompt": "prompt",
    "enable_translation": "enableTranslation",
    "upload_cn": "uploadCn",
    "input_image": "inputImage",
    "aspect_ratio": "aspectRatio",
    "output_format": "outputFormat",
    "prompt_upsampling": "promptUpsampling",
    "model": "model",
    "callback_url": "callBackUrl",
    "safety_tolerance": "safetyTolerance",
    "watermark": "watermark",
}


def request_key(payload: Mapping[str, Any]) -> str:
    """
    A stable fingerprint of a request payload (what was asked), callback URL excluded.

    An input image counts by its source as given (the path or URL in ``inputImage``), never by
    its upload link, which changes with each upload: a retry, a resubmission and a cleared rerun
    of a request find its ledger slot, and a result's ``request`` gives back the key of its line of
    the prompt file. A file edited in place keeps its key: its new content is uploaded when the
    request is next sent.
    """
    canonical = json.dumps({k: v for k, v in payload.items() if k != "callBackUrl"}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- timestamps
# Epoch seconds or milliseconds written out, in ASCII digits only: str.isdigit() is also true of
# "²" (on which float() raises) and of other scripts' digits (which float() reads).
_EPOCH = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,9})?")
#: What the vendor writes for an empty field: the JSON null, "", or the string "null".
_ABSENT_TEXTS = ("", "null")


def is_absent(value: Any) -> bool:
    """
    Whether a field of an answer holds nothing: ``None``, ``""`` or the string ``"null"``.

    The vendor writes ``"null"`` (a string) in empty fields of some answers (``errorCode``,
    ``originImageUrl``): it must never be read as a code, a message or a link.

    :param value: the field's value as decoded from JSON.
    """
    return value is None or (isinstance(value, str) and value.strip().lower() in _ABSENT_TEXTS)


def parse_timestamp(value: Any) -> datetime | None:
    """
    Read a vendor timestamp as an aware UTC datetime; ``None`` when absent or unreadable.

    Every form seen is accepted: epoch milliseconds and epoch seconds, as numbers or numeric
    strings (public clients type the fields as epoch milliseconds; a number below 1e11 cannot be
    milliseconds of this century, so it is read as seconds); ISO 8601 with ``Z`` or an offset (the
    reference's examples, ``2024-03-20T10:30:00Z``); and ``2026-01-06 08:16:56``, a space and no
    zone (a record-info answer of another model of the same API family).

    A time without a zone is read as UTC. That is a guess: the vendor documents no zone for that
    form, and if its servers write local times (UTC+8, say) such a time is off by that offset. It
    only moves ``created_at``/``completed_at`` and the durations logged; no decision depends on it.

    ``None``, ``""``, ``0``, ``"null"``, a value of any other form and one out of range all give
    ``None``: a timestamp is never a reason to fail a task.

    :param value: the field's value as decoded from JSON (or a stored ISO string).
    """
    if is_absent(value) or isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii():
            return None
        if not _EPOCH.fullmatch(text):
            return _parse_iso(text)
        value = float(text) if "." in text else int(text)
    if not isinstance(value, int | float) or value == 0:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    seconds = value / 1000 if abs(value) >= 1e11 else value
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _parse_iso(text: str) -> datetime | None:
    """ISO 8601 (``T`` or a space between date and time), ``Z``, an offset or no zone (read as UTC)."""
    if text[-1:] in ("Z", "z"):
        text = f"{text[:-1]}+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)  # no zone: UTC, a guess (see parse_timestamp)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):  # an offset pushing a year-1 or year-9999 time out of range
        return None


def to_iso(value: datetime | None) -> str | None:
    """An aware datetime as ISO 8601 UTC with a Z, the form every result uses."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def read_code(value: Any) -> int | None:
    """
    Read a vendor code (``errorCode``, ``successFlag``, a callback's ``code``) as an int.

    An int, a whole float, or a string of ASCII digits; anything else, ``"null"`` and booleans
    included, reads as ``None`` (no code), never as an error.

    :param value: the field's value as decoded from JSON.
    """
    if is_absent(value) or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        return int(value.strip())
    return None


def outcome_of(state: TaskState, code: int | None) -> Outcome | None:
    """The outcome of a task in ``state`` with error ``code``; ``None`` while it is generating."""
    if state == TaskState.GENERATING:
        return None
    if state == TaskState.SUCCESS:
        return Outcome.SUCCESS
    by_code = _OUTCOME_BY_CODE.get(code) if code is not None else None
    if by_code is not None and by_code != Outcome.SUCCESS:
        return by_code
    return _OUTCOME_BY_FAILED_STATE[state]


# --------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class TaskRecord:
    """A remote task, normalized from record-info or from a callback body."""

    task_id: str
    state: TaskState
    outcome: Outcome | None
    code: int | None = None
    message: str = ""
    result_image_url: str | None = None
    origin_image_url: str | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return self.outcome is not None

    @classmethod
    def from_record_info(cls, data: Any) -> TaskRecord:
        """
        From the ``data`` of ``GET record-info``; ``response`` may be null while generating.

        Empty fields may come as ``null``, ``""`` or the string ``"null"``: all read as absent.
        Codes and flags may come as numbers or numeric strings; timestamps in any form
        :func:`parse_timestamp` reads. What cannot be read raises an
        :class:`~imagecb_provider.exceptions.ImageCbProtocolError`, never anything else: ``data``
        or ``response`` that is not an object, or a link that is not a string
        (:class:`~imagecb_provider.exceptions.ImageCbMalformedAnswer`), and a ``taskId`` not of the
        strict form (:class:`InvalidRemoteTaskId`): an answer naming another kind of id is not
        trusted with anything else either. (``data: null``, an unknown task, is the hook's to
        refuse, as only it knows which task was asked for.)

        :param data: the answer's ``data``.
        """
        where = "a record-info answer"
        if not isinstance(data, Mapping):
            raise ImageCbMalformedAnswer(where, "data", data, "an object")
        task_id = remote_task_id(_first_present(data, "taskId", "task_id"), where)
        flag = read_code(data.get("successFlag"))
        state = _STATE_BY_SUCCESS_FLAG.get(flag if flag is not None else 0, TaskState.GENERATE_FAILED)
        code = read_code(data.get("errorCode"))
        if state == TaskState.SUCCESS and code is None:
            code = 200
        response = _object(where, "response", data.get("response"))
        return cls(
            task_id=task_id,
            state=state,
            outcome=outcome_of(state, code),
            code=code,
            message=_text(data.get("errorMessage")),
            result_image_url=_link(where, "response.resultImageUrl", response.get("resultImageUrl")),
            origin_image_url=_link(where, "response.originImageUrl", response.get("originImageUrl")),
            created_at=parse_timestamp(data.get("createTime")),
            completed_at=parse_timestamp(data.get("completeTime")),
            params=_parse_params(data.get("paramJson")),
        )

    @classmethod
    def from_callback(cls, body: Any, *, received_at: datetime | None = None) -> TaskRecord:
        """
        From a callback POST body; the task id is read from ``taskId`` or, defensively, ``task_id``.

        Empty fields read as absent whether ``null``, ``""`` or ``"null"``; a body, ``data`` or
        ``data.info`` that is not an object, a ``code`` that is not a whole number, or a link that
        is not a string, raises :class:`~imagecb_provider.exceptions.ImageCbMalformedAnswer` (a
        ``ValueError`` too, which the receiver answers with 422).

        :param body: the decoded callback body.
        :param received_at: when it arrived, the record's completion time.
        """
        where = "a callback body"
        if not isinstance(body, Mapping):
            raise ImageCbMalformedAnswer(where, "body", body, "an object")
        data = _object(where, "data", body.get("data"))
        info = _object(where, "data.info", data.get("info"))
        code = read_code(body.get("code"))
        if code is None and not is_absent(body.get("code")):  # 1e400, NaN, "abc": not a callback's code
            raise ImageCbMalformedAnswer(where, "code", body.get("code"), "a whole number")
        state = TaskState.SUCCESS if code == 200 else TaskState.FAILED
        task_id = _first_present(data, "taskId", "task_id")
        return cls(
            task_id="" if task_id is None else str(task_id),
            state=state,
            outcome=outcome_of(state, code),
            code=code,
            message=_text(body.get("msg")),
            result_image_url=_link(where, "data.info.resultImageUrl", info.get("resultImageUrl")),
            origin_image_url=_link(where, "data.info.originImageUrl", info.get("originImageUrl")),
            completed_at=received_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, for trigger events and XCom."""
        return {
            "task_id": self.task_id,
            "state": self.state.value,
            "outcome": self.outcome.value if self.outcome else None,
            "code": self.code,
            "message": self.message,
            "result_image_url": self.result_image_url,
            "origin_image_url": self.origin_image_url,
            "created_at": to_iso(self.created_at),
            "completed_at": to_iso(self.completed_at),
            "params": self.params,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskRecord:
        outcome = data.get("outcome")
        return cls(
            task_id=data["task_id"],
            state=TaskState(data["state"]),
            outcome=Outcome(outcome) if outcome else None,
            code=data.get("code"),
            message=data.get("message") or "",
            result_image_url=data.get("result_image_url"),
            origin_image_url=data.get("origin_image_url"),
            created_at=parse_timestamp(data.get("created_at")),
            completed_at=parse_timestamp(data.get("completed_at")),
            params=dict(data.get("params") or {}),
        )


def _first_present(data: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` whose value is not absent (see :func:`is_absent`), else ``None``."""
    for name in names:
        value = data.get(name)
        if not is_absent(value):
            return value
    return None


def _object(where: str, name: str, value: Any) -> Mapping[str, Any]:
    """A nested object of an answer; an empty or absent one is ``{}``, any other kind is refused."""
    if isinstance(value, Mapping):
        return value
    if is_absent(value) or not value:  # null, "", "null", and the empty [] or 0 some clients send
        return {}
    raise ImageCbMalformedAnswer(where, name, value, "an object")


def _link(where: str, name: str, value: Any) -> str | None:
    """A file link of an answer: a string, or ``None`` when absent (``"null"`` included)."""
    if is_absent(value):
        return None
    if not isinstance(value, str):
        raise ImageCbMalformedAnswer(where, name, value, "a URL string")
    return value


def _text(value: Any) -> str:
    """A message of an answer: ``""`` when absent (``"null"`` included), else its text."""
    return "" if is_absent(value) else str(value)


def _parse_params(param_json: Any) -> dict[str, Any]:
    if isinstance(param_json, Mapping):
        return dict(param_json)
    if isinstance(param_json, str) and param_json:
        try:
            parsed = json.loads(param_json)
        except (ValueError, RecursionError):  # RecursionError: a body nested thousands deep
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


# --------------------------------------------------------------------------- the result
def build_result(
    *,
    remote_task_id: str,
    outcome: Outcome,
    record: TaskRecord | None,
    request: Mapping[str, Any],
    submitted_at: datetime | str | None,
    polls: int,
    via: str,
    input_image: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    The JSON-safe result an operator or sensor returns (its XCom), as fixed in DESIGN.md.

    ``request`` is the camelCase payload that was sent, without the callback URL, and with an
    input image's source in ``inputImage`` (not its temporary upload link); ``record`` is ``None``
    when the wait ended before any status answer (a timeout). ``input_image`` describes an input
    image that is a file: ``{"source", "sha256", "bytes", "uploaded"}`` (see
    :func:`~imagecb_provider.utils.generation.input_image_result`), ``None`` for a link or no input.
    """
    payload = {k: v for k, v in request.items() if k != "callBackUrl"}
    completed = record.completed_at if record and record.completed_at else None
    if completed is None and outcome != Outcome.TIMEOUT:
        completed = datetime.now(UTC)
    submitted = parse_timestamp(submitted_at) if not isinstance(submitted_at, datetime) else submitted_at
    return {
        "task_id": remote_task_id,
        "outcome": Outcome(outcome).value,
        "code": record.code if record else None,
        "message": (record.message if record else "") or _DEFAULT_MESSAGES[Outcome(outcome)],
        "result_image_url": record.result_image_url if record else None,
        "origin_image_url": record.origin_image_url if record else None,
        "prompt": payload.get("prompt"),
        "request": payload,
        "input_image": dict(input_image) if input_image is not None else None,
        "submitted_at": to_iso(submitted or (record.created_at if record else None)),
        "completed_at": to_iso(completed),
        "polls": polls,
        "via": via,
    }


_DEFAULT_MESSAGES = {
    Outcome.SUCCESS: "",
    Outcome.CONTENT_POLICY: "The prompt was flagged by the content policy",
    Outcome.INTERNAL_ERROR: "Internal error on the API side",
    Outcome.GENERATION_FAILED: "The generation failed",
    Outcome.TIMEOUT: "Still generating at the deadline",
    Outcome.SUBMISSION_UNCERTAIN: "The submission was sent but its answer was lost; it may have been "
    "charged, so it was not resent: check the account, then clear the task to submit again",
    Outcome.NOT_SENT: "Not sent: the account refused submissions (credits or a cap); clear the run "
    "once it allows them again",
    Outcome.UPLOAD_FAILED: "Not sent: its input image could not be uploaded; nothing was generated or "
    "charged, the next try uploads it again",
}
