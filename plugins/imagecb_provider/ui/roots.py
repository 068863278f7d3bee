"""
Where the contact sheet may read files: under the archive roots an administrator configured.

A run's report location comes from a task's XCom, which any DAG author can write. Opened as
given, it would make the API server fetch an internal ``http://`` service, or read any file of
its disk, and serve the answer on Airflow's origin. So a location is read only when it lies
under one of ``[imagecb] archive_roots`` (``AIRFLOW__IMAGECB__ARCHIVE_ROOTS``): a comma-separated
list of local folders (``/data/archive``, ``file:///data/archive``) and object storage prefixes
(``s3://bucket/prefix``, ``gs://bucket/prefix``). No other scheme is ever read, ``..`` is
refused, and a local path counts where it resolves to, symbolic links followed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow.sdk import ObjectStoragePath

SECTION = "imagecb"
OPTION = "archive_roots"
ENV_VAR = "AIRFLOW__IMAGECB__ARCHIVE_ROOTS"
#: The setting, as an error text names it.
SETTING = f"[{SECTION}] {OPTION} (environment variable {ENV_VAR})"
#: The URL schemes read, and the file system each one is (``ObjectStoragePath``'s aliases).
SCHEMES = {"file": "file", "local": "file", "s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}
LOCAL = "file"


class LocationRefused(Exception):
    """A location the contact sheet does not read; the text says why and what setting to change."""


class NoArchiveRoots(LocationRefused):
    """No archive root is configured: the contact sheet reads no file at all."""


class BadArchiveRoot(LocationRefused):
    """The setting holds an entry that is not a local folder or an s3/gs prefix."""


@dataclass(frozen=True)
class Location:
    """
    A checked place: a local absolute path, or a bucket and key on S3 or GCS.

    :param scheme: ``file``, ``s3`` or ``gs``
    :param path: ``/absolute/path`` (``file``), or ``bucket/key`` without a leading ``/``
    """

    scheme: str
    path: str

    @property
    def name(self) -> str:
        """The last part of the path."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        """The folder holding this location."""
        head = self.path.rstrip("/").rsplit("/", 1)[0]
        return Location(self.scheme, head or "/")

    def child(self, *names: str) -> Location:
        """
        Return a location inside this one.

        :param names: the folder and file names below it (each checked like a location's parts)
        """
        for name in names:
            _check_part(name, self.path)
        return Location(self.scheme, "/".join([self.path.rstrip("/"), *names]))

    @property
    def url(self) -> str:
        """The location as an ``ObjectStoragePath`` URL."""
        return f"file://{self.path}" if self.scheme == LOCAL else f"{self.scheme}://{self.path}"

    def storage_path(self) -> ObjectStoragePath:
        """The location as an ``ObjectStoragePath`` (built from the checked parts only)."""
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(self.url)

    def real(self) -> Location:
        """Return the location a local path resolves to (links followed); any other as is."""
        return Location(LOCAL, os.path.realpath(self.path)) if self.scheme == LOCAL else self

    def is_within(self, root: Location) -> bool:
        """
        Tell whether this location is ``root`` or below it (a local one where both resolve to).

        :param root: a configured archive root
        """
        if self.scheme != root.scheme:
            return False
        if self.scheme == LOCAL:
            mine, base = self.real().path, root.real().path
            return os.path.commonpath([mine, base]) == base
        base_parts = root.path.strip("/").split("/")
        return self.path.split("/")[: len(base_parts)] == base_parts


def _check_part(part: str, text: str) -> None:
    """Refuse a path part that is empty, ``.`` or ``..``, or holds a ``/`` or a control character."""
    if part in ("", ".", "..") or "/" in part or any(ord(c) < 32 or ord(c) == 127 for c in part):
        raise LocationRefused(f"{text!r} has a path part the contact sheet does not follow: {part!r}")


def parse_location(text: str) -> Location:
    """
    Return what a location names, or raise :class:`LocationRefused`; nothing is read.

    :param text: a local absolute path, or a ``file://``, ``s3://`` or ``gs://`` URL (aliases too)
    """
    if not isinstance(text, str) or not text:
        raise LocationRefused(f"not a location: {text!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise LocationRefused(f"{text!r} holds a control character")
    # fsspec reads "a::b" as a chain of file systems ("file::http://..."): never pass one on.
    if "::" in text:
        raise LocationRefused(f"{text!r} is a chained URL")
    if "://" not in text:
        scheme, path = LOCAL, text
    else:
        parts = urlsplit(text)
        scheme = SCHEMES.get(parts.scheme.lower(), "")
        if not scheme:
            raise LocationRefused(
                f"{text!r}: only local paths and file://, s3:// and gs:// URLs are read, "
                f"never {parts.scheme}://"
            )
        if parts.query or parts.fragment or text.endswith(("?", "#")):
            raise LocationRefused(f"{text!r} has a query or a fragment")
        if scheme == LOCAL:
            if parts.netloc not in ("", "localhost"):
                raise LocationRefused(f"{text!r} names another host")
            path = parts.path
        else:
            if not parts.netloc:
                raise LocationRefused(f"{text!r} names no bucket")
            path = parts.netloc + parts.path
    if scheme == LOCAL and not path.startswith("/"):
        raise LocationRefused(f"{text!r} is not an absolute path")
    segments = path.strip("/").split("/") if path.strip("/") else []
    for segment in segments:
        _check_part(segment, text)
    return Location(scheme, "/" + "/".join(segments) if scheme == LOCAL else "/".join(segments))


def configured_roots() -> list[Location]:
    """Return the archive roots of ``[imagecb] archive_roots``; raise when none, or one is unusable."""
    from airflow.configuration import conf

    raw = conf.get(SECTION, OPTION, fallback="") or ""
    entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
    if not entries:
        raise NoArchiveRoots(
            f"No archive root is configured, so the contact sheet reads no report or image. "
            f"Set {SETTING} on the API server to the folders or buckets the batch writes to, "
            "comma-separated: for example /data/archive,s3://bucket/prefix."
        )
    roots = []
    for entry in entries:
        try:
            roots.append(parse_location(entry))
        except LocationRefused as error:
            raise BadArchiveRoot(
                f"{SETTING} holds an entry that is not a local folder or an s3:// or gs:// prefix: "
                f"{error}. Fix the setting on the API server."
            ) from None
    return roots


def locate(text: str, roots: Sequence[Location]) -> Location:
    """
    Return where a location a task returned is, if it parses and lies under one of ``roots``.

    Raises :class:`LocationRefused`, whose text names the setting, for anything else.

    :param text: the location as the task returned it
    :param roots: the configured archive roots
    """
    try:
        location = parse_location(text)
    except LocationRefused as error:
        raise LocationRefused(
            f"{error}. Reports and images are read only under {SETTING}: local folders, "
            "s3:// and gs:// prefixes."
        ) from None
    check_within(location, roots, text)
    return location


def check_within(location: Location, roots: Sequence[Location], text: str) -> Location:
    """
    Return ``location`` (resolved, when local) if it is under one of ``roots``, else refuse it.

    :param location: the location to read
    :param roots: the configured archive roots
    :param text: the location as the task returned it, for the error text
    """
    if any(location.is_within(root) for root in roots):
        return location.real()
    raise LocationRefused(
        f"{text!r} is outside the archive roots this API server reads. If it is where your "
        f"batch archives, an administrator adds its folder or bucket to {SETTING}."
    )
