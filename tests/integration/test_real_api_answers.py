"""
The vendor's real answers over real HTTP: the hooks, the generate operators and the simulator.

Each case forces an answer the vendor is known to give (docs/api-fidelity.md): through
``inject(...)``, which any simulator has, or through the simulator's options that follow the
vendor (``unknown_record``, ``timestamp_format="space"``, ``null_strings``, ``forget``).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import requests

from imagecb_provider.exceptions import ImageCbNotFound, ImageCbValidationError, ImageGenerationFailed
from imagecb_provider.hooks.imagecb import ImageCbAsyncHook, ImageCbHook
from imagecb_provider.hooks.protocol import RetryPolicy
from imagecb_provider.models import GenerationRequest, Outcome, TaskRecord, TaskState, request_key
from imagecb_provider.operators.generate import ImageBatchGenerateOperator, ImageGenerateOperator
from imagecb_provider.testing.airflow import InMemoryTaskStateStore
from imagecb_provider.utils.ledger import STATE_KEY, LedgerEntry, Slot

pytestmark = pytest.mark.timeout(120)

RECORD_INFO = "/api/v1/flux/kontext/record-info"
#: The three ways the API says it does not know a task, as ``inject`` forces them (code, msg).
UNKNOWN_ANSWERS = {
    "http-404": (404, "Task not found"),
    "200-422": (422, "The record does not exist"),
    "200-422-upper": (422, "THE RECORD DOES NOT EXIST"),
    "200-422-task": (422, "task does not exist"),
    "200-422-null": (422, "record is null"),  # the vendor's own 422 text on the 4o download-url
    "200-data-null": (200, "success"),  # an injected 200 carries data: null
}


class Waits(list):
    """Records the retry waits instead of sleeping them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def hook(imagecb_simulator, waits) -> ImageCbHook:
    return ImageCbHook(retry_policy=RetryPolicy(max_attempts=4, initial_delay=0.01, jitter=0, sleep=waits))


def _requests(sim, endpoint: str) -> int:
    return sim.stats(tasks=False)["requests"].get(endpoint, 0)


# --------------------------------------------------------------------- unknown task: the hook
@pytest.mark.parametrize("form", list(UNKNOWN_ANSWERS))
def test_get_task_on_a_task_the_api_does_not_know_takes_the_404_path_naming_it(
    hook, imagecb_simulator, waits, form
):
    code, msg = UNKNOWN_ANSWERS[form]
    imagecb_simulator.inject(endpoint="record-info", code=code, msg=msg, http_status=form == "http-404")
    with pytest.raises(ImageCbNotFound) as info:
        hook.get_task("gone_task_42")
    assert info.value.code == 404  # the one code the operators read as "unknown task"
    assert "remote task gone_task_42 is unknown to the API" in str(info.value)
    assert (waits, _requests(imagecb_simulator, "record-info")) == ([], 1)  # not retried


@pytest.mark.parametrize("form", ["200-422", "200-data-null"])
def test_the_async_hook_reads_an_unknown_task_the_same_way(imagecb_simulator, waits, form):
    code, msg = UNKNOWN_ANSWERS[form]
    imagecb_simulator.inject(endpoint="record-info", code=code, msg=msg)
    hook = ImageCbAsyncHook(retry_policy=RetryPolicy(max_attempts=4, sleep=waits))
    with pytest.raises(ImageCbNotFound, match="remote task gone_task_43 is unknown"):
        asyncio.run(hook.get_task("gone_task_43"))


@pytest.mark.parametrize("unknown_record", ["404", "422", "null"])
def test_the_simulator_answers_an_unknown_task_in_each_vendor_form(hook, imagecb_simulator, unknown_record):
    imagecb_simulator.configure(unknown_record=unknown_record)
    raw = requests.get(
        imagecb_simulator.url + RECORD_INFO,
        params={"taskId": "nope"},
        headers={"Authorization": "Bearer test-key"},
        timeout=10,
    ).json()
    expected = {
        "404": {"code": 404, "msg": "Task not found: taskId 'nope' does not exist", "data": None},
        "422": {"code": 422, "msg": "The record does not exist", "data": None},
        "null": {"code": 200, "msg": "success", "data": None},
    }[unknown_record]
    assert raw == expected
    with pytest.raises(ImageCbNotFound, match="remote task nope is unknown"):
        hook.get_task("nope")


def test_the_default_unknown_form_is_the_one_third_party_clients_report(imagecb_simulator):
    assert imagecb_simulator.config.unknown_record == "422"


