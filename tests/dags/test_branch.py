"""
``ImageOutcomeBranchOperator`` in real Airflow (``dag.test()``), checked per map index.

Branching per map index is broken in Airflow 3.3.2 (apache/airflow#67265); the operator works
around it with outcome guards (see ``imagecb_provider/operators/branch.py``). Every routing test
here asserts the state of every task instance of every map index, not just that the run passed.
"""

from __future__ import annotations

import itertools
import textwrap
from datetime import datetime

import pytest
from airflow.sdk import DAG, BaseBranchOperator, Label, TaskGroup, chain, task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from imagecb_provider.operators.branch import (
    DECISION_XCOM_KEY,
    OUTCOMES,
    ImageOutcomeBranchOperator,
    _has_guard,
)

_ids = itertools.count()

#: Outcome per map index, per DAG id; the ``gen`` tasks read it at run time (``dag.test()`` runs
#: tasks in this process), so a test can change an index's outcome before a rerun.
_OUTCOMES: dict[str, list[str | None]] = {}

FIVE = ["success", "content_policy", "internal_error", "generation_failed", "timeout"]
# Relative and full ids mixed on purpose; "timeout" goes to the default.
ROUTES = {
    "success": "archive",
    "content_policy": "grp.quarantine",
    "internal_error": "resubmit",
    "generation_failed": "grp.resubmit",
}
CHOSEN = {
    "success": "archive",
    "content_policy": "quarantine",
    "internal_error": "resubmit",
    "generation_failed": "resubmit",
    "timeout": "quarantine",
}
BRANCHES = ("archive", "quarantine", "resubmit")


def _dag(name: str) -> DAG:
    return DAG(f"{name}_{next(_ids)}", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)


def _states(dag_run) -> dict[tuple[str, int], str]:
    return {
        (ti.task_id, ti.map_index): getattr(ti.state, "value", ti.state)
        for ti in dag_run.get_task_instances()
    }


def _ti(dag_run, task_id: str, map_index: int = -1):
    return next(
        ti for ti in dag_run.get_task_instances() if (ti.task_id, ti.map_index) == (task_id, map_index)
    )


@task
def gen(index: int) -> dict | None:
    """Stand-in for ImageGenerateOperator(failure_mode="return"): the result dict for one index."""
    from airflow.sdk import get_current_context

    outcome = _OUTCOMES[get_current_context()["dag"].dag_id][index]
    if outcome is None:
        raise AirflowSkipException("no image for this index")
    return {"outcome": outcome, "task_id": f"remote-{index}"}


def _routing_dag(name: str, outcomes: list[str | None], **branch_kwargs) -> DAG:
    """
    items ─▶ grp[i]: gen ─▶ route ─┬─▶ archive ───────────────────┐
                                  ├─▶ quarantine ────────────────┼─▶ join (none_failed_min_one_success)
                                  └─▶ resubmit ─▶ after_resubmit ┘
             ─▶ report (none_failed_min_one_success)
    """
    dag = _dag(name)
    _OUTCOMES[dag.dag_id] = list(outcomes)
    with dag:

        @task
        def archive(result: dict) -> str:
            return result["task_id"]

        @task
        def quarantine(result: dict) -> str:
            return result["task_id"]

        @task
        def resubmit(result: dict) -> str:
            return result["task_id"]

        @task
        def after_resubmit() -> None:
            pass

        @task(trigger_rule="none_failed_min_one_success")
        def join() -> None:
            pass

        @task_group(group_id="grp")
        def grp(index: int):
            result = gen(index)
            route = ImageOutcomeBranchOperator(
                task_id="route",
                result=result,
                **({"branches": ROUTES, "default": "quarantine"} | branch_kwargs),
            )
            archived, quarantined, resubmitted = archive(result), quarantine(result), resubmit(result)
            route >> [archived, quarantined, resubmitted]
            [archived, quarantined, resubmitted >> after_resubmit()] >> join()

        @task(trigger_rule="none_failed_min_one_success")
        def report(**context) -> dict:
            ti = context["ti"]
            return {name: sorted(ti.xcom_pull(task_ids=[f"grp.{name}"]) or []) for name in BRANCHES}

        grp.expand(index=list(range(len(outcomes)))) >> report()
    return dag


