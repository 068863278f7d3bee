"""
Poisoned vendor answers over real HTTP: a submit answer or a record-info answer carrying a hostile id.

A loopback stand-in for the API answers what each case needs. The ledger rule is the point: a
submit answer whose id cannot be used still means the API took the request, so the slot is
settled ``submission_uncertain`` at once and no later try (automatic or not) sends it again.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from imagecb_provider.exceptions import (
    ImageCbError,
    ImageInternalError,
    ImageSubmissionUncertain,
    InvalidRemoteTaskId,
)
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.models import GenerationRequest, request_key
from imagecb_provider.operators.generate import ImageBatchGenerateOperator, ImageGenerateOperator
from imagecb_provider.sensors.task import ImageTaskSensor
from imagecb_provider.testing.airflow import InMemoryTaskStateStore
from imagecb_provider.utils.ledger import STATE_KEY, LedgerEntry, Slot

pytestmark = pytest.mark.timeout(60)

HOSTILE_SUBMIT_IDS = ["../../escaped", "/etc/cron.d/x", "a\\..\\b", "\uff0e\uff0e", "x" * 129, 12345, ""]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


class PoisonedApi:
    """
    The image API's three endpoints on loopback, answering what a test sets.

    :param submit_ids: the ``taskId`` of each submit answer in turn (then fresh good ones).
    :param record_ids: per asked id, the ``taskId`` its record-info answer names (default: the same).
    :param failing: asked ids whose record-info says the generation failed with code 500.
    """

    def __init__(self) -> None:
        self.submit_ids: list[Any] = []
        self.record_ids: dict[str, Any] = {}
        self.failing: set[str] = set()
        self.submissions = 0
        self.status_calls: Counter = Counter()
        self.url = ""

    def submit_answer(self) -> dict[str, Any]:
        self.submissions += 1
        task_id = self.submit_ids.pop(0) if self.submit_ids else f"good-{uuid.uuid4().hex[:12]}"
        return {"code": 200, "msg": "success", "data": {"taskId": task_id}}

    def record_answer(self, asked: str) -> dict[str, Any]:
        self.status_calls[asked] += 1
        failed = asked in self.failing
        files = {"resultImageUrl": f"{self.url}/files/{asked}.png", "originImageUrl": None}
        data = {
            "taskId": self.record_ids.get(asked, asked),
            "paramJson": json.dumps({"prompt": "a fig"}),
            "successFlag": 3 if failed else 1,
            "errorCode": 500 if failed else None,
            "errorMessage": "boom" if failed else "",
            "response": None if failed else files,
            "createTime": "2026-01-01T00:00:00Z",
            "completeTime": "2026-01-01T00:00:10Z",
        }
        return {"code": 200, "msg": "success", "data": data}


@pytest.fixture
def poisoned_api(monkeypatch) -> Iterator[PoisonedApi]:
    api = PoisonedApi()
    png = _png()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/api/v1/flux/kontext/generate"):
                self._send(200, json.dumps(api.submit_answer()).encode())
            else:
                self._send(404, b'{"code": 404, "msg": "no such endpoint"}')

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path == "/api/v1/flux/kontext/record-info":
                asked = parse_qs(parts.query).get("taskId", [""])[0]
                self._send(200, json.dumps(api.record_answer(asked)).encode())
            elif parts.path.startswith("/files/"):
                self._send(200, png, "image/png")
            else:
                self._send(404, b'{"code": 404, "msg": "no such endpoint"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT", json.dumps({"conn_type": "imagecb", "host": api.url, "password": "k"})
    )
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


def _operator(prompt: str = "a fig", **kwargs: Any) -> ImageGenerateOperator:
    return ImageGenerateOperator(
        task_id="generate", prompt=prompt, deferrable=False, **{"poll_interval": 0.1, **kwargs}
    )


def _context(store: InMemoryTaskStateStore, op: Any, *, try_number: int, cleared: bool = False) -> dict:
    """A context for a first try, an automatic retry, or the first try of a rerun cleared from the UI."""
    op.retries = 2
    max_tries = try_number - 1 + op.retries if cleared else op.retries
    ti = SimpleNamespace(
        try_number=try_number, max_tries=max_tries, dag_id="d", run_id="r", task_id="t", map_index=-1
    )
    return {"task_state_store": store, "ti": ti, "task": op}


# ----------------------------------------------------------------- the submit answer
@pytest.mark.parametrize("hostile", HOSTILE_SUBMIT_IDS, ids=repr)
def test_a_submit_answer_with_a_hostile_id_is_uncertain_and_never_resent(poisoned_api, hostile):
    poisoned_api.submit_ids = [hostile]
    store = InMemoryTaskStateStore()
    op = _operator(failure_mode="return")
    result = op.execute(_context(store, op, try_number=1))
    assert (result["outcome"], result["task_id"]) == ("submission_uncertain", None)
    assert result["message"].startswith("Sent, but its answer could not be used (")
    assert "Check the account" in result["message"]
    slot = store[STATE_KEY]["slots"][0]
    assert (slot["outcome"], slot["remote_task_id"]) == ("submission_uncertain", None)
    assert not poisoned_api.status_calls  # the id was never used, not even in a status call
    # A retry (automatic) and the same try run again: never sent a second time.
    again = op.execute(_context(store, op, try_number=2))
    assert (again["outcome"], again["task_id"]) == ("submission_uncertain", None)
    assert poisoned_api.submissions == 1


def test_with_failure_mode_raise_it_fails_at_once_naming_the_refused_id(poisoned_api):
    poisoned_api.submit_ids = ["../../escaped"]
    op = _operator()
    with pytest.raises(
        ImageSubmissionUncertain, match=r"Refused the remote task id '\.\./\.\./escaped'"
    ) as info:
        op.execute(_context(InMemoryTaskStateStore(), op, try_number=1))
    assert info.value.result["task_id"] is None
    assert poisoned_api.submissions == 1


def test_an_unchecked_hostile_id_from_the_hook_is_caught_by_the_generation_too(poisoned_api, monkeypatch):
    """Whatever the hook checks, the id (a URL part, a file name) is checked again where it is stored."""
    monkeypatch.setattr(ImageCbHook, "submit", lambda hook, request, retry=True: "../../escaped")
    op = _operator(failure_mode="return")
    result = op.execute(_context(InMemoryTaskStateStore(), op, try_number=1))
    assert (result["outcome"], result["task_id"]) == ("submission_uncertain", None)
    assert "from the submit answer" in result["message"]
    assert not poisoned_api.status_calls


def test_an_invalid_id_raised_by_the_hook_is_uncertain_too(poisoned_api, monkeypatch):
    def submit(hook, request, retry=True):
        raise InvalidRemoteTaskId("the submit answer", "/etc/cron.d/x")

    monkeypatch.setattr(ImageCbHook, "submit", submit)
    op = _operator(failure_mode="return")
    result = op.execute(_context(InMemoryTaskStateStore(), op, try_number=1))
    assert (result["outcome"], result["task_id"]) == ("submission_uncertain", None)


def test_a_batch_keeps_the_others_and_its_retry_never_resends_the_uncertain_one(poisoned_api):
    """An internal error elsewhere makes Airflow retry the batch: the uncertain request stays unsent."""
    poisoned_api.submit_ids = ["../../escaped", "good-fails", "good-ok"]
    poisoned_api.failing = {"good-fails"}
    requests = [{"prompt": "a fig"}, {"prompt": "a pear"}, {"prompt": "a plum"}]
    store = InMemoryTaskStateStore()
    batch = ImageBatchGenerateOperator(task_id="b", requests=requests, deferrable=False, poll_interval=0.1)
    with pytest.raises(ImageInternalError):  # retryable: it wins over the uncertain one
        batch.execute(_context(store, batch, try_number=1))
    assert [s["outcome"] for s in store[STATE_KEY]["slots"]] == [
        "submission_uncertain",
        "internal_error",
        "success",
    ]
    assert poisoned_api.submissions == 3
    poisoned_api.failing = set()
    batch.failure_mode = "return"
    results = batch.execute(_context(store, batch, try_number=2))  # the automatic retry
    assert [r["outcome"] for r in results] == ["submission_uncertain", "success", "success"]
    assert results[0]["task_id"] is None
    assert results[2]["task_id"] == "good-ok"  # reused, not paid again
    assert poisoned_api.submissions == 4  # only the failed one was sent again
    # A person checked the account and cleared the task: now it is sent again.
    results = batch.execute(_context(store, batch, try_number=4, cleared=True))
    assert [r["outcome"] for r in results] == ["success"] * 3
    assert poisoned_api.submissions == 5


@pytest.mark.parametrize("failure_mode", ["raise", "return"])
def test_submit_only_with_a_hostile_answer_hands_no_id_on(poisoned_api, failure_mode):
    poisoned_api.submit_ids = ["../../escaped"]
    op = _operator(wait_for_completion=False, failure_mode=failure_mode)
    context = _context(InMemoryTaskStateStore(), op, try_number=1)
    if failure_mode == "raise":
        with pytest.raises(ImageSubmissionUncertain, match="could not be used"):
            op.execute(context)
    else:
        assert op.execute(context) is None
    assert poisoned_api.submissions == 1
    assert not poisoned_api.status_calls


@pytest.mark.parametrize("finished", [False, True])
def test_a_hostile_id_in_the_stored_ledger_is_never_polled_nor_resent(poisoned_api, finished):
    key = request_key(GenerationRequest(prompt="a fig").to_payload())
    entry = LedgerEntry(
        slots=[Slot(key=key, remote_task_id="../../escaped", outcome="success")], finished=finished
    )
    store = InMemoryTaskStateStore({STATE_KEY: entry.to_dict()})
    op = _operator(failure_mode="return")
    result = op.execute(_context(store, op, try_number=2))
    assert (result["outcome"], result["task_id"]) == ("submission_uncertain", None)
    assert "Its stored answer could not be used (Refused the remote task id" in result["message"]
    assert poisoned_api.submissions == 0
    assert not poisoned_api.status_calls


# ------------------------------------------------------------ the record-info answer
def test_a_record_info_answer_naming_a_hostile_id_fails_the_wait(poisoned_api):
    poisoned_api.submit_ids = ["good-1"]
    poisoned_api.record_ids = {"good-1": "../../escaped"}
    store = InMemoryTaskStateStore()
    op = _operator(failure_mode="return")
    with pytest.raises(
        ImageCbError, match=r"Refused the remote task id '\.\./\.\./escaped' from a record-info answer"
    ):
        op.execute(_context(store, op, try_number=1))
    slot = store[STATE_KEY]["slots"][0]
    assert (slot["remote_task_id"], slot["outcome"]) == ("good-1", None)  # a retry reconnects, never resends
    assert poisoned_api.submissions == 1


@pytest.mark.parametrize("hostile", ["/etc/cron.d/x", "a/../../b", None, 7])
def test_a_sensor_refuses_a_record_info_answer_naming_a_hostile_id(poisoned_api, hostile):
    poisoned_api.record_ids = {"good-1": hostile}
    sensor = ImageTaskSensor(task_id="wait", remote_task_id="good-1", deferrable=False, poke_interval=0.1)
    with pytest.raises(InvalidRemoteTaskId, match="from a record-info answer"):
        sensor.poke({})
    assert poisoned_api.status_calls["good-1"] == 1
