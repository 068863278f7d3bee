"""ImageCbHook and ImageCbAsyncHook over real HTTP against the simulator."""

from __future__ import annotations

import json
import logging
import socket
import sys

import pytest
import requests

from imagecb_provider.exceptions import (
    ImageCbApiError,
    ImageCbAuthenticationError,
    ImageCbConfigurationError,
    ImageCbConnectionError,
    ImageCbFeatureDisabled,
    ImageCbInsufficientCredits,
    ImageCbNotFound,
    ImageCbPermanentApiError,
    ImageCbRateLimited,
    ImageCbServerError,
    ImageCbSubmissionUncertain,
    ImageCbUnavailable,
    ImageCbValidationError,
)
from imagecb_provider.hooks.imagecb import ImageCbAsyncHook, ImageCbHook
from imagecb_provider.hooks.protocol import RetryPolicy
from imagecb_provider.models import GenerationRequest, Outcome, TaskState

SECRET_KEY = "sk-live-7f3a9c1e5b2d4068a1c3e5f7"
HMAC_KEY = "whk-9b8a7c6d5e4f3a2b1c0d"


class Waits(list):
    """Records the retry waits instead of sleeping them, so retry tests stay fast."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def policy(waits) -> RetryPolicy:
    return RetryPolicy(max_attempts=4, initial_delay=1.0, max_delay=8.0, jitter=0.5, sleep=waits)


@pytest.fixture
def hook(imagecb_simulator, policy) -> ImageCbHook:
    return ImageCbHook(retry_policy=policy)


@pytest.fixture
def async_hook(imagecb_simulator, policy) -> ImageCbAsyncHook:
    return ImageCbAsyncHook(retry_policy=policy)


def _requests_to(sim, endpoint: str) -> int:
    return sim.stats()["requests"].get(endpoint, 0)


# ------------------------------------------------------------------------ happy paths
def test_connection_is_read_from_the_documented_env_form(monkeypatch, imagecb_simulator):
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps({"conn_type": "imagecb", "host": imagecb_simulator.url, "password": "test-key"}),
    )
    settings = ImageCbHook().settings
    assert settings.base_url == imagecb_simulator.url
    assert settings.api_key == "test-key"
    assert settings.timeout == 30.0
    assert ImageCbHook().get_credits() == imagecb_simulator.stats()["credits"]


def test_empty_host_means_the_vendor_api_and_extras_are_read(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_OTHER",
        json.dumps(
            {
                "conn_type": "imagecb",
                "password": SECRET_KEY,
                "extra": {
                    "callback_base_url": "https://af.example.com/",
                    "webhook_hmac_key": HMAC_KEY,
                    "timeout": 7,
                },
            }
        ),
    )
    settings = ImageCbHook("imagecb_other").settings
    assert settings.base_url == "https://api.kie.ai"
    assert settings.callback_base_url == "https://af.example.com"
    assert settings.webhook_hmac_key == HMAC_KEY
    assert settings.timeout == 7.0
    assert SECRET_KEY not in repr(settings)
    assert HMAC_KEY not in repr(settings)


def test_connection_extras_never_become_request_headers(monkeypatch, imagecb_simulator):
    """No connection extra becomes a header: the HMAC key must not reach the API."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps(
            {
                "conn_type": "imagecb",
                "host": imagecb_simulator.url,
                "password": "test-key",
                "extra": {"webhook_hmac_key": HMAC_KEY, "callback_base_url": "http://cb"},
            }
        ),
    )
    session = ImageCbHook().get_conn()
    headers = session.prepare_request(requests.Request("GET", imagecb_simulator.url)).headers
    assert headers["Authorization"] == "Bearer test-key"
    assert not any(HMAC_KEY in value for value in headers.values())
    assert not {"webhook_hmac_key", "callback_base_url"} & {k.lower() for k in headers}