def _expected(outcomes: list[str | None]) -> dict[tuple[str, int], str]:
    """Every task instance of the group, per map index, as it must end."""
    expected = {}
    for index, outcome in enumerate(outcomes):
        chosen = CHOSEN.get(outcome)
        expected[("grp.gen", index)] = "success" if outcome else "skipped"
        expected[("grp.route", index)] = "success" if outcome else "skipped"
        for name in BRANCHES:
            expected[(f"grp.{name}", index)] = "success" if name == chosen else "skipped"
        expected[("grp.after_resubmit", index)] = "success" if chosen == "resubmit" else "skipped"
        expected[("grp.join", index)] = "success" if chosen else "skipped"
    return expected


def _group_states(dag_run) -> dict[tuple[str, int], str]:
    return {key: state for key, state in _states(dag_run).items() if key[0].startswith("grp.")}


# -- per map index in a mapped task group --------------------------------------------------------


@pytest.mark.airflow
@pytest.mark.parametrize("skip_known", [True, False], ids=["guard+fast-path", "guard-only"])
def test_each_map_index_follows_its_own_outcome(run_dag, monkeypatch, skip_known):
    # guard-only: the branch does not skip any task instance itself, so the outcome guards alone
    # must do all the skipping, whatever the expansion timing.
    monkeypatch.setattr(ImageOutcomeBranchOperator, "_skip_known_downstream", skip_known)
    dag = _routing_dag("branch_mapped", FIVE)
    dag_run = run_dag(dag)

    assert _group_states(dag_run) == _expected(FIVE)
    assert dag_run.state == "success"
    # the task after the group runs and sees exactly the chosen branch per index
    assert _states(dag_run)[("report", -1)] == "success"
    assert _ti(dag_run, "report").xcom_pull(task_ids="report") == {
        "archive": ["remote-0"],
        "quarantine": ["remote-1", "remote-4"],
        "resubmit": ["remote-2", "remote-3"],
    }
    # the decision is recorded per index, with full task ids
    decision = _ti(dag_run, "grp.route", 3).xcom_pull(
        task_ids="grp.route", key=DECISION_XCOM_KEY, map_indexes=3
    )
    assert decision == {
        "outcome": "generation_failed",
        "chosen": ["grp.resubmit"],
        "followed": ["grp.resubmit"],
        "skipped": ["grp.archive", "grp.quarantine"],
    }


@pytest.mark.airflow
def test_same_outcome_on_every_index_and_a_single_index(run_dag):
    outcomes = ["internal_error"] * 4
    dag_run = run_dag(_routing_dag("branch_uniform", outcomes))
    assert _group_states(dag_run) == _expected(outcomes)
    dag_run = run_dag(_routing_dag("branch_single", ["content_policy"]))
    assert _group_states(dag_run) == _expected(["content_policy"])


@pytest.mark.airflow
def test_none_result_skips_every_branch_of_that_index_only(run_dag):
    # index 1's upstream is skipped; a route with trigger_rule="none_failed" still runs and gets
    # result=None: nothing to archive, quarantine or resubmit, so it skips all its branches.
    outcomes = ["success", None, "content_policy", "timeout"]
    dag_run = run_dag(_routing_dag("branch_none", outcomes, trigger_rule="none_failed"))
    expected = _expected(outcomes)
    expected[("grp.route", 1)] = "success"
    assert _group_states(dag_run) == expected
    assert _states(dag_run)[("report", -1)] == "success"
    decision = _ti(dag_run, "grp.route", 1).xcom_pull(
        task_ids="grp.route", key=DECISION_XCOM_KEY, map_indexes=1
    )
    assert decision["outcome"] is None
    assert decision["chosen"] == []
    assert decision["skipped"] == ["grp.archive", "grp.quarantine", "grp.resubmit"]


@pytest.mark.airflow
def test_clearing_one_map_index_redecides_it_and_a_cleared_skipped_task_skips_again(run_dag):
    outcomes = ["success", "content_policy", "internal_error", "generation_failed"]
    dag = _routing_dag("branch_rerun", outcomes)
    dag_run = run_dag(dag)
    assert _group_states(dag_run) == _expected(outcomes)

    # Index 2 is cleared with its downstream (as "Clear" with downstream on one map index does)
    # after its image came out differently; at index 1 only the skipped `archive` is cleared.
    _OUTCOMES[dag.dag_id][2] = "success"
    group_tasks = [t.task_id for t in dag.tasks if t.task_id.startswith("grp.")]
    tries = {key: _ti(dag_run, *key).try_number for key in [("grp.archive", 1), ("grp.route", 0)]}
    rerun = _clear_and_resume(dag, dag_run.run_id, [(t, 2) for t in group_tasks] + [("grp.archive", 1)])

    assert _group_states(rerun) == _expected(["success", "content_policy", "success", "generation_failed"])
    # the cleared skipped task was scheduled again and skipped itself (the branch of index 1 did
    # not run again, and Airflow's own dependency check does not see per-index decisions)
    assert _ti(rerun, "grp.archive", 1).try_number == tries[("grp.archive", 1)] + 1
    assert _ti(rerun, "grp.route", 0).try_number == tries[("grp.route", 0)]  # other indexes untouched
    assert rerun.state == "success"


