"""Store helpers shared by the SQLite and PostgreSQL store tests."""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
import sqlalchemy as sa

from imagecb_provider.callbacks.schema import callback_table
from imagecb_provider.callbacks.store import AssetQuotaExceeded, CallbackStore, NewCallback


def new_callback(
    remote_task_id: str,
    conn_id: str = "pg",
    purpose: str = "ti",
    *,
    label: str | None = None,
    received_at: datetime | None = None,
    url: str = "",
) -> NewCallback:
    """
    Build a successful callback of ``remote_task_id`` as the receiver would record it.

    :param remote_task_id: the task id of the body.
    :param conn_id: the connection of its token.
    :param purpose: ``ti`` or ``asset``.
    :param label: the label of an ``asset`` callback (``lbl`` when none is given).
    :param received_at: when it was received (now by default).
    :param url: the body's result image URL.
    """
    body = {
        "code": 200,
        "msg": "success",
        "data": {"taskId": remote_task_id, "info": {"resultImageUrl": url}},
    }
    if purpose == "asset" and label is None:
        label = "lbl"
    return NewCallback(
        remote_task_id, conn_id, purpose, body, False, received_at or datetime.now(UTC), label=label
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


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


# ------------------------------------------------------------------ a task id per connection and purpose
def check_a_task_id_is_unique_per_connection_and_purpose(store: CallbackStore, conn_id: str) -> None:
    """
    An ``asset`` callback claiming a task id first neither blocks nor reaches its ``ti`` callback.

    :param store: the store under test.
    :param conn_id: a connection no other test records for.
    """
    victim = unique("victim")
    claimed = store.record(new_callback(victim, conn_id, "asset", url="https://attacker.example/x.png"))
    real = store.record(new_callback(victim, conn_id, "ti", url="https://vendor.example/r.png"))
    elsewhere = store.record(new_callback(victim, f"{conn_id}-other", "ti"))
    assert None not in (claimed, real, elsewhere), (claimed, real, elsewhere)
    assert store.record(new_callback(victim, conn_id, "ti")) is None  # duplicates within a purpose only
    assert store.record(new_callback(victim, conn_id, "asset", label="another")) is None

    (ti_row,) = store.lookup(conn_id, [victim], purpose="ti")
    assert (ti_row.id, ti_row.purpose) == (real, "ti")
    assert ti_row.body["data"]["info"]["resultImageUrl"] == "https://vendor.example/r.png"
    assert [r.id for r in store.lookup(conn_id, [victim], purpose="asset")] == [claimed]
    assert [r.id for r in store.lookup(conn_id, [victim])] == sorted([claimed, real])
    rows, _ = store.after(conn_id, min(claimed, real) - 1, purpose="ti")
    assert [(r.id, r.purpose) for r in rows] == [(real, "ti")]


# ------------------------------------------------------------------ the asset quota
def check_the_asset_quota(store: CallbackStore, conn_id: str) -> None:
    """
    The label's (quota + 1)th callback in the window is refused and recorded nowhere; the window slides.

    :param store: a store with an ``asset_quota`` of 3.
    :param conn_id: a connection no other test records for.
    """
    assert store.asset_quota == 3
    label, now = unique("quota"), datetime.now(UTC)
    window = timedelta(seconds=store.asset_window)

    def asset(remote_task_id: str, at: datetime = now, on: str = label) -> NewCallback:
        return new_callback(remote_task_id, conn_id, "asset", label=on, received_at=at)

    assert store.record(asset(f"{label}-old", now - window - timedelta(minutes=1))) is not None
    accepted = [store.record(asset(f"{label}-{i}", now + timedelta(seconds=i))) for i in range(3)]
    assert None not in accepted
    with pytest.raises(AssetQuotaExceeded) as refused:
        store.record(asset(f"{label}-3", now + timedelta(seconds=3)))
    error = refused.value
    retry_after = math.ceil(store.asset_window) - 3  # when the oldest counted leaves the window
    assert (error.label, error.quota, error.retry_after) == (label, 3, retry_after), vars(error)
    assert store.lookup(conn_id, [f"{label}-3"]) == [], "a refused callback was recorded"

    assert store.record(asset(f"{label}-0")) is None  # the vendor's retry of a recorded one
    assert store.record(asset(f"{label}-3", on=f"{label}-b")) is not None  # another label
    assert store.record(new_callback(f"{label}-3", conn_id, "ti")) is not None  # ti is not limited
    assert store.record(asset(f"{label}-4", now + window + timedelta(seconds=1))) is not None


def check_the_asset_quota_holds_under_concurrency(
    store: CallbackStore, conn_id: str, writers: int = 6
) -> None:
    """
    Writers racing on one label record exactly the quota, whatever the interleaving.

    :param store: a store with a small ``asset_quota``.
    :param conn_id: a connection no other test records for.
    :param writers: threads inserting at once, each more than the quota.
    """
    label = unique("race")
    outcomes: list[str] = []
    lock = threading.Lock()

    def write(number: int) -> None:
        for i in range(store.asset_quota):
            callback = new_callback(f"{label}-{number}-{i}", conn_id, "asset", label=label)
            try:
                outcome = "recorded" if store.record(callback) is not None else "duplicate"
            except AssetQuotaExceeded:
                outcome = "refused"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = {"recorded": store.asset_quota, "refused": (writers - 1) * store.asset_quota}
    assert {o: outcomes.count(o) for o in ("recorded", "refused")} == expected, outcomes
    query = sa.select(sa.func.count()).where(
        callback_table.c.conn_id == conn_id, callback_table.c.label == label
    )
    with store.engine.connect() as conn:
        stored = conn.execute(query).scalar_one()
    assert stored == store.asset_quota, f"{stored} rows stored for a quota of {store.asset_quota}"


# ------------------------------------------------------------------ cursors
def check_a_cursor_stops_at_its_streams_latest_row(store: CallbackStore, conn_id: str) -> None:
    """
    A position beyond the latest row of a cursor's stream is stored as that row's id, never more.

    :param store: the store under test.
    :param conn_id: a connection no other test records for.
    """
    label = unique("clamp")
    name = f"asset:{label}"
    first = store.record(new_callback(f"{label}-1", conn_id, "asset", label=label))
    ti = store.record(new_callback(f"{label}-ti", conn_id, "ti"))  # a later row of another stream
    assert None not in (first, ti), (first, ti)

    def advanced(cursor: str, position: int, expected: int) -> None:
        stored = store.advance_cursor(conn_id, cursor, position)
        assert stored == expected, f"PUT {cursor} {position}: stored {stored}, expected {expected}"

    advanced(name, first + 10**12, first)
    advanced(name, first - 1, first)  # never back
    advanced("asset:*", ti + 5, first)  # every asset row of conn_id
    advanced("anything-else", ti + 5, ti)  # every row of conn_id
    advanced(f"asset:{label}-empty", 5, 0)

    second = store.record(new_callback(f"{label}-2", conn_id, "asset", label=label))
    rows, _ = store.after(conn_id, store.cursor(conn_id, name), purpose="asset", label=label)
    assert [r.id for r in rows] == [second], f"the stream stalled: {rows}"
    advanced(name, second, second)
