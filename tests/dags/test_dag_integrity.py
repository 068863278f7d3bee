"""Every DAG in dags/ imports cleanly, is well labelled, and does no I/O at parse time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"

pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def dag_bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_all_dags_import_without_errors(dag_bag):
    assert dag_bag.import_errors == {}
    assert {"imagecb_batch_generate", "imagecb_quickstart"} <= set(dag_bag.dag_ids)


def test_dags_have_owners_tags_and_retries(dag_bag):
    for dag_id, dag in dag_bag.dags.items():
        assert "imagecb" in dag.tags, dag_id
        for task in dag.tasks:
            assert task.owner not in ("", "airflow"), f"{dag_id}.{task.task_id} has no owner"
            assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_batch_dag_is_unscheduled_without_catchup_and_takes_its_params_from_the_run(dag_bag):
    """Unpausing it never starts a run over the demo prompts: no schedule unless one is configured."""
    dag = dag_bag.dags["imagecb_batch_generate"]
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert {
        "prompts_path",
        "archive_root",
        "wait_mode",
        "poll_interval",
        "timeout",
        "chunk_size",
        "fail_run_on_lost",
        "model",
        "aspect_ratio",
        "imagecb_conn_id",
    } <= set(dag.params)
    assert type(dag.timetable).__name__ == "NullTimetable"
    assert all(dag.params.get_param(name).description for name in ("archive_root", "chunk_size", "wait_mode"))


def test_every_param_left_empty_in_the_trigger_form_is_valid(dag_bag):
    """The UI's trigger form sends an empty text field as null: such a param must accept null."""
    from airflow.sdk.definitions.param import Param

    for dag in dag_bag.dags.values():
        for name, param in dag.params.items():
            if not isinstance(param, Param) or param.value not in ("", None):
                continue
            param.resolve(value=None)  # raises ParamValidationError when the form would be blocked
            assert "null" in param.schema.get("type", []), (dag.dag_id, name)


def test_a_schedule_comes_only_from_the_environment(tmp_path):
    probe = (
        "from airflow.dag_processing.dagbag import DagBag; import sys; "
        f"bag = DagBag(dag_folder={str(ROOT / 'dags' / 'imagecb_batch_generate.py')!r}); "
        "print(bag.dags['imagecb_batch_generate'].timetable.expression)"
    )
    env = {**os.environ, "IMAGECB_BATCH_SCHEDULE": "@daily"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] in ("@daily", "0 0 * * *")


PARSE_PROBE = r"""
import json, os, sys
events = []
ROOT = sys.argv[1]
def audit(event, args):
    if event in ("socket.connect", "socket.getaddrinfo"):
        events.append([event, repr(args[1:2])])
    elif event == "open":
        path, mode = str(args[0]), str(args[1] or "r")
        if path.startswith(os.path.join(ROOT, "include")) or any(flag in mode for flag in "wax+"):
            if "/tmp/" not in path or "include" in path:
                events.append([event, path, mode])
from airflow.dag_processing.dagbag import DagBag
sys.addaudithook(audit)
bag = DagBag(dag_folder=os.path.join(ROOT, "dags"))
print(json.dumps({"dags": sorted(bag.dag_ids), "errors": list(bag.import_errors), "events": events}))
"""


def test_parsing_the_dags_opens_no_socket_and_reads_no_data_file():
    completed = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["errors"] == []
    assert "imagecb_batch_generate" in report["dags"]
    assert report["events"] == []
