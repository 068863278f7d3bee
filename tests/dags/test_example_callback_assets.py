"""
``dags/imagecb_callback_assets.py`` run with ``dag.test()`` on the asset events its watcher fires.

Two generations are submitted to the simulator "outside Airflow" with a callback URL; the
simulator posts its real callback bodies to a local endpoint. Each body becomes the payload the
``ImageCallbackEventTrigger`` fires (``event_payload``), recorded as an event of
``imagecb_studio_callbacks`` the way the triggerer records a watcher's event
(``{"from_trigger": True, "payload": ...}``). The DAG's run, consuming both events as an
asset-triggered run would (see :func:`test_example_asset_consumer.run_consuming`), archives the
successful image and passes over the failed one. The trigger itself, with the receiver, is tested
in tests/callbacks/test_event_trigger.py.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_example_asset_consumer import asset_events, example_dag, run_consuming

DAG_ID = "imagecb_callback_assets"
#: The example DAGs these tests run (see tests/dags/test_examples_covered.py).
EXAMPLE_DAGS_RUN = {"imagecb_callback_assets"}
ASSET = "imagecb_studio_callbacks"

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]


@pytest.fixture
def callback_sink():
    """A local endpoint that records the callback bodies posted to it: ``(url, bodies)``."""
    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/callback", bodies
    finally:
        server.shutdown()
        server.server_close()


def _register(dag) -> None:
    """Write the DAG (and so its asset) to the metadata database, as the DAG processor would."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=None, collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)


def _fire(payloads: list[dict]) -> list[int]:
    """Record one event of the watched asset per payload, as ``Trigger.submit_event`` does."""
    from airflow.assets.manager import AssetManager
    from airflow.models.asset import AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        asset = session.scalars(select(AssetModel).where(AssetModel.name == ASSET)).one()
        events = [
            AssetManager.register_asset_change(
                asset=asset, extra={"from_trigger": True, "payload": payload}, session=session
            )
            for payload in payloads
        ]
        session.flush()
        return [event.id for event in events]


def test_each_callback_event_is_archived_and_a_failed_generation_passed_over(
    run_dag, imagecb_simulator, callback_sink, tmp_path, monkeypatch
):
    from imagecb_provider.callbacks.client import CallbackItem
    from imagecb_provider.hooks.imagecb import ImageCbHook
    from imagecb_provider.models import GenerationRequest
    from imagecb_provider.triggers.callback_event import event_payload

    url, bodies = callback_sink
    hook = ImageCbHook()
    made = hook.submit(GenerationRequest(prompt="a studio portrait", callback_url=url))
    failed = hook.submit(GenerationRequest(prompt="a studio still [sim:generation_failed]", callback_url=url))
    deadline = time.monotonic() + 30
    while len(bodies) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(body["data"]["taskId"] for body in bodies) == sorted([made, failed])
    payloads = [
        event_payload(
            CallbackItem(
                id=position,
                remote_task_id=body["data"]["taskId"],
                body=body,
                received_at=datetime.now(UTC),
                signed=False,
                purpose="asset",
                label="studio",
            )
        )
        for position, body in enumerate(bodies, start=1)
    ]

    dag = example_dag(DAG_ID)
    _register(dag)
    event_ids = _fire(payloads)
    assert [e["id"] for e in asset_events(ASSET) if e["id"] in event_ids] == event_ids
    dag_run = run_consuming(run_dag, monkeypatch, dag, event_ids, run_conf={"archive_root": str(tmp_path)})

    states = {ti.task_id: getattr(ti.state, "value", ti.state) for ti in dag_run.get_task_instances()}
    assert states == {"results_from_events": "success", "archive": "success"}
    assert dag_run.state == "success"
    ti = next(t for t in dag_run.get_task_instances() if t.task_id == "results_from_events")
    results = ti.xcom_pull(task_ids="results_from_events")
    assert sorted((r["task_id"], r["outcome"], r["via"]) for r in results) == sorted(
        [(made, "success", "callback"), (failed, "generation_failed", "callback")]
    )
    ti = next(t for t in dag_run.get_task_instances() if t.task_id == "archive")
    (archived,) = ti.xcom_pull(task_ids="archive")
    assert archived["task_id"] == made
    assert sorted(f["source"] for f in archived["files"]) == ["origin", "result"]
    for entry in archived["files"]:
        path = Path(entry["path"].removeprefix("file://"))
        assert path.parent == tmp_path / "studio"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    manifest = [
        json.loads(line) for line in (tmp_path / "studio" / "manifest.jsonl").read_text().splitlines()
    ]
    assert {m["remote_task_id"] for m in manifest} == {made}
