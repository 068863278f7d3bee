"""The wire rules both hooks share: which codes are retried, how long a retry waits, what it logs."""

from __future__ import annotations

import logging

import pytest

from imagecb_provider.exceptions import (
    ImageCbPermanentApiError,
    ImageCbProtocolError,
    ImageCbRateLimited,
    ImageCbServerError,
)
from imagecb_provider.hooks.protocol import (
    RetryPolicy,
    error_for,
    parse_envelope,
    parse_retry_after,
    without_query,
)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (400, ImageCbPermanentApiError),
        (418, ImageCbPermanentApiError),
        (500, ImageCbServerError),
        (503, ImageCbServerError),
    ],
)
def test_codes_without_a_class_of_their_own_are_permanent_below_500(code, expected):
    error = error_for(code, "vendor text", "/endpoint")
    assert type(error) is expected
    assert (error.code, error.msg, error.endpoint) == (code, "vendor text", "/endpoint")


def test_without_query_keeps_no_part_of_a_signed_links_query():
    assert without_query("https://cdn/x.jpg?sig=SECRET?more=1") == "https://cdn/x.jpg"
    assert without_query("https://cdn/x.jpg") == "https://cdn/x.jpg"


def _failing(times: int, error: Exception):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return call, calls


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap():
    waits: list[float] = []
    policy = RetryPolicy(max_attempts=5, initial_delay=2.0, max_delay=5.0, jitter=0, sleep=waits.append)
    call, calls = _failing(4, ImageCbServerError(500, "busy", "/x"))
    assert policy.retrying()(call) == "done"
    assert waits == [2.0, 4.0, 5.0, 5.0]
    assert len(calls) == 5


def test_jitter_is_added_to_the_backoff():
    waits: list[float] = []
    policy = RetryPolicy(max_attempts=9, initial_delay=1.0, max_delay=1000.0, jitter=3.0, sleep=waits.append)
    call, _ = _failing(8, ImageCbServerError(500, "busy", "/x"))
    policy.retrying()(call)
    jitters = [wait - 2**n for n, wait in enumerate(waits)]
    assert len(jitters) == 8
    assert all(0 <= j <= 3.0 for j in jitters)
    assert sum(jitters) > 0.5  # eight draws of U(0, 3) summing under 0.5: about one chance in 10^8


def test_retry_after_wins_over_the_backoff_and_is_capped():
    waits: list[float] = []
    policy = RetryPolicy(
        max_attempts=3, initial_delay=1.0, jitter=0, max_retry_after=30.0, sleep=waits.append
    )
    call, _ = _failing(2, ImageCbRateLimited(429, "slow down", "/x", retry_after=7.0))
    policy.retrying()(call)
    assert waits == [7.0, 7.0]
    waits.clear()
    call, _ = _failing(1, ImageCbRateLimited(429, "slow down", "/x", retry_after=900.0))
    policy.retrying()(call)
    assert waits == [30.0]


def test_a_permanent_error_is_not_retried():
    waits: list[float] = []
    call, calls = _failing(1, ImageCbPermanentApiError(400, "bad", "/x"))
    with pytest.raises(ImageCbPermanentApiError):
        RetryPolicy(sleep=waits.append).retrying()(call)
    assert (len(calls), waits) == (1, [])


async def test_the_async_retry_awaits_a_coroutine_sleep():
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    attempts = []

    async def call():
        attempts.append(1)
        if len(attempts) < 3:
            raise ImageCbServerError(502, "bad gateway", "/x")
        return "done"

    policy = RetryPolicy(initial_delay=1.0, jitter=0, sleep=sleep)
    assert await policy.async_retrying()(call) == "done"
    assert waits == [1.0, 2.0]


def test_each_retry_is_logged_with_its_error_attempt_and_wait(caplog):
    policy = RetryPolicy(max_attempts=4, initial_delay=3.0, jitter=0, sleep=lambda _: None)
    call, _ = _failing(1, ImageCbServerError(503, "overloaded", "/api/x"))
    with caplog.at_level(logging.WARNING, logger="imagecb_provider.hooks.protocol"):
        policy.retrying()(call)
    assert [r.getMessage() for r in caplog.records] == [
        f"imagecb API call failed ({ImageCbServerError(503, 'overloaded', '/api/x')}); "
        "attempt 1 of 4, retrying in 3.0 s"
    ]


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "7"}, 7.0),  # a plain dict, as the async hook's headers may be
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_is_read_in_either_spelling_and_never_negative(headers, seconds):
    assert parse_retry_after(headers) == seconds


def test_an_error_status_without_the_json_envelope_keeps_its_status_class_and_retry_after():
    with pytest.raises(ImageCbServerError) as error:
        parse_envelope(
            502, b"<html>Bad Gateway</html>", {"Retry-After": "3"}, "/api/v1/flux/kontext/record-info"
        )
    assert (error.value.code, error.value.retry_after) == (502, 3.0)
    assert error.value.msg == "HTTP 502 without the API's JSON envelope"


def test_a_success_status_with_a_foreign_body_points_at_the_connection_host():
    with pytest.raises(ImageCbProtocolError) as error:
        parse_envelope(200, b"<html>Welcome to nginx</html>", None, "/api/v1/flux/kontext/generate")
    assert str(error.value) == (
        "imagecb API answered HTTP 200 on /api/v1/flux/kontext/generate with a body that is not its JSON "
        "envelope; check the base URL (host) of the connection"
    )


def test_an_envelope_error_without_a_message_says_so():
    with pytest.raises(ImageCbServerError) as error:
        parse_envelope(200, b'{"code": 500}', None, "/endpoint")
    assert error.value.msg == ""
    assert str(error.value).startswith("imagecb API answered 500 on /endpoint: no message")


def test_retry_after_as_an_http_date_counts_from_now_and_never_below_zero():
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    def header(seconds_from_now: float) -> dict:
        when = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
        return {"Retry-After": format_datetime(when, usegmt=True)}

    assert 100.0 <= parse_retry_after(header(120)) <= 120.0  # whole seconds, read a moment later
    assert parse_retry_after(header(-120)) == 0.0


def test_an_error_envelope_with_a_code_that_is_not_a_number_falls_back_on_the_status():
    with pytest.raises(ImageCbServerError) as error:
        parse_envelope(502, b'{"code": "oops", "msg": "upstream down"}', None, "/endpoint")
    assert (error.value.code, error.value.msg, error.value.endpoint) == (502, "upstream down", "/endpoint")


def test_a_400_without_the_json_envelope_is_a_permanent_api_error_of_its_endpoint():
    with pytest.raises(ImageCbPermanentApiError) as error:
        parse_envelope(400, b"<html>Bad Request</html>", None, "/api/v1/flux/kontext/generate")
    assert (error.value.code, error.value.endpoint) == (400, "/api/v1/flux/kontext/generate")
