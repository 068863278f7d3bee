"""Store helpers shared by the SQLite and PostgreSQL store tests."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from imagecb_provider.callbacks.store import CallbackStore, NewCallback


def new_callback(remote_task_id: str, conn_id: str = "pg", purpose: str = "ti") -> NewCallback:
    body = {"code": 200, "msg": "success", "data": {"taskId": remote_task_id, "info": {}}}
    return NewCallback(remote_task_id, conn_id, purpose, body, False, datetime.now(UTC))


def concurrent_insert_and_read(
    store: CallbackStore, *, writers: int, per_writer: int, conn_id: str = "concurrency"
) -> tuple[list[str], list[str]]:
    """
    Insert from ``writers`` threads while one reader follows the log with ``after(cursor)``.

    Returns the ids inserted and the ids the reader saw. A reader that moved its cursor past a row
    committed late would never see it, and the two lists would differ.
    """
    start_cursor = store.latest_id()
    inserted: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def write(number: int) -> None:
        for i in range(per_writer):
            remote_task_id = f"{conn_id}-{start_cursor}-{number}-{i}"
            store.record(new_callback(remote_task_id, conn_id))
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

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    reader = threading.Thread(target=follow)
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    return inserted, read
