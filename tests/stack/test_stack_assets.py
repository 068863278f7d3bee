"""
Archived images as Asset events on a real stack: the scheduler starts the consumer DAG.

``dag.test()`` (``tests/dags/test_assets.py``) shows the events in the database; only a real
scheduler turns them into runs of the DAG scheduled on the asset. Here, on a LocalExecutor
stack with schedules on, a producer (generate, then archive with ``asset=imagecb_batch_images``)
runs twice with new prompts and once replaying already archived results:

* each run that keeps new files emits one event, and the scheduler starts one run of
  ``dags/imagecb_asset_consumer.py`` per event, which publishes exactly the announced files;
* the replay keeps nothing new, emits no event and starts no run.

The stack also writes OpenLineage events with the provider's file transport, extracted the
provider's default way (in a child forked off the task on the worker): the generate task's
event carries its remote task, read from the submission ledger through the supervisor.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = "imagecb_asset_consumer"
PRODUCER = "stack_asset_producer"
REPLAY = "stack_asset_replay"
ASSET = "imagecb_batch_images"

PRODUCER_DAGS = textwrap.dedent(
    f"""
    from datetime import datetime, timedelta

    from airflow.sdk import DAG, Asset, task

    from imagecb_provider.operators.archive import ImageArchiveOperator
    from imagecb_provider.operators.generate import ImageGenerateOperator

    BATCH_IMAGES = Asset({ASSET!r})
    DEFAULTS = {{"owner": "imagecb", "retries": 2, "retry_delay": timedelta(seconds=1)}}

    with DAG({PRODUCER!r}, schedule=None, start_date=datetime(2026, 1, 1), default_args=DEFAULTS,
             params={{"root": "/tmp/imagecb-stack-assets", "prompt": "a fern"}}, tags=["stack"]):
        generated = ImageGenerateOperator(
            task_id="generate", prompt="{{{{ params.prompt }}}}", poll_interval=1
        )
        ImageArchiveOperator(task_id="archive", results=generated.output,
                             destination="{{{{ params.root }}}}/images", asset=BATCH_IMAGES)

    with DAG({REPLAY!r}, schedule=None, start_date=datetime(2026, 1, 1), default_args=DEFAULTS,
             params={{"root": "/tmp/imagecb-stack-assets", "results": []}}, tags=["stack"]):

        @task
        def replay(params=None) -> list:
            return params["results"]

        ImageArchiveOperator(task_id="archive", results=replay(),
                             destination="{{{{ params.root }}}}/images", asset=BATCH_IMAGES)
    """
)


def _wait_for_consumer_runs(stack: Any, count: int, timeout: float = 240.0) -> list[dict[str, Any]]:
    """The consumer's runs, once ``count`` of them exist and all have finished."""
    deadline = time.monotonic() + timeout
    while True:
        runs = stack.client.get(f"dags/{CONSUMER}/dagRuns", order_by="run_after")["dag_runs"]
        if len(runs) >= count and all(r["state"] in ("success", "failed") for r in runs):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(runs)} run(s) of {CONSUMER} after {timeout:g}s, expected {count}: {runs}\n"
                + stack.diagnostics(["scheduler"])
            )
        time.sleep(1)


def _run(stack: Any, dag_id: str, conf: dict[str, Any]) -> str:
    run_id = stack.trigger(dag_id, conf)
    assert stack.wait_for_run(dag_id, run_id, timeout=240) == "success"
    return run_id


