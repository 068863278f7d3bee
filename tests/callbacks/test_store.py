"""
The store on SQLite (the test session's database): gap-free cursors, duplicates per connection and
purpose, the asset quota, stored bodies, consumer cursors, purge.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from store_checks import (
    check_a_cursor_stops_at_its_streams_latest_row,
    check_a_task_id_is_unique_per_connection_and_purpose,
    check_the_asset_quota,
    check_the_asset_quota_holds_under_concurrency,
    concurrent_insert_and_read,
    new_callback,
)

from imagecb_provider.callbacks.schema import callback_table
from imagecb_provider.callbacks.store import (
    DEFAULT_ASSET_QUOTA,
    MAX_MESSAGE,
    CallbackStore,
    NewCallback,
)
from imagecb_provider.exceptions import ImageCbConfigurationError


def test_concurrent_inserts_never_let_a_cursor_skip_a_row(callback_db):
    inserted, read = concurrent_insert_and_read(
        CallbackStore(), writers=4, per_writer=40, conn_id="sqlite-conc"
    )
    assert sorted(read) == sorted(inserted)


class _FailingStore(CallbackStore):
    """A store whose ``record`` raises for one row: a writer thread dies part-way."""

    def __init__(self, fail_on: str) -> None:
        super().__init__()
        self.fail_on = fail_on

    def record(self, callback):
        if callback.remote_task_id.endswith(self.fail_on):
            raise RuntimeError(f"cannot record {callback.remote_task_id}")
        return super().record(callback)


class _ForgetfulStore(CallbackStore):
    """A store whose ``record`` answers an id for one row it never stores."""

    def record(self, callback):
        if callback.remote_task_id.endswith("-1-2"):
            return 10**9
        return super().record(callback)


def test_the_concurrency_check_raises_what_a_writer_raised_naming_its_thread(callback_db):
    """A dead writer takes its rows out of both lists, which still agree: only its error tells."""
    with pytest.raises(ExceptionGroup) as info:
        concurrent_insert_and_read(_FailingStore("-2-3"), writers=3, per_writer=5, conn_id="sqlite-dead")
    (error,) = info.value.exceptions
    assert isinstance(error, RuntimeError)
    assert error.__notes__ == ["raised in the writer 2 thread"]


def test_the_concurrency_check_counts_the_rows_really_stored(callback_db):
    with pytest.raises(AssertionError, match="8 rows stored, 9 expected"):
        concurrent_insert_and_read(_ForgetfulStore(), writers=3, per_writer=3, conn_id="sqlite-lost")


def test_a_duplicate_is_recorded_once_and_ids_only_grow(callback_db):
    store = CallbackStore()
    first = store.record(new_callback(f"dup-{uuid.uuid4().hex}"))
    again = new_callback(f"dup-{uuid.uuid4().hex}")
    second = store.record(again)
    assert store.record(again) is None
    assert second > first
    assert store.latest_id() >= second


def test_a_consumer_cursor_never_moves_back(callback_db):
    store = CallbackStore()
    label = uuid.uuid4().hex
    name = f"asset:{label}"
    ids = [store.record(new_callback(f"{label}-{i}", "c", "asset", label=label)) for i in range(2)]
    assert store.cursor("c", name) is None
    assert store.advance_cursor("c", name, ids[1]) == ids[1]
    assert store.advance_cursor("c", name, ids[0]) == ids[1]
    assert store.cursor("other", name) is None


def test_a_task_id_is_unique_per_connection_and_purpose(callback_db):
    check_a_task_id_is_unique_per_connection_and_purpose(CallbackStore(), "sqlite-purpose")


def test_a_cursor_stops_at_its_streams_latest_row(callback_db):
    check_a_cursor_stops_at_its_streams_latest_row(CallbackStore(), f"sqlite-clamp-{uuid.uuid4().hex}")


def test_the_asset_quota(callback_db):
    check_the_asset_quota(CallbackStore(asset_quota=3), f"sqlite-quota-{uuid.uuid4().hex}")


def test_the_asset_quota_holds_under_concurrency(callback_db):
    check_the_asset_quota_holds_under_concurrency(CallbackStore(asset_quota=5), "sqlite-race")


def test_the_quota_is_read_from_the_airflow_config(monkeypatch):
    assert CallbackStore().asset_quota == DEFAULT_ASSET_QUOTA
    monkeypatch.setenv("AIRFLOW__IMAGECB__ASSET_CALLBACK_QUOTA", "25")
    monkeypatch.setenv("AIRFLOW__IMAGECB__ASSET_CALLBACK_QUOTA_WINDOW", "600")
    store = CallbackStore()
    assert (store.asset_quota, store.asset_window) == (25, 600.0)
    monkeypatch.setenv("AIRFLOW__IMAGECB__ASSET_CALLBACK_QUOTA", "0")
    with pytest.raises(ImageCbConfigurationError, match="must both be positive"):
        CallbackStore()
    monkeypatch.setenv("AIRFLOW__IMAGECB__ASSET_CALLBACK_QUOTA", "lots")
    with pytest.raises(ImageCbConfigurationError, match="asset_callback_quota='lots' is not a number"):
        CallbackStore()


def test_only_what_readers_use_of_a_body_is_stored(callback_db):
    remote_task_id = f"big-{uuid.uuid4().hex}"
    body = {
        "code": 200,
        "msg": "m" * 5000,
        "data": {
            "taskId": remote_task_id,
            "info": {
                "resultImageUrl": "https://files.example/r.png",
                "originImageUrl": "https://files.example/" + "o" * 9000,  # too long to be a URL
                "extra": "x" * 30000,
            },
            "padding": ["p" * 100] * 250,
        },
        "padding": "q" * 10000,
    }
    received = datetime.now(UTC)
    store = CallbackStore()
    new_id = store.record(
        NewCallback(remote_task_id, "sqlite-body", "asset", body, False, received, label="b")
    )
    with store.engine.connect() as conn:
        raw = conn.execute(sa.select(callback_table.c.body).where(callback_table.c.id == new_id)).scalar_one()
    assert len(raw.encode()) < 1200
    assert json.loads(raw) == {
        "code": 200,
        "msg": "m" * MAX_MESSAGE,
        "data": {"taskId": remote_task_id, "info": {"resultImageUrl": "https://files.example/r.png"}},
    }
    (row,) = store.lookup("sqlite-body", [remote_task_id])
    assert row.code == 200


def test_purge_removes_old_rows_and_never_reuses_their_ids(callback_db):
    store = CallbackStore()
    old = new_callback(f"old-{uuid.uuid4().hex}")
    old_id = store.record(old)
    assert store.purge(datetime.now(UTC) + timedelta(seconds=1)) >= 1
    assert store.lookup(old.conn_id, [old.remote_task_id]) == []
    assert store.record(new_callback(f"new-{uuid.uuid4().hex}")) > old_id