def test_file_hosts_are_read_and_a_bad_entry_fails_before_any_request(monkeypatch, imagecb_simulator):
    from imagecb_provider.hooks.downloads import FileHost

    def conn(file_hosts) -> None:
        monkeypatch.setenv(
            "AIRFLOW_CONN_IMAGECB_DEFAULT",
            json.dumps(
                {
                    "conn_type": "imagecb",
                    "host": imagecb_simulator.url,
                    "password": "test-key",
                    "extra": {"file_hosts": file_hosts},
                }
            ),
        )

    conn("files.example.com, http://10.0.0.5:8080")
    settings = ImageCbHook().settings
    assert settings.file_hosts == (FileHost("files.example.com"), FileHost("10.0.0.5", 8080, plain_http=True))
    assert settings.download_hosts() == (FileHost("127.0.0.1", plain_http=True), *settings.file_hosts)
    conn(["files.example.com", "ftp://files.example.com"])
    with pytest.raises(
        ImageCbConfigurationError, match=r"invalid file_hosts extra: 'ftp://files\.example\.com'"
    ):
        ImageCbHook().fetch_file(f"{imagecb_simulator.url}/files/x.jpg")
    assert sum(imagecb_simulator.stats()["requests"].values()) == 0


@pytest.mark.parametrize(
    ("hook_class", "own"),
    [
        (
            ImageCbHook,
            {
                "submit",
                "get_task",
                "get_credits",
                "get_download_url",
                "fetch_file",
                "upload_file",
                "settings",
                "test_connection",
            },
        ),
        (ImageCbAsyncHook, {"get_task", "settings"}),
    ],
)
def test_hooks_expose_only_their_own_paths(hook_class, own):
    """No inherited public method (``HttpHook.run()``, ``HttpAsyncHook.config()``) sends an extra anywhere."""
    from airflow.sdk import BaseHook

    inherited = {name for name in dir(BaseHook) if not name.startswith("_")}
    # mutmut's mutant trampolines ("x…__mutmut_N") are attributes of a mutated class, not its API
    public = {name for name in dir(hook_class) if not name.startswith("_") and "__mutmut_" not in name}
    assert public - inherited == own | {"conn_name_attr", "conn_type", "default_conn_name", "hook_name"}
    assert not {"run", "run_and_check", "run_with_advanced_retry", "config", "url_from_endpoint"} & public


def test_missing_api_key_fails_before_any_request(monkeypatch, imagecb_simulator):
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT", json.dumps({"conn_type": "imagecb", "host": imagecb_simulator.url})
    )
    with pytest.raises(ImageCbConfigurationError, match=r"no API key.*password"):
        ImageCbHook().get_credits()
    assert sum(imagecb_simulator.stats()["requests"].values()) == 0


def test_every_request_field_reaches_the_api(hook, imagecb_simulator):
    request = GenerationRequest(
        prompt="a lighthouse at dawn",
        enable_translation=False,
        upload_cn=False,
        input_image=f"{imagecb_simulator.url}/files/in.png",
        aspect_ratio="1:1",
        output_format="png",
        prompt_upsampling=True,
        model="flux-kontext-max",
        safety_tolerance=2,
        watermark="wm-1",
    )
    task_id = hook.submit(request)
    record = hook.get_task(task_id)
    assert record.task_id == task_id
    assert record.params == request.to_payload()
    assert imagecb_simulator.stats()["submissions"] == {"a lighthouse at dawn": 1}


def test_task_goes_from_generating_to_success(hook, imagecb_simulator):
    imagecb_simulator.configure(latency=0.6)
    task_id = hook.submit(GenerationRequest(prompt="a fox"))
    first = hook.get_task(task_id)
    assert (first.state, first.outcome, first.result_image_url) == (TaskState.GENERATING, None, None)
    import time

    time.sleep(0.8)
    done = hook.get_task(task_id)
    assert done.outcome is Outcome.SUCCESS
    assert done.result_image_url.startswith(imagecb_simulator.url)
    assert done.created_at is not None
    assert done.completed_at >= done.created_at


@pytest.mark.parametrize("timestamp_format", ["iso", "epoch_ms"])
def test_both_timestamp_forms_give_aware_datetimes(hook, imagecb_simulator, timestamp_format):
    imagecb_simulator.configure(latency=0.0, timestamp_format=timestamp_format)
    record = hook.get_task(hook.submit(GenerationRequest(prompt="a bee")))
    assert record.created_at.tzinfo is not None
    assert record.completed_at.tzinfo is not None
    assert 0 <= (record.completed_at - record.created_at).total_seconds() < 5


