"""
Which files of a run the contact sheet may serve, and nothing else; read in capped chunks.

A run's report lives in ``<day folder>/runs/<run folder>/report.html`` and links its images as
``../../images/<file>``. Served under ``.../runs/<run id>/files/``, the report is
``files/runs/<run folder>/report.html`` and its images ``files/images/<file>``: the same relative
links work unchanged. A requested path is matched against that exact shape (never joined
blindly), so ``..``, absolute paths, other runs' folders, hidden files and other file types are
refused. Every file must also lie under a configured archive root (:mod:`.roots`) and, on local
disk, resolve (symbolic links followed) inside the day folder. Files are read in chunks and
refused past a size cap, so a huge file neither fills the API server's memory nor is sent.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from imagecb_provider.exceptions import InvalidRemoteTaskId
from imagecb_provider.models import remote_task_id
from imagecb_provider.ui.roots import LOCAL, Location, check_within, locate

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"
#: What an image may be called: the archive names files ``<remote task id>[.origin].<ext>``.
_IMAGE_NAME = re.compile(r"^(?P<task_id>[^.]+)(?:\.origin)?\.(?P<ext>jpg|jpeg|png|webp)$")
IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
#: A run's copy of an edited image's input (batch/report.py): ``<sha256>.<ext>``.
_INPUT_NAME = re.compile(r"^[0-9a-f]{64}\.(?P<ext>jpg|jpeg|png|webp)$")
RUN_FILE_TYPES = {REPORT_NAME: "text/html; charset=utf-8", SUMMARY_NAME: "application/json"}
#: The largest image served (bytes); an archived image is a few MiB.
IMAGE_MAX_BYTES = 32 * 1024 * 1024
#: The largest report or summary served (bytes): the report is read whole, to add the tab's script.
REPORT_MAX_BYTES = 8 * 1024 * 1024
#: How much of a file is read at a time.
CHUNK_BYTES = 256 * 1024


class FileRefused(LookupError):
    """A path the contact sheet does not serve (answered 404, whatever the reason)."""


class FileTooLarge(ValueError):
    """A file larger than the contact sheet serves."""


def max_bytes(location: Location) -> int:
    """
    Return the size cap of a file the contact sheet serves.

    :param location: the file (the report and the summary have the smaller cap)
    """
    return REPORT_MAX_BYTES if location.name in RUN_FILE_TYPES else IMAGE_MAX_BYTES


@dataclass(frozen=True)
class RunFiles:
    """
    The files of one run's contact sheet, found from the location of its report.

    :param report: the report's path or URL, as the report task returned it
    :param roots: the configured archive roots (:func:`.roots.configured_roots`)
    """

    report: str
    roots: Sequence[Location]

    @property
    def report_location(self) -> Location:
        """The report's location, under an archive root (else :class:`.roots.LocationRefused`)."""
        return locate(self.report, self.roots)

    @property
    def run_folder(self) -> str:
        """The name of the run's own folder (``runs/<this>/report.html``)."""
        return self.report_location.parent.name

    @property
    def report_url_path(self) -> str:
        """Where the report is served, relative to ``files/``."""
        return f"runs/{self.run_folder}/{REPORT_NAME}"

    def day_folder(self) -> Location:
        """Return the day folder holding ``images/`` and ``runs/``; refuse a report elsewhere."""
        report = self.report_location
        if report.name != REPORT_NAME or report.parent.parent.name != "runs":
            raise FileRefused(f"{self.report!r} is not <day folder>/runs/<run>/{REPORT_NAME}")
        return report.parent.parent.parent

    def resolve(self, relative: str) -> tuple[Location, str]:
        """
        Return the file a request path names (resolved, when local) and its content type.

        Raises :class:`FileRefused` for a path not of this run's sheet, and
        :class:`.roots.LocationRefused` for a report or file outside the archive roots.

        :param relative: the path after ``files/``: ``images/<file>``,
            ``runs/<this run's folder>/report.html`` (or ``summary.json``), or an edit's input
            ``runs/<this run's folder>/inputs/<sha256>.<ext>``
        """
        day = self.day_folder()
        parts = relative.split("/")
        if len(parts) == 2 and parts[0] == "images" and (match := _IMAGE_NAME.match(parts[1])):
            try:
                remote_task_id(match["task_id"], "the image file name")
            except InvalidRemoteTaskId:
                raise FileRefused(f"not an archived image's name: {parts[1]!r}") from None
            return self._inside(day, day.child("images", parts[1])), IMAGE_TYPES[match["ext"]]
        if (
            len(parts) == 4
            and parts[:3] == ["runs", self.run_folder, "inputs"]
            and (match := _INPUT_NAME.match(parts[3]))
        ):  # the "before" picture of an edit
            target = day.child("runs", self.run_folder, "inputs", parts[3])
            return self._inside(day, target), IMAGE_TYPES[match["ext"]]
        if len(parts) == 3 and parts[:2] == ["runs", self.run_folder] and parts[2] in RUN_FILE_TYPES:
            target = day.child("runs", self.run_folder, parts[2])
            return self._inside(day, target), RUN_FILE_TYPES[parts[2]]
        raise FileRefused(f"not a file of this run's contact sheet: {relative!r}")

    def _inside(self, day: Location, path: Location) -> Location:
        """Return ``path`` resolved; refuse it outside the roots, or resolving outside the day folder."""
        resolved = check_within(path, self.roots, path.url)
        if path.scheme == LOCAL and not path.is_within(day):
            raise FileRefused(f"{path.path!r} resolves outside {day.real().path!r}")
        return resolved