def test_a_422_with_another_message_stays_a_validation_error_naming_the_task(hook, imagecb_simulator):
    imagecb_simulator.inject(endpoint="record-info", code=422, msg="taskId is malformed")
    with pytest.raises(ImageCbValidationError) as info:
        hook.get_task("t_77")
    assert "taskId is malformed (record-info of remote task t_77)" in str(info.value)


def test_a_forgotten_task_is_unknown(hook, imagecb_simulator):
    task_id = hook.submit(GenerationRequest(prompt="a tern"))
    imagecb_simulator.forget(task_id)
    with pytest.raises(ImageCbNotFound, match=f"remote task {task_id} is unknown"):
        hook.get_task(task_id)
    with pytest.raises(ValueError, match="no task"):
        imagecb_simulator.forget(task_id)


# ------------------------------------------------------------------------- 501 and 408: hook
def test_501_on_record_info_ends_the_task_generation_failed(hook, imagecb_simulator, waits):
    task_id = hook.submit(GenerationRequest(prompt="a crane"))
    imagecb_simulator.inject(endpoint="record-info", code=501, msg="Generation Failed")
    record = hook.get_task(task_id)
    assert (record.task_id, record.state) == (task_id, TaskState.GENERATE_FAILED)
    assert (record.outcome, record.code, record.message) == (
        Outcome.GENERATION_FAILED,
        501,
        "Generation Failed",
    )
    assert (waits, _requests(imagecb_simulator, "record-info")) == ([], 1)


def test_408_on_record_info_is_retried_as_transient(hook, imagecb_simulator, waits):
    imagecb_simulator.configure(latency=0.0)
    task_id = hook.submit(GenerationRequest(prompt="a gull"))
    imagecb_simulator.inject(endpoint="record-info", code=408, times=2)
    assert hook.get_task(task_id).outcome is Outcome.SUCCESS
    assert (len(waits), _requests(imagecb_simulator, "record-info")) == (2, 3)


def test_408_on_record_info_is_retried_by_the_async_hook_too(imagecb_simulator, waits):
    imagecb_simulator.configure(latency=0.0)
    task_id = ImageCbHook().submit(GenerationRequest(prompt="a skua"))
    imagecb_simulator.inject(endpoint="record-info", code=408, times=2)
    hook = ImageCbAsyncHook(retry_policy=RetryPolicy(max_attempts=4, sleep=waits))
    assert asyncio.run(hook.get_task(task_id)).outcome is Outcome.SUCCESS
    assert len(waits) == 2


@pytest.mark.parametrize(("code", "outcome"), [(501, "generation_failed"), (408, "internal_error")])
def test_a_submission_answered_with_an_outcome_code_is_sent_once(
    hook, imagecb_simulator, waits, code, outcome
):
    from imagecb_provider.exceptions import ImageCbOutcomeAnswer

    imagecb_simulator.inject(endpoint="generate", code=code, times=10)
    with pytest.raises(ImageCbOutcomeAnswer) as info:
        hook.submit(GenerationRequest(prompt="a tit"))
    assert (info.value.code, info.value.outcome) == (code, outcome)
    assert (waits, _requests(imagecb_simulator, "generate")) == ([], 1)


# ---------------------------------------------------------------- the generate operators
def _operator(prompt: str, **kwargs) -> ImageGenerateOperator:
    op = ImageGenerateOperator(
        task_id="generate", prompt=prompt, deferrable=False, **{"poll_interval": 0.1, **kwargs}
    )
    op.hook.retry_policy = RetryPolicy(max_attempts=6, initial_delay=0.01, max_delay=0.02, jitter=0)
    return op


def _context(store, op, *, try_number: int, retries: int = 2, cleared: bool = False) -> dict:
    """A context for a retry, or (``cleared``) for the first try of a rerun cleared from the UI."""
    op.retries = retries
    max_tries = try_number - 1 + retries if cleared else retries
    ti = SimpleNamespace(
        try_number=try_number, max_tries=max_tries, dag_id="d", run_id="r", task_id="t", map_index=-1
    )
    return {"task_state_store": store, "ti": ti, "task": op}


