"""
Which files of a run the contact sheet may serve, and nothing else.

A run's report lives in ``<day folder>/runs/<run folder>/report.html`` and links its images as
``../../images/<file>``. Served under ``.../runs/<run id>/files/``, the report is
``files/runs/<run folder>/report.html`` and its images ``files/images/<file>``: the same relative
links work unchanged. A requested path is matched against that exact shape (never joined
blindly), so ``..``, absolute paths, other runs' folders, hidden files and other file types are
refused; a local file must also resolve, symbolic links followed, inside the day folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"
#: What an image may be called: the archive names files ``<remote task id>[.origin].<ext>``.
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*$")
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
RUN_FILE_TYPES = {REPORT_NAME: "text/html; charset=utf-8", SUMMARY_NAME: "application/json"}


class FileRefused(LookupError):
    """A path the contact sheet does not serve (answered 404, whatever the reason)."""


@dataclass(frozen=True)
class RunFiles:
    """
    The files of one run's contact sheet, found from the path of its report.

    :param report: the report's path or URL, as the report task returned it
    """

    report: str

    @property
    def report_path(self) -> ObjectStoragePath:
        """The report as an ``ObjectStoragePath`` (a plain path is local disk)."""
        from imagecb_provider.batch.archive import storage_path

        return storage_path(self.report)

    @property
    def run_folder(self) -> str:
        """The name of the run's own folder (``runs/<this>/report.html``)."""
        return self.report_path.parent.name

    @property
    def report_url_path(self) -> str:
        """Where the report is served, relative to ``files/``."""
        return f"runs/{self.run_folder}/{REPORT_NAME}"

    def day_folder(self) -> ObjectStoragePath:
        """Return the day folder holding ``images/`` and ``runs/``; refuse a report elsewhere."""
        path = self.report_path
        if path.name != REPORT_NAME or path.parent.parent.name != "runs":
            raise FileRefused(f"{self.report!r} is not <day folder>/runs/<run>/{REPORT_NAME}")
        return path.parent.parent.parent

    def resolve(self, relative: str) -> tuple[ObjectStoragePath, str]:
        """
        Return the file a request path names and its content type, or raise :class:`FileRefused`.

        :param relative: the path after ``files/``: ``images/<file>`` or
            ``runs/<this run's folder>/report.html`` (or ``summary.json``)
        """
        day = self.day_folder()
        parts = relative.split("/")
        if len(parts) == 2 and parts[0] == "images" and _IMAGE_NAME.match(parts[1]):
            content_type = IMAGE_TYPES.get(os.path.splitext(parts[1])[1].lower())
            if content_type:
                return self._inside(day, day / "images" / parts[1]), content_type
        if len(parts) == 3 and parts[:2] == ["runs", self.run_folder] and parts[2] in RUN_FILE_TYPES:
            return self._inside(day, day / "runs" / self.run_folder / parts[2]), RUN_FILE_TYPES[parts[2]]
        raise FileRefused(f"not a file of this run's contact sheet: {relative!r}")

    @staticmethod
    def _inside(day: ObjectStoragePath, path: ObjectStoragePath) -> ObjectStoragePath:
        """Refuse a local file that resolves (through links) outside the day folder."""
        if path.protocol in ("file", "local"):
            root = os.path.realpath(day.path)
            if os.path.commonpath([root, os.path.realpath(path.path)]) != root:
                raise FileRefused(f"{path.path!r} resolves outside {root!r}")
        return path
