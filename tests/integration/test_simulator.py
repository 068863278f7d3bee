"""
The API simulator over real HTTP: what it answers, when, and what it sends back.

No mocks: every test starts a real server (``imagecb_simulator_factory``) and talks to it with
``requests`` (or aiohttp, or a real callback receiver), because the provider's clients depend on
the wire behaviour (statuses, headers, cut connections), not on the simulator's Python objects.

No race with the clock: a test waits for an observable event (a held task, a submission in
flight, no callback pending) instead of hoping a short sleep was long enough, and its time
bounds are either exact (computed by the simulator) or generous (and still far from the value a
broken behaviour would give). Every test has a timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from PIL import Image

from imagecb_provider.testing.simulator import SimulatorConfig, run_in_subprocess

GENERATE = "/api/v1/flux/kontext/generate"
RECORD = "/api/v1/flux/kontext/record-info"
CREDIT = "/api/v1/chat/credit"
DOWNLOAD = "/api/v1/common/download-url"
DROPPED = (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)
PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
#: How long a test waits for something that should happen in milliseconds: long enough for a
#: loaded 2-core machine, short enough to report a hang well before the per-test timeout.
PATIENCE = 15.0

pytestmark = pytest.mark.timeout(90)


class Api:
    """A thin ``requests`` client of one simulator, with the vendor's endpoints by name."""

    def __init__(self, url: str, key: str = "test-key") -> None:
        self.url = url
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.headers["Authorization"] = f"Bearer {key}"

    def submit(self, prompt: str | None = "a fox", **fields: Any) -> requests.Response:
        body = ({"prompt": prompt} if prompt is not None else {}) | fields
        return self.http.post(self.url + GENERATE, json=body, timeout=PATIENCE)

    def task_id(self, prompt: str = "a fox", **fields: Any) -> str:
        answer = self.submit(prompt, **fields).json()
        assert answer["code"] == 200, answer
        return answer["data"]["taskId"]

    def record_answer(self, task_id: str) -> requests.Response:
        return self.http.get(self.url + RECORD, params={"taskId": task_id}, timeout=PATIENCE)

    def record(self, task_id: str) -> dict[str, Any]:
        answer = self.record_answer(task_id).json()
        assert answer["code"] == 200, answer
        return answer["data"]

    def finished(self, task_id: str, timeout: float = PATIENCE) -> dict[str, Any]:
        return wait_for(lambda: (r := self.record(task_id))["successFlag"] and r, timeout)

    def credit(self) -> float:
        return self.http.get(self.url + CREDIT, timeout=PATIENCE).json()["data"]

    def download_url(self, url: str) -> requests.Response:
        return self.http.post(self.url + DOWNLOAD, json={"url": url}, timeout=PATIENCE)


def wait_for(check: Callable[[], Any], timeout: float = PATIENCE, step: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"condition not met within {timeout} s")


def settled(sim: Any) -> dict[str, Any]:
    """Wait until no callback delivery is armed, running or awaiting a retry; return the stats."""
    return wait_for(lambda: (s := sim.stats(tasks=False))["callbacks_pending"] == 0 and s)


def in_flight(sim: Any, count: int) -> dict[str, Any]:
    """Wait until exactly ``count`` submissions are received and not yet answered; return the stats."""
    return wait_for(lambda: (s := sim.stats())["submissions_in_flight"] == count and s)


@pytest.fixture
def start(imagecb_simulator_factory) -> Callable[..., tuple[Any, Api]]:
    """Start a simulator with the given config fields; returns (handle, client)."""

    def start_(**fields: Any) -> tuple[Any, Api]:
        fields.setdefault("latency", 0.0)
        sim = imagecb_simulator_factory(**fields)
        return sim, Api(sim.url, sim.config.api_key)

    return start_


class Receiver:
    """A real HTTP callback receiver; answers ``statuses`` in turn, then ``default_status``."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.default_status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.calls.append(
                    {"at": time.monotonic(), "headers": dict(self.headers), "body": json.loads(body)}
                )
                status = receiver.statuses.pop(0) if receiver.statuses else receiver.default_status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def wait(self, count: int, timeout: float = PATIENCE) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.calls) >= count, timeout)
        return self.calls


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


# ------------------------------------------------------------------------- auth
@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["missing", "wrong"])
def test_every_api_call_needs_the_bearer_key(start, key):
    sim, api = start()
    if key is None:
        del api.http.headers["Authorization"]
    else:
        api.http.headers["Authorization"] = f"Bearer {key}"
    answers = [
        api.submit("a fox"),
        api.record_answer("whatever"),
        api.http.get(sim.url + CREDIT),
        api.download_url(sim.url + "/files/x/result.jpg"),
    ]
    assert [(a.status_code, a.json()["code"]) for a in answers] == [(200, 401)] * 4
    assert all("key" in a.json()["msg"] for a in answers)
    stats = sim.stats()
    assert stats["rejected"] == {"401": 4}
    assert stats["submissions_total"] == 0
    assert stats["credits"] == 1000


# ------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a [sim:nonsense]"}, "prompt"),
        ({"prompt": "a [sim:latency=soon]"}, "prompt"),
        ({"prompt": "a", "aspectRatio": "5:4"}, "aspectRatio"),
        ({"prompt": "a", "outputFormat": "gif"}, "outputFormat"),
        ({"prompt": "a", "model": "flux-dev"}, "model"),
        ({"prompt": "a", "safetyTolerance": "2"}, "safetyTolerance"),
        ({"prompt": "a", "enableTranslation": "yes"}, "enableTranslation"),
        ({"prompt": "a", "promptUpsampling": 1}, "promptUpsampling"),
        ({"prompt": "a", "uploadCn": "no"}, "uploadCn"),
        ({"prompt": "a", "inputImage": "not a url"}, "inputImage"),
        ({"prompt": "a", "callBackUrl": "ftp://x.test/cb"}, "callBackUrl"),
        ({"prompt": "a", "watermark": 3}, "watermark"),
    ],
)
def test_validation_refuses_with_422_naming_the_field(start, body, field):
    sim, api = start()
    answer = api.http.post(api.url + GENERATE, json=body)
    assert answer.status_code == 200
    assert answer.json()["code"] == 422
    assert field in answer.json()["msg"]
    assert sim.stats()["submissions_total"] == 0
    assert api.credit() == 1000


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "a", "safetyTolerance": 7},
        {"prompt": "a", "safetyTolerance": -1},
        {"prompt": "a", "safetyTolerance": 3, "inputImage": "https://x.test/a.png"},
    ],
)
def test_safety_tolerance_out_of_range_is_a_500_with_the_ranges(start, body):
    """The vendor's quickstart: "Safety Tolerance Out of Range (Code 500)"."""
    sim, api = start()
    answer = api.http.post(api.url + GENERATE, json=body).json()
    assert answer["code"] == 500
    assert "safetyTolerance must be 0-6 when generating, 0-2 when editing" in answer["msg"]
    assert sim.stats()["submissions_total"] == 0
    assert sim.stats()["rejected"] == {"500": 1}
    assert api.credit() == 1000


