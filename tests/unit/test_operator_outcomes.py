"""Operator and sensor argument checks, trigger serialization, and outcome handling of events."""

from __future__ import annotations

import json
import random
import time

import pytest

from imagecb_provider.exceptions import (
    ImageCbAuthenticationError,
    ImageCbNotFound,
    ImageContentPolicyViolation,
    ImageGenerationFailed,
    ImageInternalError,
    ImageSubmissionUncertain,
    ImageTaskTimeout,
    InvalidGenerationRequest,
)
from imagecb_provider.models import GenerationRequest, Outcome, TaskRecord, TaskState, request_key
from imagecb_provider.operators.generate import ImageBatchGenerateOperator, ImageGenerateOperator
from imagecb_provider.sensors.task import ImageTaskSensor
from imagecb_provider.testing.airflow import InMemoryTaskStateStore as DictStore
from imagecb_provider.triggers.task import ImageTaskTrigger, task_event
from imagecb_provider.utils.generation import _callback_urls
from imagecb_provider.utils.ledger import STATE_KEY, LedgerEntry, Slot

REQUEST = {"prompt": "a cat", "aspectRatio": "1:1"}
KEY = request_key(REQUEST)


def _record(outcome: Outcome | None, code: int | None, task_id: str = "task-1") -> TaskRecord:
    state = {
        None: TaskState.GENERATING,
        Outcome.SUCCESS: TaskState.SUCCESS,
    }.get(outcome, TaskState.GENERATE_FAILED)
    return TaskRecord(
        task_id=task_id,
        state=state,
        outcome=outcome,
        code=code,
        message="" if code == 200 else "vendor message",
        result_image_url="http://sim/files/r.jpg" if outcome == Outcome.SUCCESS else None,
    )


def _echo(*remote_ids: str, polls: int = 1) -> dict:
    slots = [
        Slot(key=KEY, remote_task_id=r, submitted_at="2026-01-01T00:00:00+00:00", polls=polls)
        for r in remote_ids
    ]
    return LedgerEntry(slots=slots).to_dict()


def _event(status: str, records: dict, *, waited=("task-1",), polls: int = 3, error=None) -> dict:
    return task_event(
        status,
        records=records,
        polls=dict.fromkeys(waited, polls),
        error=error,
        echo=_echo(*waited),
    )


# ----------------------------------------------------------------------- the trigger
def test_trigger_serializes_to_json_safe_kwargs_and_round_trips():
    trigger = ImageTaskTrigger(
        remote_task_id="task-1", deadline=time.time() + 60, imagecb_conn_id="c", poll_interval=5
    )
    path, kwargs = trigger.serialize()
    assert path == "imagecb_provider.triggers.task.ImageTaskTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs
    rebuilt = ImageTaskTrigger(**kwargs)
    assert rebuilt.serialize() == (path, kwargs)


def test_trigger_kwargs_hold_no_secret(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps(
            {
                "conn_type": "imagecb",
                "password": "sk-secret-123456",
                "extra": {"webhook_hmac_key": "hk-123456"},
            }
        ),
    )
    _, kwargs = ImageTaskTrigger(remote_task_id="task-1", deadline=time.time(), echo=_echo("t")).serialize()
    text = json.dumps(kwargs)
    assert "sk-secret-123456" not in text
    assert "hk-123456" not in text
    assert set(kwargs) == {
        "remote_task_ids",
        "deadline",
        "imagecb_conn_id",
        "poll_interval",
        "jitter",
        "first_poll_at",
        "submitted_at",
        "wait_mode",
        "echo",
    }


def test_jittered_intervals_stay_within_ten_percent():
    random.seed(3)
    trigger = ImageTaskTrigger(remote_task_id="t", deadline=time.time() + 3600, poll_interval=30)
    waits = [trigger._interval() for _ in range(500)]
    assert min(waits) >= 27
    assert max(waits) <= 33
    assert len({round(w, 3) for w in waits}) > 100  # spread, not lockstep


def test_trigger_needs_a_task_and_a_known_wait_mode():
    with pytest.raises(ValueError, match=r"^ImageTaskTrigger needs at least one remote task id$"):
        ImageTaskTrigger(remote_task_ids=[], deadline=0)
    with pytest.raises(ValueError, match=r"^wait_mode='push': must be one of poll, callback$"):
        ImageTaskTrigger(remote_task_id="t", deadline=0, wait_mode="push")


