"""
A setting a user can get wrong fails the first task that reads it, at once (no retry), naming it
and the fix, before any credit is spent: a connection that does not exist, an archive root that
cannot be written, a callback URL that does not lead to the receiver. Run with ``dag.test()``
against the simulator, whose submission count must stay 0.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from imagecb_provider.exceptions import ImageCbConfigurationError

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
LOGICAL_DATE = datetime(2026, 3, 1, tzinfo=UTC)
EXAMPLE_DAGS_RUN = {"imagecb_batch_generate"}  # see tests/dags/test_examples_covered.py
_ids = itertools.count()


@pytest.fixture(scope="module")
def batch_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "imagecb_batch_generate.py"))
    assert bag.import_errors == {}
    return bag.dags["imagecb_batch_generate"]


@pytest.fixture
def raised(monkeypatch):
    """``raised(module, name)``: wrap a check the DAG imports at run time; return what it raised."""
    import importlib

    def spy(module_name: str, name: str) -> list[Exception]:
        module = importlib.import_module(module_name)
        check, errors = getattr(module, name), []

        def recording(*args, **kwargs):
            try:
                return check(*args, **kwargs)
            except Exception as error:
                errors.append(error)
                raise

        monkeypatch.setattr(module, name, recording)
        return errors

    return spy


def _states(dag_run) -> dict[str, tuple[str, int]]:
    return {ti.task_id: (ti.state, ti.try_number) for ti in dag_run.get_task_instances()}


def _run_batch(run_dag, batch_dag, tmp_path: Path, **conf):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('prompt\n"a quiet harbour"\n"a windmill"\n')
    # Every param a test here changes is given each time: a run's conf carries over to the next
    # dag.test() of the same (module-scoped) DAG object (seen with imagecb_conn_id).
    conf = {
        "prompts_path": str(prompts),
        "archive_root": str(tmp_path / "archive"),
        "imagecb_conn_id": "imagecb_default",
        "wait_mode": "poll",
        **conf,
    }
    return run_dag(batch_dag, logical_date=LOGICAL_DATE, run_conf=conf)


# ------------------------------------------------------------------------- the connection
def test_a_missing_connection_is_named_with_how_to_create_it():
    from imagecb_provider.hooks.imagecb import ImageCbHook
    from imagecb_provider.utils.waiting import connection_settings

    with pytest.raises(ImageCbConfigurationError) as caught:
        connection_settings(ImageCbHook(imagecb_conn_id="imagecb_nowhere"))
    assert isinstance(caught.value, AirflowFailException)
    message = str(caught.value)
    assert message.startswith("Connection 'imagecb_nowhere' is not defined")
    assert "airflow connections add imagecb_nowhere --conn-json" in message
    assert '"conn_type": "imagecb"' in message
    assert "AIRFLOW_CONN_IMAGECB_NOWHERE" in message


def test_an_operator_without_its_connection_fails_at_once(run_dag, imagecb_simulator):
    from airflow.sdk import DAG

    from imagecb_provider.operators.generate import ImageGenerateOperator

    with DAG(
        f"setup_no_conn_{next(_ids)}",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        default_args={"retry_delay": timedelta(seconds=0)},
    ) as dag:
        ImageGenerateOperator(task_id="one", prompt="a pier", imagecb_conn_id="imagecb_nowhere", retries=2)
    dag_run = run_dag(dag)
    assert _states(dag_run) == {"one": ("failed", 1)}
    assert imagecb_simulator.stats()["submissions_total"] == 0


def test_the_batch_without_its_connection_fails_in_read_prompts(
    run_dag, batch_dag, imagecb_simulator, tmp_path, raised
):
    errors = raised("imagecb_provider.utils.waiting", "connection_settings")
    dag_run = _run_batch(run_dag, batch_dag, tmp_path, imagecb_conn_id="imagecb_nowhere")
    states = _states(dag_run)
    assert states["read_prompts"] == ("failed", 1)
    assert states["report"] == ("failed", 1)  # the batch could not start; the summary says so
    assert dag_run.state == "failed"
    assert imagecb_simulator.stats()["submissions_total"] == 0
    (summary,) = (tmp_path / "archive").glob("*/runs/*/summary.json")
    assert json.loads(summary.read_text())["started"] is False
    (error,) = errors
    assert str(error).startswith("Connection 'imagecb_nowhere' is not defined. Create it")


# ------------------------------------------------------------------------ the archive root
def test_the_batch_with_an_archive_root_that_cannot_be_created_fails_in_read_prompts(
    run_dag, batch_dag, imagecb_simulator, tmp_path, raised
):
    errors = raised("imagecb_provider.batch.archive", "check_archive_destination")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    dag_run = _run_batch(run_dag, batch_dag, tmp_path, archive_root=str(blocker / "archive"))
    states = _states(dag_run)
    assert states["read_prompts"] == ("failed", 1)
    assert states["report"] == ("failed", 1)  # names the destination too, without retrying
    assert dag_run.state == "failed"
    assert imagecb_simulator.stats()["requests"].get("credit", 0) == 0  # stopped before any API call
    assert imagecb_simulator.stats()["submissions_total"] == 0
    assert len(errors) == 2  # read_prompts, then report: each once
    for error in errors:
        assert isinstance(error, ImageCbConfigurationError)
        assert str(error).startswith(
            f"The archive destination {blocker}/archive/2026-03-01 cannot be created"
        )


# ------------------------------------------------------------------------- the callback URL
def test_the_batch_in_callback_mode_with_a_wrong_callback_url_fails_in_read_prompts(
    run_dag, batch_dag, imagecb_simulator, tmp_path, monkeypatch, raised
):
    errors = raised("imagecb_provider.callbacks.client", "check_receiver")
    conn = json.loads(imagecb_simulator.connection_json())
    # The simulator is no receiver: its health route answers 404.
    conn["extra"] = {"callback_base_url": imagecb_simulator.url}
    monkeypatch.setenv("AIRFLOW_CONN_IMAGECB_DEFAULT", json.dumps(conn))
    dag_run = _run_batch(run_dag, batch_dag, tmp_path, wait_mode="callback")
    states = _states(dag_run)
    assert states["read_prompts"] == ("failed", 1)
    assert dag_run.state == "failed"
    stats = imagecb_simulator.stats()
    assert stats["submissions_total"] == 0
    assert stats["requests"].get("credit", 0) == 0  # stopped by the check, before the first API call
    (error,) = errors
    assert isinstance(error, ImageCbConfigurationError)
    assert f"GET {imagecb_simulator.url}/imagecb/callbacks/health answered 404 (Not Found)" in str(error)