def test_501_on_submit_is_sent_once_ends_generation_failed_and_the_retry_sends_it_again(imagecb_simulator):
    imagecb_simulator.inject(endpoint="generate", code=501, msg="Generation Failed")
    store = InMemoryTaskStateStore()
    op = _operator("a kite", failure_mode="return")
    result = op.execute(_context(store, op, try_number=1))
    assert (result["outcome"], result["task_id"], result["code"]) == ("generation_failed", None, 501)
    assert result["message"].startswith("Generation Failed (the API answered 501 to the submission")
    assert _requests(imagecb_simulator, "generate") == 1  # not resent by the transient retry
    slot = store[STATE_KEY]["slots"][0]
    assert (slot["remote_task_id"], slot["sending"], slot["outcome"], slot["code"]) == (
        None,
        False,
        "generation_failed",
        501,
    )
    assert store[STATE_KEY]["finished"] is True

    retry = _operator("a kite", failure_mode="return")
    again = retry.execute(_context(store, retry, try_number=2))
    assert (again["outcome"], again["code"]) == ("success", 200)
    assert _requests(imagecb_simulator, "generate") == 2
    assert imagecb_simulator.stats()["submissions"] == {"a kite": 1}


def test_a_prompt_answered_501_twice_is_sent_once_per_try_not_twelve_times(imagecb_simulator):
    """Before 501 was an outcome, this prompt was sent 6 times per try, 12 over two tries."""
    imagecb_simulator.inject(endpoint="generate", code=501, times=20)
    store = InMemoryTaskStateStore()
    for try_number in (1, 2):
        op = _operator("a wren")
        with pytest.raises(ImageGenerationFailed, match="generation_failed"):  # retryable: Airflow retries
            op.execute(_context(store, op, try_number=try_number))
    assert _requests(imagecb_simulator, "generate") == 2


def test_a_batch_reports_a_request_answered_501_and_waits_for_the_others(imagecb_simulator):
    imagecb_simulator.inject(endpoint="generate", code=501)  # the first request sent: request 0
    store = InMemoryTaskStateStore()
    op = ImageBatchGenerateOperator(
        task_id="b",
        requests=[{"prompt": "a rook"}, {"prompt": "a jay"}],
        deferrable=False,
        poll_interval=0.1,
        failure_mode="return",
        resubmit_outcomes=["generation_failed"],
    )
    op.hook.retry_policy = RetryPolicy(max_attempts=6, initial_delay=0.01, max_delay=0.02, jitter=0)
    results = op.execute(_context(store, op, try_number=1))
    assert [(r["outcome"], r["task_id"] is None) for r in results] == [
        ("generation_failed", True),
        ("success", False),
    ]
    assert _requests(imagecb_simulator, "generate") == 2  # one each: the 501 was not resent


def test_408_on_submit_ends_internal_error_without_resending(imagecb_simulator):
    imagecb_simulator.inject(endpoint="generate", code=408, times=10)
    store = InMemoryTaskStateStore()
    op = _operator("a lark", failure_mode="return")
    result = op.execute(_context(store, op, try_number=1))
    assert (result["outcome"], result["task_id"], result["code"]) == ("internal_error", None, 408)
    assert _requests(imagecb_simulator, "generate") == 1


# ------------------------------------------------------ unknown task: the submission ledger
def _stored(prompt: str, remote_task_id: str) -> InMemoryTaskStateStore:
    key = request_key(GenerationRequest(prompt=prompt).to_payload())
    entry = LedgerEntry(slots=[Slot(key=key, remote_task_id=remote_task_id)])
    return InMemoryTaskStateStore({STATE_KEY: entry.to_dict()})


def test_a_reconnect_answered_200_422_retires_the_slot_and_the_next_try_submits_anew(imagecb_simulator):
    remote_id = ImageCbHook().submit(GenerationRequest(prompt="a swift"))
    store = _stored("a swift", remote_id)
    imagecb_simulator.inject(endpoint="record-info", code=422, msg="The record does not exist")
    op = _operator("a swift")
    with pytest.raises(ImageCbNotFound, match=f"remote task {remote_id} is unknown"):
        op.execute(_context(store, op, try_number=2))
    slot = store[STATE_KEY]["slots"][0]
    assert slot["remote_task_id"] is None
    assert slot["earlier"][0]["remote_task_id"] == remote_id
    result = _operator("a swift").execute(_context(store, op, try_number=3))
    assert result["outcome"] == "success"
    assert result["task_id"] != remote_id
    assert imagecb_simulator.stats()["submissions"] == {"a swift": 2}


