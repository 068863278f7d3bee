"""
Make a remote task id unique per connection and purpose, index asset labels, unstall cursors.

Until now ``imagecb_callback`` was unique on ``remote_task_id`` alone: an ``asset`` callback URL
(handed to systems outside Airflow) that recorded a task id first turned the real ``ti`` callback
of that id into a "duplicate". The existing rows already satisfy the new, wider constraint.

* ``imagecb_callback_remote_task_id_uq (remote_task_id)`` becomes
  ``imagecb_callback_task_uq (conn_id, purpose, remote_task_id)``;
* ``idx_imagecb_callback_label (conn_id, label, received_at)`` serves the per-label quota of asset
  callbacks;
* a consumer cursor stored beyond the largest callback id (which stalled its stream: new ids are
  below it) is moved back to that id; no row exists between the two, so nothing is read twice.

Revision ID: 0002_imagecb_task_per_purpose
Revises: 0001_imagecb_callback
Create Date: 2026-07-15
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op

revision = "0002_imagecb_task_per_purpose"
down_revision = "0001_imagecb_callback"
branch_labels = None
depends_on = None

TABLE = "imagecb_callback"
OLD_UNIQUE = "imagecb_callback_remote_task_id_uq"
NEW_UNIQUE = "imagecb_callback_task_uq"
LABEL_INDEX = "idx_imagecb_callback_label"


def upgrade():
    """Swap the unique constraint, add the label index, and clamp cursors to the largest id."""
    with _ids_kept(), op.batch_alter_table(TABLE, table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint(OLD_UNIQUE, type_="unique")
        batch.create_unique_constraint(NEW_UNIQUE, ["conn_id", "purpose", "remote_task_id"])
    op.create_index(LABEL_INDEX, TABLE, ["conn_id", "label", "received_at"])
    latest = f"(SELECT COALESCE(MAX(id), 0) FROM {TABLE})"
    op.execute(f"UPDATE imagecb_callback_cursor SET position = {latest} WHERE position > {latest}")


def downgrade():
    """Restore the unique constraint on ``remote_task_id``, keeping the first row of each task id."""
    op.drop_index(LABEL_INDEX, table_name=TABLE)
    op.execute(f"DELETE FROM {TABLE} WHERE id NOT IN (SELECT MIN(id) FROM {TABLE} GROUP BY remote_task_id)")
    with _ids_kept(), op.batch_alter_table(TABLE, table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint(NEW_UNIQUE, type_="unique")
        batch.create_unique_constraint(OLD_UNIQUE, ["remote_task_id"])


@contextlib.contextmanager
def _ids_kept() -> Iterator[None]:
    """
    Keep SQLite's AUTOINCREMENT high-water mark across the table copy of a batch alteration.

    The copied table's counter restarts at the largest id copied: after a purge of the newest rows
    it would hand their ids out again, behind the cursors of waiters that already read them.
    PostgreSQL alters the table in place and keeps its sequence.
    """
    sqlite = not op.get_context().as_sql and op.get_bind().dialect.name == "sqlite"
    before = _sqlite_seq() if sqlite else None
    yield
    if before is None:
        return
    after = _sqlite_seq()
    if after is None:
        statement = "INSERT INTO sqlite_sequence (name, seq) VALUES (:name, :seq)"
    elif after < before:
        statement = "UPDATE sqlite_sequence SET seq = :seq WHERE name = :name"
    else:
        return
    op.get_bind().execute(sa.text(statement), {"name": TABLE, "seq": before})


def _sqlite_seq() -> int | None:
    query = sa.text("SELECT seq FROM sqlite_sequence WHERE name = :name")
    return op.get_bind().execute(query, {"name": TABLE}).scalar()
