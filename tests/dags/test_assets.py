"""
Archived images as Asset events, in real Airflow (``dag.test()``) against the simulator.

The events are read back from the metadata database: a run that keeps new files emits one
event listing them (path, sha256, manifest), a run that keeps nothing new emits none, and an
event of the batch's asset queues a run of ``imagecb_asset_consumer``, whose task then publishes
the files the event lists. That the scheduler really starts that run is checked on the real stack
(``tests/stack/test_stack_assets.py``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from airflow.sdk import DAG, Asset, task

from imagecb_provider.operators.archive import ImageArchiveOperator, archive_asset
from imagecb_provider.operators.generate import ImageGenerateOperator

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = "imagecb_asset_consumer"
BATCH_IMAGES = Asset("imagecb_batch_images")
FAST = {"poll_interval": 0.2}

_ids = itertools.count()
#: Results a ``replay`` task hands to the archive, per DAG id (``dag.test()`` runs tasks in this process).
_REPLAY: dict[str, list[dict]] = {}


def _dag(name: str, **kwargs) -> DAG:
    return DAG(
        f"{name}_{next(_ids)}",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        default_args={"retry_delay": timedelta(seconds=0)},
        **kwargs,
    )


def _events(asset: Asset) -> list[dict]:
    """Every event of ``asset`` in the metadata database, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == asset.name, AssetModel.uri == asset.uri)
            .order_by(AssetEvent.id)
        ).scalars()
        return [
            {
                "id": e.id,
                "extra": e.extra,
                "dag_id": e.source_dag_id,
                "task_id": e.source_task_id,
                "run_id": e.source_run_id,
                "map_index": e.source_map_index,
            }
            for e in rows
        ]


def _local(path: str) -> Path:
    return Path(path.removeprefix("file://"))


def _xcom(dag_run, task_id: str, map_index: int = -1):
    ti = next(t for t in dag_run.get_task_instances() if t.task_id == task_id and t.map_index == map_index)
    return ti.xcom_pull(task_ids=task_id, map_indexes=map_index)


