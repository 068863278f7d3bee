"""
The binding check: a callback posted to a task instance's URL must carry a remote task id that the
task's submission ledger binds to the URL's slot. The ledger is written through Airflow's real
state-store backend, for a real DagRun in the test database, and once by a real task under
``dag.test()``.

No race decides a result: the simulator holds every callback (``hold_callbacks``) until the test
releases it, after the ledger is written. And as the receiver accepts a callback for a slot not
bound yet exactly as it accepts a bound one (200, the same row), a test of a bound slot first
shows that the binding is in force: the same URL refuses another task id with 409.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime

import pytest
from cbhelpers import attempts, deliver_held, post_callback, stored_rows, submit, wait_until

from imagecb_provider.callbacks.tokens import callback_url
from imagecb_provider.utils.ledger import STATE_KEY, LedgerEntry, Slot

pytestmark = pytest.mark.timeout(120)

FAST = {"latency": 0.3, "callback_retry_delays": [0.3, 0.3, 0.3], "hold_callbacks": True}
_runs = itertools.count()


@pytest.fixture
def dag_run(callback_db):
    """A DagRun row of its own (the state store keys ledgers by run)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType

    run = DagRun(
        dag_id="cb_binding",
        run_id=f"manual__binding_{next(_runs)}_{datetime.now(UTC).timestamp()}",
        run_type=DagRunType.MANUAL,
        state=DagRunState.RUNNING,
        run_after=datetime.now(UTC),
    )
    with create_session() as session:
        session.add(run)
    return run


def _write_ledger(dag_run, entry: LedgerEntry, *, task_id: str = "generate", map_index: int = -1) -> None:
    """Store a ledger the way the execution API does: through the configured state backend."""
    from airflow.state import TaskScope, get_state_backend

    scope = TaskScope(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, map_index=map_index)
    get_state_backend().set(scope, STATE_KEY, json.dumps(entry.to_dict()))


def _url(settings, dag_run, slot: int = 0, *, task_id: str = "generate", map_index: int = -1) -> str:
    return callback_url(
        settings,
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        task_id=task_id,
        map_index=map_index,
        slot=slot,
    )


def _refuses_another_task(url: str) -> bool:
    """
    Return whether the receiver holds ``url``'s slot bound: a callback naming another task is a 409.

    :param url: the callback URL of the slot.
    """
    return post_callback(url, f"impostor-{next(_runs)}") == 409


@pytest.fixture
def simulator(imagecb_simulator_factory):
    return imagecb_simulator_factory(**FAST)


def test_a_callback_bound_to_its_slot_is_recorded(receiver, simulator, connect, dag_run):
    settings = connect(simulator, receiver.url)
    url = _url(settings, dag_run, slot=1)
    _write_ledger(dag_run, LedgerEntry(slots=[Slot(key="a", remote_task_id="someone-else"), Slot(key="b")]))
    remote_task_id = submit("a bound pelican", url)
    _write_ledger(
        dag_run,
        LedgerEntry(
            slots=[Slot(key="a", remote_task_id="someone-else"), Slot(key="b", remote_task_id=remote_task_id)]
        ),
    )
    assert _refuses_another_task(url)
    assert deliver_held(simulator, remote_task_id) == 200
    (row,) = stored_rows(remote_task_id)
    assert (row["run_id"], row["task_id"], row["map_index"], row["slot"]) == (
        dag_run.run_id,
        "generate",
        -1,
        1,
    )


def test_a_callback_for_another_remote_task_is_refused_409(receiver, simulator, connect, dag_run):
    settings = connect(simulator, receiver.url)
    _write_ledger(dag_run, LedgerEntry(slots=[Slot(key="a", remote_task_id="the-bound-one")]))
    remote_task_id = submit("an impostor", _url(settings, dag_run))
    assert deliver_held(simulator, remote_task_id) == 409
    found = wait_until(
        lambda: len(attempts(simulator, remote_task_id)) >= 4 and attempts(simulator, remote_task_id)
    )
    assert [a["status"] for a in found] == [409] * 4
    assert stored_rows(remote_task_id) == []


def test_a_callback_that_races_ahead_of_the_ledger_is_recorded(receiver, simulator, connect, dag_run):
    """Delivered while the task has stored nothing yet: the slot is not bound, so it is accepted."""
    settings = connect(simulator, receiver.url)
    url = _url(settings, dag_run)
    remote_task_id = submit("a fast finch", url)
    assert deliver_held(simulator, remote_task_id) == 200
    assert len(stored_rows(remote_task_id)) == 1
    _write_ledger(dag_run, LedgerEntry(slots=[Slot(key="a", remote_task_id=remote_task_id)]))
    assert _refuses_another_task(url)  # once written, the same slot is bound


