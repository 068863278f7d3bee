"""
``ImageArchiveOperator``: keep the files of one result or a batch of results.

The origin URL expires ten minutes after completion, so this task belongs right after the
generation; a late run still succeeds through a refreshed link or the long-lived result URL,
and the manifest says which.

The destination is the task's outlet :class:`~airflow.sdk.Asset` (see :func:`archive_asset` for
how it is named): a run that keeps new files emits one asset event listing them, a run that keeps
nothing new emits none, so a DAG scheduled on the asset runs only when there is something new.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from airflow.sdk import Asset, BaseOperator

from imagecb_provider.batch.archive import (
    MANIFEST_NAME,
    ArchivedFile,
    ArchiveRun,
    ArchiveStore,
    archive_remote_task_id,
    input_fields,
    storage_path,
)
from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID, ImageCbHook
from imagecb_provider.models import Outcome, request_key

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk import Context

DEFAULT_DESTINATION = "file:///tmp/imagecb-archive"
_TEMPLATE_MARKERS = ("{{", "{%")


def archive_asset(destination: str, asset: Asset | str | Literal[False] | None = None) -> Asset | None:
    """
    The asset an archive task emits its events to, fixed when the DAG is parsed.

    An asset's URI cannot change from run to run, so a templated destination cannot be it. The rule:

    * ``asset`` given: that asset (a string is the asset's name, and its URI too); ``False``: none;
    * a literal destination: the destination folder's URL (a plain path becomes ``file://``);
    * a templated destination: the folder before its first template, when that folder is a full
      URL or an absolute path (``s3://bucket/images/{{ ds }}`` gives ``s3://bucket/images``);
      otherwise (``{{ params.root }}/images``) no asset: pass ``asset=`` to have one.

    :param destination: the operator's ``destination``, as written in the DAG (not rendered).
    :param asset: the operator's ``asset`` argument.
    """
    if asset is False:
        return None
    if isinstance(asset, Asset):
        return asset
    if isinstance(asset, str):
        return Asset(asset)
    if asset is not None:
        raise TypeError(f"asset={asset!r}: must be an Asset, an asset name, False or None")
    url = _static_folder(destination)
    return Asset(name=url, uri=url) if url else None


def _static_folder(destination: str) -> str | None:
    """The destination folder's URL, or the static folder before its first template, if any."""
    cuts = [i for i in (destination.find(marker) for marker in _TEMPLATE_MARKERS) if i >= 0]
    if not cuts:
        if "://" not in destination:
            return f"file://{os.path.abspath(os.path.expanduser(destination))}".rstrip("/")
        return destination.rstrip("/")
    folder = destination[: min(cuts)].rpartition("/")[0].rstrip("/")
    if folder.startswith("/"):
        return f"file://{folder}"
    parts = urlsplit(folder)
    if parts.scheme and "://" in folder and (parts.netloc or parts.path.strip("/")):
        return folder
    return None


class ImageArchiveOperator(BaseOperator):
    """
    Download the result (and origin) image of every successful result into ``destination``.

    :param results: one result dict (an ``ImageGenerateOperator`` XCom) or a list of them;
        results that are not successes (or ``None``, from skipped tasks) are passed over.
    :param destination: a folder URL (templated): ``file:///…``, ``s3://bucket/prefix``,
        ``gs://…``.
    :param storage_conn_id: the Airflow connection for the destination (S3, GCS); none for local.
    :param keep_origin: also keep the origin image (as ``<task id>.origin.<ext>``).
    :param max_concurrency: parallel downloads.
    :param group_label: what this task works on, for the UI (``map_index_template="{{ task.group_label }}"``).
    :param asset: the outlet asset the task's events go to: an ``Asset``, an asset name, or
        ``False`` for none. By default, the destination's URL when the destination is literal
        (see :func:`archive_asset` for templated ones). A run that keeps new files emits one
        event whose extra lists them (path, sha256, bytes, content type, source, remote task
        id) with the destination and the manifest; a run that keeps nothing new emits none.
        When mapping this operator itself (``.partial().expand()``), pass the asset in
        ``partial(outlets=[asset], asset=asset)`` so that the scheduler knows it.
    :return: the successful results, each with ``files``: path, sha256, bytes, content_type,
        source (``result`` or ``origin``) and ``fetched_via``; for an edit, ``input_source`` and
        ``input_sha256`` (the input image's path or URL and hash). A single result in, a single out.

    Files are named after the results' remote task ids: a successful result whose ``task_id`` is
    not of the strict form (1 to 128 letters, digits, ``_`` or ``-``) fails the task with
    :class:`~imagecb_provider.exceptions.ImageCbArchiveTargetRefused` before anything is
    downloaded or written, and so does any file whose path would leave ``destination``.
    """

    template_fields: Sequence[str] = (
        "results",
        "destination",
        "storage_conn_id",
        "imagecb_conn_id",
        "group_label",
    )
    template_fields_renderers = {"results": "json"}
    ui_color = "#d9f2e6"

    def __init__(
        self,
        *,
        results: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | Any,
        destination: str = DEFAULT_DESTINATION,
        storage_conn_id: str | None = None,
        imagecb_conn_id: str = DEFAULT_CONN_ID,
        keep_origin: bool = True,
        max_concurrency: int = 4,
        manifest_name: str = MANIFEST_NAME,
        group_label: str | None = None,
        asset: Asset | str | Literal[False] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency!r}: must be 1 or more")
        self.results = results
        self.destination = destination
        self.storage_conn_id = storage_conn_id
        self.imagecb_conn_id = imagecb_conn_id
        self.keep_origin = keep_origin
        self.max_concurrency = max_concurrency
        self.manifest_name = manifest_name
        self.group_label = group_label
        self.asset = archive_asset(destination, asset)
        if self.asset is not None and self.asset not in self.outlets:
            self.outlets = [*self.outlets, self.asset]
        #: What the last run did (set by ``execute``), for its lineage.
        self.last_run: ArchiveRun | None = None

    @cached_property
    def store(self) -> ArchiveStore:
        destination = storage_path(self.destination, self.storage_conn_id)
        return ArchiveStore(
            destination, ImageCbHook(imagecb_conn_id=self.imagecb_conn_id), self.manifest_name
        )

    def execute(self, context: Context) -> Any:
        single = isinstance(self.results, Mapping)
        results = [dict(r) for r in ([self.results] if single else list(self.results or [])) if r]
        successes = [r for r in results if r.get("outcome") == Outcome.SUCCESS]
        self.log.info(
            "Archiving %d successful result(s) of %d into %s", len(successes), len(results), self.destination
        )
        kept = self.store.kept()
        # Every id is checked here, before the first download: a forged result fails the task
        # whole with nothing written, not after the other results' files were kept unrecorded.
        jobs = [job for result in successes for job in self._jobs(result)]
        todo = [job for job in jobs if (job["remote_task_id"], job["source"]) not in kept]
        # The hook's calls are stateless (a session per thread), so the threads share it.
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            fetched = list(pool.map(lambda job: self.store.keep(**job), todo))
        added = self.store.record(fetched)
        files = fetched + [kept[(j["remote_task_id"], j["source"])] for j in jobs if j not in todo]
        self.log.info(
            "Kept %d file(s) (%d already in the manifest); %d new manifest line(s) in %s",
            len(files),
            len(jobs) - len(todo),
            added,
            self.store.manifest.path,
        )
        self.last_run = ArchiveRun(
            destination=str(self.store.destination),
            manifest=str(self.store.manifest.path),
            results=results,
            files=files,
            new_files=fetched,
        )
        self._announce(context, self.last_run)
        archived = [self._with_files(result, files) for result in successes]
        return archived[0] if single and archived else (None if single else archived)

    def _announce(self, context: Context, run: ArchiveRun) -> None:
        """Describe the new files in the asset event; with none, emit no event at all."""
        if self.asset is None:
            return
        if not run.new_files:
            # Airflow emits an event for every outlet of a successful task: leaving the outlet
            # out of this run is how a run that kept nothing new announces nothing.
            self.outlets = [outlet for outlet in self.outlets if outlet != self.asset]
            self.log.info("Nothing new in %s: no event for asset %r", run.destination, self.asset.name)
            return
        outlet_events = context.get("outlet_events")
        if outlet_events is not None:
            outlet_events[self.asset].extra = run.event_extra()
        self.log.info("Asset %r: one event for %d new file(s)", self.asset.name, len(run.new_files))

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """Describe this run for OpenLineage: the requests read, the destination written, the files."""
        from imagecb_provider.utils.openlineage import archive_lineage

        return archive_lineage(
            conn_id=self.imagecb_conn_id, destination=str(self.destination), run=self.last_run
        )

    def _jobs(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        common = {
            "remote_task_id": archive_remote_task_id(result.get("task_id"), self.store.destination),
            "prompt": result.get("prompt"),
            "request_key": request_key(result.get("request") or {}),
            # an edit: where its input image came from, beside the result (no credentials or query)
            **input_fields(result),
        }
        jobs = [{**common, "source": "result", "url": result["result_image_url"]}]
        if self.keep_origin and result.get("origin_image_url"):
            origin_url, fallback_url = result["origin_image_url"], result["result_image_url"]
            jobs.append({**common, "source": "origin", "url": origin_url, "fallback_url": fallback_url})
        return jobs

    @staticmethod
    def _with_files(result: dict[str, Any], files: list[ArchivedFile]) -> dict[str, Any]:
        mine = [f.to_dict() for f in files if f.remote_task_id == result["task_id"]]
        return {**result, "files": mine}