def test_credits_and_fresh_download_links(hook, imagecb_simulator):
    before = hook.get_credits()
    imagecb_simulator.configure(latency=0.0)
    record = hook.get_task(hook.submit(GenerationRequest(prompt="an owl")))
    assert hook.get_credits() < before
    fresh = hook.get_download_url(record.origin_image_url)
    assert fresh.startswith("http")
    with pytest.raises(ImageCbValidationError):
        hook.get_download_url("https://elsewhere.example.com/a.jpg")


def test_test_connection_reports_success_and_failure(hook, monkeypatch, imagecb_simulator):
    ok, message = hook.test_connection()
    assert ok
    assert imagecb_simulator.url in message
    assert "credits" in message
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps({"conn_type": "imagecb", "host": imagecb_simulator.url, "password": SECRET_KEY}),
    )
    ok, message = ImageCbHook().test_connection()
    assert not ok
    assert "401" in message
    assert "password" in message
    assert SECRET_KEY not in message


# ----------------------------------------------------------------------- error codes
PERMANENT = [
    (401, ImageCbAuthenticationError, "API key"),
    (402, ImageCbInsufficientCredits, "credits"),
    (404, ImageCbNotFound, "task id"),
    (422, ImageCbValidationError, "field"),
    (505, ImageCbFeatureDisabled, "disabled"),
]
TRANSIENT = [
    (429, ImageCbRateLimited),
    (455, ImageCbUnavailable),
    (500, ImageCbServerError),
    (503, ImageCbServerError),
]


@pytest.mark.parametrize("as_http_status", [False, True], ids=["body-code", "http-status"])
@pytest.mark.parametrize(("code", "error", "advice"), PERMANENT)
def test_permanent_errors_fail_at_once_with_advice(
    hook, imagecb_simulator, waits, code, error, advice, as_http_status
):
    imagecb_simulator.inject(endpoint="credit", code=code, msg="vendor says no", http_status=as_http_status)
    with pytest.raises(error) as info:
        hook.get_credits()
    assert isinstance(info.value, ImageCbPermanentApiError)
    assert info.value.code == code
    assert "vendor says no" in str(info.value)
    assert advice in str(info.value)
    assert waits == []
    assert _requests_to(imagecb_simulator, "credit") == 1


@pytest.mark.parametrize("as_http_status", [False, True], ids=["body-code", "http-status"])
@pytest.mark.parametrize(("code", "error"), TRANSIENT)
def test_transient_errors_are_retried_then_succeed(
    hook, imagecb_simulator, waits, code, error, as_http_status
):
    imagecb_simulator.inject(endpoint="credit", code=code, times=2, http_status=as_http_status)
    assert hook.get_credits() > 0
    assert len(waits) == 2
    assert _requests_to(imagecb_simulator, "credit") == 3


@pytest.mark.parametrize("as_http_status", [False, True], ids=["body-code", "http-status"])
def test_retries_are_bounded_then_the_last_error_is_raised(hook, imagecb_simulator, waits, as_http_status):
    imagecb_simulator.inject(endpoint="credit", code=455, times=50, http_status=as_http_status)
    with pytest.raises(ImageCbUnavailable):
        hook.get_credits()
    assert _requests_to(imagecb_simulator, "credit") == hook.retry_policy.max_attempts
    assert len(waits) == hook.retry_policy.max_attempts - 1
    assert waits == sorted(waits)
    assert all(0 < w <= 8.0 + 0.5 for w in waits)


@pytest.mark.parametrize("as_http_status", [False, True], ids=["body-code", "http-status"])
def test_retry_after_is_honoured(hook, imagecb_simulator, waits, as_http_status):
    imagecb_simulator.inject(
        endpoint="generate", code=429, times=1, retry_after=7, http_status=as_http_status
    )
    assert hook.submit(GenerationRequest(prompt="a whale"))
    assert waits == [7.0]
    assert imagecb_simulator.stats()["submissions"] == {"a whale": 1}