def _clear_and_resume(dag: DAG, run_id: str, task_ids: list[tuple[str, int]]):
    """
    Clear the given task instances of a finished run and run it to the end again, the way the
    scheduler would after a "Clear" in the UI. ``dag.test()`` cannot do this (it clears the whole
    run), so this is its minimal scheduling loop.
    """
    from airflow.models.dagrun import DagRun
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from sqlalchemy import select

    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    assert scheduler_dag.clear(task_ids=task_ids, run_id=run_id, dag_run_state=DagRunState.RUNNING) == len(
        task_ids
    )
    with create_session() as session:
        dag_run = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id))
        dag_run.dag = scheduler_dag
        for _ in range(200):
            if dag_run.state != DagRunState.RUNNING:
                break
            session.expire_all()
            schedulable, _callback = dag_run.update_state(session=session)
            for ti in schedulable:
                ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
            session.commit()
            for ti in dag_run.get_task_instances(session=session):
                if ti.state == TaskInstanceState.SCHEDULED:
                    _run_task(ti=ti, task=dag.task_dict[ti.task_id])
        else:
            pytest.fail("the resumed run did not finish")
    return DagRun.find(dag_id=dag.dag_id, run_id=run_id)[0]


@pytest.mark.airflow
def test_dag_parsed_from_a_file_carries_the_guards_and_routes(run_dag, tmp_path):
    # A worker parses the DAG file and runs the task from that parse: the guards must come from
    # parsing alone, whatever dependency syntax the author used.
    dag_id = f"branch_from_file_{next(_ids)}"
    path = tmp_path / f"{dag_id}.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from datetime import datetime
            from airflow.sdk import DAG, task, task_group
            from imagecb_provider.operators.branch import ImageOutcomeBranchOperator

            with DAG({dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1)) as dag:
                @task
                def make(outcome):
                    return {{"outcome": outcome}}

                @task
                def ok():
                    pass

                @task
                def bad():
                    pass

                @task
                def retry():
                    pass

                @task_group
                def grp(outcome):
                    route = ImageOutcomeBranchOperator(
                        task_id="route",
                        result=make(outcome),
                        branches={{"success": "ok", "content_policy": "bad"}},
                        default="retry",
                    )
                    route >> ok()
                    bad() << route
                    retry().set_upstream(route)

                grp.expand(outcome=["success", "content_policy", "timeout", "success"])
            """
        )
    )
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(path))
    assert not bag.import_errors
    dag = bag.dags[dag_id]
    assert all(_has_guard(dag.get_task(f"grp.{name}"), "grp.route") for name in ("ok", "bad", "retry"))
    assert not _has_guard(dag.get_task("grp.make"), "grp.route")

    states = {
        key: state
        for key, state in _states(run_dag(dag)).items()
        if key[0] in {"grp.ok", "grp.bad", "grp.retry"}
    }
    chosen = ["ok", "bad", "retry", "ok"]
    assert states == {
        (f"grp.{name}", index): ("success" if name == chosen[index] else "skipped")
        for index in range(4)
        for name in ("ok", "bad", "retry")
    }


@pytest.mark.airflow
def test_plain_branch_operator_still_runs_unchosen_branches_per_map_index(run_dag):
    """
    Canary for apache/airflow#67265, the reason the operator has guards: a plain
    ``BaseBranchOperator`` in a mapped task group logs "Skipping tasks" but its unchosen branches
    run. When this test fails, Airflow has fixed the bug and the guards can be revisited.
    """

    class PlainRoute(BaseBranchOperator):
        def choose_branch(self, context):
            return "grp.archive" if context["ti"].map_index == 0 else "grp.quarantine"

    with _dag("branch_canary") as dag:

        @task
        def archive() -> None:
            pass

        @task
        def quarantine() -> None:
            pass

        @task_group(group_id="grp")
        def grp(index: int):
            PlainRoute(task_id="route") >> [archive(), quarantine()]

        grp.expand(index=[0, 1])
    states = _states(run_dag(dag))
    assert [states[("grp.archive", 1)], states[("grp.quarantine", 0)]] == ["success", "success"]


# -- a non-mapped branch ---------------------------------------------------------------------------


@pytest.mark.airflow
@pytest.mark.parametrize(
    ("outcome", "ran"),
    [
        ("success", {"archive", "join"}),
        ("content_policy", {"q_log", "q_mail"}),  # join is direct downstream, not after quarantine
        ("timeout", {"join"}),  # routed to the join only: the join is followed, the rest skipped
    ],
)
def test_non_mapped_branch(run_dag, outcome, ran):
    hook_calls: list[str] = []

    with _dag("branch_plain") as dag:

        @task
        def result() -> dict:
            return {"outcome": outcome}

        @task(pre_execute=lambda context: hook_calls.append("archive"))
        def archive() -> None:
            pass

        @task(trigger_rule="none_failed_min_one_success")
        def join() -> None:
            pass

        with TaskGroup("quarantine") as quarantine:

            @task
            def q_log() -> None:
                pass

            @task
            def q_mail() -> None:
                pass

            q_log()
            q_mail()

        route = ImageOutcomeBranchOperator(
            task_id="route",
            result=result(),
            branches={"success": "archive", "content_policy": "quarantine", "timeout": "join"},
        )
        archived = archive()
        route >> [archived, quarantine, join()]
        archived >> dag.get_task("join")

    dag_run = run_dag(dag)
    states = _states(dag_run)
    names = {"archive": "archive", "join": "join", "q_log": "quarantine.q_log", "q_mail": "quarantine.q_mail"}
    assert {name: states[(task_id, -1)] for name, task_id in names.items()} == {
        name: ("success" if name in ran else "skipped") for name in names
    }
    assert dag_run.state == "success"
    # the author's own pre_execute hook still runs, after the guard
    assert hook_calls == (["archive"] if "archive" in ran else [])


@pytest.mark.airflow
def test_unrouted_outcome_fails_without_default_and_empty_default_skips_all(run_dag):
    with _dag("branch_unrouted") as dag:

        @task
        def result() -> dict:
            return {"outcome": "timeout"}

        @task
        def a() -> None:
            pass

        @task
        def b() -> None:
            pass

        @task
        def c() -> None:
            pass

        res = result()
        ImageOutcomeBranchOperator(task_id="strict", result=res, branches={"success": "a"}, retries=3) >> a()
        (
            ImageOutcomeBranchOperator(task_id="lenient", result=res, branches={"success": "b"}, default=[])
            >> b()
        )
        ImageOutcomeBranchOperator(task_id="typo", result=res, branches={"timeout": "cc"}, retries=3) >> c()

    states = _states(run_dag(dag))
    assert {key[0]: state for key, state in states.items() if key[0] != "result"} == {
        "strict": "failed",  # AirflowFailException: no retry
        "a": "upstream_failed",
        "lenient": "success",
        "b": "skipped",
        "typo": "failed",
        "c": "upstream_failed",
    }


@pytest.mark.airflow
def test_mapping_the_branch_itself_fails_loudly(run_dag):
    with _dag("branch_flat_mapped") as dag:

        @task
        def results() -> list[dict]:
            return [{"outcome": "success"}, {"outcome": "timeout"}]

        @task
        def archive() -> None:
            pass

        route = ImageOutcomeBranchOperator.partial(
            task_id="route", branches={"success": "archive"}, default=[]
        ).expand(result=results())
        route >> archive()

    states = _states(run_dag(dag))
    assert (states[("route", 0)], states[("route", 1)], states[("archive", -1)]) == (
        "failed",
        "failed",
        "upstream_failed",
    )


@pytest.mark.airflow
def test_a_downstream_task_without_its_guard_makes_the_branch_fail_rather_than_route_wrongly(run_dag):
    with _dag("branch_unguarded") as dag:

        @task_group(group_id="grp")
        def grp(index: int):
            @task
            def make(i: int) -> dict:
                return {"outcome": "success"}

            @task
            def archive() -> None:
                pass

            @task
            def quarantine() -> None:
                pass

            route = ImageOutcomeBranchOperator(
                task_id="route", result=make(index), branches={"success": "archive"}, default=[]
            )
            route >> archive()
            sneaky = quarantine()
            # a dependency added behind the operators' back: no guard gets installed
            route.downstream_task_ids.add(sneaky.operator.task_id)
            sneaky.operator.upstream_task_ids.add(route.task_id)

        grp.expand(index=[0, 1])

    dag_run = run_dag(dag)
    states = _states(dag_run)
    assert states[("grp.route", 0)] == "failed"
    assert states[("grp.quarantine", 0)] == "upstream_failed"  # never ran unrouted


@pytest.mark.airflow
def test_a_guarded_task_skips_when_its_branch_made_no_decision(run_dag):
    """A trigger rule that runs the task although its branch failed: nothing was routed to it."""
    with _dag("branch_undecided") as dag:

        @task_group(group_id="grp")
        def grp(outcome: str):
            @task
            def make(value: str) -> dict:
                return {"outcome": value}

            @task(trigger_rule="all_done")
            def archive() -> None:
                pass

            route = ImageOutcomeBranchOperator(
                task_id="route", result=make(outcome), branches={"success": "archive"}, default=[]
            )
            route >> archive()

        grp.expand(outcome=["success", "not-an-outcome"])

    states = _states(run_dag(dag))
    assert (states[("grp.route", 0)], states[("grp.archive", 0)]) == ("success", "success")
    assert (states[("grp.route", 1)], states[("grp.archive", 1)]) == ("failed", "skipped")


# -- at DAG definition time (no database) ----------------------------------------------------------


def test_unknown_outcome_key_is_rejected_with_the_allowed_names():
    with pytest.raises(ValueError, match="unknown outcome 'sucess'") as error:
        ImageOutcomeBranchOperator(task_id="route", result=None, branches={"sucess": "archive"})
    names = (
        "success, content_policy, internal_error, generation_failed, timeout, submission_uncertain, "
        "not_sent, upload_failed"
    )
    assert f"allowed outcomes: {names}" in str(error.value)
    assert names.split(", ") == list(OUTCOMES)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"branches": ["success"]}, TypeError, "branches must be a dict"),
        ({"branches": {"success": 3}}, TypeError, r"branches\['success'\]: expected a task id"),
        ({"branches": {"success": ["a", ""]}}, TypeError, r"branches\['success'\]: expected task ids"),
        ({"branches": {"success": ""}}, ValueError, "must not be empty"),
        ({"branches": {}, "default": {"a": 1}}, TypeError, "default: expected a task id"),
    ],
)
def test_bad_targets_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        ImageOutcomeBranchOperator(task_id="route", result=None, **kwargs)


def test_guards_are_installed_whatever_the_dependency_syntax():
    with _dag("branch_syntax") as dag:

        @task
        def upstream() -> dict:
            return {"outcome": "success"}

        @task
        def by_task_fn() -> None:
            pass

        route = ImageOutcomeBranchOperator(task_id="route", result=upstream(), branches={"success": "t1"})
        t = {name: task(lambda: None, task_id=name)() for name in ("t1", "t2", "t3", "t4", "t5", "t6")}
        with TaskGroup("tg") as tg:
            task(lambda: None, task_id="root")() >> task(lambda: None, task_id="inner")()
        route >> t["t1"]
        t["t2"] << route
        t["t3"].operator.set_upstream(route)
        route.set_downstream(t["t4"].operator)
        chain(route, t["t5"])
        route >> Label("labelled") >> t["t6"]
        route >> tg
        route >> by_task_fn()

    direct = {"t1", "t2", "t3", "t4", "t5", "t6", "tg.root", "by_task_fn"}
    assert set(route.downstream_task_ids) == direct
    assert {t.task_id for t in dag.tasks if _has_guard(t, "route")} == direct
    assert dag.get_edge_info("route", "t6") == {"label": "labelled"}  # the edge keeps its label


def test_the_missing_guard_error_names_the_tasks_and_the_fix():
    with _dag("branch_unguarded_message") as dag:

        @task_group(group_id="grp")
        def grp(index: int):
            route = ImageOutcomeBranchOperator(task_id="route", result=index, branches={"success": "ok"})
            route >> task(lambda: None, task_id="ok")()
            for name in ("b", "a"):  # added behind the operators' back: no guard gets installed
                sneaky = task(lambda: None, task_id=name)()
                route.downstream_task_ids.add(sneaky.operator.task_id)

        grp.expand(index=[0])

    with pytest.raises(AirflowFailException) as error:
        dag.get_task("grp.route")._check_guards(map_index=0)
    assert str(error.value) == (
        "Cannot route per map index: direct downstream task(s) ['grp.a', 'grp.b'] of grp.route carry "
        "no outcome guard: was the dependency set without >>, <<, set_downstream or set_upstream?"
    )
    outside = ImageOutcomeBranchOperator(task_id="alone", result=None, branches={"success": "ok"})
    with pytest.raises(AirflowFailException) as error:
        outside._check_guards(map_index=0)  # a map index without a mapped task group: .partial().expand()
    assert str(error.value) == (
        "alone is mapped with .partial().expand(); per-index routing needs a mapped task group instead: "
        "put the branch and its branches in a @task_group and .expand() it"
    )


def test_decision_resolves_relative_full_and_group_ids_and_follows_joins():
    with _dag("branch_decide") as dag, TaskGroup("grp"):
        route = ImageOutcomeBranchOperator(
            task_id="route",
            result={"outcome": "success"},
            branches={"success": ["archive", "grp.notify"], "content_policy": "sub", "timeout": []},
            default="grp.missing",
        )
        names = ("archive", "notify", "other", "join")
        archive, notify, other, join = (task(lambda: None, task_id=n)().operator for n in names)
        with TaskGroup("sub"):
            first = task(lambda: None, task_id="first")().operator
        route >> [archive, notify, other, join, first]
        archive >> join

    assert route.decide({}) == {
        "outcome": "success",
        "chosen": ["grp.archive", "grp.notify"],
        "followed": ["grp.archive", "grp.join", "grp.notify"],
        "skipped": ["grp.other", "grp.sub.first"],
    }
    route.result = {"outcome": "content_policy", "task_id": "x"}
    assert route.decide({})["chosen"] == ["grp.sub.first"]
    route.result = "timeout"
    assert route.decide({})["skipped"] == [
        "grp.archive",
        "grp.join",
        "grp.notify",
        "grp.other",
        "grp.sub.first",
    ]
    route.result = {"outcome": "internal_error"}
    with pytest.raises(AirflowFailException, match=r"'grp\.missing' is neither a task nor a task group"):
        route.decide({})
    route.result = {"outcome": "exploded"}
    with pytest.raises(AirflowFailException, match="Unknown outcome 'exploded'"):
        route.decide({})
    route.result = {"code": 500}
    with pytest.raises(AirflowFailException, match="has no 'outcome'"):
        route.decide({})
    assert dag.get_task("grp.route") is route


def test_setting_a_dependency_twice_installs_one_guard():
    with _dag("branch_twice"):
        route = ImageOutcomeBranchOperator(task_id="route", result="success", branches={"success": "t"})
        t = task(lambda: None, task_id="t")().operator
        route >> t
        route >> t
    assert _has_guard(t, "route")
    assert t._pre_execute_hook.then is None  # one guard, not a guard wrapping another


def test_a_result_without_an_outcome_says_which_operators_give_one():
    route = ImageOutcomeBranchOperator(task_id="route", result=None, branches={"success": "t"})
    with pytest.raises(AirflowFailException) as error:
        route.outcome_of({"task_id": "x", "code": 200})
    assert str(error.value) == (
        "The result has no 'outcome' (keys: ['code', 'task_id']); is it an image result from "
        "ImageGenerateOperator or ImageTaskSensor?"
    )


@pytest.mark.parametrize(
    ("result", "lines"),
    [
        (
            "success",
            [
                "Outcome 'success' -> chosen ['archive']; following ['archive'], "
                "skipping ['quarantine'] (map index -1)"
            ],
        ),
        (
            None,
            [
                "No result (upstream skipped?): skipping all direct downstream tasks",
                "Outcome None -> chosen []; following [], skipping ['archive', 'quarantine'] (map index -1)",
            ],
        ),
    ],
)
def test_the_decision_is_logged_and_pushed(result, lines, capsys):
    from types import SimpleNamespace

    from airflow.sdk.exceptions import DownstreamTasksSkipped

    with _dag("branch_log"):
        route = ImageOutcomeBranchOperator(
            task_id="route", result=result, branches={"success": "archive"}, default=[]
        )
        route >> [task(lambda: None, task_id=name)() for name in ("archive", "quarantine")]
    pushed: dict = {}
    ti = SimpleNamespace(map_index=-1, xcom_push=lambda key, value: pushed.update({key: value}))
    route._skip_known_downstream = False  # not mapped: the unchosen are skipped all the same
    with pytest.raises(DownstreamTasksSkipped):
        route.execute({"ti": ti})
    logged = capsys.readouterr().out.splitlines()
    for line in lines:
        assert any(line in entry for entry in logged), (line, logged)
    assert len([entry for entry in logged if "No result" in entry]) == (result is None)
    assert pushed[DECISION_XCOM_KEY]["outcome"] == result
