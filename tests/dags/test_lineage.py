"""
OpenLineage events of the imagecb operators, emitted by the OpenLineage provider itself.

A ``dag.test()`` run happens in a subprocess whose environment configures the provider's own
*file* transport (``AIRFLOW__OPENLINEAGE__TRANSPORT``), as a deployment would: the provider
reads its configuration and registers its listener when Airflow starts, so it cannot be switched
on in the middle of this test session. The events written to the file are then checked: the
requests and the prompt file as inputs, the archive folder as output, the remote task ids and
outcomes as the ``imagecb`` run facet, for a success and for a failure. The remote tasks come
from the submission ledger, read through the task's supervisor: under ``dag.test()`` that needs
``[openlineage] execute_in_thread`` (without it the events still come, without them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imagecb_provider.models import request_key

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]

DAG_ID = "imagecb_lineage_probe"
PROMPT = "a lighthouse at dawn"
FLAGGED = "a crowd [sim:content_policy]"
PROMPT_FILE = "file:///data/prompts/lineage.csv"

#: Runs the probe DAG with ``dag.test()`` after registering it as the scheduler would, and
#: prints the task states and the XCom results as one JSON line.
PROBE = textwrap.dedent(
    f"""
    import json, sys
    from datetime import datetime, timedelta

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.sdk import DAG, Asset, task

    from imagecb_provider.operators.archive import ImageArchiveOperator
    from imagecb_provider.operators.generate import ImageGenerateOperator

    destination = sys.argv[1]
    with DAG({DAG_ID!r}, schedule=None, start_date=datetime(2026, 1, 1),
             default_args={{"retry_delay": timedelta(seconds=0)}}) as dag:
        generated = ImageGenerateOperator(
            task_id="generate", prompt={PROMPT!r}, aspect_ratio="4:3", poll_interval=0.2,
            inlets=[Asset({PROMPT_FILE!r})],
        )
        ImageArchiveOperator(task_id="archive", results=generated.output, destination=destination)

        @task.imagecb(poll_interval=0.2, retries=2)
        def flagged():
            return {FLAGGED!r}

        flagged()

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=None, collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    dag_run = dag.test()
    tis = {{ti.task_id: ti for ti in dag_run.get_task_instances()}}
    print("PROBE " + json.dumps({{
        "states": {{task_id: ti.state for task_id, ti in tis.items()}},
        "generate": tis["generate"].xcom_pull(task_ids="generate"),
        "archive": tis["archive"].xcom_pull(task_ids="archive"),
    }}))
    """
)


def _run_probe(work: Path, *, execute_in_thread: bool) -> tuple[dict, list[dict], Path, dict]:
    """Run the probe DAG with the file transport; its report, the events, the archive, the stats."""
    from imagecb_provider.testing.simulator import run_in_thread

    events_file = work / "openlineage.jsonl"
    destination = work / "archive"
    script = work / "probe.py"
    script.write_text(PROBE)
    with run_in_thread(latency=0.2) as simulator:
        env = {
            **os.environ,
            "AIRFLOW_CONN_IMAGECB_DEFAULT": simulator.connection_json(),
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                {"type": "file", "log_file_path": str(events_file), "append": True}
            ),
            "AIRFLOW__OPENLINEAGE__NAMESPACE": "imagecb-tests",
            "AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD": str(execute_in_thread),
        }
        completed = subprocess.run(
            [sys.executable, str(script), str(destination)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        stats = simulator.stats()
    assert completed.returncode == 0, completed.stderr[-4000:]
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("PROBE ")]
    report = json.loads(line.removeprefix("PROBE "))
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    return report, events, destination, stats


@pytest.fixture(scope="module")
def lineage_run(airflow_db, tmp_path_factory):
    """
    The probe DAG's run, extracting lineage in a thread of the task process.

    ``dag.test()`` serves the task's supervisor requests in-process, from a thread that a fork
    does not copy; the OpenLineage provider's default (extracting in a forked child) works on a
    worker, where the child reaches the supervisor through its socket (see the stack tests).
    """
    return _run_probe(tmp_path_factory.mktemp("lineage"), execute_in_thread=True)


def _event(events: list[dict], task_id: str, event_type: str) -> dict:
    (event,) = [
        e for e in events if e["job"]["name"] == f"{DAG_ID}.{task_id}" and e["eventType"] == event_type
    ]
    return event


def _request_dataset(payload: dict) -> tuple[str, str]:
    return ("imagecb://imagecb_default", f"request/{request_key(payload)}")


def test_generate_reads_the_prompt_file_and_the_request_and_reports_its_remote_task(lineage_run):
    report, events, _, stats = lineage_run
    assert report["states"]["generate"] == "success"
    event = _event(events, "generate", "COMPLETE")
    payload = {"prompt": PROMPT, "aspectRatio": "4:3"}
    inputs = {(d["namespace"], d["name"]): d for d in event["inputs"]}
    assert set(inputs) == {("file", "/data/prompts/lineage.csv"), _request_dataset(payload)}
    assert inputs[_request_dataset(payload)]["facets"]["documentation"]["description"] == PROMPT
    facet = event["run"]["facets"]["imagecb"]
    remote_task_id = report["generate"]["task_id"]
    assert stats["tasks"][remote_task_id]["prompt"] == PROMPT
    assert facet["operation"] == "generate"
    assert facet["connId"] == "imagecb_default"
    assert facet["outcomes"] == {"success": 1}
    assert facet["tasks"] == [
        {
            "remoteTaskId": remote_task_id,
            "outcome": "success",
            "message": "",
            "requestKey": request_key(payload),
            "earlier": [],
        }
    ]


def test_archive_writes_the_destination_and_lists_its_files(lineage_run):
    report, events, destination, _ = lineage_run
    assert report["states"]["archive"] == "success"
    event = _event(events, "archive", "COMPLETE")
    (output,) = event["outputs"]
    assert (output["namespace"], output["name"]) == ("file", str(destination))
    files = report["archive"]["files"]
    statistics = output["outputFacets"]["outputStatistics"]
    assert (statistics["fileCount"], statistics["size"]) == (2, sum(f["bytes"] for f in files))
    # The archive reads what the generate task made: the same request dataset links the two.
    payload = {"prompt": PROMPT, "aspectRatio": "4:3"}
    assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [_request_dataset(payload)]
    facet = event["run"]["facets"]["imagecb"]
    assert (facet["operation"], facet["outcomes"]) == ("archive", {"success": 1})
    assert facet["destination"] == f"file://{destination}"
    assert facet["manifest"] == f"file://{destination}/manifest.jsonl"
    (archived,) = facet["tasks"]
    assert archived["remoteTaskId"] == report["generate"]["task_id"]
    assert sorted((f["path"], f["sha256"], f["new"]) for f in archived["files"]) == sorted(
        (f["path"], f["sha256"], True) for f in files
    )
    assert Path(files[0]["path"].removeprefix("file://")).parent == destination


def test_a_failed_generation_reports_its_remote_task_and_outcome(lineage_run):
    report, events, _, stats = lineage_run
    assert report["states"]["flagged"] == "failed"
    event = _event(events, "flagged", "FAIL")
    (remote_task_id,) = [tid for tid, task in stats["tasks"].items() if task["prompt"] == FLAGGED]
    facet = event["run"]["facets"]["imagecb"]
    assert facet["outcomes"] == {"content_policy": 1}
    assert [(t["remoteTaskId"], t["outcome"]) for t in facet["tasks"]] == [(remote_task_id, "content_policy")]
    assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [_request_dataset({"prompt": FLAGGED})]


def test_a_forked_extraction_under_dag_test_still_emits_every_event(airflow_db, tmp_path):
    """With the provider's default (fork), the events come, without the remote tasks: nothing hangs."""
    report, events, destination, _ = _run_probe(tmp_path, execute_in_thread=False)
    assert report["states"] == {"generate": "success", "archive": "success", "flagged": "failed"}
    generate = _event(events, "generate", "COMPLETE")
    payload = {"prompt": PROMPT, "aspectRatio": "4:3"}
    assert _request_dataset(payload) in [(d["namespace"], d["name"]) for d in generate["inputs"]]
    assert generate["run"]["facets"]["imagecb"]["tasks"] == []
    assert _event(events, "flagged", "FAIL")["run"]["facets"]["imagecb"]["operation"] == "generate"
    (output,) = _event(events, "archive", "COMPLETE")["outputs"]
    assert (output["namespace"], output["name"]) == ("file", str(destination))
