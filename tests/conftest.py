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