# ---------------------------------------------------------------------- the operator
def test_bad_literal_arguments_fail_at_parse_time():
    with pytest.raises(InvalidGenerationRequest, match="aspect_ratio"):
        ImageGenerateOperator(task_id="g", prompt="a cat", aspect_ratio="2:1")
    with pytest.raises(InvalidGenerationRequest, match="prompt"):
        ImageGenerateOperator(task_id="g", prompt="")
    with pytest.raises(InvalidGenerationRequest, match="colour"):
        ImageGenerateOperator(task_id="g", request={"prompt": "x", "colour": "red"})
    with pytest.raises(ValueError, match="failure_mode='ignore'"):
        ImageGenerateOperator(task_id="g", prompt="a cat", failure_mode="ignore")
    with pytest.raises(ValueError, match="poll_interval=0"):
        ImageGenerateOperator(task_id="g", prompt="a cat", poll_interval=0)
    with pytest.raises(ValueError, match="poke_interval=-1"):
        ImageTaskSensor(task_id="s", remote_task_id="x", poke_interval=-1)
    with pytest.raises(ValueError, match="wait_mode='webhook'"):
        ImageGenerateOperator(task_id="g", prompt="a cat", wait_mode="webhook")
    with pytest.raises(ValueError, match="resubmit_outcomes"):
        ImageGenerateOperator(task_id="g", prompt="a cat", resubmit_outcomes=["success"])


def test_a_bad_request_in_a_batch_is_named_by_its_position_and_field():
    with pytest.raises(InvalidGenerationRequest, match=r"requests\[1\]\.aspect_ratio='2:1'"):
        ImageBatchGenerateOperator(
            task_id="b", requests=[{"prompt": "a"}, {"prompt": "b", "aspect_ratio": "2:1"}]
        )
    with pytest.raises(InvalidGenerationRequest, match=r"requests\[0\]"):
        ImageBatchGenerateOperator(task_id="b", requests=["a cat"])
    with pytest.raises(InvalidGenerationRequest, match="must be a list"):
        ImageBatchGenerateOperator(task_id="b", requests={"prompt": "a cat"})


def test_callback_mode_poll_interval_defaults_to_the_safety_net():
    assert ImageGenerateOperator(task_id="g", prompt="a cat").poll_interval == 30
    assert ImageGenerateOperator(task_id="g", prompt="a cat", wait_mode="callback").poll_interval == 300
    assert ImageTaskSensor(task_id="s", remote_task_id="x", wait_mode="callback").poke_interval == 300


def test_templated_arguments_are_validated_after_rendering():
    op = ImageGenerateOperator(task_id="g", prompt="{{ params.p }}", aspect_ratio="{{ params.ratio }}")
    op.prompt, op.aspect_ratio = "a cat", "2:1"  # what rendering would produce
    with pytest.raises(InvalidGenerationRequest, match="aspect_ratio"):
        op.execute({})


def test_rendered_flags_and_callback_timeouts_are_checked_before_any_submission():
    op = ImageGenerateOperator(task_id="g", prompt="a cat", deferrable="{{ params.defer }}")
    op.deferrable = "maybe"  # what rendering would produce
    with pytest.raises(ValueError, match="deferrable='maybe': must be true or false"):
        op.execute({})

    callback = ImageGenerateOperator(task_id="g", prompt="a cat", wait_mode="callback")
    callback.timeout = -1  # a rendered value: the callback token's lifetime is derived from it
    with pytest.raises(ValueError, match="timeout=-1"):
        _callback_urls(callback, {}, settings=None, indexes=[0])


def test_explicit_arguments_win_over_the_request_mapping():
    op = ImageGenerateOperator(
        task_id="g", request={"prompt": "a dog", "model": "flux-kontext-max"}, model="flux-kontext-pro"
    )
    assert op.generation_requests() == [GenerationRequest(prompt="a dog", model="flux-kontext-pro")]
    assert {"prompt", "request", "aspect_ratio", "safety_tolerance", "input_image"} <= set(op.template_fields)


