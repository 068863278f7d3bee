"""
``ImageArchiveOperator``: keep the files of one result or a batch of results.

The origin URL expires ten minutes after completion, so this task belongs right after the
generation; a late run still succeeds through a refreshed link or the long-lived result URL,
and the manifest says which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from imagecb_provider.batch.archive import MANIFEST_NAME, ArchivedFile, ArchiveStore, storage_path
from imagecb_provider.hooks.imagecb import DEFAULT_CONN_ID, ImageCbHook
from imagecb_provider.models import Outcome, request_key

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_DESTINATION = "file:///tmp/imagecb-archive"


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
    :return: the successful results, each with ``files``: path, sha256, bytes, content_type,
        source (``result`` or ``origin``) and ``fetched_via``. A single result in, a single out.
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
        archived = [self._with_files(result, files) for result in successes]
        return archived[0] if single and archived else (None if single else archived)

    def _jobs(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        common = {
            "remote_task_id": result["task_id"],
            "prompt": result.get("prompt"),
            "request_key": request_key(result.get("request") or {}),
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
