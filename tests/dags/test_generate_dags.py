"""
Small DAGs run with ``dag.test()`` against the simulator: the operator and the sensor in real
Airflow, asserting through ``/_sim/stats`` how many times each prompt was submitted.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

import pytest
from airflow.sdk import DAG, task

from imagecb_provider.operators.generate import ImageBatchGenerateOperator, ImageGenerateOperator
from imagecb_provider.sensors.task import ImageTaskSensor

pytestmark = pytest.mark.airflow

_ids = itertools.count()
FAST = {"poll_interval": 0.2}


def _dag(name: str, **kwargs) -> DAG:
    return DAG(
        f"{name}_{next(_ids)}",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        default_args={"retry_delay": timedelta(seconds=0)},
        **kwargs,
    )


def _tis(dag_run) -> dict:
    return {ti.task_id: ti for ti in dag_run.get_task_instances()}


def _result(dag_run, task_id: str):
    return _tis(dag_run)[task_id].xcom_pull(task_ids=task_id)


def test_success_returns_the_result_and_submits_once(run_dag, imagecb_simulator):
    with _dag("gen_success") as dag:
        ImageGenerateOperator(task_id="generate", prompt="a lantern", aspect_ratio="1:1", **FAST)
    dag_run = run_dag(dag)
    ti = _tis(dag_run)["generate"]
    assert (dag_run.state, ti.state, ti.try_number) == ("success", "success", 1)
    stats = imagecb_simulator.stats()
    assert stats["submissions"] == {"a lantern": 1}
    result = _result(dag_run, "generate")
    assert result["outcome"] == "success"
    assert result["request"] == {"prompt": "a lantern", "aspectRatio": "1:1"}
    assert result["polls"] == stats["status_calls"][result["task_id"]]
    assert result["result_image_url"].startswith(imagecb_simulator.url)


def test_content_policy_fails_at_once_without_retry(run_dag, imagecb_simulator):
    with _dag("gen_policy") as dag:
        ImageGenerateOperator(task_id="generate", prompt="a thing [sim:content_policy]", retries=2, **FAST)
    dag_run = run_dag(dag)
    ti = _tis(dag_run)["generate"]
    assert (dag_run.state, ti.state, ti.try_number) == ("failed", "failed", 1)
    assert imagecb_simulator.stats()["submissions"] == {"a thing [sim:content_policy]": 1}


def test_internal_error_is_retried_with_a_new_submission_that_succeeds(run_dag, imagecb_simulator):
    prompt = "a comet [sim:flaky]"
    with _dag("gen_flaky") as dag:
        ImageGenerateOperator(task_id="generate", prompt=prompt, retries=1, **FAST)
    dag_run = run_dag(dag)
    ti = _tis(dag_run)["generate"]
    assert (dag_run.state, ti.state, ti.try_number) == ("success", "success", 2)
    assert imagecb_simulator.stats()["submissions"] == {prompt: 2}
    assert _result(dag_run, "generate")["outcome"] == "success"


def test_return_mode_lets_a_failed_outcome_flow_downstream(run_dag, imagecb_simulator):
    with _dag("gen_return") as dag:
        generated = ImageGenerateOperator(
            task_id="generate", prompt="a wave [sim:generation_failed]", failure_mode="return", **FAST
        )

        @task
        def route(result: dict) -> str:
            return result["outcome"]

        route(generated.output)
    dag_run = run_dag(dag)
    assert dag_run.state == "success"
    assert _result(dag_run, "route") == "generation_failed"


class CrashAfterSubmitOperator(ImageGenerateOperator):
    """Dies on its first try right after the submission was stored, as a killed worker would."""

    def wait_for_remote_tasks(self, context, remote_task_ids, **kwargs):
        if context["ti"].try_number == 1:
            raise RuntimeError("worker lost right after submitting")
        return super().wait_for_remote_tasks(context, remote_task_ids, **kwargs)


def test_retry_after_a_crash_reconnects_without_a_second_submission(run_dag, imagecb_simulator):
    imagecb_simulator.configure(latency=1.0)
    with _dag("gen_crash") as dag:
        CrashAfterSubmitOperator(task_id="generate", prompt="a glacier", retries=1, **FAST)
    dag_run = run_dag(dag)
    ti = _tis(dag_run)["generate"]
    assert (dag_run.state, ti.try_number) == ("success", 2)
    stats = imagecb_simulator.stats()
    assert stats["submissions"] == {"a glacier": 1}
    result = _result(dag_run, "generate")
    assert result["task_id"] == next(iter(stats["tasks"]))
    assert result["outcome"] == "success"


class StaleDeferExitRace(ImageGenerateOperator):
    """
    Airflow 3.3's stale defer-exit race (apache/airflow#72716, #71580), made deterministic: try 1's
    trigger event is delivered, then the task instance fails before ``execute_complete`` runs.
    """

    def execute_complete(self, context, event):
        if context["ti"].try_number == 1:
            raise RuntimeError("the scheduler failed the resuming task before execute_complete ran")
        return super().execute_complete(context, event)


@pytest.mark.parametrize(
    ("marker", "retries", "state", "tries", "submissions"),
    [
        ("", 1, "success", 2, 1),  # the retry returns the image of try 1
        ("[sim:content_policy]", 2, "failed", 2, 1),  # the retry raises it: no retry after that
        ("[sim:generation_failed]", 1, "failed", 2, 1),  # the retry raises it, no retry left
        ("[sim:internal_error]", 1, "failed", 2, 1),
        ("[sim:flaky]", 2, "success", 3, 2),  # try 2 raises the delivered failure; try 3 submits anew
    ],
)
def test_a_retry_after_the_stale_defer_exit_race_settles_without_paying_again(
    run_dag, imagecb_simulator, marker, retries, state, tries, submissions
):
    prompt = f"a heron {marker}".strip()
    with _dag("gen_race") as dag:
        StaleDeferExitRace(task_id="generate", prompt=prompt, retries=retries, **FAST)
    dag_run = run_dag(dag)
    ti = _tis(dag_run)["generate"]
    assert (dag_run.state, ti.state, ti.try_number) == (state, state, tries)
    assert imagecb_simulator.stats()["submissions"] == {prompt: submissions}


def test_a_retry_after_the_race_on_a_timeout_reconnects_to_the_same_task(run_dag, imagecb_simulator):
    prompt = "a crane [sim:latency=1.5]"
    with _dag("gen_race_timeout") as dag:
        StaleDeferExitRace(task_id="generate", prompt=prompt, retries=4, timeout=0.5, **FAST)
    dag_run = run_dag(dag)
    ti = _tis(dag_run)["generate"]
    assert (dag_run.state, ti.state) == ("success", "success")
    assert ti.try_number >= 2
    stats = imagecb_simulator.stats()
    assert stats["submissions"] == {prompt: 1}
    assert _result(dag_run, "generate")["task_id"] == next(iter(stats["tasks"]))


class BatchRace(ImageBatchGenerateOperator):
    """The same race for a batch, after its in-task resubmission."""

    def execute_complete(self, context, event):
        if context["ti"].try_number == 1 and any(s.get("resubmits") for s in event["echo"]["slots"]):
            raise RuntimeError("the scheduler failed the resuming task before execute_complete ran")
        return super().execute_complete(context, event)


def test_a_batch_retry_after_the_race_reconnects_to_every_task_and_its_resubmission(
    run_dag, imagecb_simulator
):
    prompts = ["a gull", "a tern [sim:flaky]", "a skua [sim:content_policy]"]
    with _dag("gen_batch_race") as dag:
        BatchRace(
            task_id="generate",
            requests=[{"prompt": p} for p in prompts],
            retries=1,
            failure_mode="return",
            resubmit_outcomes=["internal_error"],
            **FAST,
        )
    dag_run = run_dag(dag)
    ti = _tis(dag_run)["generate"]
    assert (dag_run.state, ti.try_number) == ("success", 2)
    results = _result(dag_run, "generate")
    assert [r["outcome"] for r in results] == ["success", "success", "content_policy"]
    assert results[1]["earlier"][0]["outcome"] == "internal_error"
    assert imagecb_simulator.stats()["submissions"] == {"a gull": 1, "a tern [sim:flaky]": 2, prompts[2]: 1}


def test_timeout_is_retried_and_the_retry_reconnects_to_the_same_task(run_dag, imagecb_simulator):
    # A render far longer than one try's wait, so try 1 always times out whatever the load; then
    # every retry reconnects to the same task until it ends.
    prompt = "a geyser [sim:latency=4]"
    with _dag("gen_timeout") as dag:
        ImageGenerateOperator(task_id="generate", prompt=prompt, retries=30, timeout=0.5, **FAST)
    dag_run = run_dag(dag)
    ti = _tis(dag_run)["generate"]
    assert dag_run.state == "success"
    assert ti.try_number >= 2
    assert imagecb_simulator.stats()["submissions"] == {prompt: 1}


def test_sensor_waits_for_a_task_submitted_without_waiting(run_dag, imagecb_simulator):
    # 4 s: the sensor's first poke must come before the image is done, even on a loaded machine
    # (with 1 s, four test workers on two cores sometimes let the image finish first).
    imagecb_simulator.configure(latency=4.0)
    with _dag("gen_sensor") as dag:
        submitted = ImageGenerateOperator(
            task_id="submit", prompt="a meadow", wait_for_completion=False, **FAST
        )
        ImageTaskSensor(task_id="wait", remote_task_id=submitted.output, poke_interval=0.2)
    dag_run = run_dag(dag)
    assert dag_run.state == "success"
    remote_task_id = _result(dag_run, "submit")
    result = _result(dag_run, "wait")
    assert result["task_id"] == remote_task_id
    assert result["outcome"] == "success"
    assert result["prompt"] == "a meadow"
    assert result["polls"] > 1  # it waited: the image was still generating at the first poll
    assert imagecb_simulator.stats()["submissions"] == {"a meadow": 1}


@pytest.mark.parametrize("mode", ["poke", "reschedule"])
def test_non_deferrable_sensor_waits_in_the_worker(run_dag, imagecb_simulator, mode):
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    imagecb_simulator.configure(latency=1.5)
    with _dag(f"gen_sync_{mode}") as dag:
        submitted = ImageGenerateOperator(
            task_id="submit", prompt=f"a dune {mode}", wait_for_completion=False, deferrable=False, **FAST
        )
        ImageTaskSensor(
            task_id="wait",
            remote_task_id=submitted.output,
            poke_interval=0.3,
            deferrable=False,
            mode=mode,
        )
    dag_run = run_dag(dag)
    assert dag_run.state == "success"
    result = _result(dag_run, "wait")
    assert result["outcome"] == "success"
    remote_task_id = _result(dag_run, "submit")
    assert imagecb_simulator.stats()["status_calls"][remote_task_id] > 1  # it poked more than once
    ti = _tis(dag_run)["wait"]
    with create_session() as session:
        reschedules = session.scalar(select(func.count()).where(TaskReschedule.ti_id == ti.id))
    assert (reschedules > 0) == (mode == "reschedule")
    if mode == "poke":
        assert result["polls"] > 1  # all pokes in one process
