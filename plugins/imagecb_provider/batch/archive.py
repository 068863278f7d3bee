"""
Keeping generated files: download while the links are fresh, verify, write whole or not at all,
and describe every file once in the destination's ``manifest.jsonl``.

Destinations are ``ObjectStoragePath``s, so the same code writes to a local folder, S3 or GCS.
A file is first written under a temporary name in the same folder and then renamed, so readers
never see half a file; a file already present with the same checksum is not written again,
and the manifest is keyed by (remote task id, source), so a rerun adds nothing twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import ObjectStoragePath

from imagecb_provider.exceptions import ImageCbCorruptFile, ImageCbError, ImageCbLinkExpired
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.models import to_iso

MANIFEST_NAME = "manifest.jsonl"
MIN_IMAGE_BYTES = 64

#: How each file was obtained, as the manifest tells it.
VIA_DIRECT = "direct"
VIA_DOWNLOAD_URL = "download_url"
VIA_RESULT_URL = "result_url"

_SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"RIFF", "image/webp", "webp"),
)

log = logging.getLogger(__name__)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def storage_path(url: str, conn_id: str | None = None) -> ObjectStoragePath:
    """An ``ObjectStoragePath`` for a folder URL (``s3://…``, ``file://…``); a plain path means local disk."""
    if "://" not in url:
        url = f"file://{os.path.abspath(os.path.expanduser(url))}"
    return ObjectStoragePath(url, conn_id=conn_id)


def sniff_image(body: bytes, url: str) -> tuple[str, str]:
    """The (content type, extension) of a whole image, or :class:`ImageCbCorruptFile`."""
    if len(body) < MIN_IMAGE_BYTES:
        raise ImageCbCorruptFile(f"The file from {url} has only {len(body)} bytes: not an image")
    for signature, content_type, extension in _SIGNATURES:
        if body.startswith(signature):
            if content_type == "image/webp" and body[8:12] != b"WEBP":
                continue
            if content_type == "image/jpeg" and not body.rstrip(b"\x00").endswith(b"\xff\xd9"):
                raise ImageCbCorruptFile(f"The JPEG from {url} is truncated (no end-of-image marker)")
            if content_type == "image/png" and b"IEND" not in body[-16:]:
                raise ImageCbCorruptFile(f"The PNG from {url} is truncated (no IEND chunk)")
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
        self.manifest = JsonlLedger(destination / manifest_name, key_fields=("remote_task_id", "source"))

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
    ) -> ArchivedFile:
        """Download, verify and write one file (idempotent: same name, same bytes, no second write)."""
        body, via = self.download(url, refresh_fallback=fallback_url)
        content_type, extension = sniff_image(body, url.split("?", 1)[0])
        digest = hashlib.sha256(body).hexdigest()
        suffix = "" if source == "result" else f".{source}"
        target = self.destination / f"{remote_task_id}{suffix}.{extension}"
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
        """Append the files the manifest does not list yet; returns how many lines were added."""
        return self.manifest.add(f.to_dict() for f in files)


class JsonlLedger:
    """
    A JSON-lines file of entries unique by ``key_fields``: adding an entry twice adds one line.

    Concurrent writers sharing a local folder are serialized with a lock file; object stores
    cannot append, so there the object is rewritten whole.
    """

    def __init__(self, path: ObjectStoragePath, key_fields: tuple[str, ...]) -> None:
        self.path = path
        self.key_fields = key_fields

    def _key(self, entry: dict[str, Any]) -> tuple:
        return tuple(entry.get(name) for name in self.key_fields)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def add(self, entries: Iterable[dict[str, Any]]) -> int:
        """Append the entries whose key is not there yet; returns how many lines were added."""
        with self._lock():
            known = {self._key(entry) for entry in self.read()}
            new: list[dict[str, Any]] = []
            for entry in entries:
                if self._key(entry) not in known:
                    known.add(self._key(entry))
                    new.append(entry)
            if new:
                self._append("".join(json.dumps(entry, sort_keys=True) + "\n" for entry in new))
        return len(new)

    def _is_local(self) -> bool:
        return self.path.protocol in ("file", "local", "")

    def _append(self, text: str) -> None:
        if self._is_local():
            with open(self.path.path, "a", encoding="utf-8") as handle:
                handle.write(text)
            return
        current = self.path.read_text() if self.path.exists() else ""
        self.path.write_text(current + text)

    @contextmanager
    def _lock(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._is_local():
            yield
            return
        with open(f"{self.path.parent.path}/.{self.path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
