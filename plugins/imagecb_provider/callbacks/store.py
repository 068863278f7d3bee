"""
The durable record of received callbacks, in the Airflow metadata database.

Three properties carry the design:

* **Recorded once.** ``remote_task_id`` is unique and inserts are ``INSERT ... ON CONFLICT DO
  NOTHING``: the vendor's duplicates and retries, and replicas racing on the same delivery,
  leave one row.
* **A gap-free cursor.** Waiters read "rows with ``id`` > my cursor". With concurrent writers a
  row with a smaller id can commit *after* a larger one, and a reader that already moved past
  the larger id would never see it. Inserts are therefore serialized while they commit: a
  transaction-scoped advisory lock on PostgreSQL, SQLite's single writer on SQLite. Then every
  id at or below the largest visible id is committed, and a cursor never skips a row.
* **Synchronous and short.** One small transaction per callback; the receiver runs these
  methods in a thread pool so the event loop never blocks.

Works on PostgreSQL and SQLite (the dialects Airflow's tests and deployments here use).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from imagecb_provider.callbacks.schema import callback_table, cursor_table
from imagecb_provider.models import TaskRecord

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

#: Rows returned per events answer at most; a waiter that gets a full page asks again at once.
MAX_PAGE = 1000
#: Remote task ids per lookup at most.
MAX_LOOKUP = 1000
#: The PostgreSQL advisory lock that serializes callback inserts (see the module docstring).
INSERT_LOCK_KEY = zlib.crc32(b"imagecb_callback.insert")


class UnsupportedDialect(sa.exc.SQLAlchemyError):
    """The metadata database is neither PostgreSQL nor SQLite."""


@dataclass(frozen=True)
class NewCallback:
    """
    A verified callback about to be recorded.

    :param remote_task_id: the vendor's task id from the body.
    :param conn_id: the connection whose token the callback came with.
    :param purpose: ``ti`` or ``asset``.
    :param body: the parsed JSON body, stored as is.
    :param signed: whether the vendor's webhook signature was verified.
    :param received_at: when the receiver accepted it (aware UTC).
    :param dag_id: (``ti``) the waiting task instance's DAG.
    :param run_id: (``ti``) its run.
    :param task_id: (``ti``) its task.
    :param map_index: (``ti``) its map index.
    :param slot: (``ti``) the request's index in its ledger.
    :param label: (``asset``) the external submission stream.
    """

    remote_task_id: str
    conn_id: str
    purpose: str
    body: Mapping[str, Any]
    signed: bool
    received_at: datetime
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    map_index: int | None = None
    slot: int | None = None
    label: str | None = None

    def row(self) -> dict[str, Any]:
        code = TaskRecord.from_callback(self.body).code
        return {
            "remote_task_id": self.remote_task_id,
            "conn_id": self.conn_id,
            "purpose": self.purpose,
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "map_index": self.map_index,
            "slot": self.slot,
            "label": self.label,
            "code": code,
            "body": json.dumps(self.body, separators=(",", ":"), ensure_ascii=False),
            "signed": self.signed,
            "received_at": self.received_at,
        }


@dataclass(frozen=True)
class StoredCallback:
    """A recorded callback as waiters see it (the task instance fields are not exposed)."""

    id: int
    remote_task_id: str
    purpose: str
    label: str | None
    code: int | None
    signed: bool
    received_at: datetime
    body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Any) -> StoredCallback:
        received = row.received_at
        if received.tzinfo is None:
            received = received.replace(tzinfo=UTC)
        return cls(
            id=int(row.id),
            remote_task_id=row.remote_task_id,
            purpose=row.purpose,
            label=row.label,
            code=row.code,
            signed=bool(row.signed),
            received_at=received,
            body=json.loads(row.body),
        )

    def to_json(self) -> dict[str, Any]:
        """Return the JSON shape of one item of the events and lookup answers."""
        return {
            "id": self.id,
            "remote_task_id": self.remote_task_id,
            "purpose": self.purpose,
            "label": self.label,
            "code": self.code,
            "signed": self.signed,
            "received_at": self.received_at.isoformat().replace("+00:00", "Z"),
            "body": self.body,
        }


_PUBLIC_COLUMNS = [
    callback_table.c.id,
    callback_table.c.remote_task_id,
    callback_table.c.purpose,
    callback_table.c.label,
    callback_table.c.code,
    callback_table.c.signed,
    callback_table.c.received_at,
    callback_table.c.body,
]


class CallbackStore:
    """
    Record and read callbacks with SQLAlchemy Core.

    :param engine: the engine to use; by default Airflow's own (``airflow.settings``), looked up
        at first use so that importing this module needs no configured database.
    """

    def __init__(self, engine: Engine | None = None) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from airflow import settings

            self._engine = settings.get_engine()
        return self._engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # ------------------------------------------------------------------ writing
    def record(self, callback: NewCallback) -> int | None:
        """
        Record a callback once; return its new id, or ``None`` when its task id was already recorded.

        Commits before returning: when this returns, the callback survives any restart.
        """
        insert = self._insert_ignoring_duplicates(callback.row())
        with self.engine.begin() as conn:
            self._lock_inserts(conn)
            new_id = conn.execute(insert).scalar()
        return int(new_id) if new_id is not None else None

    def _insert(self, table: sa.Table) -> Any:
        """Return the dialect's ``INSERT`` that supports ``ON CONFLICT``."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            raise UnsupportedDialect(f"imagecb callbacks support PostgreSQL and SQLite, not {self.dialect}")
        return insert(table)

    def _insert_ignoring_duplicates(self, row: dict[str, Any]) -> Any:
        statement = self._insert(callback_table).values(**row)
        statement = statement.on_conflict_do_nothing(index_elements=["remote_task_id"])
        return statement.returning(callback_table.c.id)

    def _lock_inserts(self, conn: Connection) -> None:
        if self.dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": INSERT_LOCK_KEY})

    def advance_cursor(self, conn_id: str, name: str, position: int) -> int:
        """Move a consumer's cursor forward to ``position`` (never back); return the stored position."""
        now = datetime.now(UTC)
        statement = self._insert(cursor_table).values(
            conn_id=conn_id, name=name, position=position, updated_at=now
        )
        current = cursor_table.c.position
        statement = statement.on_conflict_do_update(
            index_elements=["conn_id", "name"],
            set_={
                "position": sa.case(
                    (statement.excluded.position > current, statement.excluded.position), else_=current
                ),
                "updated_at": now,
            },
        )
        with self.engine.begin() as conn:
            conn.execute(statement)
            return int(conn.execute(self._cursor_query(conn_id, name)).scalar_one())

    def purge(self, older_than: datetime) -> int:
        """Delete callbacks received before ``older_than``; return how many. Ids are never reused."""
        with self.engine.begin() as conn:
            result = conn.execute(sa.delete(callback_table).where(callback_table.c.received_at < older_than))
        return int(result.rowcount or 0)

    # ------------------------------------------------------------------ reading
    def latest_id(self) -> int:
        """Return the largest id recorded (0 when none): every row at or below it is committed."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(callback_table.c.id))).scalar() or 0)

    def after(
        self,
        conn_id: str,
        after: int,
        *,
        limit: int = MAX_PAGE,
        purpose: str | None = None,
        label: str | None = None,
    ) -> tuple[list[StoredCallback], int]:
        """
        Return the callbacks of ``conn_id`` recorded with an id above ``after``, and the next cursor.

        The cursor is the last id returned when the page is full, else the largest id that existed
        when the query ran (rows of other connections, purposes or labels are skipped for good:
        with serialized inserts nothing can appear below it later).
        """
        limit = max(1, min(limit, MAX_PAGE))
        with self.engine.connect() as conn:
            upto = int(conn.execute(sa.select(sa.func.max(callback_table.c.id))).scalar() or 0)
            if upto <= after:
                return [], after
            query = (
                sa.select(*_PUBLIC_COLUMNS)
                .where(callback_table.c.id > after, callback_table.c.id <= upto)
                .where(callback_table.c.conn_id == conn_id)
                .order_by(callback_table.c.id)
                .limit(limit)
            )
            if purpose is not None:
                query = query.where(callback_table.c.purpose == purpose)
            if label is not None:
                query = query.where(callback_table.c.label == label)
            rows = [StoredCallback.from_row(row) for row in conn.execute(query)]
        cursor = rows[-1].id if len(rows) == limit else upto
        return rows, cursor

    def lookup(self, conn_id: str, remote_task_ids: Iterable[str]) -> list[StoredCallback]:
        """Return the callbacks already recorded for these remote task ids (of ``conn_id``)."""
        ids = sorted(set(remote_task_ids))[:MAX_LOOKUP]
        if not ids:
            return []
        query = (
            sa.select(*_PUBLIC_COLUMNS)
            .where(callback_table.c.conn_id == conn_id, callback_table.c.remote_task_id.in_(ids))
            .order_by(callback_table.c.id)
        )
        with self.engine.connect() as conn:
            return [StoredCallback.from_row(row) for row in conn.execute(query)]

    def cursor(self, conn_id: str, name: str) -> int | None:
        """Return a consumer's stored position, or ``None`` when it never advanced."""
        with self.engine.connect() as conn:
            value = conn.execute(self._cursor_query(conn_id, name)).scalar()
        return int(value) if value is not None else None

    @staticmethod
    def _cursor_query(conn_id: str, name: str) -> Any:
        return sa.select(cursor_table.c.position).where(
            cursor_table.c.conn_id == conn_id, cursor_table.c.name == name
        )
