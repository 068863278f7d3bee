"""
``airflow db migrate`` creates the pool ``imagecb_submissions`` (one slot) on a fresh deployment,
through the provider's db-manager found the stock way (the installed distribution's provider info,
no ``[database] external_db_managers``), and a later migrate keeps the slots a user gave it.

Each case runs the real command in a subprocess with its own ``AIRFLOW_HOME``, on SQLite and on the
local PostgreSQL (127.0.0.1:5432, user ``postgres``, trust; the case fails without it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cbhelpers import postgres_database

from imagecb_provider.callbacks.db import SUBMISSION_POOL_DESCRIPTION, ensure_submission_pool
from imagecb_provider.utils.pacing import SUBMISSION_POOL

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'airflow.db'}"
        return
    with postgres_database("imagecb_pool_test") as url:
        yield url


def _migrate(url: str, home: Path) -> str:
    """Run ``airflow db migrate`` as a fresh deployment would; return its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__DATABASE__")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=url,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "plugins"), env.get("PYTHONPATH")) if p),
    )
    completed = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return output


def _pools(engine: sa.Engine) -> dict[str, tuple[int, str | None, bool]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT pool, slots, description, include_deferred FROM slot_pool"))
        return {pool: (slots, description, bool(deferred)) for pool, slots, description, deferred in rows}


def test_migrate_creates_the_pool_once_and_keeps_the_slots_a_user_set(database_url, tmp_path):
    home = tmp_path / "airflow-home"
    home.mkdir()
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        first = _migrate(database_url, home)
        assert "Created the pool imagecb_submissions with 1 slot" in first
        tables = set(sa.inspect(engine).get_table_names())
        assert {"imagecb_callback", "slot_pool"} <= tables  # the db-manager was found without any setting
        pools = _pools(engine)
        assert pools[SUBMISSION_POOL] == (1, SUBMISSION_POOL_DESCRIPTION, False)
        assert "default_pool" in pools

        # A user gives the pool more slots (as `airflow pools set imagecb_submissions 3 ...` does).
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE slot_pool SET slots = 3, description = 'mine' WHERE pool = :pool"),
                {"pool": SUBMISSION_POOL},
            )
        second = _migrate(database_url, home)
        assert "Created the pool" not in second
        assert _pools(engine)[SUBMISSION_POOL] == (3, "mine", False)
    finally:
        engine.dispose()


def test_ensure_submission_pool_creates_only_a_missing_pool(airflow_db):
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(sa.delete(Pool).where(Pool.pool == SUBMISSION_POOL))
    try:
        with create_session() as session:
            assert ensure_submission_pool(session) is True
            assert ensure_submission_pool(session) is False
            pool = session.scalar(sa.select(Pool).where(Pool.pool == SUBMISSION_POOL))
            assert (pool.slots, pool.include_deferred) == (1, False)
            pool.slots = 7
        with create_session() as session:
            assert ensure_submission_pool(session) is False
            assert session.scalar(sa.select(Pool.slots).where(Pool.pool == SUBMISSION_POOL)) == 7
    finally:
        with create_session() as session:  # the session's database as the other tests know it
            session.execute(sa.update(Pool).where(Pool.pool == SUBMISSION_POOL).values(slots=1))
