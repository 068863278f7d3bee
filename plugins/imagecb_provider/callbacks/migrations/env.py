"""
Alembic environment of the imagecb provider's tables.

Run by :class:`~imagecb_provider.callbacks.db.CallbackDBManager` on Airflow's own engine, with
the provider's version table so its history never mixes with Airflow's.
"""

from __future__ import annotations

import contextlib

from airflow import settings
from alembic import context

from imagecb_provider.callbacks.db import CallbackDBManager

config = context.config
version_table = CallbackDBManager.version_table_name
target_metadata = CallbackDBManager.metadata


def include_object(_, name, type_, *args):
    """Compare only this provider's tables when autogenerating a revision."""
    return not (type_ == "table" and name not in target_metadata.tables)


def run_migrations_offline() -> None:
    """Emit the SQL of the migrations without connecting (``--show-sql-only``)."""
    context.configure(
        url=settings.get_sql_alchemy_conn(),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        render_as_batch=True,
        version_table=version_table,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the connection alembic was given, or on Airflow's engine."""
    with contextlib.ExitStack() as stack:
        connection = config.attributes.get("connection", None)
        if not connection:
            connection = stack.enter_context(settings.get_engine().connect())
        context.configure(
            connection=connection,
            transaction_per_migration=True,
            target_metadata=target_metadata,
            compare_type=True,
            include_object=include_object,
            render_as_batch=True,
            version_table=version_table,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
