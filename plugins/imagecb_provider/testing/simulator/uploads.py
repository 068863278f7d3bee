"""
The vendor's File Upload API: stream, base64 and URL uploads, and the temporary files they make.

The vendor serves it on a host of its own (``https://kieai.redpandaai.co``); the simulator serves
it on its own host, next to the image API, so one connection reaches both. Its answers use the
image API's envelope with a ``success`` flag added (``{"success", "code", "msg", "data"}``), and
errors the same envelope with code 400 (bad parameters, and here a file over
``upload_max_bytes``), 401 (key), 405 (method) or 500.

An upload is stored in memory under ``/uploads/<account>/<uploadPath>/<fileName>`` on the host the
client used: the same name in the same path overwrites the earlier file, as the vendor says its
names do. ``downloadUrl`` serves the bytes back until ``upload_ttl`` seconds have passed since the
upload (the vendor deletes uploads after 24 hours), then answers 404. A generate request whose
``inputImage`` is such a link, unknown or expired, is refused as the vendor's fetch of it would
fail (:func:`check_input_image`).

Uploads are free: they never touch the credits. ``/_sim/stats`` counts them per endpoint
(``uploads``) and per sha256 of their content (``uploads_by_sha256``), so a test can assert that
each content was uploaded once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import mimetypes
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from imagecb_provider.testing.simulator.validation import ValidationFailure

if TYPE_CHECKING:
    from imagecb_provider.testing.simulator.app import _Api
    from imagecb_provider.testing.simulator.state import SimState

STREAM_UPLOAD_PATH = "/api/file-stream-upload"
BASE64_UPLOAD_PATH = "/api/file-base64-upload"
URL_UPLOAD_PATH = "/api/file-url-upload"
#: Where uploaded files are served (the vendor's are on ``tempfile.redpandaai.co``).
UPLOADS_ROOT = "/uploads/"
#: Framing a multipart or base64 body may add to a file of ``upload_max_bytes`` before it is refused.
BODY_SLACK = 64 * 1024
#: The vendor's documented download timeout of a URL upload.
FETCH_TIMEOUT = 30.0
UPLOAD_MESSAGES = {
    200: "File uploaded successfully",
    400: "Bad request: invalid parameters",
    401: "Unauthorized: missing or invalid API key",
    405: "Method not allowed",
    500: "Server error, please try again later",
}
#: What a file name or an upload path may hold: no control characters, backslashes or ``..``.
_NAME = re.compile(r"[^\x00-\x1f\x7f\\/]{1,200}")
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@dataclass(slots=True)
class Upload:
    """One stored file: its bytes, what the upload answered about it, and when it was made."""

    file_name: str
    file_path: str
    data: bytes
    mime_type: str
    sha256: str
    uploaded_at: float


@dataclass
class UploadStore:
    """Every upload of one simulator, by the path of its link, and the counters ``/_sim/stats`` shows."""

    files: dict[str, Upload] = field(default_factory=dict)
    #: Hosts download links were issued on: a link on any of them is this simulator's.
    hosts: set[str] = field(default_factory=set)
    accepted: Counter = field(default_factory=Counter)
    by_sha256: Counter = field(default_factory=Counter)
    downloads: Counter = field(default_factory=Counter)

    def put(self, link_path: str, upload: Upload, endpoint: str, host: str) -> None:
        """Store ``upload`` under ``link_path`` (replacing any earlier one) and count it."""
        self.files[link_path] = upload
        self.hosts.add(host)
        self.accepted[endpoint] += 1
        self.by_sha256[upload.sha256] += 1

    def live(self, link_path: str, now: float, ttl: float) -> Upload | None:
        """The upload behind ``link_path`` unless it is unknown or ``ttl`` seconds old."""
        upload = self.files.get(link_path)
        if upload is None or now >= upload.uploaded_at + ttl:
            return None
        return upload

    def stats(self, now: float, ttl: float) -> dict[str, Any]:
        """The upload counters, JSON-ready (merged into ``GET /_sim/stats``)."""
        return {
            "uploads": dict(self.accepted),
            "uploads_total": sum(self.accepted.values()),
            "uploads_by_sha256": dict(self.by_sha256),
            "uploads_stored": sum(1 for u in self.files.values() if now < u.uploaded_at + ttl),
            "upload_downloads": dict(self.downloads),
        }


def check_input_image(state: SimState, body: Any, base_url: str, now: float) -> None:
    """
    Refuse a submission whose ``inputImage`` is an upload link of this simulator that is unknown or expired.

    The vendor fetches the input image when it takes the task; a deleted upload cannot be
    fetched. Any other link (a public image) is left alone, as before.

    :param state: the simulator's state.
    :param body: the submission body (already validated).
    :param base_url: the base URL the client used.
    :param now: the time of the submission.
    :raises ValidationFailure: code 422, naming ``inputImage``.
    """
    value = body.get("inputImage") if isinstance(body, dict) else None
    if not isinstance(value, str):
        return
    parts = urlsplit(value)
    hosts = state.uploads.hosts | {urlsplit(base_url).netloc.lower()}
    if not parts.path.startswith(UPLOADS_ROOT) or parts.netloc.lower() not in hosts:
        return
    if state.uploads.live(unquote(parts.path), now, state.config.upload_ttl) is None:
        raise ValidationFailure(
            f"inputImage could not be fetched: the uploaded file {parts.path} is unknown or has expired "
            f"(uploaded files are deleted {state.config.upload_ttl:g} s after their upload)"
        )


def sniff_mime_type(data: bytes, file_name: str) -> str:
    """The MIME type of ``data``: by its first bytes, else by the file name's extension."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, mime_type in _SIGNATURES:
        if data.startswith(signature):
            return mime_type
    return mimetypes.guess_type(file_name)[0] or "application/octet-stream"


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """
    Read a ``multipart/form-data`` body: ``{field name: (file name or None, value)}``.

    The first part of a name wins. A body that is not well-formed multipart raises ``ValueError``.

    :param body: the raw body.
    :param content_type: the request's ``Content-Type`` (it carries the boundary).
    """
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise ValueError("the body must be multipart/form-data with a boundary")
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    fields: dict[str, tuple[str | None, bytes]] = {}
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            return fields
        head, separator, value = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("a part of the multipart body has no header block")
        part = Message()
        for line in head.split(b"\r\n")[1:]:  # the first "line" is the rest of the delimiter's
            name, colon, text = line.decode("utf-8", errors="replace").partition(":")
            if colon:
                part[name.strip()] = text.strip()
        field_name = part.get_param("name", header="content-disposition")
        if isinstance(field_name, str):
            fields.setdefault(field_name, (part.get_filename(), value))
    raise ValueError("the multipart body has no closing boundary")


