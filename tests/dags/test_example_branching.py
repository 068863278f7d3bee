"""
``dags/imagecb_branching.py`` run with ``dag.test()`` against the simulator: each prompt (one map
index of the mapped group ``image``) takes the route its own outcome chose, and only that one.

Every task instance of every map index is asserted (ran or skipped), and each route is checked by
what it left behind: the archived files and their manifest, the simulator's count of submissions
per prompt (the rewritten prompt and the resubmission), and the quarantine file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "imagecb_branching"
#: The example DAGs these tests run (see tests/dags/test_examples_covered.py).
EXAMPLE_DAGS_RUN = {"imagecb_branching"}

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]

GROUP = "image"
BRANCHES = ("archive", "rewrite", "regenerate", "resubmit", "quarantine")
#: What runs below ``route`` for each route; every other branch task of that map index is skipped.
RAN = {
    "archive": {"archive"},
    "rewrite": {"rewrite", "regenerate", "archive"},  # the rewritten image is archived too
    "resubmit": {"resubmit", "archive"},
    "quarantine": {"quarantine"},
}
#: The default prompts' markers and the route each must take, by map index.
DEFAULT_ROUTES = [
    ("a lighthouse on a cliff at dawn, watercolor", "success", "archive"),
    ("a gory battle scene, oil painting [sim:content_policy]", "content_policy", "rewrite"),
    ("a paper boat on a rainy street [sim:flaky]", "internal_error", "resubmit"),
    ("a city skyline made of books [sim:generation_failed]", "generation_failed", "quarantine"),
]
REWRITTEN = "a dramatic battle scene, oil painting"


@pytest.fixture(scope="module")
def branching_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / f"{DAG_ID}.py"))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def _states(dag_run) -> dict[tuple[str, int], str]:
    return {
        (ti.task_id, ti.map_index): getattr(ti.state, "value", ti.state)
        for ti in dag_run.get_task_instances()
    }


def _xcom(dag_run, task_id: str, map_index: int, key: str = "return_value"):
    ti = next(t for t in dag_run.get_task_instances() if (t.task_id, t.map_index) == (task_id, map_index))
    return ti.xcom_pull(task_ids=task_id, key=key, map_indexes=map_index)


def _expected(routes: list[str]) -> dict[tuple[str, int], str]:
    """The state every task instance of the group must end in, per map index."""
    expected = {}
    for index, route in enumerate(routes):
        expected[(f"{GROUP}.generate", index)] = "success"
        expected[(f"{GROUP}.route", index)] = "success"
        for name in BRANCHES:
            expected[(f"{GROUP}.{name}", index)] = "success" if name in RAN[route] else "skipped"
    return expected


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_prompt_takes_the_route_of_its_own_outcome(run_dag, branching_dag, imagecb_simulator, tmp_path):
    dag_run = run_dag(branching_dag, run_conf={"archive_root": str(tmp_path), "poll_interval": 0.2})
    prompts = [prompt for prompt, _, _ in DEFAULT_ROUTES]
    assert branching_dag.params["prompts"] == prompts  # the defaults are what this test expects

    # Per map index: exactly the chosen route ran, every other branch task was skipped.
    states = _states(dag_run)
    group_states = {key: state for key, state in states.items() if key[0].startswith(f"{GROUP}.")}
    assert group_states == _expected([route for _, _, route in DEFAULT_ROUTES])
    assert states[("read_prompts", -1)] == "success"
    assert dag_run.state == "success"
    for index, (prompt, outcome, route) in enumerate(DEFAULT_ROUTES):
        assert _xcom(dag_run, f"{GROUP}.generate", index)["prompt"] == prompt
        decision = _xcom(dag_run, f"{GROUP}.route", index, key="imagecb_branch")
        assert (decision["outcome"], decision["chosen"]) == (outcome, [f"{GROUP}.{route}"]), index

    # The rewritten prompt was submitted once more, the internal error resubmitted as it was.
    assert _xcom(dag_run, f"{GROUP}.rewrite", 1) == REWRITTEN
    assert imagecb_simulator.stats()["submissions"] == {
        prompts[0]: 1,
        prompts[1]: 1,
        REWRITTEN: 1,
        prompts[2]: 2,
        prompts[3]: 1,
    }

    # The three images made (first try, rewritten, resubmitted) are archived, each by its own index.
    archived_prompts = {}
    for index in (0, 1, 2):
        (kept,) = _xcom(dag_run, f"{GROUP}.archive", index)
        assert kept["outcome"] == "success"
        archived_prompts[index] = kept["prompt"]
        for entry in kept["files"]:
            body = Path(entry["path"].removeprefix("file://")).read_bytes()
            assert Path(entry["path"].removeprefix("file://")).parent == tmp_path / "images"
            assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    assert archived_prompts == {0: prompts[0], 1: REWRITTEN, 2: prompts[2]}
    manifest = _jsonl(tmp_path / "images" / "manifest.jsonl")
    assert {(m["prompt"], m["source"]) for m in manifest} == {
        (p, source) for p in archived_prompts.values() for source in ("result", "origin")
    }

    # The generation failure is quarantined with its reason; nothing else is.
    (entry,) = _jsonl(tmp_path / "quarantine.jsonl")
    assert (entry["prompt"], entry["outcome"], entry["code"]) == (prompts[3], "generation_failed", 501)
    assert entry["message"] == "Image generation task failed."


def test_a_failed_rewrite_stays_in_its_map_index_and_a_timeout_is_quarantined(
    run_dag, branching_dag, imagecb_simulator, tmp_path
):
    # The failing index comes first, so it fails before the others' archive tasks are expanded.
    prompts = ["a crowd scene [sim:content_policy]", "a red kite", "a pocket watch [sim:never]"]
    conf = {
        "archive_root": str(tmp_path),
        "poll_interval": 0.2,
        "timeout": 1,
        "prompts": prompts,
        "softer_words": {"gory": "dramatic"},  # nothing to soften in prompt 0
    }
    dag_run = run_dag(branching_dag, run_conf=conf)

    states = _states(dag_run)
    expected = _expected(["rewrite", "archive", "quarantine"])
    expected[(f"{GROUP}.rewrite", 0)] = "failed"  # AirflowFailException: no retry
    expected[(f"{GROUP}.regenerate", 0)] = "upstream_failed"
    expected[(f"{GROUP}.archive", 0)] = "upstream_failed"
    assert {key: state for key, state in states.items() if key[0].startswith(f"{GROUP}.")} == expected
    assert dag_run.state == "failed"
    assert imagecb_simulator.stats()["submissions"] == {prompt: 1 for prompt in prompts}
    # index 1's image is archived although index 0 failed before it
    assert {m["prompt"] for m in _jsonl(tmp_path / "images" / "manifest.jsonl")} == {prompts[1]}
    (entry,) = _jsonl(tmp_path / "quarantine.jsonl")
    assert (entry["prompt"], entry["outcome"]) == (prompts[2], "timeout")
