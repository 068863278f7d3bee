"""
The main job end to end: ``imagecb_batch_generate`` on the demo prompts, in real Airflow
(``dag.test()``) against the simulator.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
LOGICAL_DATE = datetime(2026, 3, 1, tzinfo=UTC)

pytestmark = pytest.mark.airflow

# What the markers in include/prompts/demo.csv choose, after the one resubmission.
EXPECTED_COUNTS = {
    "success": 7,  # six plain prompts, and [sim:flaky] after its resubmission
    "content_policy": 1,
    "internal_error": 1,  # [sim:internal_error] fails again when resubmitted
    "generation_failed": 1,
    "timeout": 1,  # [sim:never] with a short timeout
}
EXPECTED_REJECTED = 3  # an empty prompt, an aspect ratio of 2:1, a duplicate row


@pytest.fixture(scope="module")
def batch_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "imagecb_batch_generate.py"))
    assert bag.import_errors == {}
    return bag.dags["imagecb_batch_generate"]


def _run(run_dag, dag, archive_root: Path):
    conf = {"archive_root": str(archive_root), "poll_interval": 0.2, "timeout": 1.5}
    return run_dag(dag, logical_date=LOGICAL_DATE, run_conf=conf)


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_the_demo_batch_end_to_end_and_again(run_dag, batch_dag, imagecb_simulator, tmp_path):
    dag_run = _run(run_dag, batch_dag, tmp_path)
    assert dag_run.state == "success"
    run_folder = tmp_path / "2026-03-01"
    summary = json.loads((run_folder / "summary.json").read_text())

    # counts match what the markers chose, keyed by the outcome names of DESIGN.md
    assert summary["counts"] == EXPECTED_COUNTS
    assert summary["rejected"] == EXPECTED_REJECTED
    assert summary["resubmitted"] == 3  # flaky, internal_error, generation_failed
    stats = imagecb_simulator.stats()
    assert summary["credits"]["used"] == summary["credits"]["before"] - stats["credits"]
    assert summary["credits"]["used"] > 0
    sent = set(stats["submissions"])
    assert "" not in sent
    assert not any("koi pond" in prompt for prompt in sent)
    assert (
        stats["submissions"]["a red bicycle leaning on a white wall, studio photo"] == 1
    )  # duplicate row not paid

    # every archived file is a valid image whose sha256 matches its manifest line
    lines = _manifest(run_folder / "images")
    assert len(lines) == 2 * EXPECTED_COUNTS["success"]
    for line in lines:
        body = Path(line["path"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(body).hexdigest() == line["sha256"]
        Image.open(io.BytesIO(body)).verify()

    # the content-policy prompt is quarantined with its reason
    quarantined = [json.loads(x) for x in (run_folder / "quarantine.jsonl").read_text().splitlines()]
    assert Counter(q["outcome"] for q in quarantined) == {"content_policy": 1, "timeout": 1}

    # the contact sheet shows every archived image and every failure's reason
    report = (run_folder / "report.html").read_text()
    assert report.count("<img ") == EXPECTED_COUNTS["success"]
    for image in summary["images"]:
        if image["reason"]:
            assert image["reason"] in report or json.dumps(image["reason"])[1:-1] in report

    # per map index, only the chosen branch ran
    states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    by_prompt = {image["prompt"]: image for image in summary["images"]}
    for index in range(len(summary["images"]) - EXPECTED_REJECTED + 1):
        if ("image.route", index) not in states:
            continue
        ran = {task for (task, i), state in states.items() if i == index and state == "success"}
        skipped = {task for (task, i), state in states.items() if i == index and state == "skipped"}
        assert "image.generate" in ran
        assert ran & {"image.archive", "image.quarantine", "image.resubmit"}, index
        assert len(ran & {"image.archive", "image.quarantine", "image.resubmit"}) == 1, (index, ran, skipped)
    assert by_prompt  # joined by prompt

    # a second run of the same batch and date: nothing archived twice, no success paid again
    before = dict(stats["submissions"])
    second = _run(run_dag, batch_dag, tmp_path)
    assert second.state == "success"
    again = _manifest(run_folder / "images")
    assert len(again) == len(lines)
    assert len({(line["remote_task_id"], line["source"]) for line in again}) == len(again)
    submitted_again = {p: n - before.get(p, 0) for p, n in imagecb_simulator.stats()["submissions"].items()}
    assert {p for p, n in submitted_again.items() if n} <= {
        p for p in before if "[sim:" in p and "flaky" not in p
    }
    summary2 = json.loads((run_folder / "summary.json").read_text())
    assert summary2["reused_from_earlier_run"] == EXPECTED_COUNTS["success"]
    assert summary2["counts"]["success"] == EXPECTED_COUNTS["success"]


def test_a_manual_run_without_a_logical_date_keys_its_folder_by_run_after(
    run_dag, batch_dag, imagecb_simulator, tmp_path
):
    """Airflow 3 creates manual runs without a logical date: the batch must still find its folder."""
    prompts = tmp_path / "two.jsonl"
    prompts.write_text('{"prompt": "a small boat"}\n{"prompt": "a big ship", "output_format": "png"}\n')
    conf = {"archive_root": str(tmp_path / "archive"), "prompts_path": str(prompts), "poll_interval": 0.2}
    dag_run = run_dag(batch_dag, logical_date=None, run_conf=conf)
    assert dag_run.state == "success"
    assert dag_run.logical_date is None
    folder = tmp_path / "archive" / dag_run.run_after.strftime("%Y-%m-%d")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["counts"]["success"] == 2
    assert len(_manifest(folder / "images")) == 4
