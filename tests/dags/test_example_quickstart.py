"""
``dags/imagecb_quickstart.py`` run with ``dag.test()`` against the simulator: ``hero`` makes its
image and ``keep`` archives it; ``submit`` only submits, and the sensor ``wait`` waits for that
same remote task.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "imagecb_quickstart"
#: The example DAGs these tests run (see tests/dags/test_examples_covered.py).
EXAMPLE_DAGS_RUN = {"imagecb_quickstart"}

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]

HERO = "a lighthouse on a cliff at dawn, watercolor"
CRANE = "a paper crane on a wooden desk, macro shot"


def _xcom(dag_run, task_id: str):
    ti = next(t for t in dag_run.get_task_instances() if t.task_id == task_id)
    return ti.xcom_pull(task_ids=task_id)


def test_the_quickstart_makes_keeps_and_waits(run_dag, imagecb_simulator, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / f"{DAG_ID}.py"))
    assert bag.import_errors == {}
    dag_run = run_dag(bag.dags[DAG_ID], run_conf={"archive_root": str(tmp_path), "poll_interval": 0.2})

    states = {ti.task_id: getattr(ti.state, "value", ti.state) for ti in dag_run.get_task_instances()}
    assert states == {"hero": "success", "keep": "success", "submit": "success", "wait": "success"}
    assert dag_run.state == "success"
    stats = imagecb_simulator.stats()
    assert stats["submissions"] == {HERO: 1, CRANE: 1}

    hero = _xcom(dag_run, "hero")
    assert (hero["outcome"], hero["request"]["aspectRatio"], hero["request"]["outputFormat"]) == (
        "success",
        "4:3",
        "png",
    )
    # keep: the hero's result and origin images, under archive_root/<ds>, as the manifest says
    day = tmp_path / dag_run.logical_date.strftime("%Y-%m-%d")
    kept = _xcom(dag_run, "keep")
    assert kept["task_id"] == hero["task_id"]
    assert sorted(f["source"] for f in kept["files"]) == ["origin", "result"]
    for entry in kept["files"]:
        path = Path(entry["path"].removeprefix("file://"))
        assert path.parent == day
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    manifest = [json.loads(line) for line in (day / "manifest.jsonl").read_text().splitlines()]
    assert {(m["remote_task_id"], m["source"]) for m in manifest} == {
        (hero["task_id"], "result"),
        (hero["task_id"], "origin"),
    }

    # submit returned the remote task id without waiting; the sensor waited for that task
    remote_task_id = _xcom(dag_run, "submit")
    assert set(stats["tasks"]) == {hero["task_id"], remote_task_id}
    assert stats["status_calls"].get(remote_task_id, 0) >= 1
