"""Operator and sensor argument checks, trigger serialization, and outcome handling of events."""

from __future__ import annotations

import json
import time

import pytest

from imagecb_provider.exceptions import (
    ImageCbAuthenticationError,
    ImageCbNotFound,
    ImageContentPolicyViolation,
    ImageGenerationFailed,
    ImageInternalError,
    ImageTaskTimeout,
    InvalidGenerationRequest,
)
from imagecb_provider.models import GenerationRequest, Outcome, TaskRecord, TaskState
from imagecb_provider.operators.generate import ImageGenerateOperator
from imagecb_provider.sensors.task import ImageTaskSensor
from imagecb_provider.triggers.task import ImageTaskTrigger

SUBMISSION = {
    "remote_task_id": "task-1",
    "request": {"prompt": "a cat", "aspectRatio": "1:1"},
    "submitted_at": "2026-01-01T00:00:00+00:00",
    "polls": 1,
}


def _record(outcome: Outcome | None, code: int | None) -> dict:
    state = {
        None: TaskState.GENERATING,
        Outcome.SUCCESS: TaskState.SUCCESS,
    }.get(outcome, TaskState.GENERATE_FAILED)
    return TaskRecord(
        task_id="task-1",
        state=state,
        outcome=outcome,
        code=code,
        message="" if code == 200 else "vendor message",
        result_image_url="http://sim/files/r.jpg" if outcome == Outcome.SUCCESS else None,
    ).to_dict()


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
    _, kwargs = ImageTaskTrigger(remote_task_id="task-1", deadline=time.time()).serialize()
    text = json.dumps(kwargs)
    assert "sk-secret-123456" not in text
    assert "hk-123456" not in text
    assert set(kwargs) == {
        "remote_task_id",
        "deadline",
        "imagecb_conn_id",
        "poll_interval",
        "jitter",
        "submission",
    }


def test_jittered_waits_stay_within_ten_percent_and_never_pass_the_deadline():
    trigger = ImageTaskTrigger(remote_task_id="t", deadline=time.time() + 3600, poll_interval=30)
    waits = [trigger._next_wait() for _ in range(500)]
    assert min(waits) >= 27
    assert max(waits) <= 33
    assert len({round(w, 3) for w in waits}) > 100  # spread, not lockstep
    near = ImageTaskTrigger(remote_task_id="t", deadline=time.time() + 2, poll_interval=30)
    assert near._next_wait() <= 2


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


def test_templated_arguments_are_validated_after_rendering():
    op = ImageGenerateOperator(task_id="g", prompt="{{ params.p }}", aspect_ratio="{{ params.ratio }}")
    op.prompt, op.aspect_ratio = "a cat", "2:1"  # what rendering would produce
    with pytest.raises(InvalidGenerationRequest, match="aspect_ratio"):
        op.generation_request()


def test_explicit_arguments_win_over_the_request_mapping():
    op = ImageGenerateOperator(
        task_id="g", request={"prompt": "a dog", "model": "flux-kontext-max"}, model="flux-kontext-pro"
    )
    assert op.generation_request() == GenerationRequest(prompt="a dog", model="flux-kontext-pro")
    assert {"prompt", "request", "aspect_ratio", "safety_tolerance", "input_image"} <= set(op.template_fields)


OUTCOMES = [
    (Outcome.SUCCESS, 200, None),
    (Outcome.CONTENT_POLICY, 400, ImageContentPolicyViolation),
    (Outcome.INTERNAL_ERROR, 500, ImageInternalError),
    (Outcome.GENERATION_FAILED, 501, ImageGenerationFailed),
]


@pytest.mark.parametrize(("outcome", "code", "error"), OUTCOMES)
def test_execute_complete_raise_mode(outcome, code, error):
    op = ImageGenerateOperator(task_id="g", prompt="a cat")
    event = {"status": "done", "record": _record(outcome, code), "polls": 3, "submission": SUBMISSION}
    if error is None:
        result = op.execute_complete({}, event)
        assert result["outcome"] == "success"
        assert result["polls"] == 4
        return
    with pytest.raises(error) as info:
        op.execute_complete({}, event)
    assert info.value.result["outcome"] == outcome.value
    assert "task-1" in str(info.value)
    assert "vendor message" in str(info.value)


def test_content_policy_is_not_retried_but_other_failures_are():
    from airflow.sdk.exceptions import AirflowFailException

    assert issubclass(ImageContentPolicyViolation, AirflowFailException)
    for retryable in (ImageInternalError, ImageGenerationFailed, ImageTaskTimeout):
        assert not issubclass(retryable, AirflowFailException)


@pytest.mark.parametrize(("outcome", "code", "error"), OUTCOMES)
def test_execute_complete_return_mode_gives_the_full_result(outcome, code, error):
    op = ImageGenerateOperator(task_id="g", prompt="a cat", failure_mode="return")
    result = op.execute_complete(
        {}, {"status": "done", "record": _record(outcome, code), "polls": 2, "submission": SUBMISSION}
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
    }
    assert result["task_id"] == "task-1"
    assert result["outcome"] == outcome.value
    assert result["code"] == code
    assert result["prompt"] == "a cat"
    assert result["request"] == SUBMISSION["request"]
    assert result["submitted_at"] == "2026-01-01T00:00:00Z"
    assert result["completed_at"]
    assert (result["polls"], result["via"]) == (3, "poll")


def test_timeout_event_raises_retryable_timeout_or_returns_it():
    event = {"status": "timeout", "record": _record(None, None), "polls": 9, "submission": SUBMISSION}
    with pytest.raises(ImageTaskTimeout):
        ImageGenerateOperator(task_id="g", prompt="a cat").execute_complete({}, event)
    result = ImageGenerateOperator(task_id="g", prompt="a cat", failure_mode="return").execute_complete(
        {}, event
    )
    assert (result["outcome"], result["completed_at"], result["polls"]) == ("timeout", None, 10)


@pytest.mark.parametrize(("code", "error"), [(401, ImageCbAuthenticationError), (404, ImageCbNotFound)])
def test_error_events_raise_the_api_error_in_both_modes(code, error):
    event = {
        "status": "error",
        "code": code,
        "msg": "no",
        "endpoint": "/x",
        "polls": 1,
        "message": "m",
        "submission": SUBMISSION,
    }
    for mode in ("raise", "return"):
        with pytest.raises(error):
            ImageGenerateOperator(task_id="g", prompt="a cat", failure_mode=mode).execute_complete({}, event)


def test_sensor_builds_the_request_from_the_record_params():
    record = {**_record(Outcome.SUCCESS, 200), "params": {"prompt": "a fox", "callBackUrl": "http://cb"}}
    sensor = ImageTaskSensor(task_id="s", remote_task_id="task-1", failure_mode="return")
    result = sensor.execute_complete(
        {}, {"status": "done", "record": record, "polls": 2, "submission": sensor._submission()}
    )
    assert result["prompt"] == "a fox"
    assert result["request"] == {"prompt": "a fox"}