@pytest.fixture(scope="module")
def scenario(airflow_stacks: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run the producer twice and the replay once between, on a stack; everything seen after."""
    from imagecb_provider.testing.simulator import run_in_thread

    work = tmp_path_factory.mktemp("stack-assets")
    dags = work / "dags"
    dags.mkdir()
    shutil.copy(ROOT / "dags" / f"{CONSUMER}.py", dags)
    (dags / "producers.py").write_text(PRODUCER_DAGS)
    archive_root, publish_root, lineage_file = (
        work / "archive",
        work / "published",
        work / "openlineage.jsonl",
    )
    with run_in_thread(latency=0.5) as simulator:
        stack = airflow_stacks.get(
            dags_folder=dags,
            parallelism=4,
            use_job_schedule=True,
            connections={"imagecb_default": simulator.connection_json()},
            env={
                "IMAGECB_PUBLISH_ROOT": str(publish_root),
                "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                    {"type": "file", "log_file_path": str(lineage_file), "append": True}
                ),
            },
            dag_ids=[PRODUCER, REPLAY, CONSUMER],
        )
        first = _run(stack, PRODUCER, {"root": str(archive_root), "prompt": "a fern in the rain"})
        _wait_for_consumer_runs(stack, 1)
        replayed = [stack.client.xcom(PRODUCER, first, "generate")]
        replay = _run(stack, REPLAY, {"root": str(archive_root), "results": replayed})
        second = _run(stack, PRODUCER, {"root": str(archive_root), "prompt": "a heron at dusk"})
        consumer_runs = _wait_for_consumer_runs(stack, 2)
        yield {
            "stack": stack,
            "runs": {"first": first, "replay": replay, "second": second},
            "archived": {
                name: stack.client.xcom(dag_id, run_id, "archive")
                for name, dag_id, run_id in (
                    ("first", PRODUCER, first),
                    ("replay", REPLAY, replay),
                    ("second", PRODUCER, second),
                )
            },
            "generated": {
                "first": stack.client.xcom(PRODUCER, first, "generate"),
                "second": stack.client.xcom(PRODUCER, second, "generate"),
            },
            "events": stack.client.get("assets/events", limit=100, order_by="timestamp")["asset_events"],
            "consumer_runs": consumer_runs,
            "consumed": {
                r["dag_run_id"]: stack.client.get(
                    f"dags/{CONSUMER}/dagRuns/{r['dag_run_id']}/upstreamAssetEvents"
                )["asset_events"]
                for r in consumer_runs
            },
            "published": {
                r["dag_run_id"]: stack.client.xcom(CONSUMER, r["dag_run_id"], "publish")
                for r in consumer_runs
            },
            "publish_root": publish_root,
            "lineage_file": lineage_file,
        }


def test_each_run_keeping_new_files_starts_one_consumer_run_and_the_replay_none(scenario):
    runs, archived = scenario["runs"], scenario["archived"]
    events = [e for e in scenario["events"] if e["name"] == ASSET]
    assert [e["source_run_id"] for e in events] == [runs["first"], runs["second"]]  # none from the replay
    assert archived["replay"][0]["files"] == archived["first"]["files"]  # kept already, nothing new

    consumer_runs = scenario["consumer_runs"]
    assert len(consumer_runs) == 2
    assert all(r["run_type"] == "asset_triggered" and r["state"] == "success" for r in consumer_runs)
    consumed = [[e["id"] for e in scenario["consumed"][r["dag_run_id"]]] for r in consumer_runs]
    assert consumed == [[events[0]["id"]], [events[1]["id"]]]

    for event, name in zip(events, ("first", "second"), strict=True):
        files = event["extra"]["files"]
        assert {(f["path"], f["sha256"]) for f in files} == {
            (f["path"], f["sha256"]) for f in archived[name]["files"]
        }
        assert event["extra"]["manifest"].endswith("/images/manifest.jsonl")


def test_the_consumer_publishes_exactly_the_announced_files(scenario):
    publish_root = scenario["publish_root"]
    events = [e for e in scenario["events"] if e["name"] == ASSET]
    announced = {Path(f["path"]).name: f["sha256"] for e in events for f in e["extra"]["files"]}
    published = [Path(p).name for report in scenario["published"].values() for p in report["published"]]
    assert sorted(published) == sorted(announced)
    for name, sha256 in announced.items():
        assert hashlib.sha256((publish_root / name).read_bytes()).hexdigest() == sha256
    index = [json.loads(line) for line in (publish_root / "index.jsonl").read_text().splitlines()]
    assert sorted(Path(line["published"]).name for line in index) == sorted(announced)


def test_lineage_extracted_in_a_forked_child_on_a_worker_carries_the_remote_tasks(scenario):
    events = [json.loads(line) for line in scenario["lineage_file"].read_text().splitlines() if line]
    completed = [
        e["run"]["facets"]["imagecb"]
        for e in events
        if e["eventType"] == "COMPLETE" and e["job"]["name"] == f"{PRODUCER}.generate"
    ]
    expected = sorted(r["task_id"] for r in scenario["generated"].values())
    assert sorted(t["remoteTaskId"] for facet in completed for t in facet["tasks"]) == expected
    assert all(facet["outcomes"] == {"success": 1} for facet in completed)
    archives = [e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"].endswith(".archive")]
    assert {(o["namespace"], o["name"]) for e in archives for o in e["outputs"]} == {
        ("file", str(scenario["publish_root"].parent / "archive" / "images"))
    }
