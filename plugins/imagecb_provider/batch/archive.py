"""
Keeping generated files: download while the links are fresh, verify, write whole or not at all,
and describe every file once in the destination's ``manifest.jsonl``.

Destinations are ``ObjectStoragePath``s, so the same code writes to a local folder, S3 or GCS.
A file is first written under a temporary name in the same folder and then renamed, so readers
never see half a file; a file already present with the same checksum is not written again,
and the manifest is keyed by (remote task id, source), so a rerun adds nothing twice.

A file is named after its remote task id, which comes from outside (a result dict, a vendor
answer): the id must be of the one strict form (:func:`~imagecb_provider.models.remote_task_id`),
and, whatever the name, a target that would leave the destination folder is refused before a byte
is written (see :func:`archive_target`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import ObjectStoragePath

from imagecb_provider.exceptions import (
    ImageCbArchiveTargetRefused,
    ImageCbArchiveUnavailable,
    ImageCbConfigurationError,
    ImageCbCorruptFile,
    ImageCbError,
    ImageCbLinkExpired,
    InvalidRemoteTaskId,
)
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.hooks.protocol import without_query
from imagecb_provider.models import remote_task_id as checked_remote_task_id
from imagecb_provider.models import to_iso

MANIFEST_NAME = "manifest.jsonl"
MIN_IMAGE_BYTES = 64
#: Conditional writes of a remote manifest tried before giving up (each rereads it first).
MAX_WRITE_ATTEMPTS = 40

#: How each file was obtained, as the manifest tells it.
VIA_DIRECT = "direct"
VIA_DOWNLOAD_URL = "download_url"
VIA_RESULT_URL = "result_url"

#: The files kept per remote task: ``<id>.<ext>`` for the result, ``<id>.origin.<ext>`` for the origin.
SOURCES = ("result", "origin")
#: Protocols of an ``ObjectStoragePath`` on local disk (a bare path has none).
LOCAL_PROTOCOLS = ("file", "local", "")

#: How each kind of image starts and ends: (content type, extension, start, end). A WebP is a
#: RIFF container of form "WEBP" (bytes 8-11) and carries its own length, so no end marker.
_JPEG = ("image/jpeg", "jpg", b"\xff\xd8\xff", b"\xff\xd9")
_PNG = ("image/png", "png", b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82")  # the IEND chunk and its CRC

log = logging.getLogger(__name__)


def archive_remote_task_id(value: object, destination: object) -> str:
    """
    Return ``value`` if it may name archived files, or raise :class:`ImageCbArchiveTargetRefused`.

    :param value: the remote task id of a result to archive.
    :param destination: the destination folder, for the error text.
    """
    try:
        return checked_remote_task_id(value, "a result to archive")
    except InvalidRemoteTaskId as error:
        raise ImageCbArchiveTargetRefused(
            value, destination, "a remote task id is 1 to 128 letters, digits, '_' or '-'"
        ) from error


def archive_target(destination: ObjectStoragePath, name: str, remote_task_id: object) -> ObjectStoragePath:
    """
    Return ``destination / name``, or raise :class:`ImageCbArchiveTargetRefused` if it leaves ``destination``.

    Checked on the path itself, whatever produced the name: on local disk the target, symlinks
    resolved, must sit directly in the resolved destination; in an object store the normalized key
    must be the destination prefix plus this one name.

    :param destination: the archive's destination folder.
    :param name: the file name (one path segment).
    :param remote_task_id: the id the name was made from, for the error text.
    """

    def refuse(reason: str) -> ImageCbArchiveTargetRefused:
        return ImageCbArchiveTargetRefused(remote_task_id, destination, reason)

    # A backslash is a separator to some object-store tools and to Windows: never part of a name.
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise refuse(f"the file name {name!r} is not a single path segment")
    target = destination / name
    if destination.protocol in LOCAL_PROTOCOLS:
        root = os.path.realpath(destination.path)
        resolved = os.path.realpath(target.path)
        if os.path.dirname(resolved) != root:
            raise refuse(f"the file would be written at {resolved}, outside {root}")
    else:
        root = posixpath.normpath(destination.path)
        key = target.path
        expected = posixpath.join(root, name)
        if posixpath.normpath(key) != expected:
            raise refuse(f"the object key {key!r} is not directly under {root!r}")
    return target


@dataclass(frozen=True)
class ArchivedFile:
    """One kept file, as returned by the archive operator and written to the manifest."""

    remote_task_id: str
    source: str  # "result" or "origin"
    path: str
    sha256: str
    bytes: int
    content_type: str
    fetched_via: str  # direct, download_url or result_url
    prompt: str | None
    request_key: str | None  # fingerprint of the request, so a rerun of the batch can reuse the file
    archived_at: str
    # An edit's input image: where it was read (a path or URL without credentials or query) and
    # the SHA-256 of what was uploaded; both absent from the lines of images not edited from a file.
    input_source: str | None = None
    input_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in _INPUT_FIELDS:
            if data[name] is None:
                del data[name]
        return data


_INPUT_FIELDS = ("input_source", "input_sha256")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def input_fields(result: Mapping[str, Any]) -> dict[str, str | None]:
    """
    The manifest's ``input_source`` and ``input_sha256`` of a result (none when it edited no file).

    From the result's ``input_image`` (a file read and uploaded); for an edit of a public link, the
    link without its query. The source is shown through
    :func:`~imagecb_provider.utils.inputs.display_name` again, so no credentials or query reach
    the manifest whatever the result holds; a hash not of 64 hex digits is left out.

    :param result: a generate operator's result.
    """
    from imagecb_provider.utils.inputs import display_name, is_http_url

    described = result.get("input_image")
    if isinstance(described, Mapping) and described.get("source"):
        sha = described.get("sha256")
        return {
            "input_source": display_name(str(described["source"])),
            "input_sha256": sha if isinstance(sha, str) and _SHA256.fullmatch(sha) else None,
        }
    link = (result.get("request") or {}).get("inputImage")
    if is_http_url(link):
        return {"input_source": display_name(link), "input_sha256": None}
    return {}


def storage_path(url: str, conn_id: str | None = None) -> ObjectStoragePath:
    """An ``ObjectStoragePath`` for a folder URL (``s3://…``, ``file://…``); a plain path means local disk."""
    if "://" not in url:
        # Joined segment by segment: parsed as a URL, a last folder named "?" or "#" (an empty
        # query or fragment) would vanish, and the files would land in its parent.
        parts = os.path.abspath(os.path.expanduser(url)).split("/")
        return ObjectStoragePath("file:///", conn_id=conn_id).joinpath(*[p for p in parts if p])
    return ObjectStoragePath(url, conn_id=conn_id)


#: What to install for the usual object-store schemes (the provider brings the filesystem's package).
FILESYSTEM_PACKAGES = {
    "s3": "apache-airflow-providers-amazon[s3fs]",
    "s3a": "apache-airflow-providers-amazon[s3fs]",
    "gs": "apache-airflow-providers-google",
    "gcs": "apache-airflow-providers-google",
    "abfs": "apache-airflow-providers-microsoft-azure",
    "abfss": "apache-airflow-providers-microsoft-azure",
    "az": "apache-airflow-providers-microsoft-azure",
    "adl": "apache-airflow-providers-microsoft-azure",
}


class NoFilesystem(Exception):
    """No fsspec filesystem is installed for a path's scheme; ``package`` is what to install."""

    def __init__(self, scheme: str, cause: BaseException) -> None:
        self.scheme = scheme
        self.package = FILESYSTEM_PACKAGES.get(scheme, f"the fsspec filesystem of {scheme}://")
        self.detail = f"no filesystem for {scheme}:// is installed ({cause})"
        super().__init__(self.detail)


def with_filesystem(make: Callable[[], ObjectStoragePath], scheme: str) -> ObjectStoragePath:
    """
    Return the path ``make`` builds, its filesystem instantiated; raise :class:`NoFilesystem` if missing.

    :param make: builds the path (building it may already fail for an unknown scheme).
    :param scheme: the scheme named in the error.
    """
    try:
        path = make()
        path.fs  # noqa: B018 - instantiating the filesystem is what fails when its package is missing
    except (ImportError, ValueError) as error:
        raise NoFilesystem(scheme, error) from None
    return path


def check_archive_destination(url: str, conn_id: str | None = None) -> ObjectStoragePath:
    """
    Check that files can be written under ``url`` before anything is generated; return its path.

    A local folder is created (with its parents) and a probe file written and removed there; in an
    object store a probe object is written and removed (no bucket or folder is created).

    :param url: the destination folder: a path, ``file://``, ``s3://``, ``gs://``... URL.
    :param conn_id: the Airflow connection of an object store.
    :raises ImageCbConfigurationError: no filesystem is installed for the URL's scheme, or a
        local folder cannot be created or written; the message names the destination and the fix.
    :raises ImageCbArchiveUnavailable: the object store refused or failed the probe.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else "file"
    try:
        path = with_filesystem(lambda: storage_path(url, conn_id), scheme)
    except NoFilesystem as missing:
        raise ImageCbConfigurationError(
            f"The archive destination {url} cannot be used: {missing.detail}. Install {missing.package} "
            "on every worker, or choose a local folder (DAG param archive_root). Nothing was generated"
        ) from None
    local = path.protocol in LOCAL_PROTOCOLS
    probe = path / f".imagecb-write-check-{uuid.uuid4().hex}"
    try:
        if local:
            # Not in an object store: there mkdir may create a bucket.
            path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as error:
        what = f"{type(error).__name__}: {error}"
        if local and isinstance(error, OSError):
            raise ImageCbConfigurationError(
                f"The archive destination {url} cannot be created or written ({what}). Choose a folder "
                "every worker can write (DAG param archive_root), or fix its permissions. Nothing was "
                "generated"
            ) from None
        raise ImageCbArchiveUnavailable(
            f"The archive destination {url} could not be written ({what}): check the bucket, the "
            "credentials of its connection and the network. Nothing was generated"
        ) from None
    return path


def sniff_image(body: bytes, url: str) -> tuple[str, str]:
    """The (content type, extension) of a whole image, or :class:`ImageCbCorruptFile`."""
    if len(body) < MIN_IMAGE_BYTES:
        raise ImageCbCorruptFile(f"The file from {url} has only {len(body)} bytes: not an image")
    if body.startswith(b"RIFF") and body[8:12] == b"WEBP":
        return "image/webp", "webp"
    for content_type, extension, start, end in (_JPEG, _PNG):
        if body.startswith(start):
            # Zero padding after the end marker is tolerated; a missing marker is a cut-off file.
            if not body.rstrip(b"\x00").endswith(end):
                raise ImageCbCorruptFile(f"The file from {url} is a truncated {content_type} (no end marker)")
            return content_type, extension
    raise ImageCbCorruptFile(f"The file from {url} is not a JPEG, PNG or WebP image")


class ArchiveStore:
    """
    One destination folder with its manifest.

    :param destination: where files go (``file:///…``, ``s3://bucket/prefix``, ``gs://…``).
    :param hook: the API hook, for downloads and fresh links.
    """

    def __init__(self, destination: ObjectStoragePath, hook: ImageCbHook, manifest_name: str = MANIFEST_NAME):
        self.destination = destination
        self.hook = hook
        self.manifest = JsonlLedger(
            destination / manifest_name,
            key_fields=("remote_task_id", "source"),
            supersede_fields=("request_key", "source"),
        )

    # ------------------------------------------------------------------ downloads
    def download(self, url: str, refresh_fallback: str | None = None) -> tuple[bytes, str]:
        """
        The bytes behind ``url`` and how they were obtained.

        An expired or refused link is refreshed through the download-url endpoint; if that
        fails too, ``refresh_fallback`` (the long-lived result URL) is used instead.
        """
        try:
            return self.hook.fetch_file(url)[0], VIA_DIRECT
        except ImageCbLinkExpired as expired:
            log.info("%s; asking the API for a fresh link", expired)
        try:
            return self.hook.fetch_file(self.hook.get_download_url(url))[0], VIA_DOWNLOAD_URL
        except ImageCbError as error:
            if not refresh_fallback:
                raise
            log.warning("Could not refresh the link (%s); using the long-lived result URL instead", error)
        return self.hook.fetch_file(refresh_fallback)[0], VIA_RESULT_URL

    # --------------------------------------------------------------------- files
    def keep(
        self,
        remote_task_id: str,
        source: str,
        url: str,
        *,
        prompt: str | None,
        request_key: str | None = None,
        fallback_url: str | None = None,
        input_source: str | None = None,
        input_sha256: str | None = None,
    ) -> ArchivedFile:
        """
        Download, verify and write one file (idempotent: same name, same bytes, no second write).

        ``input_source`` and ``input_sha256`` (see :func:`input_fields`) go into its manifest line.

        A remote task id not of the strict form, or a target outside the destination, raises
        :class:`ImageCbArchiveTargetRefused` and writes nothing; a bad id is refused before the download.
        """
        if source not in SOURCES:
            raise ValueError(f"source={source!r}: must be one of {', '.join(SOURCES)}")
        remote_task_id = archive_remote_task_id(remote_task_id, self.destination)
        body, via = self.download(url, refresh_fallback=fallback_url)
        content_type, extension = sniff_image(body, without_query(url))
        digest = hashlib.sha256(body).hexdigest()
        suffix = "" if source == "result" else f".{source}"
        target = archive_target(self.destination, f"{remote_task_id}{suffix}.{extension}", remote_task_id)
        if not self._same_file_exists(target, digest):
            self._write_whole(target, body)
        return ArchivedFile(
            remote_task_id=remote_task_id,
            source=source,
            path=str(target),
            sha256=digest,
            bytes=len(body),
            content_type=content_type,
            fetched_via=via,
            prompt=prompt,
            request_key=request_key,
            archived_at=to_iso(datetime.now(UTC)),
            input_source=input_source,
            input_sha256=input_sha256,
        )

    @staticmethod
    def _same_file_exists(target: ObjectStoragePath, digest: str) -> bool:
        return target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == digest

    def _write_whole(self, target: ObjectStoragePath, body: bytes) -> None:
        self.destination.mkdir(parents=True, exist_ok=True)
        partial = self.destination / f".{target.name}.{uuid.uuid4().hex}.partial"
        try:
            partial.write_bytes(body)
            if partial.stat().st_size != len(body):
                raise ImageCbCorruptFile(
                    f"Writing {target} stored {partial.stat().st_size} of {len(body)} bytes"
                )
            partial.rename(target)
        finally:
            if partial.exists():
                partial.unlink()

    # ------------------------------------------------------------------ manifest
    def record(self, files: Iterable[ArchivedFile]) -> int:
        """Add the files the manifest does not list yet; returns how many lines were added."""
        return self.manifest.add(f.to_dict() for f in files)

    def kept(self) -> dict[tuple[str, str], ArchivedFile]:
        """The files the manifest lists, by (remote task id, source): kept already, not downloaded again."""
        fields = ArchivedFile.__dataclass_fields__
        return {
            (e["remote_task_id"], e["source"]): ArchivedFile(**{k: e.get(k) for k in fields})
            for e in self.manifest.read()
        }


class JsonlLedger:
    """
    A JSON-lines file of entries unique by ``key_fields``: adding an entry twice adds one line.

    With ``supersede_fields``, a new entry that matches a current one on those fields (the same
    request and source, another remote task) marks the old one ``superseded_by`` the new one: the
    old file is kept, and :meth:`current` leaves it out.

    Concurrent writers are safe. In a local folder they are serialized by a lock file and lines
    are appended. Object stores cannot append or lock, so the object is rewritten whole with a
    conditional write (S3 ``If-Match`` / ``If-None-Match``), read again and retried on conflict.
    """

    def __init__(
        self,
        path: ObjectStoragePath,
        key_fields: tuple[str, ...],
        supersede_fields: tuple[str, ...] = (),
    ) -> None:
        self.path = path
        self.key_fields = key_fields
        self.supersede_fields = supersede_fields

    def _key(self, entry: dict[str, Any]) -> tuple:
        return tuple(entry.get(name) for name in self.key_fields)

    def read(self) -> list[dict[str, Any]]:
        return _parse(self.path.read_text()) if self.path.exists() else []

    def current(self) -> list[dict[str, Any]]:
        """The entries not superseded by a newer one."""
        return [entry for entry in self.read() if not entry.get("superseded_by")]

    def add(self, entries: Iterable[dict[str, Any]]) -> int:
        """Add the entries whose key is not there yet; returns how many lines were added."""
        entries = list(entries)
        if not entries:
            return 0
        if self._is_local():
            with self._lock():
                return self._merge_local(entries)
        return _retry_on_conflict(lambda: self._merge_remote(entries))

    def _merge(self, existing: list[dict], entries: list[dict]) -> tuple[list[dict], list[dict], bool]:
        """The new lines, the existing lines (some now superseded), and whether any was changed."""
        known = {self._key(entry) for entry in existing}
        new: list[dict[str, Any]] = []
        for entry in entries:
            if self._key(entry) not in known:
                known.add(self._key(entry))
                new.append(entry)
        changed = False
        for entry in new:
            for old in existing:
                if self._supersedes(entry, old):
                    old["superseded_by"] = entry.get("remote_task_id")
                    changed = True
        return new, existing, changed

    def _supersedes(self, new: dict[str, Any], old: dict[str, Any]) -> bool:
        if not self.supersede_fields or old.get("superseded_by"):
            return False
        same = all(new.get(f) == old.get(f) and new.get(f) is not None for f in self.supersede_fields)
        return same and self._key(new) != self._key(old)

    def _is_local(self) -> bool:
        return self.path.protocol in ("file", "local", "")

    def _merge_local(self, entries: list[dict[str, Any]]) -> int:
        existing = self.read()
        new, existing, changed = self._merge(existing, entries)
        if changed:  # rewrite whole (old lines now say superseded_by), atomically
            temporary = f"{self.path.path}.{uuid.uuid4().hex}.partial"
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(_lines(existing + new))
            os.replace(temporary, self.path.path)
        elif new:
            with open(self.path.path, "a", encoding="utf-8") as handle:
                handle.write(_lines(new))
        return len(new)

    def _merge_remote(self, entries: list[dict[str, Any]]) -> int:
        fs, key = self.path.fs, self.path.path
        etag, text = _read_with_etag(fs, key)
        new, existing, changed = self._merge(_parse(text), entries)
        if not new and not changed:
            return 0
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        if self.path.protocol != "s3":  # other stores: no condition (one writer at a time)
            condition = {}
        fs.pipe_file(key, _lines(existing + new).encode(), **condition)
        return len(new)

    @contextmanager
    def _lock(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path.parent.path}/.{self.path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class _WriteConflict(Exception):
    """Another writer changed the object between our read and our conditional write."""


def _parse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _lines(entries: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)


def _read_with_etag(fs: Any, key: str) -> tuple[str | None, str]:
    """The object's ETag and text, read consistently (``(None, "")`` when it does not exist)."""
    for _ in range(MAX_WRITE_ATTEMPTS):
        try:
            before = fs.info(key, refresh=True).get("ETag")
        except FileNotFoundError:
            return None, ""
        text = fs.cat_file(key).decode("utf-8")
        if fs.info(key, refresh=True).get("ETag") == before:
            return before, text
    raise _WriteConflict(f"{key} kept changing while it was read")


def _retry_on_conflict(write: Callable[[], int]) -> int:
    for attempt in range(1, MAX_WRITE_ATTEMPTS + 1):
        try:
            return write()
        except (OSError, _WriteConflict) as error:
            if attempt == MAX_WRITE_ATTEMPTS or not _is_precondition_failure(error):
                raise
            log.info("The manifest changed while it was updated (attempt %d); reading it again", attempt)
            # Tuning only: another backoff changes how long a writer waits, not what is written.
            time.sleep(random.uniform(0, min(0.05 * 2**attempt, 2.0)))  # pragma: no mutate
    raise AssertionError("unreachable")  # pragma: no cover


def _is_precondition_failure(error: Exception) -> bool:
    text = str(error)
    return isinstance(error, _WriteConflict) or "pre-condition" in text or "PreconditionFailed" in text


#: What each new file's entry in an asset event's extra holds.
_EVENT_FILE_FIELDS = ("path", "sha256", "bytes", "content_type", "source", "remote_task_id")


@dataclass
class ArchiveRun:
    """
    What one run of the archive operator did, for its asset event and its lineage.

    :param destination: the rendered destination folder.
    :param manifest: the manifest's path.
    :param results: every result the task was given (``None`` ones left out), successes or not.
    :param files: every file of the successful results, kept now or by an earlier run.
    :param new_files: the files this run added to the destination.
    """

    destination: str
    manifest: str
    results: list[dict[str, Any]]
    files: list[ArchivedFile]
    new_files: list[ArchivedFile]

    def event_extra(self) -> dict[str, Any]:
        """The extra of the asset event: the destination, the manifest, and each new file."""
        return {
            "destination": self.destination,
            "manifest": self.manifest,
            "files": [{name: getattr(f, name) for name in _EVENT_FILE_FIELDS} for f in self.new_files],
        }