def _check_files(extra: dict, archived: list[dict]) -> None:
    """The event lists exactly the archived files, and each file on disk matches its sha256."""
    kept = {(f["remote_task_id"], f["source"]): f for result in archived for f in result["files"]}
    assert {(f["remote_task_id"], f["source"]) for f in extra["files"]} == set(kept)
    for entry in extra["files"]:
        assert hashlib.sha256(_local(entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
        assert entry["path"] == kept[(entry["remote_task_id"], entry["source"])]["path"]
        assert entry["bytes"] == _local(entry["path"]).stat().st_size
        assert entry["content_type"] in ("image/jpeg", "image/png")


def test_a_run_keeping_new_files_emits_one_event_and_a_run_keeping_nothing_new_none(
    run_dag, imagecb_simulator, tmp_path
):
    destination = tmp_path / "images"
    asset = Asset(name=f"file://{destination}", uri=f"file://{destination}")

    with _dag("asset_new") as produce:
        generated = ImageGenerateOperator(task_id="generate", prompt="a lantern at dusk", **FAST)
        ImageArchiveOperator(task_id="archive", results=generated.output, destination=str(destination))
    assert produce.get_task("archive").outlets == [asset]  # the literal destination is the asset

    dag_run = run_dag(produce)
    assert dag_run.state == "success"
    archived = _xcom(dag_run, "archive")
    (event,) = _events(asset)
    assert (event["dag_id"], event["task_id"], event["run_id"]) == (produce.dag_id, "archive", dag_run.run_id)
    assert event["extra"]["destination"] == f"file://{destination}"
    assert event["extra"]["manifest"] == f"file://{destination}/manifest.jsonl"
    assert len(event["extra"]["files"]) == 2  # the result and the origin image
    _check_files(event["extra"], [archived])
    manifest = [json.loads(line) for line in (destination / "manifest.jsonl").read_text().splitlines()]
    assert {(m["path"], m["sha256"]) for m in manifest} == {
        (f["path"], f["sha256"]) for f in event["extra"]["files"]
    }

    # Another DAG archives the same results into the same destination: nothing new, no event.
    with _dag("asset_nothing_new") as replay_dag:

        @task
        def replay() -> list[dict]:
            return _REPLAY[replay_dag.dag_id]

        ImageArchiveOperator(task_id="archive", results=replay(), destination=str(destination))
    _REPLAY[replay_dag.dag_id] = [_xcom(dag_run, "generate")]

    again = run_dag(replay_dag)
    assert again.state == "success"
    assert [f["path"] for f in _xcom(again, "archive")[0]["files"]] == [f["path"] for f in archived["files"]]
    assert [e["id"] for e in _events(asset)] == [event["id"]]
    assert len((destination / "manifest.jsonl").read_text().splitlines()) == 2


def test_mapped_archives_emit_one_event_each_to_an_explicit_asset_of_a_templated_destination(
    run_dag, imagecb_simulator, tmp_path
):
    asset = Asset("imagecb_test_mapped_images")
    prompts = ["a pear", "a fig", "a lime [sim:content_policy]"]
    with _dag("asset_mapped", params={"root": str(tmp_path)}) as dag:
        generated = ImageGenerateOperator.partial(task_id="generate", failure_mode="return", **FAST).expand(
            prompt=prompts
        )
        ImageArchiveOperator.partial(
            task_id="archive",
            destination="{{ params.root }}/{{ ds }}/images",
            keep_origin=False,
            asset=asset,
            outlets=[asset],
        ).expand(results=generated.output)

    dag_run = run_dag(dag)
    assert dag_run.state == "success"
    events = _events(asset)
    by_index = {e["map_index"]: e for e in events if e["run_id"] == dag_run.run_id}
    assert sorted(by_index) == [0, 1]  # the flagged prompt kept nothing: no event
    for index in (0, 1):
        extra = by_index[index]["extra"]
        assert extra["destination"].startswith(f"file://{tmp_path}/")  # rendered
        assert extra["destination"].endswith("/images")
        assert len(extra["files"]) == 1
        _check_files(extra, [_xcom(dag_run, "archive", index)])
    assert _xcom(dag_run, "archive", 2) is None


def test_the_batch_asset_queues_the_consumer_which_publishes_the_announced_files(
    run_dag, imagecb_simulator, tmp_path
):
    consumer = _consumer_dag()
    _register_unpaused(consumer)
    with _dag("asset_batch", params={"root": str(tmp_path)}) as produce:
        generated = ImageGenerateOperator(task_id="generate", prompt="a quiet harbour", **FAST)
        ImageArchiveOperator(
            task_id="archive",
            results=generated.output,
            destination="{{ params.root }}/images",
            asset=BATCH_IMAGES,
        )

    dag_run = run_dag(produce)
    assert dag_run.state == "success"
    event = next(e for e in _events(BATCH_IMAGES) if e["run_id"] == dag_run.run_id)
    assert _queued_runs(BATCH_IMAGES) >= {CONSUMER}

    publish_root = tmp_path / "published"
    new_files = consumer.get_task("new_files").python_callable
    publish = consumer.get_task("publish").python_callable
    files = new_files(triggering_asset_events={BATCH_IMAGES: [_Event(event["extra"])]})
    report = publish(files, params={"publish_root": str(publish_root), "storage_conn_id": None})
    names = sorted(Path(f["path"]).name for f in event["extra"]["files"])
    assert sorted(Path(p).name for p in report["published"]) == names
    assert report["indexed"] == 2
    for entry in event["extra"]["files"]:
        published = publish_root / Path(entry["path"]).name
        assert hashlib.sha256(published.read_bytes()).hexdigest() == entry["sha256"]
    assert publish(files, params={"publish_root": str(publish_root), "storage_conn_id": None})["indexed"] == 0


class _Event:
    """What ``triggering_asset_events`` holds per event, as far as the consumer reads it."""

    def __init__(self, extra: dict) -> None:
        self.extra = extra


def _consumer_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / f"{CONSUMER}.py"))
    assert bag.import_errors == {}
    return bag.dags[CONSUMER]


def _register_unpaused(dag) -> None:
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import update

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=None, collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    with create_session() as session:
        session.execute(update(DagModel).where(DagModel.dag_id == dag.dag_id).values(is_paused=False))


def _queued_runs(asset: Asset) -> set[str]:
    """The DAGs the scheduler has queued a run of because of ``asset``'s events."""
    from airflow.models.asset import AssetDagRunQueue, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return set(
            session.scalars(
                select(AssetDagRunQueue.target_dag_id)
                .join(AssetModel, AssetDagRunQueue.asset_id == AssetModel.id)
                .where(AssetModel.name == asset.name)
            )
        )


@pytest.mark.parametrize(
    ("destination", "asset", "expected"),
    [
        ("/data/images", None, "file:///data/images"),
        ("file:///data/images/", None, "file:///data/images"),
        ("s3://bucket/images", None, "s3://bucket/images"),
        ("s3://bucket/images/{{ ds }}", None, "s3://bucket/images"),
        ("/data/{{ ds }}/images", None, "file:///data"),
        ("gs://bucket/img_{{ ds }}", None, "gs://bucket"),
        ("{{ params.archive_root }}/images", None, None),
        ("s3://{{ var.value.bucket }}/images", None, None),
        ("/{{ ds }}", None, None),
        ("{{ params.archive_root }}/images", "imagecb_batch_images", "imagecb_batch_images"),
        ("/data/images", False, None),
    ],
)
def test_the_asset_naming_rule(destination, asset, expected):
    named = archive_asset(destination, asset)
    assert (named.name if named else None) == expected


def test_a_templated_destination_without_an_asset_declares_no_outlet():
    op = ImageArchiveOperator(task_id="archive", results=[], destination="{{ params.root }}/images")
    assert (op.asset, op.outlets) == (None, [])
    explicit = ImageArchiveOperator(
        task_id="archive2", results=[], destination="{{ params.root }}/images", asset=BATCH_IMAGES
    )
    assert explicit.outlets == [BATCH_IMAGES]