def test_a_body_that_is_not_json_is_a_422(start):
    _, api = start()
    answer = api.http.post(
        api.url + GENERATE, data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert answer.json()["code"] == 422


def test_edit_mode_accepts_safety_tolerance_up_to_2(start):
    _, api = start()
    task_id = api.task_id("an edit", inputImage="https://x.test/a.png", safetyTolerance=2)
    assert api.record(task_id)["successFlag"] == 1


# -------------------------------------------------------------------- lifecycle
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.mark.parametrize("timestamp_format", ["iso", "epoch_ms"])
def test_task_is_generating_then_succeeds_with_the_vendor_record_shape(start, timestamp_format):
    sim, api = start(timestamp_format=timestamp_format)
    body = {"prompt": "a fox [sim:hold]", "aspectRatio": "1:1", "model": "flux-kontext-max", "watermark": "w"}
    submitted = time.time()
    task_id = api.task_id(**body, callBackUrl="http://127.0.0.1:9/never-called")
    first = api.record(task_id)
    keys = {
        "taskId",
        "paramJson",
        "completeTime",
        "response",
        "successFlag",
        "errorCode",
        "errorMessage",
        "createTime",
    }
    assert set(first) == keys
    assert (first["taskId"], first["successFlag"], first["response"], first["completeTime"]) == (
        task_id,
        0,
        None,
        None,
    )
    assert json.loads(first["paramJson"]) == body  # callBackUrl is not echoed
    released = time.time()
    sim.release(task_id)
    done = api.finished(task_id)
    seen = time.time()
    assert done["successFlag"] == 1
    assert (done["errorCode"], done["errorMessage"]) == (None, "")
    assert done["response"]["resultImageUrl"].startswith(sim.url + "/files/")
    assert done["response"]["originImageUrl"].startswith(sim.url + "/files/")
    if timestamp_format == "iso":
        assert ISO.match(done["createTime"])
        assert ISO.match(done["completeTime"])
        assert done["completeTime"] >= done["createTime"]
    else:  # the simulator's own clock, read between the client's readings (ms, rounded down)
        assert isinstance(done["createTime"], int)
        assert int(submitted * 1000) <= done["createTime"] <= released * 1000
        assert int(released * 1000) <= done["completeTime"] <= seen * 1000


def test_config_latency_sets_the_complete_time_exactly(start):
    _, api = start(latency=0.3, timestamp_format="epoch_ms")
    done = api.finished(api.task_id("a fox"))
    assert 299 <= done["completeTime"] - done["createTime"] <= 301  # computed, not measured


OUTCOMES = [
    ("", 1, None),
    ("[sim:content_policy]", 3, 400),
    ("[SIM:Internal_Error]", 3, 500),
    ("[sim:generation_failed]", 3, 501),
    ("[sim:create_failed]", 2, None),
    ("[sim:upstream_timeout]", 3, 408),
]


@pytest.mark.parametrize(("marker", "flag", "code"), OUTCOMES)
def test_each_marker_gives_its_outcome(start, marker, flag, code):
    sim, api = start()
    record = api.finished(api.task_id(f"a kite {marker}"))
    assert (record["successFlag"], record["errorCode"]) == (flag, code)
    assert (record["response"] is None) == (flag != 1)
    assert bool(record["errorMessage"]) == (flag != 1)
    if code == 400:
        assert "content polic" in record["errorMessage"]
    assert sim.stats()["tasks"][record["taskId"]]["successFlag"] == flag


def test_never_stays_generating(start, receiver):
    sim, api = start()
    task_id = api.task_id("a harp [sim:never]", callBackUrl=receiver.url)
    control = api.finished(api.task_id("a lute", callBackUrl=receiver.url))  # latency 0: done at once
    receiver.wait(1)
    assert api.record(task_id)["successFlag"] == 0
    stats = settled(sim)  # nothing left to deliver: the never task has no callback armed
    assert [c["body"]["data"]["taskId"] for c in receiver.calls] == [control["taskId"]]
    assert sim.stats()["tasks"][task_id]["outcome"] == "never"
    assert stats["held"] == []
    with pytest.raises(ValueError, match="no held task"):
        sim.release(task_id)


def test_latency_marker_is_scaled_by_time_factor(start):
    _, api = start(latency=0.0, time_factor=0.2, timestamp_format="epoch_ms")
    far = api.task_id("a tortoise [sim:latency=1000]")  # 200 s once scaled
    slow = api.task_id("a snail [sim:latency=2]")  # 0.4 s once scaled
    fast = api.task_id("a hare")
    assert api.record(fast)["successFlag"] == 1
    done = api.finished(slow)
    assert 399 <= done["completeTime"] - done["createTime"] <= 401  # 2 s x 0.2, computed
    assert api.record(far)["successFlag"] == 0


def test_flaky_fails_the_first_submission_of_a_prompt_only(start):
    sim, api = start()
    prompt = "a silo [sim:flaky]"
    flags = [api.finished(api.task_id(prompt))["errorCode"] for _ in range(3)]
    assert flags == [500, None, None]
    assert api.finished(api.task_id("another [sim:flaky]"))["errorCode"] == 500
    assert sim.stats()["submissions"] == {prompt: 3, "another [sim:flaky]": 1}
    sim.reset()
    assert api.finished(api.task_id(prompt))["errorCode"] == 500


def test_random_failures_are_reproducible_from_the_seed(start):
    sim, api = start(random_failure_rate=1.0, seed=42, rate_limit_count=100)

    def codes() -> list[int]:
        return [api.finished(api.task_id(f"p{i}"))["errorCode"] for i in range(8)]

    first = codes()
    assert set(first) <= {400, 500, 501}
    assert len(set(first)) > 1
    sim.reset()
    assert codes() == first
    sim.configure(random_failure_rate=0.0)
    assert api.finished(api.task_id("fine"))["successFlag"] == 1


# ------------------------------------------------------------------------ files
@pytest.mark.parametrize(
    ("ratio", "fmt", "pil_format", "content_type"),
    [
        ("16:9", None, "JPEG", "image/jpeg"),
        ("9:16", "png", "PNG", "image/png"),
        ("1:1", "jpeg", "JPEG", "image/jpeg"),
        ("21:9", "png", "PNG", "image/png"),
        ("3:4", "jpeg", "JPEG", "image/jpeg"),
    ],
)
def test_result_file_is_a_real_image_of_the_requested_format_and_ratio(
    start, ratio, fmt, pil_format, content_type
):
    sim, api = start()
    fields = {"aspectRatio": ratio} | ({"outputFormat": fmt} if fmt else {})
    urls = api.finished(api.task_id("a red barn", **fields))["response"]
    result = requests.get(urls["resultImageUrl"])
    assert result.status_code == 200
    assert result.headers["Content-Type"] == content_type
    image = Image.open(io.BytesIO(result.content))
    image.load()
    assert image.format == pil_format
    w, h = (int(x) for x in ratio.split(":"))
    assert abs(image.width / image.height - w / h) < 0.01
    assert max(image.size) == 512
    assert requests.get(urls["resultImageUrl"]).content == result.content
    assert requests.get(urls["originImageUrl"]).content == result.content
    assert sim.stats()["downloads"][urls["resultImageUrl"].removeprefix(sim.url)] == 2


def test_different_prompts_give_different_pictures(start):
    _, api = start()
    pixels = []
    for prompt in ("a red barn", "a blue sea"):
        url = api.finished(api.task_id(prompt, outputFormat="png"))["response"]["resultImageUrl"]
        pixels.append(Image.open(io.BytesIO(requests.get(url).content)).convert("RGB").getpixel((500, 5)))
    assert pixels[0] != pixels[1]


def test_origin_link_expires_and_download_url_refreshes_it(start):
    sim, api = start(origin_ttl=600, download_url_ttl=60)
    urls = api.finished(api.task_id("a pier"))["response"]
    assert requests.get(urls["originImageUrl"]).status_code == 200
    sim.configure(origin_ttl=0)  # read on every download: completion is now more than 0 s ago
    assert requests.get(urls["originImageUrl"]).status_code == 410
    assert requests.get(urls["resultImageUrl"]).status_code == 200
    answer = api.download_url(urls["originImageUrl"]).json()
    assert answer["code"] == 200
    fresh = answer["data"]
    assert fresh.startswith(sim.url)
    assert fresh != urls["originImageUrl"]
    downloaded = requests.get(fresh)
    assert downloaded.status_code == 200
    assert downloaded.content == requests.get(urls["resultImageUrl"]).content
    assert api.download_url(urls["resultImageUrl"]).json()["code"] == 200
    assert requests.get(fresh.replace("signature=", "signature=0")).status_code == 403
    sim.configure(download_url_ttl=0)
    expired = api.download_url(urls["resultImageUrl"]).json()["data"]  # expires: the current second
    wait_for(lambda: int(time.time()) > int(re.search(r"expires=(\d+)", expired).group(1)))
    assert requests.get(expired).status_code == 410


@pytest.mark.parametrize(
    "url",
    [
        "https://elsewhere.example.com/a.jpg",
        "https://elsewhere.example.com/files/00000000000000000000000000000000/result.jpg",
        "{sim}/files/00000000000000000000000000000000/result.jpg",
        "",
    ],
)
def test_download_url_refuses_urls_it_did_not_make(start, url):
    sim, api = start()
    api.finished(api.task_id("a pier"))
    answer = api.download_url(url.format(sim=sim.url)).json()
    assert answer["code"] == 422
    assert "url" in answer["msg"]


def test_files_of_unfinished_or_failed_tasks_are_404(start):
    sim, api = start()
    task_id = api.task_id("slow [sim:hold]")
    assert requests.get(f"{sim.url}/files/{task_id}/result.jpg").status_code == 404
    failed = api.finished(api.task_id("bad [sim:generation_failed] [sim:latency=0]"))
    assert requests.get(f"{sim.url}/files/{failed['taskId']}/result.jpg").status_code == 404


# ------------------------------------------------------------ limits and credits
def test_rate_limit_refuses_without_queueing_or_charging(start):
    sim, api = start(rate_limit_count=3, rate_limit_window=600)
    assert [api.submit(f"p{i}").json()["code"] for i in range(3)] == [200] * 3
    refused = api.submit("one too many")
    assert refused.json()["code"] == 429
    assert refused.status_code == 200
    assert 500 <= int(refused.headers["Retry-After"]) <= 600  # the oldest slot frees in ~600 s
    stats = sim.stats()
    assert stats["submissions_total"] == 3
    assert "one too many" not in stats["submissions"]
    assert stats["credits"] == 1000 - 3 * 5
    assert stats["rejected"] == {"429": 1}
    sim.configure(rate_limit_window=0.3)  # the window slides: accepted submissions age out of it
    time.sleep(0.35)  # a lower bound only: every accepted submission is now older than 0.3 s
    assert api.submit("after the window").json()["code"] == 200


def test_credits_are_spent_per_model_then_402(start):
    sim, api = start(credits=17)
    api.task_id("a", model="flux-kontext-max")
    api.task_id("b")
    assert api.credit() == 2
    answer = api.submit("c")
    assert answer.json()["code"] == 402
    assert "credit" in answer.json()["msg"].lower()
    assert api.credit() == 2
    assert sim.stats()["submissions_total"] == 2
    sim.configure(credits=100)
    assert api.credit() == 100


def test_disabled_model_is_a_505(start):
    sim, api = start(disabled_models=["flux-kontext-max"])
    answer = api.submit("a", model="flux-kontext-max").json()
    assert answer["code"] == 505
    assert "disabled" in answer["msg"].lower()
    assert api.submit("a").json()["code"] == 200
    assert sim.stats()["rejected"] == {"505": 1}


def test_http_status_errors_mode_uses_real_statuses(start):
    sim, api = start(
        http_status_errors=True, rate_limit_count=1, rate_limit_window=600, credits=5, unknown_record="404"
    )
    assert api.submit("a").status_code == 200
    checks = {
        429: api.submit("b"),
        422: api.submit("c", aspectRatio="7:1"),
        404: api.record_answer("nope"),
    }
    sim.reset()
    sim.configure(rate_limit_count=10)
    checks[402] = (api.submit("d"), api.submit("e"))[1]
    api.http.headers["Authorization"] = "Bearer nope"
    checks[401] = api.http.get(sim.url + CREDIT)
    for status, answer in checks.items():
        assert answer.status_code == status
        assert answer.json()["code"] == status
        assert set(answer.json()) == {"code", "msg", "data"}
    assert int(checks[429].headers["Retry-After"]) >= 1


# -------------------------------------------------------------------- injection
@pytest.mark.parametrize(
    ("endpoint", "code"),
    [
        ("generate", 401),
        ("generate", 402),
        ("record-info", 404),
        ("generate", 422),
        ("credit", 429),
        ("record-info", 455),
        ("credit", 500),
        ("download-url", 501),
        ("credit", 503),
        ("generate", 505),
    ],
)
@pytest.mark.parametrize("http_status", [False, True])
def test_injection_forces_any_code_on_the_next_calls(start, endpoint, code, http_status):
    sim, api = start()
    task_id = api.task_id("a real task")
    sim.inject(endpoint=endpoint, code=code, times=2, msg="forced", http_status=http_status)
    call = {
        "generate": lambda: api.submit("a"),
        "record-info": lambda: api.record_answer(task_id),
        "credit": lambda: api.http.get(sim.url + CREDIT),
        "download-url": lambda: api.download_url("x"),
    }[endpoint]
    answers = [call(), call(), call()]
    assert [a.json()["code"] for a in answers[:2]] == [code, code]
    assert [a.status_code for a in answers[:2]] == [code if http_status else 200] * 2
    assert answers[0].json()["msg"] == "forced"
    assert answers[2].json()["code"] != code
    stats = sim.stats()
    assert stats["injected"] == {str(code): 2}
    assert stats["requests"][endpoint] == (4 if endpoint == "generate" else 3)
    assert stats["credits"] == (990 if endpoint == "generate" else 995)


def test_injected_retry_after_header_and_wildcard_endpoint(start):
    sim, api = start()
    sim.inject(code=429, retry_after=7)
    sim.inject(endpoint="*", code=455, retry_after=0.5)
    first, second = api.http.get(sim.url + CREDIT), api.submit("a")
    assert (first.json()["code"], first.headers["Retry-After"]) == (429, "7")
    assert (second.json()["code"], second.headers["Retry-After"]) == (455, "0.5")
    assert "Retry-After" not in api.http.get(sim.url + CREDIT).headers
    assert sim.stats()["submissions_total"] == 0


def test_injected_drop_breaks_the_connection_for_requests(start):
    sim, api = start()
    task_id = api.task_id("a crane")
    sim.inject(endpoint="record-info", drop=True)
    with pytest.raises(DROPPED):
        api.record_answer(task_id)
    assert api.record(task_id)["successFlag"] == 1
    assert sim.stats()["status_calls"][task_id] == 2


async def test_injected_drop_breaks_the_connection_for_aiohttp(start):
    sim, api = start()
    task_id = api.task_id("a crane")
    sim.inject(endpoint="record-info", drop=True)
    headers = {"Authorization": "Bearer test-key"}
    async with aiohttp.ClientSession() as session:
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            async with session.get(sim.url + RECORD, params={"taskId": task_id}, headers=headers) as answer:
                await answer.read()
        async with session.get(sim.url + RECORD, params={"taskId": task_id}, headers=headers) as answer:
            assert (await answer.json())["data"]["successFlag"] == 1
    assert sim.stats()["status_calls"][task_id] == 2  # aiohttp did not silently resend


def test_bad_injection_is_refused(start):
    sim, _ = start()
    with pytest.raises(ValueError, match="endpoint"):
        sim.inject(endpoint="files", code=500)
    with pytest.raises(ValueError, match="code"):
        sim.inject(endpoint="credit")
    with pytest.raises(ValueError, match="echo"):
        sim.inject(endpoint="generate", drop=True, echo=True)
    assert sim.stats()["pending_injections"] == 0


def test_injected_echo_writes_the_request_headers_and_body_into_the_msg(start):
    sim, api = start()
    sim.inject(endpoint="generate", code=422, echo=True)
    raw = b'{"prompt":  "a fox",\n "watermark": "w"}'  # odd spacing: verbatim, not re-encoded
    headers = {"Content-Type": "application/json", "X-Trace": "t-42"}
    answer = api.http.post(api.url + GENERATE, data=raw, headers=headers).json()
    assert answer["code"] == 422
    msg = answer["msg"]
    assert msg.startswith("Validation error | ")
    assert f"\nPOST {GENERATE}\n" in msg
    assert "\nauthorization: Bearer test-key\n" in msg
    assert "\nx-trace: t-42\n" in msg
    assert msg.endswith("\n\n" + raw.decode())
    stats = sim.stats()
    assert (stats["submissions_total"], stats["credits"], stats["injected"]) == (0, 1000, {"422": 1})
    assert api.submit("a fox").json()["code"] == 200  # the injection answered one call only


def test_injected_echo_on_a_get_shows_the_query_and_keeps_the_given_msg(start):
    sim, api = start()
    sim.inject(endpoint="record-info", code=500, msg="boom", echo=True, http_status=True)
    answer = api.record_answer("abc")
    assert answer.status_code == 500
    msg = answer.json()["msg"]
    assert msg.startswith("boom | ")
    assert f"\nGET {RECORD}?taskId=abc\n" in msg
    assert "\nauthorization: Bearer test-key\n" in msg
    assert msg.endswith("\n\n")  # a GET has an empty body


# ------------------------------------------------------------------------ faults
@pytest.mark.parametrize("kind", ["500", "455", "429", "drop"])
def test_fault_rate_one_gives_the_configured_fault_on_record_info_only(start, kind):
    sim, api = start(fault_rate=1.0, fault_kinds=[kind])
    task_id = api.task_id("a drum")
    if kind == "drop":
        with pytest.raises(DROPPED):
            api.record_answer(task_id)
    else:
        answer = api.record_answer(task_id)
        assert answer.json()["code"] == int(kind)
        assert answer.headers.get("Retry-After") == ("1" if kind == "429" else None)
    assert api.credit() == 995
    stats = sim.stats()
    assert stats["faults"] == {kind: 1}
    assert stats["faults_by_endpoint"] == {"record-info": {kind: 1}}
    assert stats["rejected"] == {}  # a fault is not a refusal


FAULTABLE = ["generate", "record-info", "credit", "download-url", "files"]


@pytest.mark.parametrize("endpoint", FAULTABLE)
def test_fault_endpoints_choose_where_random_faults_land(start, endpoint):
    sim, api = start()
    task_id = api.task_id("a bell")
    urls = api.finished(task_id)["response"]
    sim.configure(fault_rate=1.0, fault_kinds=["500"], fault_endpoints=[endpoint])
    calls = {
        "generate": lambda: api.submit("another bell"),
        "record-info": lambda: api.record_answer(task_id),
        "credit": lambda: api.http.get(sim.url + CREDIT),
        "download-url": lambda: api.download_url(urls["resultImageUrl"]),
        "files": lambda: requests.get(urls["resultImageUrl"]),
    }
    for name, call in calls.items():
        answer = call()
        code = answer.status_code if name == "files" else answer.json()["code"]
        assert code == (500 if name == endpoint else 200), name
    stats = sim.stats()
    assert stats["faults_by_endpoint"] == {endpoint: {"500": 1}}
    assert stats["faults"] == {"500": 1}
    assert stats["submissions_total"] == (1 if endpoint == "generate" else 2)
    assert stats["credits"] == 1000 - 5 * stats["submissions_total"]


@pytest.mark.parametrize("http_status_errors", [False, True])
def test_random_429_fault_says_when_to_come_back(start, http_status_errors):
    endpoints = ["generate", "credit", "files"]
    sim, api = start(
        http_status_errors=http_status_errors, fault_rate=1.0, fault_kinds=["429"], fault_endpoints=endpoints
    )
    for answer in (api.submit("a wasp"), api.http.get(sim.url + CREDIT)):
        assert answer.json()["code"] == 429
        assert answer.status_code == (429 if http_status_errors else 200)
        assert answer.headers["Retry-After"] == "1"
    download = requests.get(f"{sim.url}/files/{'0' * 32}/result.jpg")
    assert (download.status_code, download.headers["Retry-After"]) == (429, "1")
    stats = sim.stats()
    assert stats["faults_by_endpoint"] == {name: {"429": 1} for name in endpoints}
    assert (stats["rejected"], stats["submissions_total"], stats["credits"]) == ({}, 0, 1000)


def test_random_faults_on_generate_never_create_or_charge_a_task(start):
    sim, api = start(
        fault_rate=0.5,
        fault_kinds=["500", "455", "429"],
        fault_endpoints=["generate"],
        seed=11,
        rate_limit_count=1000,
    )
    answers = [api.submit(f"p{i}").json() for i in range(30)]
    accepted = {a["data"]["taskId"] for a in answers if a["code"] == 200}
    faulted = [a["code"] for a in answers if a["code"] != 200]
    assert accepted
    assert faulted
    assert set(faulted) <= {500, 455, 429}
    assert all(a["data"] is None for a in answers if a["code"] != 200)
    stats = sim.stats()
    assert set(stats["tasks"]) == accepted
    assert stats["submissions_total"] == len(accepted)
    assert stats["credits"] == 1000 - 5 * len(accepted)
    assert sum(stats["faults_by_endpoint"]["generate"].values()) == len(faulted)
    assert stats["requests"]["generate"] == 30


def test_drop_is_refused_as_a_random_fault_on_generate(start):
    with pytest.raises(ValueError, match="'drop' cannot apply to the generate endpoint"):
        SimulatorConfig(fault_endpoints=["generate"])  # the default fault_kinds include drop
    sim, _ = start()
    with pytest.raises(ValueError, match="'drop' cannot apply to the generate endpoint"):
        sim.configure(fault_rate=1.0, fault_endpoints=["record-info", "generate"])
    config = requests.get(sim.url + "/_sim/config").json()
    assert (config["fault_rate"], config["fault_endpoints"]) == (0.0, ["record-info"])  # all or nothing
    sim.configure(fault_endpoints=["generate"], fault_kinds=["500"])
    with pytest.raises(ValueError, match="'drop' cannot apply to the generate endpoint"):
        sim.configure(fault_kinds=["500", "drop"])
    with pytest.raises(ValueError, match="fault_endpoints"):
        SimulatorConfig(fault_endpoints=["status"])


def test_random_drop_on_files_and_credit_cuts_the_connection(start):
    sim, api = start()
    url = api.finished(api.task_id("a gong"))["response"]["resultImageUrl"]
    sim.configure(fault_rate=1.0, fault_kinds=["drop"], fault_endpoints=["files", "credit"])
    with pytest.raises(DROPPED):
        requests.get(url)
    with pytest.raises(DROPPED):
        api.http.get(sim.url + CREDIT)
    sim.configure(fault_rate=0.0)
    assert requests.get(url).status_code == 200
    assert sim.stats()["faults_by_endpoint"] == {"files": {"drop": 1}, "credit": {"drop": 1}}


def test_fault_rate_follows_the_seed(start):
    sim, api = start(fault_rate=0.5, fault_kinds=["500", "455"], seed=3)
    task_id = api.task_id("a drum")

    def codes() -> list[int]:
        return [api.record_answer(task_id).json()["code"] for _ in range(16)]

    first = codes()
    assert {200, 500, 455} == set(first)
    sim.reset()
    task_id = api.task_id("a drum")
    assert codes() == first


# --------------------------------------------------------------------- callbacks
def _signature(key: str, task_id: str, timestamp: str) -> str:
    digest = hmac.new(key.encode(), f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def test_success_callback_has_the_vendor_body_and_a_valid_signature(start, receiver):
    sim, api = start(latency=0.1, webhook_hmac_key="whk-secret")
    submitted = int(time.time())
    task_id = api.task_id("a lark", callBackUrl=receiver.url)
    [call] = receiver.wait(1)
    received = time.time()
    record = api.record(task_id)
    assert call["body"] == {
        "code": 200,
        "msg": "BFL image generated successfully.",
        "data": {"taskId": task_id, "info": record["response"]},
    }
    timestamp = call["headers"]["X-Webhook-Timestamp"]
    assert submitted <= int(timestamp) <= received  # Unix seconds of the sending
    expected = _signature("whk-secret", task_id, timestamp)
    assert hmac.compare_digest(call["headers"]["X-Webhook-Signature"], expected)
    assert call["headers"]["Content-Type"] == "application/json"
    [entry] = settled(sim)["callbacks"]
    assert len(receiver.calls) == 1
    assert {k: entry[k] for k in ("taskId", "url", "attempt", "status", "error", "duplicate")} == {
        "taskId": task_id,
        "url": receiver.url,
        "attempt": 1,
        "status": 200,
        "error": None,
        "duplicate": False,
    }


@pytest.mark.parametrize(
    ("marker", "code"),
    [("[sim:content_policy]", 400), ("[sim:internal_error]", 500), ("[sim:upstream_timeout]", 500)],
)
def test_failure_callback_has_the_code_and_empty_urls_unsigned(start, receiver, marker, code):
    _, api = start()
    task_id = api.task_id(f"a lark {marker}", callBackUrl=receiver.url)
    [call] = receiver.wait(1)
    assert call["body"]["code"] == code
    assert call["body"]["data"] == {"taskId": task_id, "info": {"originImageUrl": "", "resultImageUrl": ""}}
    assert "X-Webhook-Signature" not in call["headers"]


def test_duplicate_callbacks_by_marker_and_by_config(start, receiver):
    sim, api = start()
    marked = api.task_id("twice [sim:duplicate_callback]", callBackUrl=receiver.url)
    receiver.wait(2)
    sim.configure(duplicate_callbacks=True)
    configured = api.task_id("twice too", callBackUrl=receiver.url)
    receiver.wait(4)
    stats = settled(sim)
    assert [c["body"]["data"]["taskId"] for c in receiver.calls] == [marked] * 2 + [configured] * 2
    assert [c["duplicate"] for c in stats["callbacks"]] == [False, True, False, True]


def test_failing_receiver_is_retried_on_the_scaled_schedule_then_given_up(start, receiver):
    sim, api = start(latency=5, time_factor=0.001)
    receiver.default_status = 500
    task_id = api.task_id("a gull", callBackUrl=receiver.url)
    receiver.wait(4)
    callbacks = settled(sim)["callbacks"]  # nothing pending: it gave up after 1 + 3 retries
    assert len(receiver.calls) == 4
    attempts = [(c["attempt"], c["status"], c["taskId"]) for c in callbacks]
    assert attempts == [(1, 500, task_id), (2, 500, task_id), (3, 500, task_id), (4, 500, task_id)]
    # sent_at is stamped by the simulator before each POST, so a gap is the wait plus the previous
    # POST: never shorter than the scaled delay (less 10 ms of timer rounding), and with 2 s of
    # slack for a loaded machine still far below the unscaled 60/300/900 s.
    gaps = [b["sent_at"] - a["sent_at"] for a, b in itertools.pairwise(callbacks)]
    for gap, expected in zip(gaps, (0.060, 0.300, 0.900), strict=True):
        assert expected - 0.01 <= gap <= expected + 2.0


def test_retries_stop_at_the_first_success_and_connection_errors_are_recorded(start, receiver):
    sim, api = start(time_factor=0.0001)
    receiver.statuses = [503, 502]
    api.task_id("a tern", callBackUrl=receiver.url)
    receiver.wait(3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    api.task_id("nobody home", callBackUrl=closed)
    wait_for(lambda: len(sim.stats()["callbacks"]) == 7)
    callbacks = settled(sim)["callbacks"]
    assert len(callbacks) == 7
    assert [c["status"] for c in callbacks[:3]] == [503, 502, 200]
    assert len(receiver.calls) == 3
    unreachable = callbacks[3:]
    assert [c["attempt"] for c in unreachable] == [1, 2, 3, 4]
    assert all(c["status"] is None and c["error"] for c in unreachable)


def test_reset_cancels_pending_callbacks(start, receiver):
    sim, api = start(latency=600)
    api.task_id("a wren", callBackUrl=receiver.url)
    assert sim.stats()["callbacks_pending"] == 1  # its timer is armed for 600 s from now
    sim.reset()
    assert sim.stats()["callbacks_pending"] == 0
    sim.configure(latency=0)
    after = api.task_id("a robin", callBackUrl=receiver.url)
    receiver.wait(1)
    stats = settled(sim)
    assert [c["body"]["data"]["taskId"] for c in receiver.calls] == [after]
    assert [c["taskId"] for c in stats["callbacks"]] == [after]


# -------------------------------------------------------------- hold and release
def test_held_task_generates_until_released_by_id(start):
    sim, api = start()
    first, second = api.task_id("a moth [sim:hold]"), api.task_id("a moth [sim:hold]")
    assert api.finished(api.task_id("a moth"))["successFlag"] == 1  # latency 0: unheld is done at once
    assert [api.record(t)["successFlag"] for t in (first, second)] == [0, 0]
    stats = sim.stats()
    assert stats["held"] == [first, second]
    assert stats["tasks"][first]["held"] is True
    assert stats["tasks"][first]["outcome"] == "success"
    assert sim.release(first) == [first]
    assert api.record(first)["successFlag"] == 1  # no latency marker: complete at release
    assert api.record(second)["successFlag"] == 0
    stats = sim.stats()
    assert (stats["held"], stats["tasks"][first]["held"]) == ([second], False)


def test_release_by_exact_prompt_and_release_all(start):
    sim, api = start()
    twins = [api.task_id("a kite [sim:hold]") for _ in range(2)]
    others = [api.task_id("A kite [sim:hold]"), api.task_id("a kite [sim:hold] ")]
    assert sorted(sim.release(prompt="a kite [sim:hold]")) == sorted(twins)
    assert [api.record(t)["successFlag"] for t in twins + others] == [1, 1, 0, 0]
    assert sim.stats()["held"] == others
    assert sim.release(all_held=True) == others
    assert [api.record(t)["successFlag"] for t in others] == [1, 1]
    assert sim.release(all_held=True) == []  # nothing held is not an error for "all"


def test_released_task_completes_after_its_latency_marker_with_its_outcome(start):
    sim, api = start(latency=100, time_factor=0.5, timestamp_format="epoch_ms")
    plain = api.task_id("a yak [sim:hold]")
    marked = api.task_id("a gnu [sim:hold] [sim:latency=0.4] [sim:content_policy]")
    assert sim.stats()["tasks"][marked]["outcome"] == "content_policy"
    before = time.time()
    assert sorted(sim.release(all_held=True)) == sorted([plain, marked])
    after = time.time()
    assert api.record(plain)["successFlag"] == 1  # config latency (100 s) does not apply after release
    done = api.finished(marked)
    assert (done["successFlag"], done["errorCode"]) == (3, 400)
    # release time (between the client's readings) + 0.4 s x time_factor 0.5, in ms (±1 for rounding)
    assert int(before * 1000) + 199 <= done["completeTime"] <= after * 1000 + 201


def test_release_schedules_the_callback_of_a_held_task(start, receiver):
    sim, api = start(latency=600)
    api.task_id("a slow one", callBackUrl=receiver.url)
    held = api.task_id("a crow [sim:hold]", callBackUrl=receiver.url)
    assert sim.stats()["callbacks_pending"] == 1  # the slow one's timer; none for the held task
    released = time.monotonic()
    sim.release(held)
    [call] = receiver.wait(1)
    assert call["at"] >= released
    assert call["body"]["code"] == 200
    assert call["body"]["data"]["taskId"] == held
    assert call["body"]["data"]["info"] == api.record(held)["response"]


def test_release_refuses_what_matches_no_held_task(start):
    sim, api = start()
    done = api.task_id("a cod")
    with pytest.raises(ValueError, match="no held task"):
        sim.release(done)
    with pytest.raises(ValueError, match="no held task"):
        sim.release("0" * 32)
    with pytest.raises(ValueError, match="no held task"):
        sim.release(prompt="a cod [sim:hold]")
    with pytest.raises(ValueError, match="exactly one"):
        sim.release()
    for body in ({"task_id": "x", "all": True}, {"all": False}, {"prompt": ""}, {"taskId": "x"}, []):
        answer = requests.post(sim.url + "/_sim/release", json=body)
        assert answer.status_code == 422, body
        assert answer.json()["error"]


def test_hold_cannot_be_combined_with_never_and_reset_forgets_held_tasks(start):
    sim, api = start()
    answer = api.submit("a yeti [sim:hold] [sim:never]").json()
    assert answer["code"] == 422
    assert "[sim:hold]" in answer["msg"]
    api.task_id("a ghost [sim:hold]")
    sim.reset()
    assert sim.stats()["held"] == []
    assert sim.release(all_held=True) == []


# ---------------------------------------------------------------- held callbacks
def test_hold_callbacks_keeps_a_due_callback_until_it_is_released(start, receiver):
    """The task completes as usual; only the delivery of its callback waits for the test."""
    sim, api = start(hold_callbacks=True, callback_retry_delays=[0.05])
    held = api.task_id("a heron", callBackUrl=receiver.url)
    assert api.finished(held)["successFlag"] == 1  # the task itself is not held
    wait_for(lambda: sim.stats()["callbacks_held"] == [held])
    assert (sim.stats()["callbacks"], receiver.calls, sim.stats()["callbacks_pending"]) == ([], [], 0)
    receiver.statuses = [503]  # once released, its retries run as usual, never held again
    released = time.monotonic()
    assert sim.release_callbacks(held) == [held]
    receiver.wait(2)
    assert all(call["at"] >= released for call in receiver.calls)
    stats = settled(sim)
    assert [(c["taskId"], c["attempt"], c["status"]) for c in stats["callbacks"]] == [
        (held, 1, 503),
        (held, 2, 200),
    ]
    assert stats["callbacks_held"] == []


def test_held_callbacks_are_released_by_prompt_all_or_turning_the_hold_off(start, receiver):
    sim, api = start(hold_callbacks=True)
    ids = {p: api.task_id(p, callBackUrl=receiver.url) for p in ("a gull", "a tern", "a skua", "a auk")}
    wait_for(lambda: len(sim.stats()["callbacks_held"]) == 4)
    assert sim.release_callbacks(prompt="a gull") == [ids["a gull"]]
    receiver.wait(1)
    assert sorted(sim.release_callbacks(all_held=True)) == sorted(
        [ids["a tern"], ids["a skua"], ids["a auk"]]
    )
    receiver.wait(4)
    late = api.task_id("a petrel", callBackUrl=receiver.url)
    wait_for(lambda: sim.stats()["callbacks_held"] == [late])
    sim.configure(hold_callbacks=False)  # sends what is held, and holds nothing more
    receiver.wait(5)
    after = api.task_id("a shag", callBackUrl=receiver.url)
    receiver.wait(6)
    assert [c["body"]["data"]["taskId"] for c in receiver.calls[4:]] == [late, after]


def test_release_callbacks_refuses_what_is_not_held_and_reset_forgets_them(start, receiver):
    sim, api = start(hold_callbacks=True, latency=600)
    generating = api.task_id("a loon", callBackUrl=receiver.url)
    with pytest.raises(ValueError, match="no held callback"):
        sim.release_callbacks(generating)  # not due yet: the test would be early
    with pytest.raises(ValueError, match="no held callback"):
        sim.release_callbacks(prompt="a loon")
    with pytest.raises(ValueError, match="exactly one"):
        sim.release_callbacks()
    answer = requests.post(sim.url + "/_sim/callbacks/release", json={"all": False})
    assert answer.status_code == 422
    sim.configure(latency=0)
    due = api.task_id("a grebe", callBackUrl=receiver.url)
    wait_for(lambda: sim.stats()["callbacks_held"] == [due])
    sim.reset()
    assert sim.stats()["callbacks_held"] == []
    assert sim.release_callbacks(all_held=True) == []


# ------------------------------------------------------------ held answers
def test_submit_answer_delay_holds_the_answer_for_at_least_the_delay(start):
    sim, api = start(submit_answer_delay=0.5, timestamp_format="epoch_ms")
    started = time.monotonic()
    answer = api.submit("a sloth").json()
    assert time.monotonic() - started >= 0.49  # timers may round a millisecond or so
    assert answer["code"] == 200
    refused = time.monotonic()
    assert api.submit("").json()["code"] == 422  # refusals are held back too
    assert time.monotonic() - refused >= 0.49
    assert sim.stats(tasks=False)["submissions_in_flight"] == 0


def test_in_flight_submission_is_already_created_and_charged(start):
    sim, _ = start(submit_answer_delay=600)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(Api(sim.url).submit, "a koala")
        stats = in_flight(sim, 1)
        assert (stats["submissions_total"], stats["credits"]) == (1, 995)
        [task_id] = stats["tasks"]
        assert not pending.done()  # its answer is still held back
        sim.configure(submit_answer_delay=0)  # lowering the delay sends held answers at once
        answer = pending.result(timeout=PATIENCE)
    assert answer.json()["data"]["taskId"] == task_id
    assert sim.stats(tasks=False)["submissions_in_flight"] == 0


def test_client_killed_while_waiting_for_its_answer_leaves_a_charged_task(start):
    sim, api = start(submit_answer_delay=600)
    client = f"""
import requests
session = requests.Session()
session.trust_env = False
session.post({sim.url + GENERATE!r}, json={{"prompt": "a lemur"}},
             headers={{"Authorization": "Bearer test-key"}}, timeout=900)
"""
    child = subprocess.Popen([sys.executable, "-c", client])
    try:
        [task_id] = in_flight(sim, 1)["tasks"]
    finally:
        child.kill()
        child.wait(timeout=10)
    in_flight(sim, 0)  # the server saw the client go, long before the 600 s delay
    stats = sim.stats()
    assert (stats["submissions"], stats["credits"]) == ({"a lemur": 1}, 995)
    assert api.finished(task_id)["successFlag"] == 1


# ------------------------------------------------------------- stats and control
def test_stats_count_everything(start):
    sim, api = start()
    task_id = api.task_id("a mole", model="flux-kontext-max")
    api.record(task_id)
    api.record(task_id)
    api.credit()
    api.submit("")
    result = api.record(task_id)["response"]["resultImageUrl"]
    requests.get(result)
    stats = sim.stats()
    assert stats["submissions"] == {"a mole": 1}
    assert stats["submissions_total"] == 1
    assert stats["status_calls"] == {task_id: 3}
    assert stats["status_calls_total"] == 3
    assert stats["requests"] == {"generate": 2, "record-info": 3, "credit": 1}
    assert stats["rejected"] == {"422": 1}
    assert stats["credits"] == 990
    assert stats["downloads"] == {result.removeprefix(sim.url): 1}
    task = stats["tasks"][task_id]
    assert {k: task[k] for k in ("prompt", "model", "outcome", "successFlag")} == {
        "prompt": "a mole",
        "model": "flux-kontext-max",
        "outcome": "success",
        "successFlag": 1,
    }
    assert task["submitted_at"].startswith(time.strftime("%Y-", time.gmtime()))
    assert task["held"] is False
    assert stats["callbacks"] == []
    assert (stats["held"], stats["submissions_in_flight"], stats["callbacks_pending"]) == ([], 0, 0)
    assert (stats["faults"], stats["faults_by_endpoint"]) == ({}, {})


def test_stats_can_leave_out_the_task_map(start):
    sim, api = start()
    ids = {api.task_id(f"a newt {i}") for i in range(3)}
    full, light = sim.stats(), sim.stats(tasks=False)
    assert set(full["tasks"]) == ids
    assert "tasks" not in light
    assert {k: v for k, v in full.items() if k != "tasks"} == light
    assert "tasks" not in requests.get(sim.url + "/_sim/stats", params={"tasks": "0"}).json()
    assert set(requests.get(sim.url + "/_sim/stats", params={"tasks": "1"}).json()["tasks"]) == ids


def test_reset_forgets_tasks_counters_windows_and_injections(start):
    sim, api = start(rate_limit_count=1, rate_limit_window=600, credits=50, unknown_record="404")
    task_id = api.task_id("a vole")
    assert api.submit("b").json()["code"] == 429
    sim.inject(endpoint="credit", code=500, times=5)
    sim.reset()
    stats = sim.stats()
    assert (stats["submissions_total"], stats["status_calls_total"], stats["tasks"]) == (0, 0, {})
    assert (stats["rejected"], stats["requests"], stats["pending_injections"]) == ({}, {}, 0)
    assert api.credit() == 50
    assert api.record_answer(task_id).json()["code"] == 404
    assert api.submit("c").json()["code"] == 200


def test_config_endpoint_updates_live_and_redacts_keys(start):
    sim, api = start(webhook_hmac_key="whk-secret")
    config = sim.configure(api_key="new-key", latency=3)
    assert config["api_key"] == config["webhook_hmac_key"] == "***"
    assert config["latency"] == 3
    assert sim.config.api_key == "new-key"
    assert api.credit() is None  # old key: 401, no data
    assert json.loads(sim.connection_json()) == {
        "conn_type": "imagecb",
        "host": sim.url,
        "password": "new-key",
    }
    with pytest.raises(ValueError, match="timestamp_format"):
        sim.configure(timestamp_format="rfc")
    with pytest.raises(ValueError, match="unknown"):
        sim.configure(colour="red")
    assert requests.get(sim.url + "/_sim/health").json() == {"ok": True}


def test_config_rejects_bad_values_at_construction():
    with pytest.raises(ValueError, match="fault_kinds"):
        SimulatorConfig(fault_kinds=["404"])
    with pytest.raises(ValueError, match="fault_rate"):
        SimulatorConfig(fault_rate=2)


def test_fixture_points_the_default_connection_at_the_simulator(imagecb_simulator):
    assert os.environ["AIRFLOW_CONN_IMAGECB_DEFAULT"] == imagecb_simulator.connection_json()
    assert imagecb_simulator.config.latency == 0.2
    imagecb_simulator.configure(timestamp_format="epoch_ms")
    api = Api(imagecb_simulator.url)
    done = api.finished(api.task_id())
    assert done["successFlag"] == 1
    assert 199 <= done["completeTime"] - done["createTime"] <= 201  # the fixture's 0.2 s latency


# -------------------------------------------------------------------------- CLI
def test_run_in_subprocess_serves_the_api_with_its_config():
    with run_in_subprocess(latency=0.0, api_key="sub-key", credits=40, http_status_errors=True) as sim:
        api = Api(sim.url, "sub-key")
        assert api.finished(api.task_id("a moth"))["successFlag"] == 1
        assert api.credit() == 35
        assert requests.get(sim.url + CREDIT).status_code == 401
        sim.configure(credits=7)
        assert sim.stats()["credits"] == 7
        assert sim.config.credits == 7


def test_cli_prints_where_it_listens_and_never_the_keys():
    env = dict(os.environ, PYTHONPATH=str(PLUGINS), IMAGECB_SIM_WEBHOOK_HMAC_KEY="whk-cli-secret")
    command = [sys.executable, "-m", "imagecb_provider.testing.simulator", "--port", "0"]
    command += ["--api-key", "cli-secret", "--rate-limit", "2/5", "--log-level", "warning"]
    command += ["--fault-endpoints", "credit,files", "--fault-kinds", "500,429"]
    command += ["--submit-answer-delay", "0.25"]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert "cli-secret" not in line
        url = re.search(r"http://\S+", line).group(0)
        wait_for(lambda: _answers(url))
        config = requests.get(url + "/_sim/config").json()
        assert (config["rate_limit_count"], config["rate_limit_window"]) == (2, 5.0)
        assert (config["fault_endpoints"], config["fault_kinds"]) == (["credit", "files"], ["500", "429"])
        assert config["submit_answer_delay"] == 0.25
        assert config["webhook_hmac_key"] == "***"
        assert Api(url, "cli-secret").credit() == 1000
        assert child.poll() is None
    finally:
        child.terminate()
        child.wait(timeout=10)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (older ones exit 0)
    assert child.returncode in (0, -signal.SIGTERM)
    assert not _answers(url)


def test_cli_refuses_a_random_drop_on_generate():
    env = dict(os.environ, PYTHONPATH=str(PLUGINS))
    command = [sys.executable, "-m", "imagecb_provider.testing.simulator", "--port", "0"]
    command += ["--fault-endpoints", "generate"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "'drop' cannot apply to the generate endpoint" in done.stderr
    assert "listening" not in done.stdout


def _answers(url: str) -> bool:
    """Tell whether ``/_sim/health`` answers (the socket listens before the server runs: timeouts)."""
    try:
        return requests.get(url + "/_sim/health", timeout=1).ok
    except (requests.ConnectionError, requests.Timeout):
        return False
