"""
Publish the batch's new images as soon as they are archived.

The batch's archive task (``imagecb_batch_generate``, ``image.archive``) emits an event of the
asset ``imagecb_batch_images`` for every group that keeps new files; the event's extra lists them
(path, sha256, bytes, content type, source, remote task id) with the destination folder and the
manifest. A rerun that keeps nothing new emits no event, so it starts no run here.

Each run of this DAG, scheduled on that asset, copies the new images of the events that triggered
it into ``publish_root`` (each checked against its sha256 first: a file changed since it was
archived fails the run) and adds one line per image to ``publish_root/index.jsonl`` (once per
published file, so a rerun indexes nothing twice). ``publish_root`` defaults to ``IMAGECB_PUBLISH_ROOT``
from the environment, else ``/tmp/imagecb-published``. Parsing this file reads no file and makes
no network call.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from airflow.sdk import Asset, Param, dag, task

#: The asset the batch's archive task emits to (``asset=`` of its ``ImageArchiveOperator``).
BATCH_IMAGES = Asset("imagecb_batch_images")
PUBLISH_ROOT = os.environ.get("IMAGECB_PUBLISH_ROOT", "/tmp/imagecb-published")


@dag(
    dag_id="imagecb_asset_consumer",
    description="Copy the images each batch archives to a publish folder, verified, and index them",
    doc_md=__doc__,
    schedule=[BATCH_IMAGES],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["imagecb", "example", "assets"],
    default_args={"owner": "imagecb", "retries": 2},
    params={
        "publish_root": Param(PUBLISH_ROOT, type="string", description="Folder or URL the images go to"),
        "storage_conn_id": Param(
            None, type=["null", "string"], description="Connection to read the archive with (S3, GCS)"
        ),
    },
)
def imagecb_asset_consumer():
    # [START howto_asset_consumer]
    @task
    def new_files(triggering_asset_events: Any = None) -> list[dict[str, Any]]:
        """The files the triggering asset events announce, each once."""
        files: dict[str, dict[str, Any]] = {}
        for events in (triggering_asset_events or {}).values():
            for event in events:
                for entry in (event.extra or {}).get("files", []):
                    files.setdefault(entry["path"], entry)
        print(f"{len(files)} new file(s) announced")
        return list(files.values())

    # [END howto_asset_consumer]
    @task
    def publish(files: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
        """Copy each announced file into publish_root, checked against its sha256, and index it."""
        import hashlib

        from airflow.sdk.exceptions import AirflowFailException

        from imagecb_provider.batch.archive import JsonlLedger, storage_path

        root = storage_path(params["publish_root"])
        root.mkdir(parents=True, exist_ok=True)
        published = []
        for entry in files:
            body = storage_path(entry["path"], params.get("storage_conn_id")).read_bytes()
            digest = hashlib.sha256(body).hexdigest()
            if digest != entry["sha256"]:
                raise AirflowFailException(
                    f"{entry['path']} changed since it was archived: sha256 {digest}, "
                    f"the asset event says {entry['sha256']}"
                )
            target = root / entry["path"].rsplit("/", 1)[-1]
            target.write_bytes(body)
            published.append({**entry, "published": str(target)})
        added = JsonlLedger(root / "index.jsonl", key_fields=("published",)).add(published)
        print(f"Published {len(published)} file(s) to {root}; {added} new index line(s)")
        return {"published": [p["published"] for p in published], "indexed": added}

    publish(new_files())


imagecb_asset_consumer()
