"""
What a try of the generate operators does with what earlier tries stored, over real HTTP.

``task_state_store`` is stood in for by a dict with its methods, so each case can set up the
exact state an earlier try (or a rerun cleared from the UI) leaves. The same rules are proven in
real Airflow in tests/dags/test_generate_dags.py (retries, the stale defer-exit race) and on the
real stack (a cleared rerun).
"""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest

from imagecb_provider.exceptions import (
    ImageCbNotFound,
    ImageContentPolicyViolation,
    ImageGenerationFailed,
    ImageInternalError,
    ImageSubmissionUncertain,
)
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.models import GenerationRequest, request_key
from imagecb_provider.operators.generate import ImageBatchGenerateOperator, ImageGenerateOperator
from imagecb_provider.testing.airflow import InMemoryTaskStateStore as DictStateStore
from imagecb_provider.utils.ledger import STATE_KEY, LedgerEntry, Slot

pytestmark = pytest.mark.timeout(60)


def _operator(prompt: str, **kwargs) -> ImageGenerateOperator:
    return ImageGenerateOperator(
        task_id="generate", prompt=prompt, deferrable=False, **{"poll_interval": 0.1, **kwargs}
    )


def _context(
    store: DictStateStore, op, *, try_number: int = 2, retries: int = 2, cleared: bool = False
) -> dict:
    """A context for a retry (default) or for the first try of a rerun cleared from the UI."""
    op.retries = retries
    max_tries = try_number - 1 + retries if cleared else retries
    ti = SimpleNamespace(
        try_number=try_number, max_tries=max_tries, dag_id="d", run_id="r", task_id="t", map_index=-1
    )
    return {"task_state_store": store, "ti": ti, "task": op}


def _stored(prompt: str, remote_task_id: str | None, *, finished: bool = False, **slot) -> DictStateStore:
    key = request_key(GenerationRequest(prompt=prompt).to_payload())
    entry = LedgerEntry(slots=[Slot(key=key, remote_task_id=remote_task_id, **slot)], finished=finished)
    return DictStateStore({STATE_KEY: entry.to_dict()})


def _submit(prompt: str) -> str:
    return ImageCbHook().submit(GenerationRequest(prompt=prompt))


def test_the_first_try_records_each_submission_before_and_after_it_goes_out(imagecb_simulator):
    store = DictStateStore()
    op = _operator("a pier")
    result = op.execute(_context(store, op, try_number=1))
    first = store.writes[0]["slots"][0]
    assert (first["sending"], first["remote_task_id"]) == (True, None)  # stored before the request left
    final = store[STATE_KEY]
    assert (final["finished"], final["delivered_try"]) == (True, 1)  # the retry rule reads the try
    assert final["slots"][0]["sending"] is False  # answered: never counted as uncertain
    assert final["slots"][0]["remote_task_id"] == result["task_id"]
    assert final["slots"][0]["outcome"] == "success"
    assert imagecb_simulator.stats()["submissions"] == {"a pier": 1}


@pytest.mark.parametrize(
    ("marker", "error"),
    [
        ("", None),
        ("[sim:content_policy]", ImageContentPolicyViolation),
        ("[sim:internal_error]", ImageInternalError),
        ("[sim:generation_failed]", ImageGenerationFailed),
    ],
)
def test_a_retry_settles_an_undelivered_outcome_without_submitting(imagecb_simulator, marker, error):
    """The stale defer-exit race: try 1's event came, but execute_complete never ran."""
    imagecb_simulator.configure(latency=0.0)
    prompt = f"a barn {marker}".strip()
    remote_task_id = _submit(prompt)
    store = _stored(prompt, remote_task_id, finished=False)
    op = _operator(prompt)
    if error is None:
        result = op.execute(_context(store, op))
        assert (result["task_id"], result["outcome"], result["polls"]) == (remote_task_id, "success", 1)
    else:
        with pytest.raises(error) as info:
            op.execute(_context(store, op))
        assert info.value.result["task_id"] == remote_task_id
    assert imagecb_simulator.stats()["submissions"] == {prompt: 1}
    assert imagecb_simulator.stats()["status_calls"][remote_task_id] == 1  # polled at once, not after 30 s
    assert store[STATE_KEY]["finished"] is True


