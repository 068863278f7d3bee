"""Store helpers shared by the SQLite and PostgreSQL store tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

import sqlalchemy as sa

from imagecb_provider.callbacks.schema import callback_table
from imagecb_provider.callbacks.store import CallbackStore, NewCallback


def new_callback(remote_task_id: str, conn_id: str = "pg", purpose: str = "ti") -> NewCallback:
    body = {"code": 200, "msg": "success", "data": {"taskId": remote_task_id, "info": {}}}
    return NewCallback(remote_task_id, conn_id, purpose, body, False, datetime.now(UTC))


def stored_row_count(store: CallbackStore, conn_id: str, after: int) -> int:
    """
    Count the rows of ``conn_id`` with an id above ``after``, straight from the table.

    :param store: the store whose database is counted.
    :param conn_id: the connection the rows were recorded for.
    :param after: count only ids above this one.
    """
    query = (
        sa.select(sa.func.count())
        .select_from(callback_table)
        .where(callback_table.c.conn_id == conn_id, callback_table.c.id > after)
    )
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def concurrent_insert_and_read(
    store: CallbackStore, *, writers: int, per_writer: int, conn_id: str = "concurrency"
) -> tuple[list[str], list[str]]:
    """
    Insert from ``writers`` threads while one reader follows the log with ``after(cursor)``.

    Returns the ids inserted and the ids the reader saw. A reader that moved its cursor past a row
    committed late would never see it, and the two lists would differ. Raises an
    exception group of every exception a thread raised (each noted with its thread), and fails
    unless every writer recorded each of its rows: a writer that died takes its rows out of both
    lists, which would still agree.

    :param store: the store under test.
    :param writers: how many threads insert at once.
    :param per_writer: how many rows each of them inserts.
    :param conn_id: the connection the rows are recorded for (one per test keeps counts exact).
    """
    start_cursor = store.latest_id()
    inserted: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()

    def collecting(name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as error:  # a thread's exception is otherwise only printed
                error.add_note(f"raised in the {name} thread")
                with lock:
                    errors.append(error)

        return run

    def write(number: int) -> None:
        for i in range(per_writer):
            remote_task_id = f"{conn_id}-{start_cursor}-{number}-{i}"
            assert store.record(new_callback(remote_task_id, conn_id)) is not None, (
                f"{remote_task_id} was taken for a duplicate"
            )
            with lock:
                inserted.append(remote_task_id)

    read: list[str] = []

    def follow() -> None:
        cursor = start_cursor
        while True:
            finished = done.is_set()
            rows, cursor = store.after(conn_id, cursor, limit=50)
            read.extend(row.remote_task_id for row in rows)
            if finished and not rows:
                return

    threads = [threading.Thread(target=collecting(f"writer {n}", partial(write, n))) for n in range(writers)]
    reader = threading.Thread(target=collecting("reader", follow))
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    if errors:
        # BaseExceptionGroup: an ExceptionGroup unless a thread caught, say, a KeyboardInterrupt
        raise BaseExceptionGroup(f"{len(errors)} of {writers + 1} store threads failed", errors)
    expected = writers * per_writer
    assert len(inserted) == expected, f"{len(inserted)} inserts reported, {expected} expected"
    stored = stored_row_count(store, conn_id, start_cursor)
    assert stored == expected, f"{stored} rows stored, {expected} expected"  # no assert rewriting here
    return inserted, read
