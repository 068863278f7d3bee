"""
The provider's alembic history on SQLite: a database revision 0001 made, with rows in it, upgrades
to the head with its rows, ids and AUTOINCREMENT high-water mark kept, and matches the ORM's schema.
(``test_postgres.py`` upgrades one on PostgreSQL with ``airflow db migrate``.)
"""

from __future__ import annotations

import sqlalchemy as sa
from migration_checks import HEAD, REVISION_0001, check_upgraded, fill_0001

from imagecb_provider.callbacks.db import CallbackDBManager
from imagecb_provider.callbacks.schema import metadata


def _alembic(engine: sa.Engine, action: str, revision: str) -> None:
    """Run ``alembic <action> <revision>`` with the provider's migrations on ``engine``."""
    from alembic import command

    config = CallbackDBManager(None).get_alembic_config()
    with engine.connect() as conn:
        config.attributes["connection"] = conn  # env.py migrates this connection, not Airflow's
        getattr(command, action)(config, revision)
        conn.commit()


def _engine(path) -> sa.Engine:
    return sa.create_engine(f"sqlite:///{path}", poolclass=sa.NullPool)


def _schema(engine: sa.Engine) -> dict:
    inspector = sa.inspect(engine)
    return {
        table: (
            sorted((c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)),
            sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
            sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)
            ),
        )
        for table in ("imagecb_callback", "imagecb_callback_cursor")
    }


def test_a_0001_database_with_rows_upgrades_to_the_head(tmp_path):
    engine = _engine(tmp_path / "old.db")
    _alembic(engine, "upgrade", REVISION_0001)
    before = fill_0001(engine)
    _alembic(engine, "upgrade", "heads")
    check_upgraded(engine, before)
    with engine.connect() as conn:  # still AUTOINCREMENT: ids are never reused after a purge
        table = conn.execute(
            sa.text("SELECT sql FROM sqlite_master WHERE name = 'imagecb_callback'")
        ).scalar()
    assert "AUTOINCREMENT" in table


def test_the_migrations_build_the_schema_of_the_orm(tmp_path):
    migrated, created = _engine(tmp_path / "migrated.db"), _engine(tmp_path / "created.db")
    _alembic(migrated, "upgrade", "heads")
    metadata.create_all(created)
    assert _schema(migrated) == _schema(created)


def test_the_downgrade_keeps_the_first_row_of_each_task_id(tmp_path):
    engine = _engine(tmp_path / "down.db")
    _alembic(engine, "upgrade", REVISION_0001)
    before = fill_0001(engine)
    _alembic(engine, "upgrade", "heads")
    check_upgraded(engine, before)  # records an asset row for the task id of a ti row
    _alembic(engine, "downgrade", REVISION_0001)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, remote_task_id, purpose FROM imagecb_callback ORDER BY id")
        ).all()
    assert [(r.remote_task_id, r.purpose) for r in rows] == [
        ("t-ti-1", "ti"),
        ("t-asset-1", "asset"),
        ("t-ti-2", "ti"),
        ("t-other-conn", "ti"),
    ]
    assert [u["column_names"] for u in sa.inspect(engine).get_unique_constraints("imagecb_callback")] == [
        ["remote_task_id"]
    ]
    _alembic(engine, "upgrade", "heads")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM imagecb_alembic_version")).scalar_one() == HEAD
