"""
The receiver on PostgreSQL, the database of real deployments: ``airflow db migrate`` creates its
tables through the db-manager (and upgrades those an older release made, rows and all), the
standalone receiver records, binds and serves callbacks there, concurrent inserts never let a
reader's cursor skip a row, and the store's rules (a task id per connection and purpose, the asset
quota, cursors that stop at their stream's latest row) hold there too.

These tests need the local PostgreSQL (127.0.0.1:5432, user ``postgres``, trust). Each run creates
its own database and drops it. Without PostgreSQL they fail: they are never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from cbhelpers import StandaloneReceiver, attempts, postgres_database, submit, wait_until
from migration_checks import HEAD, REVISION_0001, check_upgraded, fill_0001

from imagecb_provider.callbacks.store import CallbackStore
from imagecb_provider.callbacks.tokens import callback_url, watch_token
from imagecb_provider.utils.ledger import STATE_KEY, LedgerEntry, Slot

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
MANAGER = "imagecb_provider.callbacks.db.CallbackDBManager"


def _airflow_db_migrate(url: str, home: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=_airflow_env(url, home),
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory):
    """A fresh database migrated by ``airflow db migrate`` (with the provider's db-manager), dropped after."""
    with postgres_database("imagecb_cb_test") as url:
        _airflow_db_migrate(url, tmp_path_factory.mktemp("pg-airflow-home"))
        yield url


def _airflow_env(url: str, home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=url,
        AIRFLOW__DATABASE__EXTERNAL_DB_MANAGERS=MANAGER,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "plugins"), env.get("PYTHONPATH")) if p),
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def pg_engine(pg_url):
    engine = sa.create_engine(pg_url, pool_size=10)
    yield engine
    engine.dispose()


def test_airflow_db_migrate_created_the_tables_with_the_providers_version(pg_engine):
    inspector = sa.inspect(pg_engine)
    tables = set(inspector.get_table_names())
    assert {"imagecb_callback", "imagecb_callback_cursor", "imagecb_alembic_version", "dag_run"} <= tables
    with pg_engine.connect() as conn:
        version = conn.execute(sa.text("SELECT version_num FROM imagecb_alembic_version")).scalar_one()
    assert version == HEAD
    columns = {c["name"]: c for c in inspector.get_columns("imagecb_callback")}
    assert isinstance(columns["id"]["type"], sa.BigInteger)
    assert [u["column_names"] for u in inspector.get_unique_constraints("imagecb_callback")] == [
        ["conn_id", "purpose", "remote_task_id"]
    ]