def test_a_slot_still_sending_counts_as_unbound(receiver, simulator, connect, dag_run):
    """A resubmission in flight: its earlier remote task is bound, the new id is not stored yet."""
    settings = connect(simulator, receiver.url)
    in_flight = Slot(
        key="a", sending=True, earlier=[{"remote_task_id": "first-try", "outcome": "internal_error"}]
    )
    _write_ledger(dag_run, LedgerEntry(slots=[in_flight]))
    remote_task_id = submit("a resubmitted robin", _url(settings, dag_run))
    assert deliver_held(simulator, remote_task_id) == 200
    assert len(stored_rows(remote_task_id)) == 1


def test_the_late_callback_of_an_earlier_attempt_is_accepted(receiver, simulator, connect, dag_run):
    settings = connect(simulator, receiver.url)
    url = _url(settings, dag_run)
    remote_task_id = submit("a late lark", url)
    retired = Slot(key="a", remote_task_id="second-try", earlier=[{"remote_task_id": remote_task_id}])
    _write_ledger(dag_run, LedgerEntry(slots=[retired]))
    assert _refuses_another_task(url)
    assert deliver_held(simulator, remote_task_id) == 200
    assert len(stored_rows(remote_task_id)) == 1


def test_map_indexes_are_bound_separately(receiver, simulator, connect, dag_run):
    settings = connect(simulator, receiver.url)
    first = submit("mapped 3", _url(settings, dag_run, map_index=3))
    second = submit("mapped 4", _url(settings, dag_run, map_index=4))
    _write_ledger(dag_run, LedgerEntry(slots=[Slot(key="a", remote_task_id=first)]), map_index=3)
    _write_ledger(dag_run, LedgerEntry(slots=[Slot(key="a", remote_task_id=first)]), map_index=4)
    assert deliver_held(simulator, first) == 200
    assert stored_rows(first)[0]["map_index"] == 3
    assert deliver_held(simulator, second) == 409
    assert stored_rows(second) == []


@pytest.mark.airflow
def test_a_real_task_instance_binds_its_callback_through_task_state_store(
    receiver, imagecb_simulator_factory, connect, run_dag
):
    """Under ``dag.test()``, tasks write their ledgers through the real execution API and backend."""
    from datetime import timedelta

    from airflow.sdk import DAG, task

    from imagecb_provider.callbacks.tokens import callback_url_for_context
    from imagecb_provider.hooks.imagecb import ImageCbHook
    from imagecb_provider.models import GenerationRequest
    from imagecb_provider.utils.ledger import SubmissionLedger

    simulator = imagecb_simulator_factory(**FAST)
    connect(simulator, receiver.url)

    def submit_and_bind(prompt: str, bound: str | None, context) -> str:
        hook = ImageCbHook()
        url = callback_url_for_context(hook.settings, context, slot=0)
        ledger = SubmissionLedger(context)
        ledger.save(LedgerEntry(slots=[Slot(key="k", sending=True)]))
        remote_task_id = hook.submit(GenerationRequest(prompt=prompt, callback_url=url))
        ledger.save(LedgerEntry(slots=[Slot(key="k", remote_task_id=bound or remote_task_id)]))
        return remote_task_id

    with DAG(
        f"cb_binding_real_{next(_runs)}",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        default_args={"retry_delay": timedelta(seconds=0)},
    ) as dag:

        @task
        def honest(**context) -> str:
            return submit_and_bind("an honest image", None, context)

        @task
        def mismatched(**context) -> str:
            return submit_and_bind("a mismatched image", "not-this-one", context)

        honest()
        mismatched()

    dag_run = run_dag(dag)
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert {ti.state for ti in tis.values()} == {"success"}
    honest_id = tis["honest"].xcom_pull(task_ids="honest")
    mismatched_id = tis["mismatched"].xcom_pull(task_ids="mismatched")

    # The tasks have ended, so both ledgers are written: only now do their callbacks go out.
    assert deliver_held(simulator, honest_id) == 200
    (row,) = stored_rows(honest_id)
    assert (row["dag_id"], row["run_id"], row["task_id"], row["map_index"]) == (
        dag.dag_id,
        dag_run.run_id,
        "honest",
        -1,
    )
    assert deliver_held(simulator, mismatched_id) == 409
    assert stored_rows(mismatched_id) == []
