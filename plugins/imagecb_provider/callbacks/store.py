"""
The durable record of received callbacks, in the Airflow metadata database.

Four properties carry the design:

* **Recorded once.** ``(conn_id, purpose, remote_task_id)`` is unique and inserts are ``INSERT ...
  ON CONFLICT DO NOTHING``: the vendor's duplicates and retries, and replicas racing on the same
  delivery, leave one row. The purpose is part of the key because an ``asset`` URL is handed to
  systems outside Airflow: a callback it records for some task id must neither turn the real
  ``ti`` callback of that id into a duplicate nor be seen by the task waiting for it (readers
  filter by purpose).
* **A gap-free cursor.** Waiters read "rows with ``id`` > my cursor". With concurrent writers a
  row with a smaller id can commit *after* a larger one, and a reader that already moved past
  the larger id would never see it. Inserts are therefore serialized while they commit: a
  transaction-scoped advisory lock on PostgreSQL, SQLite's single writer on SQLite. Then every
  id at or below the largest visible id is committed, and a cursor never skips a row.
* **Bounded.** ``asset`` callbacks are limited per connection and label to ``[imagecb]
  asset_callback_quota`` (10,000) in a sliding window of ``[imagecb]
  asset_callback_quota_window`` seconds (24 hours): the next one is refused
  (:class:`AssetQuotaExceeded`, a 429 the vendor retries) and nothing is recorded. A window
  rather than "not yet consumed" because no consumer may exist yet (a trigger deployed later
  reads the label from its start) and several may (``asset:<label>`` and ``asset:*``). Only the
  fields readers use of a body are stored (:func:`stored_body`), at most about 20 KB a row
  whatever the vendor or a URL holder posts (up to 64 KiB).
* **Synchronous and short.** One small transaction per callback; the receiver runs these
  methods in a thread pool so the event loop never blocks.

Works on PostgreSQL and SQLite (the dialects Airflow's tests and deployments here use).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from imagecb_provider.callbacks.schema import MAX_REMOTE_TASK_ID, callback_table, cursor_table
from imagecb_provider.callbacks.tokens import PURPOSE_ASSET
from imagecb_provider.exceptions import ImageCbConfigurationError
from imagecb_provider.models import TaskRecord

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

#: Rows returned per events answer at most; a waiter that gets a full page asks again at once.
MAX_PAGE = 1000
#: Remote task ids per lookup at most.
MAX_LOOKUP = 1000
#: The PostgreSQL advisory lock that serializes callback inserts (see the module docstring).
INSERT_LOCK_KEY = zlib.crc32(b"imagecb_callback.insert")
#: ``asset`` callbacks accepted per connection and label in the window, unless configured.
DEFAULT_ASSET_QUOTA = 10_000
DEFAULT_ASSET_QUOTA_WINDOW = 24 * 3600.0
CONFIG_SECTION = "imagecb"
#: What the unique constraint is on (``ON CONFLICT`` names it by its columns).
UNIQUE_COLUMNS = ("conn_id", "purpose", "remote_task_id")
#: Longest ``msg`` stored (longer ones are cut) and longest image URL (longer ones are dropped:
#: a cut URL is no URL).
MAX_MESSAGE = 1000
MAX_URL = 8192
_URL_KEYS = ("resultImageUrl", "originImageUrl")
#: The event trigger names its cursors ``asset:<label>`` and ``asset:*`` (``cursor_name`` in
#: :mod:`imagecb_provider.triggers.callback_event`); the name says which stream a cursor follows.
_ASSET_CURSOR_PREFIX = "asset:"


class UnsupportedDialect(sa.exc.SQLAlchemyError):
    """The metadata database is neither PostgreSQL nor SQLite."""


class AssetQuotaExceeded(Exception):
    """
    An ``asset`` callback refused because its label used up its quota; nothing was recorded.

    :param conn_id: the connection of the callback URL.
    :param label: the label of the callback URL.
    :param quota: how many callbacks a label may record in the window.
    :param window: the window, in seconds.
    :param retry_after: seconds until the oldest callback counted leaves the window.
    """

    def __init__(self, conn_id: str, label: str | None, quota: int, window: float, retry_after: int) -> None:
        super().__init__(
            f"label {label!r} has used its quota of {quota} asset callbacks per {window:g} seconds; "
            f"retry in {retry_after} seconds"
        )
        self.conn_id = conn_id
        self.label = label
        self.quota = quota
        self.window = window
        self.retry_after = retry_after


def stored_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """
    Return the part of a callback body that is stored: what :meth:`TaskRecord.from_callback` reads.

    ``code``, ``msg`` (cut to :data:`MAX_MESSAGE` characters), ``data.taskId`` or ``data.task_id``
    and the image URLs of ``data.info`` (each up to :data:`MAX_URL` characters); anything else a
    body carries is not kept.

    :param body: the parsed JSON body, as posted.
    """
    kept: dict[str, Any] = {}
    if "code" in body and _is_short_scalar(body["code"], 32):
        kept["code"] = body["code"]
    if "msg" in body and _is_short_scalar(body["msg"], None):
        message = body["msg"]
        kept["msg"] = message[:MAX_MESSAGE] if isinstance(message, str) else message
    data = body.get("data")
    if isinstance(data, Mapping):
        ids = ("taskId", "task_id")
        kept_data = {k: data[k] for k in ids if k in data and _is_short_scalar(data[k], MAX_REMOTE_TASK_ID)}
        info = data.get("info")
        if isinstance(info, Mapping):
            kept_data["info"] = {
                k: info[k] for k in _URL_KEYS if isinstance(info.get(k), str) and len(info[k]) <= MAX_URL
            }
        kept["data"] = kept_data
    return kept


def _is_short_scalar(value: Any, length: int | None) -> bool:
    """Whether ``value`` is JSON null, a number, a boolean or a string of at most ``length`` characters."""
    if isinstance(value, str):
        return length is None or len(value) <= length
    return value is None or isinstance(value, int | float | bool)


@dataclass(frozen=True)
class NewCallback:
    """
    A verified callback about to be recorded.

    :param remote_task_id: the vendor's task id from the body.
    :param conn_id: the connection whose token the callback came with.
    :param purpose: ``ti`` or ``asset``.
    :param body: the parsed JSON body; only :func:`stored_body` of it is stored.
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
            "body": json.dumps(stored_body(self.body), separators=(",", ":"), ensure_ascii=False),
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
    :param asset_quota: ``asset`` callbacks recorded per connection and label in ``asset_window``
        at most; by default ``[imagecb] asset_callback_quota`` (10,000).
    :param asset_window: the quota's sliding window in seconds; by default ``[imagecb]
        asset_callback_quota_window`` (86,400).
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        asset_quota: int | None = None,
        asset_window: float | None = None,
    ) -> None:
        self._engine = engine
        if asset_quota is None:
            asset_quota = _config("asset_callback_quota", DEFAULT_ASSET_QUOTA, int)
        if asset_window is None:
            asset_window = _config("asset_callback_quota_window", DEFAULT_ASSET_QUOTA_WINDOW, float)
        if asset_quota < 1 or asset_window <= 0:
            raise ImageCbConfigurationError(
                f"[{CONFIG_SECTION}] asset_callback_quota={asset_quota} and asset_callback_quota_window="
                f"{asset_window:g} must both be positive"
            )
        self.asset_quota = asset_quota
        self.asset_window = asset_window

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
        Record a callback once; return its new id, or ``None`` when it is a duplicate.

        A duplicate has the connection, purpose and task id of a recorded callback. Commits before
        returning: when this returns, the callback survives any restart.

        :raises AssetQuotaExceeded: an ``asset`` callback, not a duplicate, over its label's quota.
        """
        limited = callback.purpose == PURPOSE_ASSET
        with self.engine.begin() as conn:
            # a refusal costs one indexed count and never queues for the insert lock
            if limited and conn.execute(self._asset_count(callback)).scalar_one() >= self.asset_quota:
                return self._duplicate_or_refuse(conn, callback)
            self._lock_inserts(conn)
            new_id = conn.execute(self._insert_once(callback, limited)).scalar()
            if new_id is None and limited:
                return self._duplicate_or_refuse(conn, callback)
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

    def _insert_once(self, callback: NewCallback, limited: bool) -> Any:
        """Return the ``INSERT`` of ``callback`` ignoring duplicates, and within its quota if ``limited``."""
        row = callback.row()
        statement = self._insert(callback_table)
        if limited:
            # The quota is checked by the insert itself: on SQLite a count in a statement of its
            # own runs outside the write lock, and concurrent requests would all pass it.
            values = sa.select(
                *(sa.literal(value, callback_table.c[name].type) for name, value in row.items())
            )
            within = values.where(self._asset_count(callback).scalar_subquery() < self.asset_quota)
            statement = statement.from_select(list(row), within)
        else:
            statement = statement.values(**row)
        statement = statement.on_conflict_do_nothing(index_elements=list(UNIQUE_COLUMNS))
        return statement.returning(callback_table.c.id)

    def _window(self, callback: NewCallback) -> Any:
        """Return the conditions selecting the callbacks counted in ``callback``'s quota."""
        since = callback.received_at - timedelta(seconds=self.asset_window)
        return (
            callback_table.c.conn_id == callback.conn_id,
            callback_table.c.label == callback.label,
            callback_table.c.purpose == PURPOSE_ASSET,
            callback_table.c.received_at >= since,
        )

    def _asset_count(self, callback: NewCallback) -> Any:
        return sa.select(sa.func.count()).select_from(callback_table).where(*self._window(callback))

    def _duplicate_or_refuse(self, conn: Connection, callback: NewCallback) -> None:
        """Return ``None`` for a duplicate (the vendor's retry of a recorded callback), else refuse it."""
        if conn.execute(self._recorded(callback)).first() is not None:
            return None
        oldest = conn.execute(
            sa.select(sa.func.min(callback_table.c.received_at)).where(*self._window(callback))
        ).scalar()
        retry_after = 1
        if oldest is not None:
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=UTC)
            leaves = oldest + timedelta(seconds=self.asset_window) - callback.received_at
            retry_after = max(1, math.ceil(leaves.total_seconds()))
        raise AssetQuotaExceeded(
            callback.conn_id, callback.label, self.asset_quota, self.asset_window, retry_after
        )

    @staticmethod
    def _recorded(callback: NewCallback) -> Any:
        return sa.select(callback_table.c.id).where(
            callback_table.c.conn_id == callback.conn_id,
            callback_table.c.purpose == callback.purpose,
            callback_table.c.remote_task_id == callback.remote_task_id,
        )

    def _lock_inserts(self, conn: Connection) -> None:
        if self.dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": INSERT_LOCK_KEY})

    def advance_cursor(self, conn_id: str, name: str, position: int) -> int:
        """
        Move a consumer's cursor forward to ``position``; return the stored position.

        It never moves back, and never past the latest row of the cursor's stream: a cursor
        beyond it would skip the rows recorded next, whose ids are smaller, and stall the stream.
        The stream of ``asset:<label>`` is the ``asset`` callbacks of that label, of ``asset:*``
        every ``asset`` callback, of any other name every callback; all of ``conn_id``.

        :param conn_id: the connection of the watch token.
        :param name: the consumer's name.
        :param position: the id of the last row the consumer is done with.
        """
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            # a row recorded after this read only makes the clamp lower than it could be: harmless
            latest = int(conn.execute(self._stream_latest(conn_id, name)).scalar() or 0)
            return self._store_cursor(conn, conn_id, name, min(position, latest), now)

    def _store_cursor(self, conn: Connection, conn_id: str, name: str, position: int, now: datetime) -> int:
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
        conn.execute(statement)
        return int(conn.execute(self._cursor_query(conn_id, name)).scalar_one())

    @staticmethod
    def _stream_latest(conn_id: str, name: str) -> Any:
        """Return the query of the largest id in cursor ``name``'s stream (see :meth:`advance_cursor`)."""
        query = sa.select(sa.func.max(callback_table.c.id)).where(callback_table.c.conn_id == conn_id)
        if name.startswith(_ASSET_CURSOR_PREFIX):
            query = query.where(callback_table.c.purpose == PURPOSE_ASSET)
            label = name.removeprefix(_ASSET_CURSOR_PREFIX)
            if label != "*":
                query = query.where(callback_table.c.label == label)
        return query

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

    def lookup(
        self, conn_id: str, remote_task_ids: Iterable[str], *, purpose: str | None = None
    ) -> list[StoredCallback]:
        """
        Return the callbacks already recorded for these remote task ids (of ``conn_id``).

        :param conn_id: the connection the callbacks were recorded for.
        :param remote_task_ids: the task ids (at most :data:`MAX_LOOKUP` are read).
        :param purpose: only callbacks of this purpose; a waiting task asks for ``ti`` only.
        """
        ids = sorted(set(remote_task_ids))[:MAX_LOOKUP]
        if not ids:
            return []
        query = (
            sa.select(*_PUBLIC_COLUMNS)
            .where(callback_table.c.conn_id == conn_id, callback_table.c.remote_task_id.in_(ids))
            .order_by(callback_table.c.id)
        )
        if purpose is not None:
            query = query.where(callback_table.c.purpose == purpose)
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


def _config(key: str, default: Any, kind: type) -> Any:
    from airflow.configuration import conf

    raw = conf.get(CONFIG_SECTION, key, fallback=None)
    if raw is None or not str(raw).strip():
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ImageCbConfigurationError(f"[{CONFIG_SECTION}] {key}={raw!r} is not a number") from None
