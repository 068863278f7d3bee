"""
Several submissions of one task in flight at once, their ledger writes grouped, the rule kept.

Real HTTP against the simulator. Where the account's rate lets several requests go out within
0.25 s, a generate task sends up to ``max_in_flight`` at once, each from its own thread, and
stores their ``sending`` marks and answers in grouped writes. Checked here: each mark is stored
before its request leaves; the writes are far fewer than two per request; a crash leaves at most
``max_in_flight`` requests uncertain and never pays twice; at the documented limit one request
is in flight at a time, as before.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

from imagecb_provider.operators.generate import ImageBatchGenerateOperator
from imagecb_provider.testing.airflow import InMemoryTaskStateStore
from imagecb_provider.utils.ledger import STATE_KEY

pytestmark = pytest.mark.timeout(120)


class SlowStore(InMemoryTaskStateStore):
    """The store with the time a real write takes (a call to the API server and a commit)."""

    def set(self, key, value):
        time.sleep(0.03)
        super().set(key, value)


class Killed(BaseException):
    """The task's process died: nothing after it runs in that try."""


def _account(sim, monkeypatch, per_10s: float) -> None:
    """Point the default connection at the simulator, with an account allowing ``per_10s``."""
    sim.configure(latency=0.0, rate_limit_count=int(per_10s), rate_limit_window=10.0)
    conn = {**json.loads(sim.connection_json()), "extra": {"submissions_per_10s": per_10s}}
    monkeypatch.setenv("AIRFLOW_CONN_IMAGECB_DEFAULT", json.dumps(conn))


def _context(store, op, *, try_number: int = 1) -> dict:
    op.retries = 2
    ti = SimpleNamespace(
        try_number=try_number, max_tries=2, dag_id="d", run_id="r", task_id="t", map_index=-1
    )
    return {"task_state_store": store, "ti": ti, "task": op}


class Watched:
    """
    Wrap the hook's submit: check the request's mark is stored before it leaves, count overlaps.

    :param op: the operator whose hook is watched.
    :param store: the task's store.
    :param prompts: the requests' prompts, in slot order.
    """

    def __init__(self, op, store, prompts: list[str]) -> None:
        self.store, self.slot_of = store, {p: i for i, p in enumerate(prompts)}
        self.real = op.hook.submit
        self.in_flight = self.peak = 0
        self.unmarked: list[str] = []
        self.lock = threading.Lock()
        op.hook.submit = self

    def __call__(self, request, **kwargs):
        stored = self.store.get(STATE_KEY) or {"slots": []}
        slot = stored["slots"][self.slot_of[request.prompt]] if stored["slots"] else {}
        if not slot.get("sending"):
            self.unmarked.append(request.prompt)
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            return self.real(request, **kwargs)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_at_a_high_rate_several_go_at_once_each_marked_first_in_few_writes(
    imagecb_simulator, monkeypatch, batch_operator
):
    _account(imagecb_simulator, monkeypatch, per_10s=2000)
    imagecb_simulator.configure(submit_answer_delay=0.2)  # an answer takes a moment, as on the real API
    prompts = [f"a heron {i}" for i in range(40)]
    store = SlowStore()
    op = batch_operator(prompts, max_in_flight=8)
    watched = Watched(op, store, prompts)

    results = op.execute(_context(store, op))

    assert [r["outcome"] for r in results] == ["success"] * 40
    assert watched.unmarked == []  # every request's mark was stored before it left
    assert watched.peak == 8  # overlapped up to the cap, never beyond
    assert imagecb_simulator.stats()["submissions"] == {p: 1 for p in prompts}
    assert imagecb_simulator.stats()["rejected"].get("429", 0) == 0
    # Grouped: one write per mark and per answer would be 81 (with the finish). Writes go back to
    # back while requests are in flight, each holding every change made during the one before.
    assert len(store.writes) <= 60, len(store.writes)
    final = store.get(STATE_KEY)["slots"]
    assert [s["remote_task_id"] for s in final] == [r["task_id"] for r in results]
    assert not any(s["sending"] for s in final)


def test_at_the_documented_limit_one_request_is_in_flight_at_a_time(
    imagecb_simulator, monkeypatch, batch_operator
):
    _account(imagecb_simulator, monkeypatch, per_10s=20)
    prompts = [f"a wren {i}" for i in range(4)]
    store = InMemoryTaskStateStore()
    op = batch_operator(prompts)
    watched = Watched(op, store, prompts)

    results = op.execute(_context(store, op))

    assert [r["outcome"] for r in results] == ["success"] * 4
    assert (watched.peak, watched.unmarked) == (1, [])
    # As before: each request's mark, then its answer, each in a write of its own (plus the finish).
    assert len(store.writes) >= 2 * 4


def test_a_crash_leaves_at_most_max_in_flight_uncertain_and_never_pays_twice(
    imagecb_simulator, monkeypatch, batch_operator
):
    """
    Try 1 dies while four requests wait for their answers: the store keeps what it had then.

    The API took all four (it charges them), so try 2 must report exactly those four uncertain
    and send the six never sent: every prompt reaches the API once.
    """
    _account(imagecb_simulator, monkeypatch, per_10s=2000)
    imagecb_simulator.configure(submit_answer_delay=1.0)
    prompts = [f"a finch {i}" for i in range(10)]
    store = InMemoryTaskStateStore()
    op = batch_operator(prompts, max_in_flight=4)
    real = op.hook.submit
    state = {"sent": 0, "dead": False}
    lock = threading.Lock()
    frozen_set = store.set

    def submit(request, **kwargs):
        with lock:
            if state["dead"]:
                raise Killed()
            state["sent"] += 1
            if state["sent"] == 4:  # the fourth is leaving: the process dies once it has
                state["dead"] = True
        try:
            return real(request, **kwargs)
        finally:
            with lock:
                if state["dead"]:
                    store.set = lambda *a, **k: None  # a dead process writes nothing more

    op.hook.submit = submit
    with pytest.raises(Killed):
        op.execute(_context(store, op))
    store.set = frozen_set
    stored = store.get(STATE_KEY)["slots"]
    assert sum(bool(s["sending"]) for s in stored) == 4

    retry = batch_operator(prompts, max_in_flight=4)
    results = retry.execute(_context(store, retry, try_number=2))

    outcomes = [r["outcome"] for r in results]
    assert outcomes.count("submission_uncertain") == 4
    assert outcomes.count("success") == 6
    assert imagecb_simulator.stats()["submissions"] == {p: 1 for p in prompts}  # never twice


def test_max_in_flight_must_be_a_positive_integer():
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="max_in_flight"):
            ImageBatchGenerateOperator(task_id="b", requests=[{"prompt": "x"}], max_in_flight=bad)
