"""
Input images of edits: read a user's own file, check it, and upload it once per content.

An edit's ``input_image`` is a link the vendor fetches. A public ``http(s)`` link is passed on as
it is (:func:`input_image_url`); anything else (a local path, a ``file://``, ``s3://`` or
``gs://`` URL, an ``ObjectStoragePath``) is read here (:func:`read_input_image`) and checked
before anything is sent: the file exists, it is a PNG, JPEG or WEBP image by its first bytes, and
it is at most :data:`MAX_INPUT_IMAGE_BYTES`. It is then uploaded through the vendor's free File
Upload API (:meth:`~imagecb_provider.hooks.imagecb.ImageCbHook.upload_file`).

Uploaded files are temporary: the vendor deletes them after 24 hours (some of its pages say 3
days; the shorter is assumed, :data:`UPLOAD_TTL`). :class:`UploadCache` keeps each link per task
instance in Airflow's ``task_state_store``, keyed by the content's SHA-256, so the retries of one
task instance upload each content once, and a link is reused only while it is younger than its
assumed lifetime less :data:`UPLOAD_SAFETY_MARGIN` (the vendor must still find the file when it
takes the task, which may wait in a queue).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from imagecb_provider.exceptions import InputImageUnavailable, InvalidInputImage
from imagecb_provider.hooks.protocol import without_query

if TYPE_CHECKING:
    from airflow.sdk import Context, ObjectStoragePath

    from imagecb_provider.hooks.imagecb import ImageCbHook

#: The largest input image read (10 MiB). The vendor documents no limit for ``inputImage``; its
#: upload pages advise the stream upload from 10 MB on, so this cap is the provider's choice.
MAX_INPUT_IMAGE_BYTES = 10 * 1024 * 1024
#: How long an uploaded file is assumed to live: the shorter of the vendor's two figures.
UPLOAD_TTL = timedelta(hours=24)
#: A stored link is uploaded anew once it is older than its lifetime less this margin.
UPLOAD_SAFETY_MARGIN = timedelta(hours=1)
#: The ``uploadPath`` input images go to.
UPLOAD_PATH = "imagecb/inputs"
#: ``task_state_store`` key of the upload cache; renaming it would upload every input again.
STATE_KEY = "imagecb_uploads"
CACHE_VERSION = 1

#: (first bytes, MIME type, extension): the formats the image model takes.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
)
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_FORMATS = "a PNG, JPEG or WEBP image"
#: Schemes read from the local disk; every other one goes through ObjectStoragePath.
_HTTP_SCHEMES = ("http", "https")

log = logging.getLogger(__name__)


def sniff_image_type(data: bytes) -> str | None:
    """
    The MIME type of ``data`` by its first bytes (``image/png``, ``image/jpeg``, ``image/webp``), or ``None``.

    Only the signature is read (a WEBP is ``RIFF``, a 4-byte size, then ``WEBP``), never the rest.

    :param data: the file's bytes, or at least its first 12.
    """
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, mime_type, _ in _SIGNATURES:
        if data.startswith(signature):
            return mime_type
    return None


@dataclass(frozen=True)
class InputImage:
    """
    One input image, read and checked: what :meth:`UploadCache.link_for` uploads.

    :param data: the file's bytes (left out of ``repr``).
    :param sha256: the hex SHA-256 of ``data``.
    :param mime_type: ``image/png``, ``image/jpeg`` or ``image/webp``, by its first bytes.
    :param name: where it came from, fit for a log line: a path or a URL without query or credentials.
    """

    data: bytes = field(repr=False)
    sha256: str
    mime_type: str
    name: str

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def upload_name(self) -> str:
        """The file name it is uploaded under: its hash, so the same name always holds the same bytes."""
        return f"{self.sha256}.{_EXTENSIONS[self.mime_type]}"


def is_http_url(source: object) -> bool:
    """Whether ``source`` is an ``http(s)://`` URL string: passed to the API as it is, never read."""
    return isinstance(source, str) and source.strip().partition("://")[0].lower() in _HTTP_SCHEMES


