"""The store on SQLite (the test session's database): gap-free cursors, duplicates, cursors, purge."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from store_checks import concurrent_insert_and_read, new_callback

from imagecb_provider.callbacks.store import CallbackStore


def test_concurrent_inserts_never_let_a_cursor_skip_a_row(callback_db):
    inserted, read = concurrent_insert_and_read(
        CallbackStore(), writers=4, per_writer=40, conn_id="sqlite-conc"
    )
    assert sorted(read) == sorted(inserted)


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
    name = f"asset:{uuid.uuid4().hex}"
    assert store.cursor("c", name) is None
    assert store.advance_cursor("c", name, 7) == 7
    assert store.advance_cursor("c", name, 3) == 7
    assert store.cursor("other", name) is None


def test_purge_removes_old_rows_and_never_reuses_their_ids(callback_db):
    store = CallbackStore()
    old = new_callback(f"old-{uuid.uuid4().hex}")
    old_id = store.record(old)
    assert store.purge(datetime.now(UTC) + timedelta(seconds=1)) >= 1
    assert store.lookup(old.conn_id, [old.remote_task_id]) == []
    assert store.record(new_callback(f"new-{uuid.uuid4().hex}")) > old_id
