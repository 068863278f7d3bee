"""
The vendor's File Upload API: send a file, get back the temporary link an edit's ``inputImage`` takes.

The upload API lives on a host of its own (:data:`VENDOR_UPLOAD_BASE_URL`), with the image API's
key and envelope (plus a ``success`` flag, not read here). Uploads are free and their files are
temporary: the vendor deletes them after 24 hours (some of its pages say 3 days). Where it is
sent (:func:`upload_base_url`): the connection's ``upload_base_url`` extra; without it the vendor's
upload host when the connection uses the vendor's API, else the connection's own host (the
simulator serves both APIs on one host).

Only the stream (multipart) upload is used: it sends the bytes as they are. One upload is retried
through the hook's :class:`~imagecb_provider.hooks.protocol.RetryPolicy` on transient errors
(429, 5xx, a dropped connection): an upload costs nothing, so sending it again is safe. Its
answer goes through :func:`~imagecb_provider.hooks.protocol.parse_envelope`, then
``data.downloadUrl`` is checked strictly (:func:`checked_download_url`) before anyone uses it.
The API key travels only in the ``Authorization`` header: never in a URL, a log line or an error
text (the vendor's message is scrubbed of it like every other answer's).
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from imagecb_provider.exceptions import (
    ImageCbApiError,
    ImageCbConfigurationError,
    ImageCbConnectionError,
    ImageCbMalformedAnswer,
)
from imagecb_provider.hooks.protocol import (
    DEFAULT_BASE_URL,
    RETRYABLE_ERRORS,
    RetryPolicy,
    parse_envelope,
    without_query,
)

if TYPE_CHECKING:
    from requests import Session

    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

#: The File Upload API's documented host ("API Base URL" of the vendor's upload quickstart).
VENDOR_UPLOAD_BASE_URL = "https://kieai.redpandaai.co"
STREAM_UPLOAD_PATH = "/api/file-stream-upload"
UPLOAD_ANSWER = "an upload answer"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadedFile:
    """
    A file the upload API took, and the temporary link it answered.

    :param download_url: the file's link (checked: https, or http on the connection's own http host).
    :param file_name: the name it was stored under (the vendor's ``fileName``, else the one sent).
    :param size: the bytes sent.
    :param mime_type: the vendor's ``mimeType``, else the one sent.
    :param uploaded_at: the vendor's ``uploadedAt``, else when the upload was sent (aware, UTC).
    :param sha256: the hex SHA-256 of the bytes sent.
    """

    download_url: str
    file_name: str
    size: int
    mime_type: str
    uploaded_at: datetime
    sha256: str


def parse_upload_base_url(value: Any) -> str | None:
    """
    Read the ``upload_base_url`` extra: an ``http(s)://host[:port]`` URL, or nothing.

    A bad value raises ``ValueError`` saying why, without quoting it (it could hold a password).

    :param value: the extra's value (``None`` or empty for none).
    """
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError("it must be a string")
    text = value.strip().rstrip("/")
    parts = urlsplit(text)
    if "@" in parts.netloc:
        raise ValueError("it must not carry credentials (user:password@): the key is the password field")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("it must be an absolute http:// or https:// URL")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError("it must not carry a query or a fragment")
    if any(c.isspace() or ord(c) < 0x20 for c in text):
        raise ValueError("it must not hold spaces or control characters")
    try:
        parts.port  # noqa: B018 - reading it is the check
    except ValueError:
        raise ValueError("its port is not a number from 0 to 65535") from None
    return text


def upload_base_url(base_url: str, configured: str | None) -> str:
    """
    Where a connection sends uploads (see the module docstring).

    :param base_url: the connection's API base URL.
    :param configured: its ``upload_base_url`` extra, already read by :func:`parse_upload_base_url`.
    """
    if configured:
        return configured
    base = base_url.rstrip("/")
    return VENDOR_UPLOAD_BASE_URL if base == DEFAULT_BASE_URL else base


def stream_upload(
    session: Session,
    settings: ImageCbConnectionSettings,
    policy: RetryPolicy,
    data: bytes,
    *,
    file_name: str,
    upload_path: str,
) -> UploadedFile:
    """
    Upload ``data`` with ``POST /api/file-stream-upload``, retrying transient errors; return the file.

    :param session: the hook's session (its ``BearerAuth`` adds the key).
    :param settings: the connection's settings.
    :param policy: how transient errors are retried.
    :param data: the file's bytes.
    :param file_name: the ``fileName`` to store it under (the same name in the same path overwrites).
    :param upload_path: the ``uploadPath`` folder.
    :raises ImageCbConfigurationError: an empty file, or a name or path the API could not take;
        nothing was sent.
    """
    _check_arguments(data, file_name, upload_path)
    base = upload_base_url(settings.base_url, settings.upload_base_url)
    mime_type = mimetypes.guess_type(file_name)[0] or "application/octet-stream"
    started = datetime.now(UTC)
    answer = policy.retrying(RETRYABLE_ERRORS)(
        _send_once, session, settings, base, data, file_name, upload_path, mime_type
    )
    return uploaded_file(
        answer,
        settings,
        base,
        data=data,
        file_name=file_name,
        mime_type=mime_type,
        started=started,
    )


def _check_arguments(data: bytes, file_name: str, upload_path: str) -> None:
    if not isinstance(data, bytes | bytearray) or not data:
        raise ImageCbConfigurationError("Refused to upload an empty file (or one that is not bytes)")
    if not isinstance(file_name, str) or not file_name.strip() or "/" in file_name or "\\" in file_name:
        raise ImageCbConfigurationError(
            f"Refused to upload under file_name={file_name!r}: give a plain file name, without / or \\"
        )
    segments = upload_path.strip("/").split("/") if isinstance(upload_path, str) else [""]
    if not all(s.strip() and s not in (".", "..") for s in segments):
        raise ImageCbConfigurationError(
            f"Refused to upload into upload_path={upload_path!r}: give folder names separated by /, "
            "without . or .."
        )


def _send_once(
    session: Session,
    settings: ImageCbConnectionSettings,
    base: str,
    data: bytes,
    file_name: str,
    upload_path: str,
    mime_type: str,
) -> Any:
    """One upload attempt: the answer's ``data``, or the error it carries (scrubbed of the keys)."""
    try:
        response = session.post(
            base + STREAM_UPLOAD_PATH,
            files={"file": (file_name, bytes(data), mime_type)},
            data={"uploadPath": upload_path, "fileName": file_name},
            # None drops the session's JSON Content-Type, so requests writes the multipart one.
            headers={"Content-Type": None},
            timeout=settings.timeout,
            # A redirect would be followed as a GET, and to another host without the key: the
            # answer is read as it is (not the envelope: a protocol error naming the base URL).
            allow_redirects=False,
        )
    except requests.RequestException as error:
        # Free to resend: every network failure is retryable, even after the body went out.
        raise ImageCbConnectionError(
            f"Could not reach the upload API on {STREAM_UPLOAD_PATH}: {type(error).__name__}: "
            f"{without_query(str(error))}"
        ) from error
    try:
        return parse_envelope(response.status_code, response.content, response.headers, STREAM_UPLOAD_PATH)
    except ImageCbApiError as error:
        raise settings.scrubbed(error) from None


def uploaded_file(
    answer: Any,
    settings: ImageCbConnectionSettings,
    base: str,
    *,
    data: bytes,
    file_name: str,
    mime_type: str,
    started: datetime,
) -> UploadedFile:
    """
    Read the ``data`` of a successful upload answer, or raise :class:`ImageCbMalformedAnswer`.

    :param answer: what :func:`parse_envelope` returned.
    :param settings: the connection's settings (its own hosts; its keys, never shown).
    :param base: the upload base URL the file was sent to.
    :param data: the bytes sent.
    :param file_name: the name sent.
    :param mime_type: the type sent.
    :param started: when the upload was first sent (the fallback of ``uploadedAt``).
    """
    if not isinstance(answer, Mapping):
        raise ImageCbMalformedAnswer(UPLOAD_ANSWER, "data", _shown(answer, settings), "an object")
    url = checked_download_url(answer.get("downloadUrl"), settings, base)
    size = answer.get("fileSize")
    if isinstance(size, int) and not isinstance(size, bool) and size != len(data):
        # Not refused: the vendor documents fileSize without saying how it counts.
        log.warning("The upload API says %s holds %d bytes; %d were sent", file_name, size, len(data))
    stored_name, stored_type = answer.get("fileName"), answer.get("mimeType")
    return UploadedFile(
        download_url=url,
        file_name=stored_name if isinstance(stored_name, str) and stored_name else file_name,
        size=len(data),
        mime_type=stored_type if isinstance(stored_type, str) and stored_type else mime_type,
        uploaded_at=_uploaded_at(answer.get("uploadedAt")) or started,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def checked_download_url(value: Any, settings: ImageCbConnectionSettings, base: str) -> str:
    """
    Return ``value`` if an edit can send it as ``inputImage``; else raise :class:`ImageCbMalformedAnswer`.

    It must be an absolute ``https`` link with a host and no credentials (``user:password@``), no
    spaces or control characters; plain ``http`` only on a host (and port) of the connection's own
    that it reaches over ``http``: its API base URL or its upload base URL (the simulator).

    :param value: the answer's ``data.downloadUrl``.
    :param settings: the connection's settings.
    :param base: the upload base URL the file was sent to.
    """
    expected = "an https:// link with a host, no credentials (http:// only on the connection's http host)"
    if (
        not isinstance(value, str)
        or not value
        or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        raise ImageCbMalformedAnswer(UPLOAD_ANSWER, "data.downloadUrl", _shown(value, settings), expected)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - reading it is the check (a port that is no number raises)
    except ValueError:
        raise ImageCbMalformedAnswer(
            UPLOAD_ANSWER, "data.downloadUrl", _shown(value, settings), expected
        ) from None
    scheme = parts.scheme.lower()
    own_http = {
        urlsplit(url).netloc.lower() for url in (settings.base_url, base) if urlsplit(url).scheme == "http"
    }
    if (
        "@" in parts.netloc
        or not parts.hostname
        or not (scheme == "https" or (scheme == "http" and parts.netloc.lower() in own_http))
    ):
        raise ImageCbMalformedAnswer(UPLOAD_ANSWER, "data.downloadUrl", _shown(value, settings), expected)
    return value


def _uploaded_at(value: Any) -> datetime | None:
    """The answer's ``uploadedAt`` (ISO 8601) as an aware datetime; ``None`` if absent or unreadable."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _shown(value: Any, settings: ImageCbConnectionSettings) -> str:
    """A refused value as an error may show it: no query string, no key of the connection."""
    text = without_query(value) if isinstance(value, str) else repr(value)
    try:
        netloc = urlsplit(text).netloc if isinstance(value, str) else ""
    except ValueError:  # an unclosed "[" of an IPv6 host
        netloc = ""
    if "@" in netloc:  # user:password@ goes, the host stays
        text = text.replace(netloc, "***@" + netloc.rpartition("@")[2], 1)
    for secret in (settings.api_key, settings.webhook_hmac_key):
        if secret:
            text = text.replace(secret, "***")
    return text
