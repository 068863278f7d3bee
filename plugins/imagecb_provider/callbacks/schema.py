"""
The provider's tables in the Airflow metadata database (SQLAlchemy Core).

``imagecb_callback`` holds one row per connection, purpose and remote task (a duplicate delivery
is not recorded again); its ``id`` is the global cursor that waiters read from.
``imagecb_callback_cursor`` holds the positions consumers (the event trigger) have durably
reached. Both are created by :class:`~imagecb_provider.callbacks.db.CallbackDBManager`
(``airflow db migrate``).
"""

from __future__ import annotations

import sqlalchemy as sa
from airflow.utils.sqlalchemy import UtcDateTime

CALLBACK_TABLE = "imagecb_callback"
CURSOR_TABLE = "imagecb_callback_cursor"
VERSION_TABLE = "imagecb_alembic_version"
#: Longest remote task id accepted (the vendor's are 32 hex characters).
MAX_REMOTE_TASK_ID = 128
#: A task id is unique per connection and purpose only: an ``asset`` URL (handed to systems outside
#: Airflow) recording a task id first must not turn the real ``ti`` callback into a "duplicate".
UNIQUE_TASK = "imagecb_callback_task_uq"

metadata = sa.MetaData()

#: SQLite only makes an ``INTEGER PRIMARY KEY`` an alias of its rowid; AUTOINCREMENT there (and a
#: sequence on PostgreSQL) guarantees an id is never reused, even after old rows are purged.
_ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

callback_table = sa.Table(
    CALLBACK_TABLE,
    metadata,
    sa.Column("id", _ID_TYPE, primary_key=True, autoincrement=True),
    sa.Column("remote_task_id", sa.String(MAX_REMOTE_TASK_ID), nullable=False),
    sa.Column("conn_id", sa.String(250), nullable=False),
    sa.Column("purpose", sa.String(8), nullable=False),
    sa.Column("dag_id", sa.String(250), nullable=True),
    sa.Column("run_id", sa.String(250), nullable=True),
    sa.Column("task_id", sa.String(250), nullable=True),
    sa.Column("map_index", sa.Integer, nullable=True),
    sa.Column("slot", sa.Integer, nullable=True),
    sa.Column("label", sa.String(100), nullable=True),
    sa.Column("code", sa.Integer, nullable=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("signed", sa.Boolean, nullable=False),
    sa.Column("received_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("conn_id", "purpose", "remote_task_id", name=UNIQUE_TASK),
    sa.Index("idx_imagecb_callback_received_at", "received_at"),
    # counts the asset callbacks of a label in the quota window (only asset rows have a label)
    sa.Index("idx_imagecb_callback_label", "conn_id", "label", "received_at"),
    sqlite_autoincrement=True,
)

cursor_table = sa.Table(
    CURSOR_TABLE,
    metadata,
    sa.Column("conn_id", sa.String(250), primary_key=True),
    sa.Column("name", sa.String(250), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)
