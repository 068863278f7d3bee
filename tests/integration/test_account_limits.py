"""
The account refuses for longer than a burst: credits run out, or the key meets its cap.

Real HTTP against the simulator (``credits``, ``submission_cap``). A generate task that meets
such a refusal stops submitting, settles its unsent requests ``not_sent`` with the reason, and
puts the account on hold (:mod:`imagecb_provider.utils.limiter`), so the other groups of the
batch send nothing until it lifts; a rerun then sends exactly the requests never sent.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from imagecb_provider.exceptions import ImageCbRateCapped, ImageCbRateLimited, ImageNotSent
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.hooks.protocol import CAP_RETRY_AFTER, RetryPolicy
from imagecb_provider.models import GenerationRequest
from imagecb_provider.operators.generate import ImageGenerateOperator
from imagecb_provider.testing.airflow import InMemoryTaskStateStore
from imagecb_provider.utils import limiter
from imagecb_provider.utils.ledger import STATE_KEY
from imagecb_provider.utils.limiter import CREDITS, RATE_CAP, AccountHold, HoldStore

pytestmark = pytest.mark.timeout(120)

FAST = RetryPolicy(max_attempts=6, initial_delay=0.01, max_delay=0.02, jitter=0)


@pytest.fixture(autouse=True)
def _no_hold():
    """Each test starts and ends with the account not on hold (in this process: no task context)."""
    HoldStore("imagecb_default").lift()
    yield
    HoldStore("imagecb_default").lift()


def _generate_calls(sim) -> int:
    return sim.stats(tasks=False)["requests"].get("generate", 0)


def _context(store, op, *, try_number: int = 1, cleared: bool = False) -> dict:
    op.retries = 2
    max_tries = try_number - 1 + 2 if cleared else 2
    ti = SimpleNamespace(
        try_number=try_number, max_tries=max_tries, dag_id="d", run_id="r", task_id="t", map_index=-1
    )
    return {"task_state_store": store, "ti": ti, "task": op}


# --------------------------------------------------------------------------- the wire
def test_a_429_asking_to_wait_longer_than_a_burst_is_a_cap_and_is_not_retried(imagecb_simulator):
    imagecb_simulator.configure(submission_cap=0, submission_cap_retry_after=3600)
    hook = ImageCbHook(retry_policy=FAST)
    with pytest.raises(ImageCbRateCapped) as info:
        hook.submit(GenerationRequest(prompt="a pike"))
    assert isinstance(info.value, AirflowFailException)
    assert "hourly, daily or total cap" in str(info.value)
    assert _generate_calls(imagecb_simulator) == 1


def test_a_burst_429_with_a_short_retry_after_stays_a_retried_rate_limit(imagecb_simulator):
    imagecb_simulator.inject(endpoint="generate", code=429, retry_after=CAP_RETRY_AFTER / 60)
    hook = ImageCbHook(retry_policy=RetryPolicy(max_attempts=3, sleep=lambda s: None))
    assert hook.submit(GenerationRequest(prompt="a dace"))
    assert _generate_calls(imagecb_simulator) == 2


def test_the_simulator_cap_refuses_once_used_up_and_lifts_when_set_again(imagecb_simulator):
    imagecb_simulator.configure(submission_cap=1)
    hook = ImageCbHook(retry_policy=RetryPolicy(max_attempts=1))
    hook.submit(GenerationRequest(prompt="a ruff"))
    with pytest.raises(ImageCbRateLimited, match="usage limit"):  # no Retry-After: the hook cannot tell
        hook.submit(GenerationRequest(prompt="a shad"))
    imagecb_simulator.configure(submission_cap=None)
    assert hook.submit(GenerationRequest(prompt="a shad"))


# -------------------------------------------------------------------------- credits run out
def test_credits_running_out_stop_the_group_and_hold_the_other_groups_until_a_top_up(
    imagecb_simulator, batch_operator
):
    imagecb_simulator.configure(latency=0.0, credits=15.0)  # three images at 5 credits
    first, second = [f"a gull {i}" for i in range(6)], [f"a tern {i}" for i in range(4)]
    store_1, store_2 = InMemoryTaskStateStore(), InMemoryTaskStateStore()

    op = batch_operator(first)
    results = op.execute(_context(store_1, op))
    assert [r["outcome"] for r in results] == ["success"] * 3 + ["not_sent"] * 3
    assert _generate_calls(imagecb_simulator) == 4  # three accepted, one 402, then nothing
    refused = results[3]
    assert (refused["task_id"], refused["code"]) == (None, 402)
    assert refused["message"].startswith("Not sent: the account ran out of credits (402 at ")
    assert "top it up, then clear the run" in refused["message"]
    hold = HoldStore("imagecb_default").get()
    assert (hold.kind, hold.balance) == (CREDITS, 0.0)

    op = batch_operator(second)  # the next group: sends nothing while the balance is unchanged
    results = op.execute(_context(store_2, op))
    assert [r["outcome"] for r in results] == ["not_sent"] * 4
    assert _generate_calls(imagecb_simulator) == 4

    imagecb_simulator.configure(credits=100.0)  # a top-up
    op = batch_operator(first)  # the rerun cleared from the UI: successes reused, the unsent sent
    results = op.execute(_context(store_1, op, try_number=2, cleared=True))
    assert [r["outcome"] for r in results] == ["success"] * 6
    op = batch_operator(second)
    assert [r["outcome"] for r in op.execute(_context(store_2, op, try_number=2, cleared=True))] == [
        "success"
    ] * 4
    assert HoldStore("imagecb_default").get() is None
    submissions = imagecb_simulator.stats()["submissions"]
    assert sorted(submissions.values()) == [1] * 10  # never a second payment
    assert _generate_calls(imagecb_simulator) == 4 + 3 + 4


def test_a_single_image_not_sent_fails_at_once_naming_the_fix(imagecb_simulator):
    imagecb_simulator.configure(credits=0.0)
    op = ImageGenerateOperator(task_id="g", prompt="a coot", deferrable=False, poll_interval=0.1)
    op.hook.retry_policy = FAST
    with pytest.raises(ImageNotSent) as info:
        op.execute(_context(InMemoryTaskStateStore(), op))
    assert isinstance(info.value, AirflowFailException)  # no retry: minutes later it is still empty
    assert "top it up" in str(info.value)
    assert _generate_calls(imagecb_simulator) == 1


# ---------------------------------------------------------------------------- a key's cap
def test_a_cap_stops_the_group_after_one_refused_request_and_holds_the_others(
    imagecb_simulator, monkeypatch, batch_operator
):
    imagecb_simulator.configure(latency=0.0, submission_cap=2)  # no Retry-After: the hook retries first
    store_1, store_2 = InMemoryTaskStateStore(), InMemoryTaskStateStore()
    first, second = [f"a vole {i}" for i in range(5)], [f"a mole {i}" for i in range(3)]

    op = batch_operator(first)
    results = op.execute(_context(store_1, op))
    assert [r["outcome"] for r in results] == ["success"] * 2 + ["not_sent"] * 3
    assert (
        _generate_calls(imagecb_simulator) == 2 + FAST.max_attempts
    )  # one request refused through its attempts
    assert "hourly, daily or total cap" in results[2]["message"]
    assert results[2]["code"] == 429
    slots = store_1[STATE_KEY]["slots"]
    assert [s["sending"] for s in slots] == [False] * 5  # nothing left uncertain
    assert HoldStore("imagecb_default").get().kind == RATE_CAP

    op = batch_operator(second)  # within the probe interval: not one request
    assert [r["outcome"] for r in op.execute(_context(store_2, op))] == ["not_sent"] * 3
    assert _generate_calls(imagecb_simulator) == 2 + FAST.max_attempts

    # The cap lifts; once the probe time has come, the next task probes, succeeds and lifts the hold.
    imagecb_simulator.configure(submission_cap=None)
    hold = HoldStore("imagecb_default").get()
    HoldStore("imagecb_default").put(AccountHold(**{**hold.__dict__, "probe_after": 0.0}))
    op = batch_operator(first)
    results = op.execute(_context(store_1, op, try_number=2, cleared=True))
    assert [r["outcome"] for r in results] == ["success"] * 5
    assert HoldStore("imagecb_default").get() is None
    op = batch_operator(second)
    assert [r["outcome"] for r in op.execute(_context(store_2, op, try_number=2, cleared=True))] == [
        "success"
    ] * 3
    assert sorted(imagecb_simulator.stats()["submissions"].values()) == [1] * 8


def test_only_one_task_probes_a_capped_account_per_interval(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0, submission_cap=0, submission_cap_retry_after=7200)
    now = [1000.0]
    store = HoldStore("imagecb_default")
    store.put(AccountHold(kind=RATE_CAP, code=429, message="", since="t", probe_after=now[0]))
    hook = ImageCbHook(retry_policy=FAST)
    first = limiter.AccountLimiter(hook, store=store, clock=lambda: now[0])
    second = limiter.AccountLimiter(hook, store=store, clock=lambda: now[0])
    assert first.admit() is None  # the probe
    assert second.admit() is not None  # the others wait for the next probe time
    now[0] += limiter.PROBE_INTERVAL
    assert second.admit() is None


@pytest.mark.parametrize(
    "stored",
    ["", "null", "[]", '{"kind": "credits"}', '{"kind": "other", "code": 1, "since": "x"}', "{" * 5000, 7],
)
def test_a_variable_not_of_the_hold_form_is_ignored(stored):
    assert AccountHold.from_json(stored) is None


def test_a_hold_round_trips_through_json():
    hold = AccountHold(
        kind=CREDITS, code=402, message="Insufficient credits", since="2026-12-03T20:00:00Z", balance=2.5
    )
    assert AccountHold.from_json(hold.to_json()) == hold