def test_a_retry_reconnects_to_a_task_still_generating(imagecb_simulator):
    """Pinned to that path: the task is held generating until the retry has polled it once."""
    from concurrent.futures import ThreadPoolExecutor

    prompt = "a mill [sim:hold]"
    remote_task_id = _submit(prompt)
    store = _stored(prompt, remote_task_id, submitted_at="2026-01-01T00:00:00+00:00")
    op = _operator(prompt)
    with ThreadPoolExecutor(1) as pool:
        retry = pool.submit(op.execute, _context(store, op))
        _wait_until(lambda: imagecb_simulator.stats()["status_calls"].get(remote_task_id, 0) >= 1)
        assert not retry.done()  # it found the task generating and waits for it
        imagecb_simulator.release(remote_task_id)
        result = retry.result(timeout=30)
    assert result["task_id"] == remote_task_id
    assert result["outcome"] == "success"
    assert result["submitted_at"] == "2026-01-01T00:00:00Z"
    assert imagecb_simulator.stats()["status_calls"][remote_task_id] >= 2
    assert imagecb_simulator.stats()["submissions"] == {prompt: 1}


def _wait_until(check, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.02)


def test_a_retry_after_a_delivered_internal_error_submits_anew(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    prompt = "a silo [sim:flaky]"
    failed_id = _submit(prompt)
    store = _stored(prompt, failed_id, finished=True, outcome="internal_error")
    op = _operator(prompt)
    result = op.execute(_context(store, op))
    assert result["task_id"] != failed_id
    assert result["outcome"] == "success"
    assert result["earlier"] == [{"remote_task_id": failed_id, "outcome": "internal_error", "message": ""}]
    assert imagecb_simulator.stats()["submissions"] == {prompt: 2}
    assert failed_id not in imagecb_simulator.stats()["status_calls"]


def test_a_delivered_content_policy_is_not_paid_again_by_a_retry_but_is_by_a_cleared_rerun(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    prompt = "a riot [sim:content_policy]"
    flagged_id = _submit(prompt)
    store = _stored(prompt, flagged_id, finished=True, outcome="content_policy")
    op = _operator(prompt)
    with pytest.raises(ImageContentPolicyViolation):
        op.execute(_context(store, op, try_number=2))
    assert imagecb_simulator.stats()["submissions"] == {prompt: 1}
    with pytest.raises(ImageContentPolicyViolation) as info:
        op.execute(_context(store, op, try_number=3, cleared=True))
    assert info.value.result["task_id"] != flagged_id
    assert imagecb_simulator.stats()["submissions"] == {prompt: 2}


def test_a_cleared_rerun_of_one_image_makes_a_new_one_but_a_batch_keeps_its_successes(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    old_id = _submit("a dam")
    store = _stored("a dam", old_id, finished=True, outcome="success")
    op = _operator("a dam")
    assert op.execute(_context(store, op, try_number=2, cleared=True))["task_id"] != old_id
    assert imagecb_simulator.stats()["submissions"] == {"a dam": 2}

    kept_id, failed_id = _submit("a weir"), _submit("a lock [sim:generation_failed]")
    requests = [{"prompt": "a weir"}, {"prompt": "a lock [sim:generation_failed]"}]
    keys = [request_key(GenerationRequest.from_dict(r).to_payload()) for r in requests]
    entry = LedgerEntry(
        slots=[
            Slot(key=keys[0], remote_task_id=kept_id, outcome="success"),
            Slot(key=keys[1], remote_task_id=failed_id, outcome="generation_failed"),
        ],
        finished=True,
    )
    batch_store = DictStateStore({STATE_KEY: entry.to_dict()})
    batch = ImageBatchGenerateOperator(
        task_id="b", requests=requests, deferrable=False, poll_interval=0.1, failure_mode="return"
    )
    results = batch.execute(_context(batch_store, batch, try_number=2, cleared=True))
    assert results[0]["task_id"] == kept_id  # reused, not paid again
    assert results[1]["task_id"] != failed_id  # regenerated
    assert imagecb_simulator.stats()["submissions"] == {
        "a dam": 2,
        "a weir": 1,
        "a lock [sim:generation_failed]": 2,
    }


@pytest.mark.parametrize("failure_mode", ["raise", "return"])
def test_a_submission_whose_answer_was_lost_is_never_resent(imagecb_simulator, failure_mode):
    store = _stored("a quay", None, sending=True)
    op = _operator("a quay", failure_mode=failure_mode)
    if failure_mode == "raise":
        with pytest.raises(ImageSubmissionUncertain, match=r"(?i)check the account"):
            op.execute(_context(store, op))
    else:
        result = op.execute(_context(store, op))
        assert (result["outcome"], result["task_id"]) == ("submission_uncertain", None)
    assert imagecb_simulator.stats()["submissions_total"] == 0


def test_a_remote_task_the_api_forgot_is_not_a_dead_end(imagecb_simulator):
    """A 404 on reconnect retires the stored id: the next try (or a Clear) submits anew."""
    store = _stored("a jetty", "gone-task-id")
    op = _operator("a jetty")
    with pytest.raises(ImageCbNotFound):
        op.execute(_context(store, op, try_number=2))
    assert store[STATE_KEY]["slots"][0]["remote_task_id"] is None
    result = op.execute(_context(store, op, try_number=3))
    assert result["outcome"] == "success"
    assert result["earlier"][0]["remote_task_id"] == "gone-task-id"
    assert imagecb_simulator.stats()["submissions"] == {"a jetty": 1}


def test_submit_only_retry_returns_the_stored_id(imagecb_simulator):
    store = _stored("a bay", "task-from-try-1")
    op = _operator("a bay", wait_for_completion=False)
    assert op.execute(_context(store, op)) == "task-from-try-1"
    assert imagecb_simulator.stats()["submissions_total"] == 0
    assert store[STATE_KEY]["finished"] is True  # its work, the submission, is delivered


def test_without_a_state_store_it_warns_once_and_carries_on(imagecb_simulator, capsys):
    result = _operator("a reef").execute({})
    assert result["outcome"] == "success"
    assert capsys.readouterr().out.count("task_state_store is not available") == 1


def test_a_timeout_is_reconnected_to_by_the_retry(imagecb_simulator):
    prompt = "a moor [sim:latency=1.2]"
    store = DictStateStore()
    op = _operator(prompt, timeout=0.3, failure_mode="return")
    first = op.execute(_context(store, op, try_number=1))
    assert first["outcome"] == "timeout"
    second = _operator(prompt, failure_mode="return")
    result = second.execute(_context(store, second, try_number=2))
    assert (result["outcome"], result["task_id"]) == ("success", first["task_id"])
    assert imagecb_simulator.stats()["submissions"] == {prompt: 1}


def test_a_batch_is_paced_under_the_accounts_limit_and_resubmits_once(imagecb_simulator, monkeypatch):
    imagecb_simulator.configure(latency=0.0, rate_limit_count=4, rate_limit_window=1.0)
    conn = {**json.loads(imagecb_simulator.connection_json()), "extra": {"submissions_per_10s": 40}}
    monkeypatch.setenv("AIRFLOW_CONN_IMAGECB_DEFAULT", json.dumps(conn))  # 4 per second
    requests = [{"prompt": f"a tile {i}"} for i in range(10)] + [{"prompt": "a vase [sim:flaky]"}]
    store = DictStateStore()
    op = ImageBatchGenerateOperator(
        task_id="b",
        requests=requests,
        deferrable=False,
        poll_interval=0.1,
        resubmit_outcomes=["internal_error"],
    )
    results = op.execute(_context(store, op, try_number=1))
    assert [r["outcome"] for r in results] == ["success"] * 11
    assert results[-1]["earlier"][0]["outcome"] == "internal_error"
    stats = imagecb_simulator.stats()
    assert stats["submissions_total"] == 12  # eleven, and the one resubmission
    assert stats["rejected"].get("429", 0) == 0  # paced: never over the limit


def test_a_submission_refused_by_the_api_is_sent_again_by_the_next_try(imagecb_simulator):
    """An error answer proves nothing was created: unlike a lost answer, the next try may send it."""
    from imagecb_provider.exceptions import ImageCbServerError
    from imagecb_provider.hooks.protocol import RetryPolicy

    imagecb_simulator.inject(endpoint="generate", code=500, times=2)
    store = DictStateStore()
    op = _operator("a cliff")
    op.hook.retry_policy = RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.02, jitter=0)
    with pytest.raises(ImageCbServerError):
        op.execute(_context(store, op, try_number=1))
    slot = store[STATE_KEY]["slots"][0]
    assert (slot["sending"], slot["remote_task_id"]) == (False, None)
    retry = _operator("a cliff")
    result = retry.execute(_context(store, retry, try_number=2))
    assert result["outcome"] == "success"
    assert imagecb_simulator.stats()["submissions"] == {"a cliff": 1}


@pytest.mark.timeout(60)  # resubmitting without end would hang here
def test_a_request_failing_every_time_is_resubmitted_exactly_once(imagecb_simulator, capsys):
    prompt = "a kiln [sim:internal_error]"
    store = DictStateStore()
    op = _operator(prompt, resubmit_outcomes=["internal_error"], failure_mode="return")
    result = op.execute(_context(store, op, try_number=1))
    assert result["outcome"] == "internal_error"
    (earlier,) = result["earlier"]
    assert earlier["outcome"] == "internal_error"
    assert earlier["message"] == result["message"] != ""  # the vendor's reason is kept for each try
    assert imagecb_simulator.stats()["submissions"] == {prompt: 2}
    assert store[STATE_KEY]["slots"][0]["resubmits"] == 1
    log = capsys.readouterr().out
    assert f"Resubmitting 1 request(s) once: {earlier['remote_task_id']} ended with internal_error" in log
    assert "after -" not in log  # the API's clock stamps the end: no negative duration


def test_the_trigger_is_told_when_each_image_was_submitted(imagecb_simulator):
    """It polls an image when images lately took to render, counted from its submission."""
    from airflow.sdk.exceptions import TaskDeferred

    store = DictStateStore()
    op = ImageGenerateOperator(task_id="generate", prompt="a heron", poll_interval=30)
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(_context(store, op, try_number=1))
    trigger = deferred.value.trigger
    remote_task_id = store[STATE_KEY]["slots"][0]["remote_task_id"]
    assert list(trigger.submitted_at) == [remote_task_id]
    assert before - 1 <= trigger.submitted_at[remote_task_id] <= time.time()


@pytest.mark.timeout(60)  # polled only after its 600 s interval, the retry would hang here
def test_a_retry_polls_a_task_it_reconnects_to_at_once_whatever_its_interval(imagecb_simulator):
    remote_task_id = _submit("a kiln")
    _wait_until(lambda: ImageCbHook().get_task(remote_task_id).is_terminal)
    store = _stored("a kiln", remote_task_id)  # no submission time: no expected end to poll at
    op = _operator("a kiln", poll_interval=600)
    result = op.execute(_context(store, op))
    assert (result["task_id"], result["outcome"]) == (remote_task_id, "success")
    assert imagecb_simulator.stats()["submissions"] == {"a kiln": 1}


def test_a_submission_sent_without_an_answer_ends_uncertain_and_says_why(imagecb_simulator):
    imagecb_simulator.inject(endpoint="generate", drop=True)  # the connection closes unanswered
    store = DictStateStore()
    op = _operator("a pier", failure_mode="return")
    result = op.execute(_context(store, op, try_number=1))
    assert (result["outcome"], result["task_id"]) == ("submission_uncertain", None)
    assert re.fullmatch(
        r"Sent, but no answer came back \(\w+\) \(sent at [0-9T:.+-]+Z?\): the API may have accepted "
        r"and charged it, so it is not resent automatically\. Check the account .*",
        result["message"],
    ), result["message"]
    assert imagecb_simulator.stats()["submissions_total"] <= 1  # never sent a second time