def is_file(location: Location) -> bool:
    """
    Tell whether a checked location is a regular file (a local one: without following a link).

    :param location: a location returned by :meth:`RunFiles.resolve`
    """
    if location.scheme == LOCAL:
        try:
            return stat.S_ISREG(os.lstat(location.path).st_mode)
        except OSError:
            return False
    return location.storage_path().is_file()


def open_capped(location: Location, limit: int) -> Iterator[bytes]:
    """
    Open a checked file and return its chunks; refuse it at once when it is larger than ``limit``.

    Raises :class:`FileRefused` when it is not a regular file (or moved since it was checked),
    :class:`FileTooLarge` when its size is over ``limit``; the chunks stop with
    :class:`FileTooLarge` should it grow past ``limit`` while read.

    :param location: a location returned by :meth:`RunFiles.resolve`
    :param limit: the most bytes served
    """
    handle, size = _open_local(location) if location.scheme == LOCAL else _open_remote(location)
    if size is not None and size > limit:
        handle.close()
        raise FileTooLarge(f"{location.name} is {size} bytes, more than the {limit} the contact sheet serves")
    return read_capped(handle, limit, location.name)


def _open_local(location: Location) -> tuple[BinaryIO, int]:
    """Open a resolved local file without following a link; refuse anything but that very file."""
    try:
        # O_NONBLOCK: a FIFO put in the file's place cannot hang the open.
        fd = os.open(location.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise FileRefused(f"cannot open {location.path!r}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"{location.path!r} is not a regular file")
        # A folder of the path swapped for a link after the check would open another file.
        opened = f"/proc/self/fd/{fd}"
        if os.path.exists(opened) and os.path.realpath(opened) != location.path:
            raise FileRefused(f"{location.path!r} moved while it was opened")
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def _open_remote(location: Location) -> tuple[BinaryIO, int | None]:
    """Open a file on S3 or GCS; return it with its size when the store tells it."""
    path = location.storage_path()
    try:
        info = path.fs.info(path.path)
    except FileNotFoundError:
        raise FileRefused(f"no file at {location.url!r}") from None
    if info.get("type") != "file":
        raise FileRefused(f"{location.url!r} is not a file")
    size = info.get("size")
    return path.open("rb"), size if isinstance(size, int) else None


def read_capped(handle: BinaryIO, limit: int, name: str = "the file") -> Iterator[bytes]:
    """
    Yield a file's bytes in chunks; stop with :class:`FileTooLarge` once more than ``limit`` came.

    At most ``limit + 1`` bytes are read, whatever the file's size; the file is closed at the end.

    :param handle: the open file
    :param limit: the most bytes yielded
    :param name: the file's name, for the error text
    """
    with handle:
        read = 0
        while chunk := handle.read(min(CHUNK_BYTES, limit + 1 - read)):
            read += len(chunk)
            if read > limit:
                raise FileTooLarge(f"{name} grew past the {limit} bytes the contact sheet serves")
            yield chunk


def read_all(location: Location, limit: int) -> bytes:
    """
    Return a checked file's bytes (at most ``limit``), or raise like :func:`open_capped`.

    :param location: a location returned by :meth:`RunFiles.resolve`
    :param limit: the most bytes read
    """
    return b"".join(open_capped(location, limit))