def test_rate_limit_of_the_simulator_is_ridden_out(hook, imagecb_simulator, waits):
    imagecb_simulator.configure(rate_limit_count=2, rate_limit_window=0.5)
    hook.retry_policy = RetryPolicy(
        max_attempts=6, sleep=__import__("time").sleep, initial_delay=0.3, jitter=0.1
    )
    ids = [hook.submit(GenerationRequest(prompt=f"a deer {i}")) for i in range(3)]
    assert len(set(ids)) == 3
    assert imagecb_simulator.stats()["submissions_total"] == 3


def test_submission_rejected_by_the_api_spends_nothing(hook, imagecb_simulator, waits):
    credits = hook.get_credits()
    imagecb_simulator.inject(endpoint="generate", code=422, msg="inputImage could not be fetched")
    with pytest.raises(ImageCbValidationError, match="inputImage could not be fetched"):
        hook.submit(GenerationRequest(prompt="a gull", input_image="https://example.com/missing.png"))
    assert hook.get_credits() == credits
    assert imagecb_simulator.stats()["submissions_total"] == 0
    assert waits == []


def test_dropped_submission_is_not_resent(hook, imagecb_simulator, waits):
    imagecb_simulator.inject(endpoint="generate", drop=True)
    with pytest.raises(ImageCbSubmissionUncertain, match="never paid twice"):
        hook.submit(GenerationRequest(prompt="a heron"))
    assert _requests_to(imagecb_simulator, "generate") == 1
    assert waits == []


def test_dropped_status_call_is_retried(hook, imagecb_simulator, waits):
    imagecb_simulator.configure(latency=0.0)
    task_id = hook.submit(GenerationRequest(prompt="a crane"))
    imagecb_simulator.inject(endpoint="record-info", drop=True, times=2)
    assert hook.get_task(task_id).outcome is Outcome.SUCCESS
    assert len(waits) == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api_is_retried_even_for_submit(monkeypatch, policy, waits):
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps({"conn_type": "imagecb", "host": f"http://127.0.0.1:{_closed_port()}", "password": "k"}),
    )
    with pytest.raises(ImageCbConnectionError, match="Could not reach"):
        ImageCbHook(retry_policy=policy).submit(GenerationRequest(prompt="a stork"))
    assert len(waits) == policy.max_attempts - 1


# ------------------------------------------------------------------------- async twin
async def test_async_get_task_matches_the_sync_hook(hook, async_hook, imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    task_id = hook.submit(GenerationRequest(prompt="a lynx [sim:generation_failed]"))
    record = await async_hook.get_task(task_id)
    assert record == hook.get_task(task_id)
    assert record.outcome is Outcome.GENERATION_FAILED


@pytest.mark.parametrize("as_http_status", [False, True], ids=["body-code", "http-status"])
async def test_async_hook_retries_transient_faults_and_honours_retry_after(
    hook, async_hook, imagecb_simulator, waits, as_http_status
):
    imagecb_simulator.configure(latency=0.0)
    task_id = hook.submit(GenerationRequest(prompt="a mole"))
    imagecb_simulator.inject(endpoint="record-info", code=429, retry_after=3, http_status=as_http_status)
    imagecb_simulator.inject(endpoint="record-info", code=500, http_status=as_http_status)
    imagecb_simulator.inject(endpoint="record-info", drop=True)
    record = await async_hook.get_task(task_id)
    assert record.outcome is Outcome.SUCCESS
    assert len(waits) == 3
    assert waits[0] == 3.0


@pytest.mark.parametrize(("code", "error", "advice"), PERMANENT)
async def test_async_hook_fails_at_once_on_permanent_errors(
    async_hook, imagecb_simulator, waits, code, error, advice
):
    imagecb_simulator.inject(endpoint="record-info", code=code)
    with pytest.raises(error):
        await async_hook.get_task("task-whatever")
    assert waits == []


# --------------------------------------------------------------------------- secrets
def test_api_key_never_reaches_logs_or_error_text(monkeypatch, imagecb_simulator, policy, caplog, capsys):
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps(
            {
                "conn_type": "imagecb",
                "host": imagecb_simulator.url,
                "password": SECRET_KEY,
                "extra": {"webhook_hmac_key": HMAC_KEY},
            }
        ),
    )
    imagecb_simulator.configure(api_key=SECRET_KEY, latency=0.0)
    caplog.set_level(logging.DEBUG)
    hook = ImageCbHook(retry_policy=policy)
    errors: list[BaseException] = []
    task_id = hook.submit(GenerationRequest(prompt="a seal"))
    hook.get_task(task_id)
    for endpoint, code in [("credit", 401), ("credit", 429), ("credit", 500), ("record-info", 404)]:
        imagecb_simulator.inject(endpoint=endpoint, code=code, times=10)
        try:
            hook.get_credits() if endpoint == "credit" else hook.get_task("nope")
        except ImageCbApiError as error:
            errors.append(error)
        imagecb_simulator.reset()
    imagecb_simulator.configure(api_key="another-key")
    try:
        hook.get_credits()
    except ImageCbAuthenticationError as error:
        errors.append(error)
    imagecb_simulator.configure(api_key=SECRET_KEY)
    # The API (or a proxy in front of it) echoes the request, Authorization header included, into
    # its error message: the sync and the async hook must not pass the key on.
    imagecb_simulator.inject(endpoint="generate", code=422, echo=True)
    imagecb_simulator.inject(endpoint="record-info", code=422, echo=True)
    for call in (lambda: hook.submit(GenerationRequest(prompt="a seal")), lambda: _async_get(task_id)):
        with pytest.raises(ImageCbValidationError) as info:
            call()
        assert "Bearer ***" in str(info.value)  # the echo came back, scrubbed
        errors.append(info.value)
    assert len(errors) == 7
    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err] + [str(e) + repr(e.args) for e in errors]
    for text in texts:
        assert SECRET_KEY not in text
        assert HMAC_KEY not in text