OUTCOMES = [
    (Outcome.SUCCESS, 200, None),
    (Outcome.CONTENT_POLICY, 400, ImageContentPolicyViolation),
    (Outcome.INTERNAL_ERROR, 500, ImageInternalError),
    (Outcome.GENERATION_FAILED, 501, ImageGenerationFailed),
]


@pytest.mark.parametrize(("outcome", "code", "error"), OUTCOMES)
def test_execute_complete_raise_mode(outcome, code, error):
    op = ImageGenerateOperator(task_id="g", prompt="a cat", aspect_ratio="1:1")
    event = _event("done", {"task-1": _record(outcome, code)})
    if error is None:
        result = op.execute_complete({}, event)
        assert result["outcome"] == "success"
        assert result["polls"] == 4  # one before, three in this wait
        return
    with pytest.raises(error) as info:
        op.execute_complete({}, event)
    assert info.value.result["outcome"] == outcome.value
    assert "task-1" in str(info.value)
    assert "vendor message" in str(info.value)


def test_content_policy_and_uncertain_submissions_are_not_retried_but_other_failures_are():
    from airflow.sdk.exceptions import AirflowFailException

    assert issubclass(ImageContentPolicyViolation, AirflowFailException)
    assert issubclass(ImageSubmissionUncertain, AirflowFailException)
    for retryable in (ImageInternalError, ImageGenerationFailed, ImageTaskTimeout):
        assert not issubclass(retryable, AirflowFailException)


@pytest.mark.parametrize(("outcome", "code", "error"), OUTCOMES)
def test_execute_complete_return_mode_gives_the_full_result(outcome, code, error):
    store = DictStore()
    op = ImageGenerateOperator(task_id="g", prompt="a cat", aspect_ratio="1:1", failure_mode="return")
    result = op.execute_complete(
        {"task_state_store": store}, _event("done", {"task-1": _record(outcome, code)})
    )
    assert json.loads(json.dumps(result)) == result
    assert set(result) == {
        "task_id",
        "outcome",
        "code",
        "message",
        "result_image_url",
        "origin_image_url",
        "prompt",
        "request",
        "submitted_at",
        "completed_at",
        "polls",
        "via",
        "earlier",
        "input_image",
    }
    assert result["input_image"] is None  # no input image
    assert result["task_id"] == "task-1"
    assert result["outcome"] == outcome.value
    assert result["code"] == code
    assert result["message"] == ("" if code == 200 else "vendor message")
    assert result["prompt"] == "a cat"
    assert result["request"] == REQUEST
    assert result["submitted_at"] == "2026-01-01T00:00:00Z"
    assert result["completed_at"]
    assert (result["polls"], result["via"], result["earlier"]) == (4, "poll", [])
    stored = store[STATE_KEY]
    assert stored["finished"] is True
    assert stored["slots"][0]["outcome"] == outcome.value


def test_timeout_event_raises_retryable_timeout_or_returns_it():
    event = _event("timeout", {}, polls=9)
    with pytest.raises(ImageTaskTimeout):
        ImageGenerateOperator(task_id="g", prompt="a cat", aspect_ratio="1:1").execute_complete({}, event)
    result = ImageGenerateOperator(
        task_id="g", prompt="a cat", aspect_ratio="1:1", failure_mode="return"
    ).execute_complete({}, event)
    assert (result["outcome"], result["completed_at"], result["polls"]) == ("timeout", None, 10)


@pytest.mark.parametrize(("code", "error"), [(401, ImageCbAuthenticationError), (404, ImageCbNotFound)])
def test_error_events_raise_the_api_error_in_both_modes(code, error):
    details = {"remote_task_id": "task-1", "code": code, "msg": "no", "endpoint": "/x", "message": "m"}
    for mode in ("raise", "return"):
        store = DictStore()
        op = ImageGenerateOperator(task_id="g", prompt="a cat", aspect_ratio="1:1", failure_mode=mode)
        with pytest.raises(error):
            op.execute_complete({"task_state_store": store}, _event("error", {}, error=details))
        slot = store[STATE_KEY]["slots"][0]
        assert store[STATE_KEY]["finished"] is False
        if code == 404:  # gone: the next try submits anew instead of meeting the same 404 forever
            assert (slot["remote_task_id"], slot["earlier"][0]["remote_task_id"]) == (None, "task-1")
        else:  # a fixed key lets the next try reconnect to the same task
            assert slot["remote_task_id"] == "task-1"