class UploadApi:
    """The three upload endpoints and the uploaded files; one per app, on top of its ``_Api``."""

    def __init__(self, api: _Api) -> None:
        self.api = api
        self.state = api.state

    # ------------------------------------------------------------------ answers
    def answer(self, code: int, msg: str | None = None, data: Any = None) -> JSONResponse:
        """The upload envelope; the HTTP status is the code only in ``http_status_errors`` mode."""
        as_status = self.state.config.http_status_errors
        status = code if code != 200 and as_status and 100 <= code <= 599 else 200
        body = {
            "success": code == 200,
            "code": code,
            "msg": msg if msg is not None else UPLOAD_MESSAGES.get(code, "error"),
            "data": data,
        }
        return JSONResponse(body, status_code=status)

    def reject(self, code: int, msg: str) -> JSONResponse:
        self.state.counters.rejected[code] += 1
        return self.answer(code, msg)

    @staticmethod
    def with_success_flag(response: Response) -> Response:
        """A guard's answer (injected, faulted, 401) in the upload envelope; a cut stays a cut."""
        if not isinstance(response, JSONResponse):
            return response
        body = json.loads(response.body)
        headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
        return JSONResponse({"success": False, **body}, status_code=response.status_code, headers=headers)

    # ---------------------------------------------------------------- endpoints
    async def stream_upload(self, request: Request) -> Response:
        """``POST /api/file-stream-upload``: multipart ``file``, ``uploadPath``, optional ``fileName``."""
        raw, oversized = await self._read(request, self.state.config.upload_max_bytes + BODY_SLACK)
        refused = self.api.guard(request, "file-stream-upload", raw)
        if refused is not None:
            return self.with_success_flag(refused)
        if oversized:
            return self._too_large()
        try:
            fields = parse_multipart(raw, request.headers.get("content-type", ""))
        except ValueError as error:
            return self.reject(400, f"Invalid multipart body: {error}")
        if "file" not in fields or fields["file"][0] is None:
            return self.reject(400, "file is required (a multipart file part named file)")
        original, data = fields["file"]
        upload_path = _text(fields.get("uploadPath"))
        file_name = _text(fields.get("fileName"))
        return self.store(request, "file-stream-upload", data, upload_path, file_name, original)

    async def base64_upload(self, request: Request) -> Response:
        """``POST /api/file-base64-upload``: ``base64Data`` (or a data URL), ``uploadPath``, ``fileName``."""
        limit = (self.state.config.upload_max_bytes * 4) // 3 + BODY_SLACK
        raw, oversized = await self._read(request, limit)
        refused = self.api.guard(request, "file-base64-upload", raw)
        if refused is not None:
            return self.with_success_flag(refused)
        if oversized:
            return self._too_large()
        body = _json(raw)
        encoded = body.get("base64Data") if isinstance(body, dict) else None
        if not isinstance(encoded, str) or not encoded:
            return self.reject(400, "base64Data is required and must be a string")
        if encoded.startswith("data:"):
            encoded = encoded.partition(",")[2]
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return self.reject(400, "base64Data is not valid base64")
        return self.store(request, "file-base64-upload", data, body.get("uploadPath"), body.get("fileName"))

    async def url_upload(self, request: Request) -> Response:
        """``POST /api/file-url-upload``: JSON ``fileUrl`` (fetched at once), ``uploadPath``, ``fileName``."""
        raw, oversized = await self._read(request, BODY_SLACK)
        refused = self.api.guard(request, "file-url-upload", raw)
        if refused is not None:
            return self.with_success_flag(refused)
        body = _json(raw) if not oversized else None
        url = body.get("fileUrl") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return self.reject(400, "fileUrl is required and must be an http(s) URL")
        data = await self._fetch(url)
        if isinstance(data, Response):
            return data
        original = urlsplit(url).path.rpartition("/")[2] or None
        return self.store(
            request, "file-url-upload", data, body.get("uploadPath"), body.get("fileName"), original
        )

    async def wrong_method(self, request: Request) -> Response:
        """Any other method on an upload path: 405 in the envelope, as the vendor documents."""
        return self.reject(405, f"Method {request.method} not allowed: use POST")

    async def file(self, request: Request, rest: str) -> Response:
        """An uploaded file, until ``upload_ttl`` seconds after its upload; then 404."""
        path = UPLOADS_ROOT + rest
        upload = self.state.uploads.live(path, time.time(), self.state.config.upload_ttl)
        if upload is None:
            return Response("no such file (unknown, or expired)\n", status_code=404, media_type="text/plain")
        self.state.uploads.downloads[path] += 1
        return Response(upload.data, media_type=upload.mime_type)

    # ------------------------------------------------------------------ helpers
    def store(
        self,
        request: Request,
        endpoint: str,
        data: bytes,
        upload_path: Any,
        file_name: Any,
        original: str | None = None,
    ) -> Response:
        """Check the fields and the size, store the file, answer its link."""
        if len(data) > self.state.config.upload_max_bytes:
            return self._too_large()
        if not data:
            return self.reject(400, "the file is empty")
        if not isinstance(upload_path, str) or not upload_path.strip("/"):
            return self.reject(400, "uploadPath is required and must be a non-empty string")
        segments = upload_path.strip("/").split("/")
        if not all(_NAME.fullmatch(s) and s not in (".", "..") for s in segments):
            return self.reject(400, "uploadPath must be folder names separated by /, without . or ..")
        if file_name in (None, ""):
            extension = mimetypes.guess_extension(sniff_mime_type(data, original or "")) or ""
            file_name = uuid.uuid4().hex + extension  # the vendor makes up a random name too
        if not isinstance(file_name, str) or not _NAME.fullmatch(file_name) or file_name in (".", ".."):
            return self.reject(400, "fileName must be a file name without / or control characters")
        now = time.time()
        file_path = "/".join([*segments, file_name])
        link_path = f"{UPLOADS_ROOT}{self._account(request)}/{file_path}"
        upload = Upload(
            file_name=file_name,
            file_path=file_path,
            data=data,
            mime_type=sniff_mime_type(data, file_name),
            sha256=hashlib.sha256(data).hexdigest(),
            uploaded_at=now,
        )
        base_url = str(request.base_url).rstrip("/")
        self.state.uploads.put(link_path, upload, endpoint, urlsplit(base_url).netloc.lower())
        answer = {
            "fileName": file_name,
            "filePath": file_path,
            "downloadUrl": base_url + quote(link_path),
            "fileSize": len(data),
            "mimeType": upload.mime_type,
            "uploadedAt": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
        }
        return self.answer(200, UPLOAD_MESSAGES[200], answer)

    def _account(self, request: Request) -> str:
        """The key's folder (the vendor's links hold one too): not the key, not reversible."""
        key = request.headers.get("authorization", "").partition(" ")[2].strip()
        return hmac.new(self.state.url_secret, key.encode(), hashlib.sha256).hexdigest()[:12]

    def _too_large(self) -> JSONResponse:
        limit = self.state.config.upload_max_bytes
        return self.reject(400, f"File too large: at most {limit} bytes may be uploaded")

    @staticmethod
    async def _read(request: Request, limit: int) -> tuple[bytes, bool]:
        """
        The whole body, or ``(b"", True)`` past ``limit`` bytes.

        A body over the limit is still read to its end, unkept: answering before the client has
        sent it would cut the connection under its feet, and the client would see a network error
        instead of the refusal.
        """
        body = bytearray()
        oversized = False
        async for chunk in request.stream():
            if not oversized:
                body.extend(chunk)
                if len(body) > limit:
                    oversized = True
                    body.clear()
        return bytes(body), oversized

    async def _fetch(self, url: str) -> bytes | Response:
        """Download ``fileUrl`` as the vendor does (30 s, the size cap), or the refusal to answer."""
        limit = self.state.config.upload_max_bytes
        try:
            async with (
                httpx.AsyncClient(trust_env=False, timeout=FETCH_TIMEOUT, follow_redirects=True) as client,
                client.stream("GET", url) as answer,
            ):
                if answer.status_code >= 400:
                    return self.reject(400, f"fileUrl could not be downloaded: HTTP {answer.status_code}")
                data = bytearray()
                async for chunk in answer.aiter_bytes():
                    data.extend(chunk)
                    if len(data) > limit:
                        return self._too_large()
                return bytes(data)
        except httpx.HTTPError as error:
            return self.reject(400, f"fileUrl could not be downloaded: {type(error).__name__}")


def register_uploads(app: FastAPI, api: _Api) -> UploadApi:
    """
    Serve the upload endpoints and the uploaded files on ``app``.

    :param app: the simulator's app.
    :param api: its image API endpoints (their guard: injections, faults, the key).
    """
    uploads = UploadApi(api)
    for path, endpoint in (
        (STREAM_UPLOAD_PATH, uploads.stream_upload),
        (BASE64_UPLOAD_PATH, uploads.base64_upload),
        (URL_UPLOAD_PATH, uploads.url_upload),
    ):
        app.add_api_route(path, endpoint, methods=["POST"])
        app.add_api_route(path, uploads.wrong_method, methods=["GET", "PUT", "PATCH", "DELETE"])
    app.add_api_route(UPLOADS_ROOT + "{rest:path}", uploads.file, methods=["GET"])
    return uploads


def _text(part: tuple[str | None, bytes] | None) -> str | None:
    """A multipart text field's value; ``None`` when absent."""
    return None if part is None else part[1].decode("utf-8", errors="replace")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return None