def _async_get(task_id: str):
    import asyncio

    return asyncio.run(ImageCbAsyncHook(retry_policy=RetryPolicy(max_attempts=1)).get_task(task_id))


def test_the_keys_are_registered_with_airflows_secrets_masker(monkeypatch, imagecb_simulator):
    """Whatever prints them later (a traceback, a debug line) shows *** in Airflow's logs."""
    import uuid

    from airflow.sdk._shared.secrets_masker import redact

    api_key, hmac_key = f"sk-{uuid.uuid4().hex}", f"whk-{uuid.uuid4().hex}"  # unknown to the masker
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps(
            {
                "conn_type": "imagecb",
                "host": imagecb_simulator.url,
                "password": api_key,
                "extra": {"webhook_hmac_key": hmac_key},
            }
        ),
    )
    assert redact(f"key {api_key}") == f"key {api_key}"
    ImageCbHook().settings  # noqa: B018 - reading the connection registers its secrets
    assert redact(f"key {api_key} and {hmac_key}") == "key *** and ***"


def test_one_hook_serves_many_threads_at_once(imagecb_simulator):
    """The archive's download threads share one hook: calls of different methods must not mix."""
    from concurrent.futures import ThreadPoolExecutor

    imagecb_simulator.configure(latency=0.0, rate_limit_count=10_000)
    hook = ImageCbHook()
    done = [hook.submit(GenerationRequest(prompt=f"a shell {i}")) for i in range(8)]
    url = hook.get_task(done[0]).result_image_url

    def call(n: int) -> tuple[str, object]:
        kind = n % 4
        if kind == 0:
            return "record", hook.get_task(done[n % len(done)]).task_id
        if kind == 1:
            return "credits", hook.get_credits()
        if kind == 2:
            return "link", hook.get_download_url(url)
        return "submit", hook.submit(GenerationRequest(prompt=f"a pebble {n}"))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so a shared attribute would race
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, range(400)))
    finally:
        sys.setswitchinterval(switch)
    for n, (kind, value) in enumerate(answers):
        if kind == "record":
            assert value == done[n % len(done)]
        elif kind == "credits":
            assert isinstance(value, float)
        elif kind == "link":
            assert value.startswith(imagecb_simulator.url)
            assert "signature=" in value
        else:
            assert isinstance(value, str)
            assert len(value) == 32
    assert imagecb_simulator.stats()["submissions_total"] == 8 + 100
