"""The store on SQLite (the test session's database): gap-free cursors, duplicates, cursors, purge."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from store_checks import concurrent_insert_and_read, new_callback

from imagecb_provider.callbacks.store import CallbackStore


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