def test_a_batch_in_raise_mode_raises_a_retryable_error_when_any_failure_is_retryable():
    requests = [{"prompt": f"p{i}"} for i in range(3)]
    op = ImageBatchGenerateOperator(task_id="b", requests=requests)
    keys = [request_key(GenerationRequest.from_dict(r).to_payload()) for r in requests]
    echo = LedgerEntry(slots=[Slot(key=k, remote_task_id=f"r{i}") for i, k in enumerate(keys)]).to_dict()
    records = {
        "r0": _record(Outcome.SUCCESS, 200, "r0"),
        "r1": _record(Outcome.CONTENT_POLICY, 400, "r1"),
        "r2": _record(Outcome.INTERNAL_ERROR, 500, "r2"),
    }
    event = task_event("done", records=records, polls=dict.fromkeys(records, 1), echo=echo)
    with pytest.raises(
        ImageInternalError, match=r"2 of 3 images failed \(1 content_policy, 1 internal_error\)"
    ):
        op.execute_complete({}, event)
    records["r2"] = _record(Outcome.SUCCESS, 200, "r2")
    event = task_event("done", records=records, polls=dict.fromkeys(records, 1), echo=echo)
    with pytest.raises(ImageContentPolicyViolation):
        op.execute_complete({}, event)
    results = ImageBatchGenerateOperator(
        task_id="b", requests=requests, failure_mode="return"
    ).execute_complete({}, event)
    assert [r["outcome"] for r in results] == ["success", "content_policy", "success"]
    assert [r["prompt"] for r in results] == ["p0", "p1", "p2"]


def test_sensor_builds_the_request_from_the_record_params():
    record = _record(Outcome.SUCCESS, 200)
    record = TaskRecord.from_dict(
        {**record.to_dict(), "params": {"prompt": "a fox", "callBackUrl": "http://cb"}}
    )
    sensor = ImageTaskSensor(task_id="s", remote_task_id="task-1", failure_mode="return")
    result = sensor.execute_complete({}, _event("done", {"task-1": record}, polls=2))
    assert result["prompt"] == "a fox"
    assert result["request"] == {"prompt": "a fox"}
    assert result["polls"] == 2


def test_the_result_says_an_ending_was_learned_from_a_callback():
    op = ImageGenerateOperator(task_id="g", prompt="a cat", aspect_ratio="1:1", wait_mode="callback")
    event = task_event(
        "done",
        records={"task-1": _record(Outcome.SUCCESS, 200)},
        polls={"task-1": 0},
        via={"task-1": "callback"},
        echo=_echo("task-1", polls=0),
    )
    result = op.execute_complete({"task_state_store": DictStore()}, event)
    assert (result["via"], result["polls"]) == ("callback", 0)


def test_a_callback_url_outlives_the_wait_by_the_vendors_retry_window():
    from types import SimpleNamespace

    from imagecb_provider.callbacks.tokens import EXPIRY_STEP, VENDOR_RETRY_WINDOW, CallbackToken
    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

    settings = ImageCbConnectionSettings(
        conn_id="imagecb_default", base_url="http://sim", api_key="k", callback_base_url="https://af.example"
    )
    ti = SimpleNamespace(dag_id="d", run_id="r", task_id="t", map_index=2)
    op = ImageGenerateOperator(task_id="g", prompt="a cat", wait_mode="callback", timeout=3600)
    before = time.time()
    urls = _callback_urls(op, {"ti": ti}, settings, indexes=[0, 1])
    claims = {i: CallbackToken.verify(url.rsplit("/", 1)[1]) for i, url in urls.items()}
    assert {i: c.slot for i, c in claims.items()} == {0: 0, 1: 1}
    # A late callback still wakes the task: the vendor retries after the wait has ended.
    expiry = before + 3600 + VENDOR_RETRY_WINDOW  # rounded up to a step, so a task's URLs share a grant
    assert all(expiry - 1 <= c.expires_at <= expiry + EXPIRY_STEP + 60 for c in claims.values())
