"""
Test session setup.

Airflow reads ``AIRFLOW_HOME`` when it is first imported, so it is pointed at a throwaway folder
here, before any test module imports Airflow: tests never touch a developer's own Airflow.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="imagecb-test-airflow-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ.pop("AIRFLOW_CONN_IMAGECB_DEFAULT", None)
# The batch DAG's retries wait 1 s here, not 30 s (dag.test() waits them out in real time).
os.environ["IMAGECB_BATCH_RETRY_DELAY"] = "1"
# The callback tokens' signing key (the throwaway AIRFLOW_HOME has no fernet key to derive one from).
os.environ.setdefault("AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS", "t1:" + "test-signing-secret-" * 3)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def airflow_db():
    """Create the throwaway Airflow metadata database once per test session."""
    from airflow.utils import db

    db.initdb()
    return True


@pytest.fixture
def run_dag(airflow_db):
    """
    Run a DAG defined in a test with ``dag.test()``, after registering it the way the
    scheduler would (bundles synced, DAG serialized), and return the finished DagRun.
    """
    from imagecb_provider.testing.airflow import run_dag_test

    return run_dag_test


@pytest.fixture(autouse=True)
def _fresh_render_times():
    """Start every test with no render times learned, so poll schedules do not depend on test order."""
    import sys

    # Only once something imported the triggers: importing them here would load Airflow for all.
    triggers = sys.modules.get("imagecb_provider.triggers.task")
    if triggers is not None:
        triggers.RENDER_TIMES.clear()


@pytest.fixture(autouse=True)
def _no_account_hold_left(request):
    """End every test with no account hold (utils/limiter.py), in this process or in Airflow's Variables."""
    yield
    import sys

    limiter = sys.modules.get("imagecb_provider.utils.limiter")
    if limiter is None:
        return
    with limiter.HoldStore._LOCAL_LOCK:
        limiter.HoldStore._LOCAL.clear()
    if "airflow_db" in request.fixturenames:
        from airflow.models.variable import Variable
        from airflow.utils.session import create_session

        with create_session() as session:
            session.query(Variable).filter(Variable.key.like("imagecb_account_hold__%")).delete(
                synchronize_session=False
            )