@pytest.mark.parametrize("unknown_record", ["404", "422", "null"])
def test_a_batch_whose_remote_task_became_unknown_retires_it_and_the_next_try_completes(
    imagecb_simulator, unknown_record
):
    imagecb_simulator.configure(latency=0.0, unknown_record=unknown_record)
    requests_ = [{"prompt": "a cove"}, {"prompt": "a spit"}]
    store = InMemoryTaskStateStore()

    def batch() -> ImageBatchGenerateOperator:
        return ImageBatchGenerateOperator(
            task_id="b", requests=requests_, deferrable=False, poll_interval=0.1, failure_mode="return"
        )

    op = batch()
    first = op.execute(_context(store, op, try_number=1))
    assert [r["outcome"] for r in first] == ["success", "success"]
    kept, gone = first[0]["task_id"], first[1]["task_id"]
    imagecb_simulator.forget(gone)  # its record expired on the vendor's side
    polled_before = imagecb_simulator.stats()["status_calls"][gone]

    op = batch()  # a rerun cleared from the UI reconnects to both successes
    with pytest.raises(ImageCbNotFound, match=f"remote task {gone} is unknown to the API"):
        op.execute(_context(store, op, try_number=2, cleared=True))
    slots = store[STATE_KEY]["slots"]
    assert (slots[0]["remote_task_id"], slots[1]["remote_task_id"]) == (kept, None)
    assert slots[1]["earlier"][0]["remote_task_id"] == gone

    op = batch()  # the next try: no endless failure
    results = op.execute(_context(store, op, try_number=3, cleared=True))
    assert [r["outcome"] for r in results] == ["success", "success"]
    assert results[0]["task_id"] == kept
    assert results[1]["task_id"] not in (gone, None)
    assert results[1]["earlier"][0]["remote_task_id"] == gone
    stats = imagecb_simulator.stats()
    assert stats["submissions"] == {"a cove": 1, "a spit": 2}
    assert stats["status_calls"][gone] == polled_before + 1  # the call that found it gone; never again


# ------------------------------------------------------ timestamps and "null" strings, live
def test_the_space_timestamp_form_is_read_as_utc(hook, imagecb_simulator):
    imagecb_simulator.configure(latency=0.0, timestamp_format="space")
    task_id = hook.submit(GenerationRequest(prompt="a finch"))
    raw = requests.get(
        imagecb_simulator.url + RECORD_INFO,
        params={"taskId": task_id},
        headers={"Authorization": "Bearer test-key"},
        timeout=10,
    ).json()["data"]
    assert len(raw["createTime"]) == 19
    assert raw["createTime"][10] == " "
    record = hook.get_task(task_id)
    assert record.created_at.utcoffset().total_seconds() == 0
    assert record.created_at.strftime("%Y-%m-%d %H:%M:%S") == raw["createTime"]
    assert 0 <= (record.completed_at - record.created_at).total_seconds() < 5


def test_null_strings_in_records_read_as_absent(hook, imagecb_simulator):
    imagecb_simulator.configure(latency=0.0, null_strings=True)
    held = hook.submit(GenerationRequest(prompt="a plover [sim:hold]"))
    failed = hook.submit(GenerationRequest(prompt="a snipe [sim:generation_failed]"))
    generating = hook.get_task(held)
    assert (generating.state, generating.completed_at, generating.code) == (TaskState.GENERATING, None, None)
    assert (generating.result_image_url, generating.message) == (None, "")
    record = hook.get_task(failed)
    assert (record.outcome, record.code) == (Outcome.GENERATION_FAILED, 501)
    assert (record.result_image_url, record.origin_image_url) == (None, None)


def test_null_strings_in_callback_bodies_read_as_absent():
    from imagecb_provider.testing.simulator.callbacks import callback_payload
    from imagecb_provider.testing.simulator.markers import OUTCOMES
    from imagecb_provider.testing.simulator.state import Task

    task = Task(
        task_id="f" * 32,
        prompt="p",
        model="flux-kontext-pro",
        params={},
        callback_url="http://cb",
        created=0.0,
        complete_at=1.0,
        outcome=OUTCOMES["internal_error"],
        duplicate_callback=False,
        base_url="http://sim/",
    )
    body = callback_payload(task, {"originImageUrl": "u", "resultImageUrl": "u"}, null_strings=True)
    assert body["data"]["info"] == {"originImageUrl": "null", "resultImageUrl": "null"}
    record = TaskRecord.from_callback(body)
    assert (record.outcome, record.result_image_url, record.origin_image_url) == (
        Outcome.INTERNAL_ERROR,
        None,
        None,
    )


@pytest.mark.parametrize("kind", ["501", "408"])
def test_501_and_408_are_fault_kinds_of_the_simulator(imagecb_simulator, kind):
    imagecb_simulator.configure(fault_rate=1.0, fault_kinds=[kind], fault_endpoints=["credit"])
    answer = requests.get(
        imagecb_simulator.url + "/api/v1/chat/credit",
        headers={"Authorization": "Bearer test-key"},
        timeout=10,
    ).json()
    assert answer["code"] == int(kind)
