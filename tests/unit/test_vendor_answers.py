"""
The vendor's real answers, as the wire review found them (docs/api-fidelity.md), read without HTTP.

Record-info for a task the API does not know comes in three forms; 501 and 408 are outcomes, not
call errors; timestamps come in every form and empty fields as the string ``"null"``. The last
part proves, for any answer hypothesis finds, that reading it either gives a record or raises an
``ImageCbError``: never ``AttributeError``, ``TypeError`` or ``OverflowError``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecb_provider.exceptions import (
    ImageCbError,
    ImageCbNotFound,
    ImageCbPermanentApiError,
    ImageCbProtocolError,
    ImageCbServerError,
    ImageCbValidationError,
)
from imagecb_provider.hooks.protocol import (
    GENERATE_PATH,
    RECORD_INFO_PATH,
    RETRYABLE_ERRORS,
    error_for,
    parse_envelope,
)
from imagecb_provider.models import Outcome, TaskRecord, TaskState, parse_timestamp

# ------------------------------------------------------------------------------ outcomes
GENERATE_501 = error_for(501, "Generation Failed", GENERATE_PATH)
RECORD_501 = error_for(501, "Generation Failed", RECORD_INFO_PATH)
GENERATE_408 = error_for(408, "upstream timeout", GENERATE_PATH)
RECORD_408 = error_for(408, "upstream timeout", RECORD_INFO_PATH)


@pytest.mark.parametrize(
    ("error", "outcome", "retried"),
    [
        (GENERATE_501, "generation_failed", False),
        (RECORD_501, "generation_failed", False),
        (GENERATE_408, "internal_error", False),
        (RECORD_408, "internal_error", True),
    ],
    ids=["501-generate", "501-record-info", "408-generate", "408-record-info"],
)
def test_501_and_408_are_outcomes_and_only_408_on_a_status_call_is_retried(error, outcome, retried):
    assert error.outcome == outcome
    assert isinstance(error, RETRYABLE_ERRORS) is retried
    assert not isinstance(error, ImageCbPermanentApiError)  # an outcome, not "fix your request"


@pytest.mark.parametrize(("code", "expected"), [(501, ImageCbServerError), (408, ImageCbPermanentApiError)])
def test_a_file_download_keeps_the_plain_http_meaning_of_501_and_408(code, expected):
    assert type(error_for(code, "Not Implemented", "https://tempfile.aiquickdraw.com/a.png")) is expected


def test_a_404_on_record_info_rebuilt_from_a_trigger_event_does_not_claim_the_api_said_404():
    rebuilt = error_for(
        404, "remote task t1 is unknown to the API: record-info answered code 422", RECORD_INFO_PATH
    )
    assert isinstance(rebuilt, ImageCbNotFound)
    assert "answered 404" not in str(rebuilt)
    assert "remote task t1" in str(rebuilt)


# ----------------------------------------------------------------- the record's fields
#: The shape of a real record-info answer of this API family: a space and no zone in the
#: timestamps, the string "null" in empty fields.
REAL_RECORD = {
    "taskId": "task_flux_1767687416",
    "paramJson": '{"prompt":"a heron","aspectRatio":"1:1"}',
    "completeTime": "2026-01-06 08:16:56",
    "response": {"originImageUrl": "null", "resultImageUrl": "https://tempfile.aiquickdraw.com/r.png"},
    "successFlag": 1,
    "errorCode": "null",
    "errorMessage": "null",
    "createTime": "2026-01-06 08:16:20",
}


def test_a_real_answer_with_null_strings_and_space_timestamps_is_read():
    record = TaskRecord.from_record_info(REAL_RECORD)
    assert (record.state, record.outcome, record.code) == (TaskState.SUCCESS, Outcome.SUCCESS, 200)
    assert record.message == ""
    assert record.origin_image_url is None
    assert record.result_image_url == "https://tempfile.aiquickdraw.com/r.png"
    assert record.created_at == datetime(2026, 1, 6, 8, 16, 20, tzinfo=UTC)  # no zone: UTC (a guess)
    assert record.completed_at == datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)


def test_a_failed_record_with_null_strings_keeps_its_code_and_no_links():
    failed = {
        **REAL_RECORD,
        "successFlag": "3",
        "errorCode": "501",
        "errorMessage": "Image generation task failed.",
        "completeTime": "null",
        "response": {"originImageUrl": "null", "resultImageUrl": "null"},
    }
    record = TaskRecord.from_record_info(failed)
    assert (record.outcome, record.code) == (Outcome.GENERATION_FAILED, 501)
    assert (record.result_image_url, record.origin_image_url, record.completed_at) == (None, None, None)


def test_null_strings_in_a_callback_are_absent():
    body = {
        "code": 501,
        "msg": "null",
        "data": {"taskId": "t1", "info": {"originImageUrl": "null", "resultImageUrl": "NULL"}},
    }
    record = TaskRecord.from_callback(body)
    assert (record.outcome, record.message) == (Outcome.GENERATION_FAILED, "")
    assert (record.result_image_url, record.origin_image_url) == (None, None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-01-06 08:16:56", datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)),
        ("2026-01-06T08:16:56Z", datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)),
        ("2026-01-06T08:16:56z", datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)),
        ("2026-01-06T16:16:56+08:00", datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)),
        ("2026-01-06T08:16:56.250Z", datetime(2026, 1, 6, 8, 16, 56, 250000, tzinfo=UTC)),
        (1767687416000, datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)),
        ("1767687416000", datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)),
        (1767687416, datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)),
        ("1767687416", datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)),
        (1767687416.5, datetime(2026, 1, 6, 8, 16, 56, 500000, tzinfo=UTC)),
        (" 1767687416000 ", datetime(2026, 1, 6, 8, 16, 56, tzinfo=UTC)),
        ("null", None),
        ("NULL", None),
        ("", None),
        (None, None),
        (0, None),
        (True, None),
        ("²", None),  # str.isdigit() is true of it; float() raises on it
        (
            "\u0661\u0667\u0666\u0667\u0666\u0668\u0667\u0664\u0661\u0666",
            None,
        ),  # Arabic-Indic digits: float() would read them
        ("2026-01-06T08:16:56+99:00", None),
        (10**30, None),
        (float("nan"), None),
        (float("inf"), None),
        ("1e400", None),
        ([2026], None),
    ],
)
def test_parse_timestamp_reads_every_form_seen_and_nothing_else(value, expected):
    assert parse_timestamp(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (501, 501),
        ("501", 501),
        (" 408 ", 408),
        (501.0, 501),
        ("null", None),
        (True, None),
        ("\uff15\uff10\uff11", None),
    ],
)
def test_codes_are_read_from_ascii_digits_only(value, expected):
    from imagecb_provider.models import read_code

    assert read_code(value) == expected


# -------------------------------------------------------------------------- properties
PROPERTIES = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Scalars the vendor, a proxy or a bug could put in any field.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "null", "NULL", " ", "0", "1", "3", "200", "501", "\u0661", "²", "1e999", "-1"]),
    st.sampled_from(
        ["2026-01-06 08:16:56", "2024-03-20T10:30:00Z", "1767687416000", "9999-12-31T23:59:59-23:59"]
    ),
    st.text(max_size=20),
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
TASK_IDS = st.one_of(st.sampled_from(["task12345", "task_flux-2_1765175490366", "null", ""]), ANY_JSON)
RESPONSE = st.one_of(
    ANY_JSON,
    st.fixed_dictionaries(
        {},
        optional={"originImageUrl": ANY_JSON, "resultImageUrl": ANY_JSON},
    ),
)
#: The documented record schema, every field optional, each of any type, plus extra keys.
RECORDS = st.fixed_dictionaries(
    {},
    optional={
        "taskId": TASK_IDS,
        "paramJson": st.one_of(ANY_JSON, ANY_JSON.map(json.dumps), st.just('{"prompt": "a"')),
        "completeTime": ANY_JSON,
        "response": RESPONSE,
        "successFlag": st.one_of(st.sampled_from([0, 1, 2, 3, "0", "1", "2", "3", 7]), ANY_JSON),
        "errorCode": st.one_of(st.sampled_from([400, 408, 500, 501, "501", "null"]), ANY_JSON),
        "errorMessage": ANY_JSON,
        "createTime": ANY_JSON,
        "extra": ANY_JSON,
    },
)


def _read(data):
    try:
        return TaskRecord.from_record_info(data)
    except ImageCbError:
        return None  # a clear error of the provider's own: the property holds


@PROPERTIES
@given(RECORDS)
def test_any_record_gives_a_record_or_an_imagecb_error(data):
    record = _read(data)
    if record is not None:
        assert isinstance(record.state, TaskState)
        assert record.message == "" or isinstance(record.message, str)
        assert record.result_image_url is None or isinstance(record.result_image_url, str)
        assert record.result_image_url != "null"
        assert record.origin_image_url != "null"
        json.dumps(record.to_dict())  # what the trigger event and XCom carry


@PROPERTIES
@given(st.one_of(ANY_JSON, RECORDS.map(lambda r: [r]), st.just(None)))
def test_data_that_is_not_an_object_is_a_protocol_error(data):
    if isinstance(data, dict):
        _read(data)
        return
    with pytest.raises(ImageCbProtocolError):
        TaskRecord.from_record_info(data)


@PROPERTIES
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "code": st.one_of(st.sampled_from([200, 400, 500, 501]), ANY_JSON),
            "msg": ANY_JSON,
            "data": st.one_of(
                ANY_JSON,
                st.fixed_dictionaries({}, optional={"taskId": TASK_IDS, "info": RESPONSE}),
            ),
        },
    )
)
def test_any_callback_body_gives_a_record_or_an_imagecb_error(body):
    try:
        record = TaskRecord.from_callback(body)
    except ImageCbError:
        return
    assert record.result_image_url is None or isinstance(record.result_image_url, str)


ENVELOPES = st.one_of(
    st.fixed_dictionaries(
        {"code": st.one_of(st.sampled_from([200, 404, 408, 422, 429, 455, 500, 501, 505, "200"]), ANY_JSON)},
        optional={"msg": ANY_JSON, "data": st.one_of(RECORDS, ANY_JSON)},
    ),
    ANY_JSON,
)


@PROPERTIES
@given(
    status=st.sampled_from([200, 404, 422, 500, 501, 502]),
    body=st.one_of(
        ENVELOPES.map(json.dumps),
        st.binary(max_size=40),
        st.just("[" * 5000),  # nested deeper than json's recursion limit
        st.just('{"code": 1' + "0" * 5000 + "}"),  # longer than int()'s digit limit
    ),
    retry_after=st.one_of(
        st.none(), st.sampled_from(["nan", "inf", "-5", "7", "Wed, 21 Oct 2015 07:28:00 GMT"])
    ),
    endpoint=st.sampled_from([GENERATE_PATH, RECORD_INFO_PATH, "/api/v1/chat/credit"]),
)
def test_any_answer_gives_data_or_an_imagecb_error_and_a_record_or_an_imagecb_error(
    status, body, retry_after, endpoint
):
    headers = {"Retry-After": retry_after} if retry_after else None
    try:
        data = parse_envelope(status, body, headers, endpoint)
    except ImageCbError as error:
        waits = getattr(error, "retry_after", None)  # a nan or an infinity would sleep forever
        assert waits is None or 0 <= waits < float("inf")
        return
    if endpoint == RECORD_INFO_PATH:
        _read(data)


# ------------------------------------------------------------------ the 422 that is not one
def test_a_422_with_another_message_stays_a_validation_error():
    from imagecb_provider.hooks.protocol import record_from_error

    error = error_for(422, "taskId is required", RECORD_INFO_PATH)
    with pytest.raises(ImageCbValidationError, match=r"taskId is required \(record-info of remote task t7\)"):
        record_from_error(error, "t7")
