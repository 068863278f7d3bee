"""GenerationRequest validation and mapping; TaskRecord normalization of both API shapes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from imagecb_provider.exceptions import InvalidGenerationRequest
from imagecb_provider.models import (
    MAX_PROMPT_LENGTH,
    GenerationRequest,
    Outcome,
    TaskRecord,
    TaskState,
    parse_timestamp,
)

FULL_REQUEST = {
    "prompt": "a red bicycle against a white wall",
    "enable_translation": False,
    "upload_cn": True,
    "input_image": "https://example.com/in.png",
    "aspect_ratio": "4:3",
    "output_format": "png",
    "prompt_upsampling": True,
    "model": "flux-kontext-max",
    "callback_url": "https://airflow.example.com/imagecb/callback",
    "safety_tolerance": 1,
    "watermark": "acme",
}


def test_every_field_maps_to_its_camel_case_name():
    payload = GenerationRequest(**FULL_REQUEST).to_payload()
    assert payload == {
        "prompt": "a red bicycle against a white wall",
        "enableTranslation": False,
        "uploadCn": True,
        "inputImage": "https://example.com/in.png",
        "aspectRatio": "4:3",
        "outputFormat": "png",
        "promptUpsampling": True,
        "model": "flux-kontext-max",
        "callBackUrl": "https://airflow.example.com/imagecb/callback",
        "safetyTolerance": 1,
        "watermark": "acme",
    }


def test_unset_fields_are_omitted_and_callback_can_be_left_out():
    request = GenerationRequest(prompt="x", callback_url="http://h/cb")
    assert request.to_payload() == {"prompt": "x", "callBackUrl": "http://h/cb"}
    assert request.to_payload(include_callback=False) == {"prompt": "x"}


def test_strings_from_templates_and_csv_are_coerced():
    request = GenerationRequest(
        prompt="  padded  ",
        safety_tolerance="5",
        enable_translation="false",
        prompt_upsampling="Yes",
        aspect_ratio="16:9",
        model="FLUX-KONTEXT-PRO",
        output_format="",
        watermark="",
    )
    assert request.prompt == "padded"
    assert request.safety_tolerance == 5
    assert request.enable_translation is False
    assert request.prompt_upsampling is True
    assert request.model == "flux-kontext-pro"
    assert request.output_format is None
    assert request.watermark is None


def test_from_dict_round_trips_and_rejects_unknown_keys():
    request = GenerationRequest.from_dict(FULL_REQUEST)
    assert GenerationRequest.from_dict(request.to_dict()) == request
    with pytest.raises(InvalidGenerationRequest, match=r"colour.*not a request field") as info:
        GenerationRequest.from_dict({"prompt": "x", "colour": "red"})
    assert info.value.field == "colour"


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"prompt": ""}, "prompt", "non-empty"),
        ({"prompt": "   "}, "prompt", "non-empty"),
        ({"prompt": None}, "prompt", "non-empty"),
        ({"prompt": 42}, "prompt", "non-empty"),
        ({"prompt": "x" * (MAX_PROMPT_LENGTH + 1)}, "prompt", f"at most {MAX_PROMPT_LENGTH}"),
        ({"aspect_ratio": "2:1"}, "aspect_ratio", "one of 21:9, 16:9, 4:3, 1:1, 3:4, 9:16"),
        ({"output_format": "gif"}, "output_format", "one of jpeg, png"),
        ({"model": "flux-dev"}, "model", "one of flux-kontext-pro, flux-kontext-max"),
        ({"safety_tolerance": 7}, "safety_tolerance", "0 to 6 when generating"),
        ({"safety_tolerance": -1}, "safety_tolerance", "0 to 6 when generating"),
        ({"safety_tolerance": "high"}, "safety_tolerance", "whole number"),
        ({"safety_tolerance": True}, "safety_tolerance", "whole number"),
        (
            {"safety_tolerance": 3, "input_image": "https://e.com/a.png"},
            "safety_tolerance",
            "0 to 2 when editing",
        ),
        ({"input_image": "nosuch://b/k.png"}, "input_image", "http:// or https://"),
        ({"input_image": "ftp://e.com/a.png"}, "input_image", "http:// or https://"),
        ({"callback_url": "file:///etc/passwd"}, "callback_url", "http:// or https://"),
        ({"callback_url": "https://exa mple.com/cb"}, "callback_url", "http:// or https://"),
        ({"enable_translation": "maybe"}, "enable_translation", "true or false"),
        ({"upload_cn": 2}, "upload_cn", "true or false"),
        ({"prompt_upsampling": "sometimes"}, "prompt_upsampling", "true or false"),
        ({"watermark": 12}, "watermark", "string of at most"),
    ],
)
def test_each_invalid_field_is_named_with_value_and_what_is_allowed(fields, field, message):
    with pytest.raises(InvalidGenerationRequest) as info:
        GenerationRequest(**{"prompt": "ok", **fields})
    assert info.value.field == field
    assert f"Invalid {field}=" in str(info.value)
    assert message in str(info.value)


RECORD = {
    "taskId": "task12345",
    "paramJson": '{"prompt":"a cat","aspectRatio":"16:9"}',
    "completeTime": "2024-03-20T10:30:00Z",
    "response": {"originImageUrl": "https://x/o.jpg", "resultImageUrl": "https://x/r.jpg"},
    "successFlag": 1,
    "errorCode": None,
    "errorMessage": "",
    "createTime": "2024-03-20T10:25:00Z",
}


def test_record_info_success_is_normalized():
    record = TaskRecord.from_record_info(RECORD)
    assert record.task_id == "task12345"
    assert record.state is TaskState.SUCCESS
    assert record.outcome is Outcome.SUCCESS
    assert record.code == 200
    assert record.result_image_url == "https://x/r.jpg"
    assert record.origin_image_url == "https://x/o.jpg"
    assert record.created_at == datetime(2024, 3, 20, 10, 25, tzinfo=UTC)
    assert record.completed_at == datetime(2024, 3, 20, 10, 30, tzinfo=UTC)
    assert record.params == {"prompt": "a cat", "aspectRatio": "16:9"}


@pytest.mark.parametrize("response", [None, {}, "missing"])
def test_generating_record_has_no_outcome_whatever_response_looks_like(response):
    data = {**RECORD, "successFlag": 0, "completeTime": None}
    if response == "missing":
        del data["response"]
    else:
        data["response"] = response
    record = TaskRecord.from_record_info(data)
    assert record.state is TaskState.GENERATING
    assert record.outcome is None
    assert not record.is_terminal
    assert record.result_image_url is None
    assert record.completed_at is None


@pytest.mark.parametrize(
    ("flag", "error_code", "state", "outcome"),
    [
        (3, 400, TaskState.GENERATE_FAILED, Outcome.CONTENT_POLICY),
        (3, 500, TaskState.GENERATE_FAILED, Outcome.INTERNAL_ERROR),
        (3, 408, TaskState.GENERATE_FAILED, Outcome.INTERNAL_ERROR),
        (3, 501, TaskState.GENERATE_FAILED, Outcome.GENERATION_FAILED),
        (3, None, TaskState.GENERATE_FAILED, Outcome.GENERATION_FAILED),
        (2, None, TaskState.CREATE_FAILED, Outcome.INTERNAL_ERROR),
        (2, 400, TaskState.CREATE_FAILED, Outcome.CONTENT_POLICY),
        (2, "500", TaskState.CREATE_FAILED, Outcome.INTERNAL_ERROR),
    ],
)
def test_failure_codes_map_to_outcomes(flag, error_code, state, outcome):
    record = TaskRecord.from_record_info(
        {**RECORD, "successFlag": flag, "errorCode": error_code, "errorMessage": "nope", "response": None}
    )
    assert (record.state, record.outcome, record.message) == (state, outcome, "nope")


def test_epoch_millisecond_timestamps_are_read_like_iso_ones():
    iso = TaskRecord.from_record_info(RECORD)
    epoch = TaskRecord.from_record_info(
        {**RECORD, "createTime": 1710930300000, "completeTime": "1710930600000"}
    )
    assert (epoch.created_at, epoch.completed_at) == (iso.created_at, iso.completed_at)
    assert epoch.created_at.tzinfo is not None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-20T10:30:00Z", datetime(2024, 3, 20, 10, 30, tzinfo=UTC)),
        ("2024-03-20T12:30:00+02:00", datetime(2024, 3, 20, 10, 30, tzinfo=UTC)),
        ("2024-03-20 10:30:00", datetime(2024, 3, 20, 10, 30, tzinfo=UTC)),
        (1710930600000, datetime(2024, 3, 20, 10, 30, tzinfo=UTC)),
        (1710930600, datetime(2024, 3, 20, 10, 30, tzinfo=UTC)),
        (None, None),
        ("", None),
        (0, None),
        ("garbage", None),
    ],
)
def test_parse_timestamp_accepts_both_documented_forms(value, expected):
    assert parse_timestamp(value) == expected


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (400, Outcome.CONTENT_POLICY),
        (500, Outcome.INTERNAL_ERROR),
        (501, Outcome.GENERATION_FAILED),
    ],
)
def test_callback_bodies_are_normalized(code, outcome):
    ok = code == 200
    body = {
        "code": code,
        "msg": "BFL image generated successfully." if ok else "failed",
        "data": {
            "taskId": "task12345",
            "info": {
                "originImageUrl": "https://x/o.jpg" if ok else "",
                "resultImageUrl": "https://x/r.jpg" if ok else "",
            },
        },
    }
    record = TaskRecord.from_callback(body)
    assert record.task_id == "task12345"
    assert record.outcome is outcome
    assert record.code == code
    assert record.result_image_url == ("https://x/r.jpg" if ok else None)


def test_callback_task_id_is_also_read_from_snake_case():
    assert TaskRecord.from_callback({"code": 200, "data": {"task_id": "t9"}}).task_id == "t9"


def test_record_round_trips_through_its_json_form():
    import json

    record = TaskRecord.from_record_info(RECORD)
    assert TaskRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
