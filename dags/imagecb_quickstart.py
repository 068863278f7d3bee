"""
Quick start: generate a handful of images through ``ImageCbHook`` and keep the files.

The smallest useful job: submit every prompt, poll until each task ends, download each result
image into ``archive_root``. It runs anywhere the ``imagecb_default`` connection points (the
simulator for ``make demo``, the real API otherwise).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from airflow.sdk import Param, dag, task

DEFAULT_PROMPTS = [
    "a lighthouse on a cliff at dawn, watercolor",
    "a red bicycle leaning on a white wall, photo",
    "a bowl of ramen seen from above, studio light",
    "a paper crane on a wooden desk, macro shot",
]


@dag(
    dag_id="imagecb_quickstart",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["imagecb", "example"],
    default_args={"owner": "imagecb", "retries": 1},
    params={
        "prompts": Param(DEFAULT_PROMPTS, type="array", description="One image per prompt"),
        "archive_root": Param("/tmp/imagecb-quickstart", type="string", description="Where files are kept"),
        "poll_interval": Param(1.0, type="number", minimum=0.1, description="Seconds between status calls"),
    },
)
def imagecb_quickstart():
    @task
    def generate_and_keep(params: dict) -> list[str]:
        from imagecb_provider.hooks.imagecb import ImageCbHook
        from imagecb_provider.models import GenerationRequest, Outcome

        hook = ImageCbHook()
        requests = [GenerationRequest(prompt=p) for p in params["prompts"]]  # validated before any call
        pending = {hook.submit(request): request for request in requests}
        root = Path(params["archive_root"])
        root.mkdir(parents=True, exist_ok=True)
        kept = []
        while pending:
            time.sleep(params["poll_interval"])
            for task_id in list(pending):
                record = hook.get_task(task_id)
                if not record.is_terminal:
                    continue
                pending.pop(task_id)
                if record.outcome is not Outcome.SUCCESS:
                    print(f"{task_id}: {record.outcome} ({record.message})")
                    continue
                body, content_type = hook.fetch_file(record.result_image_url)
                path = root / f"{task_id}.{'png' if 'png' in content_type else 'jpg'}"
                path.write_bytes(body)
                kept.append(str(path))
                print(f"{task_id}: {path} ({len(body)} bytes)")
        return kept

    generate_and_keep()


imagecb_quickstart()