def test_the_alembic_migration_builds_the_same_schema_as_the_orm(pg_url, pg_engine, tmp_path):
    """``resetdb(use_migration_files=True)`` drops the tables and rebuilds them from the revision files."""

    def schema() -> dict:
        inspector = sa.inspect(pg_engine)
        return {
            table: (
                sorted((c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)),
                sorted(
                    (u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)
                ),
                sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)),
            )
            for table in ("imagecb_callback", "imagecb_callback_cursor")
        }

    from_orm = schema()
    script = (
        "from airflow.utils.session import create_session\n"
        f"from {MANAGER.rsplit('.', 1)[0]} import CallbackDBManager\n"
        "with create_session() as session:\n"
        "    CallbackDBManager(session).resetdb(use_migration_files=True)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], env=_airflow_env(pg_url, tmp_path), capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert schema() == from_orm


def test_concurrent_inserts_never_let_a_cursor_skip_a_row(pg_engine):
    """Eight writers and one reader: every row appears after the reader's cursor exactly once."""
    from store_checks import concurrent_insert_and_read

    inserted, read = concurrent_insert_and_read(CallbackStore(pg_engine), writers=8, per_writer=60)
    assert sorted(read) == sorted(inserted)


def test_duplicates_are_recorded_once(pg_engine):
    from store_checks import new_callback

    store = CallbackStore(pg_engine)
    callback = new_callback(f"pg-dup-{uuid.uuid4().hex}")
    assert store.record(callback) is not None
    assert store.record(callback) is None
    assert len(store.lookup("pg", [callback.remote_task_id])) == 1


def test_a_task_id_is_unique_per_connection_and_purpose(pg_engine):
    from store_checks import check_a_task_id_is_unique_per_connection_and_purpose

    check_a_task_id_is_unique_per_connection_and_purpose(CallbackStore(pg_engine), "pg-purpose")


def test_a_cursor_stops_at_its_streams_latest_row(pg_engine):
    from store_checks import check_a_cursor_stops_at_its_streams_latest_row

    check_a_cursor_stops_at_its_streams_latest_row(CallbackStore(pg_engine), "pg-clamp")


def test_the_asset_quota(pg_engine):
    from store_checks import check_the_asset_quota

    check_the_asset_quota(CallbackStore(pg_engine, asset_quota=3), "pg-quota")


def test_the_asset_quota_holds_under_concurrency(pg_engine):
    """Eight writers on one label, under the insert lock: exactly the quota is recorded."""
    from store_checks import check_the_asset_quota_holds_under_concurrency

    check_the_asset_quota_holds_under_concurrency(
        CallbackStore(pg_engine, asset_quota=5), "pg-race", writers=8
    )


def test_airflow_db_migrate_upgrades_a_0001_database_with_rows(tmp_path):
    """A database the previous release migrated (revision 0001), with callbacks and cursors in it."""
    with postgres_database("imagecb_cb_test") as url:
        at_0001 = (
            "from alembic import command\n"
            f"from {MANAGER.rsplit('.', 1)[0]} import CallbackDBManager\n"
            f"command.upgrade(CallbackDBManager(None).get_alembic_config(), {REVISION_0001!r})\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", at_0001], env=_airflow_env(url, tmp_path), capture_output=True, text=True
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        try:
            before = fill_0001(engine)
            _airflow_db_migrate(url, tmp_path)
            check_upgraded(engine, before)
        finally:
            engine.dispose()


# ------------------------------------------------------------------ the standalone receiver on PostgreSQL
@pytest.fixture
def pg_dag_run(pg_engine):
    """A DagRun row in the PostgreSQL metadata database, with an ORM session bound to it."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType
    from sqlalchemy.orm import Session

    with Session(bind=pg_engine) as session:
        run = DagRun(
            dag_id="pg_binding",
            run_id=f"manual__{uuid.uuid4().hex}",
            run_type=DagRunType.MANUAL,
            state=DagRunState.RUNNING,
            run_after=datetime.now(UTC),
        )
        session.add(run)
        session.commit()
        return run.dag_id, run.run_id


def _write_ledger(pg_engine, dag_id: str, run_id: str, remote_task_id: str) -> None:
    """Write a ledger through Airflow's real state backend, on the PostgreSQL session."""
    from airflow.state import TaskScope
    from airflow.state.metastore import MetastoreBackend
    from sqlalchemy.orm import Session

    entry = LedgerEntry(slots=[Slot(key="k", remote_task_id=remote_task_id)])
    with Session(bind=pg_engine) as session:
        scope = TaskScope(dag_id=dag_id, run_id=run_id, task_id="generate")
        MetastoreBackend().set(scope, STATE_KEY, json.dumps(entry.to_dict()), session=session)
        session.commit()


def test_the_standalone_receiver_on_postgres(
    pg_url, pg_engine, pg_dag_run, imagecb_simulator_factory, connect, tmp_path
):
    simulator = imagecb_simulator_factory(
        latency=0.5,
        webhook_hmac_key="pg-whk",
        duplicate_callbacks=True,
        callback_retry_delays=[2.0, 3.0, 4.0],
    )
    receiver_env = _airflow_env(
        pg_url,
        tmp_path,
        AIRFLOW_CONN_IMAGECB_DEFAULT=json.dumps(
            {**json.loads(simulator.connection_json()), "extra": {"webhook_hmac_key": "pg-whk"}}
        ),
    )
    receiver = StandaloneReceiver(receiver_env).start()
    try:
        settings = connect(simulator, receiver.url, webhook_hmac_key="pg-whk")
        dag_id, run_id = pg_dag_run
        url = callback_url(settings, dag_id=dag_id, run_id=run_id, task_id="generate")

        _write_ledger(pg_engine, dag_id, run_id, "the-bound-one")
        impostor = submit("an impostor on postgres", url)
        wait_until(lambda: len(attempts(simulator, impostor)) >= 2, what="the impostor's deliveries")
        assert {a["status"] for a in attempts(simulator, impostor)} == {409}

        simulator.configure(latency=1.5)
        bound = submit("a bound image on postgres", url)
        _write_ledger(pg_engine, dag_id, run_id, bound)
        wait_until(lambda: len(attempts(simulator, bound)) >= 2, what="both deliveries of the duplicate")
        assert [a["status"] for a in attempts(simulator, bound)] == [200, 200]

        store = CallbackStore(pg_engine)
        (row,) = store.lookup("imagecb_default", [bound, impostor])
        assert (row.remote_task_id, row.signed, row.code) == (bound, True, 200)

        auth = {"Authorization": f"Bearer {watch_token(settings)}"}
        answer = httpx.post(
            f"{receiver.url}/imagecb/callbacks/lookup", json={"remote_task_ids": [bound]}, headers=auth
        )
        assert [i["remote_task_id"] for i in answer.json()["items"]] == [bound]
        events = httpx.get(
            f"{receiver.url}/imagecb/callbacks/events", params={"after": row.id - 1}, headers=auth
        ).json()
        assert events["items"][0]["remote_task_id"] == bound

        # a restart of the receiver: the delivery that finds it down is recorded on the vendor's retry
        receiver.stop()
        simulator.configure(latency=0.3, duplicate_callbacks=False)
        late = submit(
            "while the receiver restarts", callback_url(settings, dag_id="x", run_id="y", task_id="z")
        )
        wait_until(lambda: attempts(simulator, late), what="the first delivery")
        receiver.start()
        wait_until(lambda: store.lookup("imagecb_default", [late]), what="the retried callback")
        # the row commits before the 200 goes out, and the simulator logs an attempt once answered
        wait_until(lambda: attempts(simulator, late)[-1]["status"] == 200, what="the retry's answer")
        assert attempts(simulator, late)[0]["status"] is None
    finally:
        receiver.stop()
