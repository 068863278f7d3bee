"""
The main job end to end: ``imagecb_batch_generate`` on the demo prompts, in real Airflow
(``dag.test()``) against the simulator. The same DAG on the real stack is in tests/stack/.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
LOGICAL_DATE = datetime(2026, 3, 1, tzinfo=UTC)
EXAMPLE_DAGS_RUN = {"imagecb_batch_generate"}  # see tests/dags/test_examples_covered.py

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]

# What the markers in include/prompts/demo.csv choose, after the one resubmission.
EXPECTED_COUNTS = {
    "success": 7,  # six plain prompts, and [sim:flaky] after its resubmission
    "content_policy": 1,
    "internal_error": 1,  # [sim:internal_error] fails again when resubmitted
    "generation_failed": 1,
    "timeout": 1,  # [sim:latency=120] with a short timeout
    "submission_uncertain": 0,
    "not_sent": 0,
    "upload_failed": 0,
}
EXPECTED_REJECTED = 3  # an empty prompt, an aspect ratio of 2:1, a duplicate row
LOST = {"content_policy", "internal_error", "generation_failed", "timeout"}


@pytest.fixture(scope="module")
def batch_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "imagecb_batch_generate.py"))
    assert bag.import_errors == {}
    return bag.dags["imagecb_batch_generate"]


def _run(run_dag, dag, archive_root: Path, **conf):
    # Every param this module changes is given: the module's DAG object is shared by its tests.
    conf = {
        "archive_root": str(archive_root),
        "poll_interval": 0.2,
        "timeout": 1.5,
        "fail_run_on_lost": True,
        "chunk_size": 25,
        **conf,
    }
    return run_dag(dag, logical_date=LOGICAL_DATE, run_conf=conf)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _summary(day: Path, dag_run) -> dict:
    from imagecb_provider.batch.report import run_folder_name

    return json.loads((day / "runs" / run_folder_name(dag_run.run_id) / "summary.json").read_text())


def test_the_demo_batch_end_to_end_and_again(run_dag, batch_dag, imagecb_simulator, tmp_path):
    dag_run = _run(run_dag, batch_dag, tmp_path, chunk_size=4)
    day = tmp_path / "2026-03-01"
    summary = _summary(day, dag_run)

    # the run fails because prompts were lost (fail_run_on_lost defaults to true), yet reports
    assert dag_run.state == "failed"
    states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    assert states[("report", -1)] == "failed"
    assert summary["counts"] == EXPECTED_COUNTS
    assert summary["lost"] == 4
    assert summary["rejected"] == EXPECTED_REJECTED
    assert summary["resubmitted"] == 3  # flaky, internal_error, generation_failed

    # 11 valid prompts in groups of 4: three mapped instances, labelled by their lines
    assert {i for (t, i) in states if t == "image.generate"} == {0, 1, 2}
    by_group: dict[int, set[str]] = {}
    for image in summary["images"]:
        by_group.setdefault(image["group"], set()).add(image["outcome"])
    labels = {image["group"]: image["label"] for image in summary["images"]}
    assert labels[0].startswith("lines 2-5")
    for group, outcomes in by_group.items():
        assert states[("image.generate", group)] == "success"
        assert states[("image.archive", group)] == "success"
        # settle is red exactly where the group lost a prompt
        assert states[("image.settle", group)] == ("failed" if outcomes & LOST else "success"), group
    rendered = {(ti.task_id, ti.map_index): ti.rendered_map_index for ti in dag_run.get_task_instances()}
    assert rendered[("image.generate", 0)] == labels[0]
    assert rendered[("image.settle", 0)] == labels[0]
    for group, outcomes in by_group.items():  # a red instance names what was lost
        if outcomes & LOST:
            assert rendered[("image.settle", group)].startswith(f"{labels[group]} · ")
            assert all(o in rendered[("image.settle", group)] for o in outcomes & LOST)

    stats = imagecb_simulator.stats()
    assert summary["credits"]["used"] == summary["credits"]["before"] - stats["credits"]
    assert summary["credits"]["used"] > 0
    sent = set(stats["submissions"])
    assert "" not in sent
    assert not any("koi pond" in prompt for prompt in sent)
    assert stats["submissions"]["a red bicycle leaning on a white wall, studio photo"] == 1  # duplicate row
    resubmitted = {p for p in sent if any(m in p for m in ("flaky", "internal_error", "generation_failed"))}
    assert {p: n for p, n in stats["submissions"].items() if n > 1} == dict.fromkeys(resubmitted, 2)

    # every archived file is a valid image whose sha256 matches its manifest line; the count matches
    lines = _jsonl(day / "images" / "manifest.jsonl")
    assert len(lines) == 2 * EXPECTED_COUNTS["success"] == summary["archived_files"]
    for line in lines:
        body = Path(line["path"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(body).hexdigest() == line["sha256"]
        Image.open(io.BytesIO(body)).verify()

    # every prompt without an image is quarantined with its final reason
    quarantined = _jsonl(day / "quarantine.jsonl")
    assert Counter(q["outcome"] for q in quarantined) == dict.fromkeys(LOST, 1)
    assert {tuple(q["resubmitted_after"]) for q in quarantined if q["outcome"] == "internal_error"} == {
        ("internal_error",)
    }
    assert all(q["message"] for q in quarantined)

    # the contact sheet shows every archived image, every failure's reason, a link to each group
    report = (day / "runs").glob("*/report.html").__next__().read_text()
    assert report.count("<img ") == EXPECTED_COUNTS["success"]
    assert report.count('class="card lost"') == 4
    for image in summary["images"]:
        if image["reason"]:
            assert image["reason"] in report or json.dumps(image["reason"])[1:-1] in report
        assert f"/tasks/image.generate/mapped/{image['group']}" in report

    # a second run of the same day: nothing archived twice, no success paid again
    before = dict(stats["submissions"])
    second = _run(run_dag, batch_dag, tmp_path, chunk_size=4, fail_run_on_lost=False)
    assert second.state == "success"
    again = _jsonl(day / "images" / "manifest.jsonl")
    assert again == lines
    submitted_again = {p: n - before.get(p, 0) for p, n in imagecb_simulator.stats()["submissions"].items()}
    assert {p for p, n in submitted_again.items() if n} == {
        p for p in before if any(m in p for m in LOST_MARKERS)
    }
    summary2 = _summary(day, second)
    assert summary2["reused_from_earlier_run"] == EXPECTED_COUNTS["success"]
    assert summary2["counts"]["success"] == EXPECTED_COUNTS["success"]
    assert len(list((day / "runs").iterdir())) == 2  # each run keeps its own report


LOST_MARKERS = (
    "[sim:content_policy]",
    "[sim:internal_error]",
    "[sim:generation_failed]",
    "[sim:latency=120]",
)


def test_one_prompt_per_group_and_a_run_without_a_logical_date(
    run_dag, batch_dag, imagecb_simulator, tmp_path
):
    """chunk_size=1 maps one instance per prompt; Airflow 3 manual runs have no logical date."""
    prompts = tmp_path / "two.jsonl"
    prompts.write_text('{"prompt": "a small boat"}\n{"prompt": "a big ship", "output_format": "png"}\n')
    conf = {
        "archive_root": str(tmp_path / "archive"),
        "prompts_path": str(prompts),
        "poll_interval": 0.2,
        "chunk_size": 1,
    }
    dag_run = run_dag(batch_dag, logical_date=None, run_conf=conf)
    assert dag_run.state == "success"
    assert dag_run.logical_date is None
    day = tmp_path / "archive" / dag_run.run_after.strftime("%Y-%m-%d")
    summary = _summary(day, dag_run)
    assert summary["counts"]["success"] == 2
    assert len(_jsonl(day / "images" / "manifest.jsonl")) == 4
    rendered = {(t.task_id, t.map_index): t.rendered_map_index for t in dag_run.get_task_instances()}
    assert rendered[("image.generate", 0)] == "line 1: a small boat"
    assert rendered[("image.generate", 1)] == "line 2: a big ship"


def test_a_batch_that_cannot_start_fails_its_run(run_dag, batch_dag, imagecb_simulator, tmp_path):
    """read_prompts fails (no such file): the report still runs, and the run is failed, not green."""
    conf = {"archive_root": str(tmp_path), "prompts_path": str(tmp_path / "missing.csv")}
    dag_run = run_dag(batch_dag, logical_date=LOGICAL_DATE, run_conf=conf)
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["read_prompts"] == "failed"
    assert states["report"] == "failed"
    assert dag_run.state == "failed"
    assert imagecb_simulator.stats()["submissions_total"] == 0


@pytest.fixture
def no_account_hold(airflow_db):
    """The account hold is an Airflow Variable: none before the test, none left after it."""
    from airflow.models.variable import Variable

    from imagecb_provider.utils.limiter import hold_key

    Variable.delete(hold_key("imagecb_default"))
    yield hold_key("imagecb_default")
    Variable.delete(hold_key("imagecb_default"))


def test_credits_running_out_partway_stop_the_batch_and_a_rerun_after_a_top_up_sends_only_the_rest(
    run_dag, batch_dag, imagecb_simulator, tmp_path, no_account_hold
):
    """
    The account can pay for 5 of 12 prompts: the sixth submission is refused (402) and nothing
    more is sent by any group. The run fails saying the prompts were not sent and why; after a
    top-up a second run of the day sends exactly the 7 never sent.
    """
    from airflow.models.variable import Variable

    prompts = tmp_path / "twelve.csv"
    prompts.write_text("prompt\n" + "".join(f"a paper boat number {i}\n" for i in range(12)))
    imagecb_simulator.configure(credits=25.0)  # 5 images at 5 credits
    dag_run = _run(run_dag, batch_dag, tmp_path, chunk_size=4, prompts_path=str(prompts))
    day = tmp_path / "2026-03-01"
    summary = _summary(day, dag_run)

    assert dag_run.state == "failed"
    assert summary["counts"]["success"] == 5
    assert summary["counts"]["not_sent"] == 7
    assert summary["not_sent"]["count"] == 7
    assert summary["not_sent"]["reason"].startswith("the account ran out of credits (402 at ")
    stats = imagecb_simulator.stats()
    assert stats["requests"]["generate"] == 6  # five accepted, one refused; no group tried again
    assert sorted(stats["submissions"].values()) == [1] * 5
    states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    assert [states[("image.generate", g)] for g in range(3)] == ["success"] * 3  # waited for what was sent
    not_sent_groups = {i["group"] for i in summary["images"] if i["outcome"] == "not_sent"}
    for group in range(3):
        assert states[("image.settle", group)] == ("failed" if group in not_sent_groups else "success")
    quarantined = _jsonl(day / "quarantine.jsonl")
    assert Counter(q["outcome"] for q in quarantined) == {"not_sent": 7}
    report = next((day / "runs").glob("*/report.html")).read_text()
    assert "<b>7 prompt(s) were not sent</b>: the account ran out of credits" in report
    assert report.count("<img ") == 5
    assert json.loads(Variable.get(no_account_hold))["kind"] == "credits"  # shown under Admin > Variables

    imagecb_simulator.configure(credits=1000.0)  # the top-up
    before = dict(imagecb_simulator.stats()["submissions"])
    second = _run(run_dag, batch_dag, tmp_path, chunk_size=4, prompts_path=str(prompts))
    assert second.state == "success"
    after = imagecb_simulator.stats()["submissions"]
    sent_again = {p for p, n in after.items() if n - before.get(p, 0)}
    assert len(sent_again) == 7
    assert not sent_again & set(before)
    assert sorted(after.values()) == [1] * 12  # each prompt paid for once
    assert _summary(day, second)["reused_from_earlier_run"] == 5
    assert Variable.get(no_account_hold, default_var=None) is None  # lifted by the top-up
