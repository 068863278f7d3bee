"""The runs the contact sheet tests look at: a batch-like DAG, run with ``dag.test()``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from airflow.sdk import DAG, get_current_context, task, task_group

from imagecb_provider.batch.report import run_folder_name
from imagecb_provider.operators.generate import ImageBatchGenerateOperator

DAY = "2026-01-02"
IMAGE = b"\xff\xd8\xff\xe0" + b"not really a jpeg, but bytes to compare" + b"\xff\xd9"
SECRET = "the-secret-outside-the-day-folder"
INPUT_SHA = "ab" * 32
REPORT_HTML = (
    "<!doctype html><html><body><h1>Sheet</h1>"
    '<div class="card" id="line-2"><img src="../../images/abc123.jpg">'
    '<a class="ti" href="/dags/d/runs/r/tasks/image.generate/mapped/0" target="_top">lines 2-3</a></div>'
    "</body></html>"
)
REQUESTS = [[{"prompt": "a lantern"}, {"prompt": "a kite"}], [{"prompt": "a fox [sim:content_policy]"}]]


@dataclass
class Run:
    dag_id: str
    run_id: str
    root: Path

    def url(self, tail: str) -> str:
        return f"/imagecb/dags/{self.dag_id}/runs/{quote(self.run_id, safe='')}/{tail}"


def _write_report(root: Path, run_id: str) -> dict[str, str]:
    """Lay out a day folder as the batch DAG does, plus bait outside it; return the report task's XCom."""
    day = root / DAY
    out = day / "runs" / run_folder_name(run_id)
    out.mkdir(parents=True)
    (out / "report.html").write_text(REPORT_HTML)
    (out / "summary.json").write_text('{"lost": 1}')
    (out / "inputs").mkdir()
    (out / "inputs" / f"{INPUT_SHA}.jpg").write_bytes(IMAGE)  # an edit's "before" picture
    (out / "inputs" / "notes.txt").write_text(SECRET)
    images = day / "images"
    images.mkdir()
    (images / "abc123.jpg").write_bytes(IMAGE)
    (images / "manifest.jsonl").write_text('{"path": "abc123.jpg"}\n')
    (images / ".hidden.jpg").write_bytes(IMAGE)
    (root / "secret.jpg").write_text(SECRET)
    (root / "secret.txt").write_text(SECRET)
    os.symlink(root / "secret.jpg", images / "escape.jpg")
    other = day / "runs" / "another_run"
    other.mkdir()
    (other / "report.html").write_text(SECRET)
    return {"summary": str(out / "summary.json"), "report": str(out / "report.html")}


def _batch_dag(dag_id: str, root: Path | None) -> DAG:
    with DAG(dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:

        @task_group(group_id="image")
        def image(requests: list[dict]) -> None:
            ImageBatchGenerateOperator(
                task_id="generate", requests=requests, failure_mode="return", poll_interval=0.2
            )

        group = image.expand(requests=REQUESTS)
        if root is not None:

            @task(trigger_rule="all_done")
            def report() -> dict[str, str]:
                return _write_report(root, get_current_context()["dag_run"].run_id)

            group >> report()
    return dag


def make_runs(run_module_dag: Callable[..., Any], tmp_path_factory: Any) -> dict[str, Run]:
    """Two finished runs: one whose report task returned its paths, one without a report task."""
    made = {}
    for name, root in (("with_report", tmp_path_factory.mktemp("archive")), ("without_report", None)):
        dag_id = f"imagecb_ui_{name}"
        dag_run = run_module_dag(_batch_dag(dag_id, root))
        assert dag_run.state == "success", [(t.task_id, t.map_index, t.state) for t in dag_run.task_instances]
        made[name] = Run(dag_id, dag_run.run_id, root or Path("/nonexistent"))
    return made
