"""
``@task.imagecb`` in real Airflow (``dag.test()``) against the simulator: a TaskFlow pipeline that
computes each request from upstream rows, maps over them, and uses the results; the computed
request as a rendered field; a bad request failing at once without a submission.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from airflow.sdk import DAG, task

from imagecb_provider.decorators.imagecb import REQUEST_STATE_KEY

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]

DAGS = Path(__file__).resolve().parents[2] / "dags"
EXAMPLE_DAGS_RUN = {"imagecb_taskflow"}  # see tests/dags/test_examples_covered.py
_ids = itertools.count()
FAST = {"poll_interval": 0.2}
ROWS = [
    {"subject": "a lantern", "style": "ink drawing"},
    {"subject": "a kettle", "style": "watercolor"},
    {"subject": "a crowd [sim:content_policy]", "style": "photo"},
]


def _dag(name: str) -> DAG:
    return DAG(
        f"{name}_{next(_ids)}",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        default_args={"retries": 2, "retry_delay": timedelta(seconds=0)},
    )


def _tis(dag_run, task_id: str) -> list:
    return sorted(
        (ti for ti in dag_run.get_task_instances() if ti.task_id == task_id), key=lambda ti: ti.map_index
    )


def _rendered(ti) -> dict:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields

    return RenderedTaskInstanceFields.get_templated_fields(ti)


def _prompt(row: dict) -> str:
    return f"{row['subject']}, {row['style']}"


def test_a_mapped_taskflow_pipeline_generates_one_image_per_row(run_dag, imagecb_simulator):
    with _dag("taskflow") as dag:

        @task
        def read_rows() -> list[dict]:
            return ROWS

        @task.imagecb(
            aspect_ratio="1:1",
            failure_mode="return",
            map_index_template="{{ task.request.prompt[:20] }}",
            **FAST,
        )
        def image(row: dict) -> dict:
            return {"prompt": f"{row['subject']}, {row['style']}", "output_format": "png"}

        @task
        def summarize(results: list[dict]) -> dict:
            outcomes = {r["prompt"]: r["outcome"] for r in results}
            return {
                "outcomes": outcomes,
                "images": [r["result_image_url"] for r in results if r["outcome"] == "success"],
            }

        summarize(image.expand(row=read_rows()))

    dag_run = run_dag(dag)
    assert dag_run.state == "success"
    generated = _tis(dag_run, "image")
    assert [(ti.map_index, ti.state, ti.try_number) for ti in generated] == [
        (0, "success", 1),
        (1, "success", 1),
        (2, "success", 1),
    ]
    assert [ti.rendered_map_index for ti in generated] == [_prompt(row)[:20] for row in ROWS]

    stats = imagecb_simulator.stats()
    assert stats["submissions"] == {_prompt(row): 1 for row in ROWS}

    results = [ti.xcom_pull(task_ids="image", map_indexes=ti.map_index) for ti in generated]
    assert [r["outcome"] for r in results] == ["success", "success", "content_policy"]
    assert [r["prompt"] for r in results] == [_prompt(row) for row in ROWS]
    assert results[0]["request"] == {"prompt": _prompt(ROWS[0]), "aspectRatio": "1:1", "outputFormat": "png"}
    assert {r["task_id"] for r in results} == set(stats["tasks"])

    summary = _tis(dag_run, "summarize")[0].xcom_pull(task_ids="summarize")
    assert summary["outcomes"] == {_prompt(row): r["outcome"] for row, r in zip(ROWS, results, strict=True)}
    assert len(summary["images"]) == 2

    for row, ti in zip(ROWS, generated, strict=True):
        rendered = _rendered(ti)
        assert rendered["request"] == {"prompt": _prompt(row), "aspect_ratio": "1:1", "output_format": "png"}
        assert rendered["op_kwargs"] == {"row": row}


def test_a_prompt_string_and_partial_arguments(run_dag, imagecb_simulator):
    with _dag("taskflow_partial") as dag:

        @task.imagecb(**FAST)
        def image(subject: str, style: str) -> str:
            return f"{subject} in {style}"

        image.partial(style="pastel").expand(subject=["a heron", "a crane"])

    dag_run = run_dag(dag)
    assert dag_run.state == "success"
    assert imagecb_simulator.stats()["submissions"] == {"a heron in pastel": 1, "a crane in pastel": 1}
    for ti in _tis(dag_run, "image"):
        assert ti.xcom_pull(task_ids="image", map_indexes=ti.map_index)["outcome"] == "success"


def test_a_flagged_prompt_fails_its_instance_at_once_in_raise_mode(run_dag, imagecb_simulator):
    with _dag("taskflow_raise") as dag:

        @task.imagecb(**FAST)
        def image(prompt: str) -> str:
            return prompt

        image.expand(prompt=["a fern", "a thing [sim:content_policy]"])

    dag_run = run_dag(dag)
    assert dag_run.state == "failed"
    assert [(ti.state, ti.try_number) for ti in _tis(dag_run, "image")] == [("success", 1), ("failed", 1)]
    assert imagecb_simulator.stats()["submissions"] == {"a fern": 1, "a thing [sim:content_policy]": 1}


@pytest.mark.parametrize(
    ("returned", "field"),
    [
        ({"prompt": "a koi pond", "aspect_ratio": "2:1"}, "aspect_ratio"),
        ({"prompt": "a koi pond", "colour": "red"}, "colour"),
        ({"prompt": "   "}, "prompt"),
        (["a koi pond"], "request"),
    ],
)
def test_a_bad_request_fails_at_once_naming_the_field_without_a_submission(
    run_dag, imagecb_simulator, capfd, returned, field
):
    with _dag("taskflow_bad") as dag:

        @task
        def upstream() -> dict:
            return {"value": returned}

        @task.imagecb(**FAST)
        def image(data: dict):
            return data["value"]

        image(upstream())

    dag_run = run_dag(dag)
    (ti,) = _tis(dag_run, "image")
    assert (dag_run.state, ti.state, ti.try_number) == ("failed", "failed", 1)  # retries=2 not used
    assert imagecb_simulator.stats()["submissions"] == {}
    assert f"Invalid {field}=" in "".join(capfd.readouterr())
    assert _rendered(ti)["request"] == returned  # what the function returned, as the UI shows it


class _Flaky:
    """A request function whose answer changes on every call, as one reading a clock would."""

    calls = 0

    @classmethod
    def next_prompt(cls) -> str:
        cls.calls += 1
        return f"a comet, variant {cls.calls} [sim:flaky]"


def test_a_retry_reuses_the_request_of_the_first_try(run_dag, imagecb_simulator):
    _Flaky.calls = 0
    with _dag("taskflow_retry") as dag:

        @task.imagecb(retries=1, **FAST)
        def image() -> str:
            return _Flaky.next_prompt()

        image()

    dag_run = run_dag(dag)
    (ti,) = _tis(dag_run, "image")
    assert (dag_run.state, ti.try_number) == ("success", 2)
    assert _Flaky.calls == 1  # the function ran once; its retry (and the resumptions) reused the answer
    first = "a comet, variant 1 [sim:flaky]"
    assert imagecb_simulator.stats()["submissions"] == {first: 2}  # internal error, then a new submission
    assert ti.xcom_pull(task_ids="image")["prompt"] == first
    assert _rendered(ti)["request"] == {"prompt": first}


def test_the_request_is_kept_in_the_task_state_store(run_dag, imagecb_simulator):
    with _dag("taskflow_state") as dag:

        @task.imagecb(**FAST)
        def image() -> dict:
            return {"prompt": "a teapot", "model": "flux-kontext-max"}

        image()

    dag_run = run_dag(dag)
    (ti,) = _tis(dag_run, "image")
    assert ti.state == "success"
    stored = _state_store_value(ti, REQUEST_STATE_KEY)
    assert stored == {"try_number": 1, "request": {"prompt": "a teapot", "model": "flux-kontext-max"}}


def _state_store_value(ti, key: str):
    import json

    from airflow.models.task_state_store import TaskStateStoreModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.scalar(
            select(TaskStateStoreModel.value).where(
                TaskStateStoreModel.dag_id == ti.dag_id,
                TaskStateStoreModel.run_id == ti.run_id,
                TaskStateStoreModel.task_id == ti.task_id,
                TaskStateStoreModel.map_index == ti.map_index,
                TaskStateStoreModel.key == key,
            )
        )
    return json.loads(value) if value is not None else None


def test_the_example_dag_reads_rows_generates_one_image_each_and_summarizes(
    run_dag, imagecb_simulator, tmp_path
):
    from airflow.dag_processing.dagbag import DagBag

    prompts = tmp_path / "prompts.csv"
    prompts.write_text(
        "prompt,aspect_ratio\n"
        "a red kite,4:3\n"
        "a blue kite,\n"
        "a kite [sim:content_policy],\n"
        "a kite,2:1\n"  # a bad row: reported by read_rows, never sent
    )
    bag = DagBag(dag_folder=str(DAGS / "imagecb_taskflow.py"))
    dag = bag.dags["imagecb_taskflow"]
    dag_run = run_dag(dag, run_conf={"prompts_path": str(prompts), "style": ", ink", "poll_interval": 0.2})
    assert dag_run.state == "success"
    assert imagecb_simulator.stats()["submissions"] == {
        "a red kite, ink": 1,
        "a blue kite, ink": 1,
        "a kite [sim:content_policy], ink": 1,
    }
    requests = [_rendered(ti)["request"] for ti in _tis(dag_run, "image")]
    assert requests == [
        {"prompt": "a red kite, ink", "aspect_ratio": "4:3"},
        {"prompt": "a blue kite, ink", "aspect_ratio": "1:1"},
        {"prompt": "a kite [sim:content_policy], ink", "aspect_ratio": "1:1"},
    ]
    summary = _tis(dag_run, "summarize")[0].xcom_pull(task_ids="summarize")
    assert summary["outcomes"] == {"success": 2, "content_policy": 1}
    assert len(summary["images"]) == 2


def test_the_provider_registers_the_decorator():
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    from imagecb_provider.decorators.imagecb import imagecb_task

    assert ProvidersManagerTaskRuntime().taskflow_decorators["imagecb"] is imagecb_task