def display_name(source: object) -> str:
    """
    ``source`` fit for a message or a log: a path, or a URL without credentials, query or fragment.

    :param source: a path, a URL or an ``ObjectStoragePath``.
    """
    protocol = getattr(source, "protocol", None)
    if protocol is not None and hasattr(source, "path"):  # an ObjectStoragePath: its conn id goes too
        path = str(source.path)
        if protocol in ("file", "local", ""):
            return path
        return f"{protocol}://{path.lstrip('/')}"
    text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return without_query(text).partition("://")[0] + "://…"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def read_input_image(
    source: str | os.PathLike[str] | ObjectStoragePath,
    *,
    conn_id: str | None = None,
    max_bytes: int = MAX_INPUT_IMAGE_BYTES,
) -> InputImage:
    """
    Read and check one input image before anything is sent.

    :param source: a local path, a ``file://``, ``s3://``, ``gs://``... URL (read through
        ``ObjectStoragePath``), or an ``ObjectStoragePath``. A plain ``http(s)`` URL is not read:
        it goes to the API as it is (:func:`input_image_url`), and is refused here.
    :param conn_id: the Airflow connection of an object store (else the URL's own or the default).
    :param max_bytes: refuse a larger file (default :data:`MAX_INPUT_IMAGE_BYTES`).
    :raises InvalidInputImage: no such file, a folder, unreadable, not a PNG, JPEG or WEBP image,
        larger than ``max_bytes``, or no filesystem for the URL's scheme; fails the task at once.
    :raises InputImageUnavailable: the object store failed the read (credentials, network): retryable.
    """
    shown = display_name(source)
    path = _path(source, shown, conn_id)
    data = _read(path, shown, max_bytes)
    if len(data) > max_bytes:
        raise InvalidInputImage(
            shown,
            f"it is over {max_bytes} bytes ({max_bytes / 2**20:g} MiB), the most an input image may be",
            "shrink or recompress it (a JPEG of a few megapixels is enough for an edit)",
        )
    mime_type = sniff_image_type(data)
    if mime_type is None:
        what = "it is empty" if not data else f"its first bytes {data[:12]!r} are not those of {_FORMATS}"
        raise InvalidInputImage(
            shown, what, "give a PNG, JPEG or WEBP file (the formats the image model takes), or convert it"
        )
    return InputImage(data=data, sha256=hashlib.sha256(data).hexdigest(), mime_type=mime_type, name=shown)


def _path(source: Any, shown: str, conn_id: str | None) -> Path | ObjectStoragePath:
    """The local ``Path`` or the ``ObjectStoragePath`` to read ``source`` from."""
    if isinstance(source, os.PathLike) and not hasattr(source, "protocol"):
        return Path(os.fspath(source)).expanduser()
    if not isinstance(source, str) and not hasattr(source, "protocol"):
        raise InvalidInputImage(
            _type_name(source), "it is neither a path, a URL nor an ObjectStoragePath", "give one of those"
        )
    if isinstance(source, str):
        text = source.strip()
        if not text:
            raise InvalidInputImage(repr(source), "it is empty", "give a path or a URL")
        if "://" not in text:
            return Path(text).expanduser()
        scheme = text.partition("://")[0].lower()
        if scheme in _HTTP_SCHEMES:
            raise InvalidInputImage(
                shown,
                "an http(s) link is not read here: the API fetches it itself",
                "pass it as input_image as it is",
            )
    else:
        scheme = str(source.protocol)
    from airflow.sdk import ObjectStoragePath

    from imagecb_provider.batch.archive import NoFilesystem, with_filesystem

    try:
        return with_filesystem(
            lambda: (
                source if not isinstance(source, str) else ObjectStoragePath(source.strip(), conn_id=conn_id)
            ),
            scheme,
        )
    except NoFilesystem as missing:
        raise InvalidInputImage(shown, missing.detail, f"install {missing.package} on every worker") from None


def _read(path: Path | ObjectStoragePath, shown: str, max_bytes: int) -> bytes:
    """Up to ``max_bytes + 1`` bytes of the file (one more tells that it is too large)."""
    try:
        with path.open("rb") as file:
            return file.read(max_bytes + 1)
    except FileNotFoundError:
        raise InvalidInputImage(
            shown, "no such file", "check the path (it is read on the worker) or the bucket and key"
        ) from None
    except IsADirectoryError:
        raise InvalidInputImage(shown, "it is a folder", "give the path of one image file") from None
    except PermissionError:
        raise InvalidInputImage(
            shown, "it cannot be read (permission denied)", "let the worker (or the connection) read it"
        ) from None
    except Exception as error:
        # from None: an object store's error text can quote the request; the type and the text
        # without any query say enough.
        raise InputImageUnavailable(
            f"Could not read the input image {shown} ({type(error).__name__}: {without_query(str(error))}): "
            "check the store, the credentials of its connection and the network. Nothing was sent"
        ) from None


def _type_name(value: object) -> str:
    """How a source of the wrong type is named in its error: its type, never its value."""
    return f"a {type(value).__name__}"


# ------------------------------------------------------------------------------ the cache
@dataclass
class CachedUpload:
    """A stored link: where the content was uploaded, and the earliest time it may have been made."""

    download_url: str
    uploaded_at: datetime
    upload_base_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "download_url": self.download_url,
            "uploaded_at": self.uploaded_at.isoformat(),
            "upload_base_url": self.upload_base_url,
        }

    @classmethod
    def from_dict(cls, data: Any) -> CachedUpload | None:
        """Read a stored entry; ``None`` for one of any other form (it is then uploaded anew)."""
        if not isinstance(data, Mapping):
            return None
        url, at, base = data.get("download_url"), data.get("uploaded_at"), data.get("upload_base_url")
        if not isinstance(url, str) or not url or not isinstance(at, str):
            return None
        try:
            moment = datetime.fromisoformat(at)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return cls(url, moment, base if isinstance(base, str) else None)


