"""
``dags/imagecb_asset_consumer.py`` run with ``dag.test()`` on a real asset event: a producer
archives an image with ``asset=imagecb_batch_images`` (as the batch's archive task does), and the
consumer's run, given that event as the scheduler would give it, publishes and indexes the file.

``dag.test()`` makes a manual run, which consumes no asset event; the scheduler makes an
asset-triggered run whose ``consumed_asset_events`` are the events that queued it.
:func:`run_consuming` gives ``dag.test()``'s run those events the same way, so the tasks read
them through ``triggering_asset_events`` exactly as in a scheduled run. That the scheduler really
starts such a run is checked on the real stack (tests/stack/test_stack_assets.py).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "imagecb_asset_consumer"
#: The example DAGs these tests run (see tests/dags/test_examples_covered.py).
EXAMPLE_DAGS_RUN = {"imagecb_asset_consumer"}
BATCH_IMAGES = "imagecb_batch_images"

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]


def example_dag(dag_id: str):
    """The DAG ``dag_id`` parsed from its file in dags/."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / f"{dag_id}.py"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def asset_events(asset_name: str, **source: Any) -> list[dict[str, Any]]:
    """The events of the asset named ``asset_name`` (id and extra), oldest first, filtered by source."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    query = select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
    query = query.where(AssetModel.name == asset_name)
    for name, value in source.items():
        query = query.where(getattr(AssetEvent, f"source_{name}") == value)
    with create_session() as session:
        return [{"id": e.id, "extra": e.extra} for e in session.scalars(query.order_by(AssetEvent.id))]


def run_consuming(run_dag, monkeypatch, dag, event_ids: list[int], **kwargs):
    """``run_dag(dag, **kwargs)`` with the run consuming the asset events ``event_ids``."""
    import airflow.models.dagrun as dagrun_module
    from airflow.models.asset import AssetEvent
    from sqlalchemy import select

    create = dagrun_module.get_or_create_dagrun  # dag.test() imports it from this module when called

    def create_consuming(**create_kwargs):
        dag_run = create(**create_kwargs)
        session = create_kwargs["session"]
        events = session.scalars(select(AssetEvent).where(AssetEvent.id.in_(event_ids))).all()
        assert sorted(e.id for e in events) == sorted(event_ids)
        dag_run.consumed_asset_events.extend(events)  # what the scheduler does for an asset-triggered run
        session.commit()
        return dag_run

    monkeypatch.setattr(dagrun_module, "get_or_create_dagrun", create_consuming)
    return run_dag(dag, **kwargs)


def _producer(archive: Path):
    from airflow.sdk import DAG, Asset

    from imagecb_provider.operators.archive import ImageArchiveOperator
    from imagecb_provider.operators.generate import ImageGenerateOperator

    with DAG(
        "example_asset_consumer_producer",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        default_args={"retry_delay": timedelta(seconds=0)},
    ) as dag:
        generated = ImageGenerateOperator(task_id="generate", prompt="a quiet harbour", poll_interval=0.2)
        ImageArchiveOperator(
            task_id="archive",
            results=generated.output,
            destination=str(archive),
            asset=Asset(BATCH_IMAGES),
        )
    return dag


def test_the_consumer_publishes_and_indexes_the_files_its_event_announces(
    run_dag, imagecb_simulator, tmp_path, monkeypatch
):
    produced = run_dag(_producer(tmp_path / "archive"))
    assert produced.state == "success"
    (event,) = asset_events(BATCH_IMAGES, run_id=produced.run_id)
    announced = event["extra"]["files"]
    assert sorted(f["source"] for f in announced) == ["origin", "result"]

    publish_root = tmp_path / "published"
    dag_run = run_consuming(
        run_dag, monkeypatch, example_dag(DAG_ID), [event["id"]], run_conf={"publish_root": str(publish_root)}
    )

    states = {ti.task_id: getattr(ti.state, "value", ti.state) for ti in dag_run.get_task_instances()}
    assert states == {"new_files": "success", "publish": "success"}
    assert dag_run.state == "success"
    # every announced file is published, byte for byte, and indexed once
    for entry in announced:
        published = publish_root / Path(entry["path"]).name
        assert hashlib.sha256(published.read_bytes()).hexdigest() == entry["sha256"]
    index = [json.loads(line) for line in (publish_root / "index.jsonl").read_text().splitlines()]
    assert sorted((line["sha256"], Path(line["published"]).name) for line in index) == sorted(
        (entry["sha256"], Path(entry["path"]).name) for entry in announced
    )
    assert {p.name for p in publish_root.iterdir() if not p.name.startswith(".")} == {
        "index.jsonl",
        *(Path(entry["path"]).name for entry in announced),
    }
