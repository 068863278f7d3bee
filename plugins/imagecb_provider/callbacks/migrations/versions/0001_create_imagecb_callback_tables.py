"""
Create the callback table and the consumer cursor table.

Revision ID: 0001_imagecb_callback
Revises:
Create Date: 2026-07-01
"""

from __future__ import annotations

import sqlalchemy as sa
from airflow.utils.sqlalchemy import UtcDateTime
from alembic import op

revision = "0001_imagecb_callback"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    """Create ``imagecb_callback`` and ``imagecb_callback_cursor``."""
    op.create_table(
        "imagecb_callback",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("remote_task_id", sa.String(128), nullable=False),
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
        sa.UniqueConstraint("remote_task_id", name="imagecb_callback_remote_task_id_uq"),
        sqlite_autoincrement=True,
    )
    op.create_index("idx_imagecb_callback_received_at", "imagecb_callback", ["received_at"])
    op.create_table(
        "imagecb_callback_cursor",
        sa.Column("conn_id", sa.String(250), primary_key=True),
        sa.Column("name", sa.String(250), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )


def downgrade():
    """Drop both tables."""
    op.drop_table("imagecb_callback_cursor")
    op.drop_index("idx_imagecb_callback_received_at", table_name="imagecb_callback")
    op.drop_table("imagecb_callback")