class UploadCache:
    """
    The input images a task instance uploaded, by SHA-256, kept in ``task_state_store``.

    One value per task instance (key :data:`STATE_KEY`), as the submission ledger keeps its own:
    ``{"version": 1, "files": {"<sha256>": {"download_url", "uploaded_at", "upload_base_url"}}}``.
    Where the store is absent (Airflow before 3.3, or a bare context) the links are kept in this
    object only and :attr:`available` is false: a retry then uploads again (free, only slower).

    :param context: the task's context (its ``task_state_store``), or any mapping.
    :param clock: the current time, aware (tests replace it).
    """

    def __init__(
        self, context: Context | Mapping[str, Any], *, clock: Callable[[], datetime] | None = None
    ) -> None:
        self._store = context.get("task_state_store")
        self._clock = clock or (lambda: datetime.now(UTC))
        self._local: dict[str, CachedUpload] = {}

    @property
    def available(self) -> bool:
        return self._store is not None

    def load(self) -> dict[str, CachedUpload]:
        """Every stored link by SHA-256 (entries of any other form are left out)."""
        if self._store is None:
            return dict(self._local)
        value = self._store.get(STATE_KEY)
        if not isinstance(value, Mapping) or value.get("version") != CACHE_VERSION:
            return {}
        files = value.get("files")
        entries = files.items() if isinstance(files, Mapping) else ()
        loaded = {sha: CachedUpload.from_dict(entry) for sha, entry in entries if isinstance(sha, str)}
        return {sha: entry for sha, entry in loaded.items() if entry is not None}

    def save(self, entries: Mapping[str, CachedUpload]) -> None:
        if self._store is None:
            self._local = dict(entries)
            return
        files = {sha: entry.to_dict() for sha, entry in entries.items()}
        self._store.set(STATE_KEY, {"version": CACHE_VERSION, "files": files})

    def link_for(
        self,
        image: InputImage,
        hook: ImageCbHook,
        ttl: timedelta = UPLOAD_TTL,
        *,
        margin: timedelta = UPLOAD_SAFETY_MARGIN,
    ) -> str:
        """
        A link to ``image`` the vendor can still fetch: the stored one while it is fresh, else a new upload.

        A stored link is used while it is younger than ``ttl - margin`` and was uploaded to the
        hook's current upload host; otherwise the image is uploaded (under its hash, so a name is
        never reused for other bytes) and the link stored at once, before it is used. Entries past
        their lifetime are dropped on that save.

        :param image: the checked input image.
        :param hook: the API hook that uploads it.
        :param ttl: how long an uploaded file is assumed to live (default :data:`UPLOAD_TTL`).
        :param margin: how long before that assumed end a link stops being used.
        """
        from imagecb_provider.hooks.uploads import upload_base_url

        settings = hook.settings
        base = upload_base_url(settings.base_url, settings.upload_base_url)
        entries = self.load()
        now = self._clock()
        cached = entries.get(image.sha256)
        if cached is not None and cached.upload_base_url == base and now < cached.uploaded_at + ttl - margin:
            log.info("Input image %s was uploaded at %s: reusing its link", image.name, cached.uploaded_at)
            return cached.download_url
        started = now
        uploaded = hook.upload_file(image.data, file_name=image.upload_name, upload_path=UPLOAD_PATH)
        # The earlier of the vendor's time and ours: the lifetime is never counted from too late.
        made = min(uploaded.uploaded_at, started)
        entries = {sha: entry for sha, entry in entries.items() if now < entry.uploaded_at + ttl}
        entries[image.sha256] = CachedUpload(uploaded.download_url, made, base)
        self.save(entries)
        return uploaded.download_url


def input_image_url(
    source: str | os.PathLike[str] | ObjectStoragePath,
    hook: ImageCbHook,
    cache: UploadCache | None = None,
    *,
    conn_id: str | None = None,
) -> str:
    """
    The ``input_image`` to submit for ``source``: an ``http(s)`` URL as it is, anything else uploaded.

    :param source: a public ``http(s)`` link, or what :func:`read_input_image` reads.
    :param hook: the API hook that uploads it.
    :param cache: the task instance's :class:`UploadCache` (without one, every call uploads).
    :param conn_id: the Airflow connection of an object store.
    """
    if is_http_url(source):
        return str(source).strip()
    image = read_input_image(source, conn_id=conn_id)
    if cache is None:
        return hook.upload_file(image.data, file_name=image.upload_name, upload_path=UPLOAD_PATH).download_url
    return cache.link_for(image, hook)
