"""
Editing the images a user has: the generate operators take a file for ``input_image`` and upload it.

Real HTTP against the simulator (its File Upload API and its generate refusing an upload link it
cannot fetch), S3 through moto's server; operators run with ``InMemoryTaskStateStore`` contexts,
as Airflow would run a try, a retry and a rerun cleared from the UI. What was sent is read from
the simulator's counters (``uploads_total``, ``uploads_by_sha256``, ``requests``), so "uploaded once
per content" and "nothing generated" are asserted on what arrived.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from airflow.sdk import ObjectStoragePath
from airflow.sdk.exceptions import AirflowFailException
from PIL import Image

from imagecb_provider.decorators.imagecb import _ImageGenerateDecoratedOperator
from imagecb_provider.exceptions import ImageInternalError, ImageUploadFailed, InvalidInputImage
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.hooks.protocol import RetryPolicy
from imagecb_provider.models import request_key
from imagecb_provider.operators.archive import ImageArchiveOperator
from imagecb_provider.operators.generate import ImageBatchGenerateOperator, ImageGenerateOperator
from imagecb_provider.testing.airflow import InMemoryTaskStateStore
from imagecb_provider.utils import generation
from imagecb_provider.utils import inputs as upload_cache
from imagecb_provider.utils.generation import INPUTS_STATE_KEY
from imagecb_provider.utils.inputs import UPLOAD_TTL, UploadCache
from imagecb_provider.utils.ledger import STATE_KEY
from imagecb_provider.utils.limiter import HoldStore

pytestmark = pytest.mark.timeout(180)

ATTEMPTS = 3
FAST = RetryPolicy(max_attempts=ATTEMPTS, initial_delay=0.01, max_delay=0.02, jitter=0, sleep=lambda _: None)
UPLOAD = "file-stream-upload"
SECRET_KEY = "sk-live-edit-7f3a9c2e5b1d4f80"


@pytest.fixture(autouse=True)
def _no_hold():
    """Each test starts and ends with the account not on hold (in this process: no task context)."""
    HoldStore("imagecb_default").lift()
    yield
    HoldStore("imagecb_default").lift()


@pytest.fixture
def sim(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    return imagecb_simulator


class Clock:
    """The upload cache's clock, moved forward by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _image(colour: str, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format=image_format)
    return buffer.getvalue()


def _file(folder: Path, name: str, colour: str) -> str:
    path = folder / name
    path.write_bytes(_image(colour))
    return str(path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stats(sim) -> dict[str, Any]:
    return sim.stats(tasks=False)


def _calls(sim, endpoint: str) -> int:
    return _stats(sim)["requests"].get(endpoint, 0)


def _single(prompt: str, input_image: Any, **kwargs) -> ImageGenerateOperator:
    op = ImageGenerateOperator(
        task_id="edit",
        prompt=prompt,
        input_image=input_image,
        deferrable=False,
        poll_interval=0.1,
        **{"failure_mode": "return", **kwargs},
    )
    op.hook.retry_policy = FAST
    return op


def _batch(requests_: list[dict[str, Any]], **kwargs) -> ImageBatchGenerateOperator:
    op = ImageBatchGenerateOperator(
        task_id="edits",
        requests=requests_,
        deferrable=False,
        poll_interval=0.1,
        **{"failure_mode": "return", **kwargs},
    )
    op.hook.retry_policy = FAST
    return op


def _context(store, op, *, try_number: int = 1, cleared: bool = False) -> dict:
    """A context for a try, a retry, or (``cleared``) the first try of a rerun cleared from the UI."""
    op.retries = 2
    max_tries = try_number - 1 + 2 if cleared else 2
    ti = SimpleNamespace(
        try_number=try_number, max_tries=max_tries, dag_id="d", run_id="r", task_id="t", map_index=-1
    )
    return {"task_state_store": store, "ti": ti, "task": op}


def _sent_input(result: dict[str, Any]) -> str:
    """The inputImage the simulator received for the result's remote task (read back from its record)."""
    return ImageCbHook().get_task(result["task_id"]).params["inputImage"]


# -------------------------------------------------------------------- the forms it takes
def test_a_local_folder_of_edits_is_uploaded_once_per_content_and_sent_as_links(sim, tmp_path):
    paths = [_file(tmp_path, f"{i}-{c}.png", c) for i, c in enumerate(["red", "green", "red"])]
    public = f"{sim.url}/files/in.png"
    asked = [{"prompt": f"edit {i}", "input_image": p} for i, p in enumerate(paths)]
    asked.append({"prompt": "edit a link", "input_image": public})
    store = InMemoryTaskStateStore()
    op = _batch(asked)
    results = op.execute(_context(store, op))

    assert [r["outcome"] for r in results] == ["success"] * 4
    stats = _stats(sim)
    assert stats["uploads_total"] == 2  # red twice, green once: one upload per content
    assert stats["uploads_by_sha256"] == {_sha(_image("red")): 1, _sha(_image("green")): 1}
    assert _calls(sim, "generate") == 4
    for result, path in zip(results, paths, strict=False):
        # The request says what was asked (the path), and fingerprints as the ledger slot does.
        assert result["request"]["inputImage"] == path
        assert result["input_image"] == {
            "source": path,
            "sha256": _sha(Path(path).read_bytes()),
            "bytes": Path(path).stat().st_size,
            "uploaded": True,
        }
        assert _sent_input(result).startswith(f"{sim.url}/uploads/")  # the API got the upload link
    assert _sent_input(results[0]) == _sent_input(results[2])
    assert (results[3]["request"]["inputImage"], results[3]["input_image"]) == (public, None)
    assert _sent_input(results[3]) == public  # an http(s) link goes as it is, never uploaded
    slots = store[STATE_KEY]["slots"]
    assert [s["key"] for s in slots] == [request_key(r["request"]) for r in results]
    assert "/uploads/" not in json.dumps(results)  # the temporary link is in no result
    kept = store[INPUTS_STATE_KEY]["requests"]  # what was read, per request, for the results after a wait
    assert kept[slots[0]["key"]] == results[0]["input_image"]
    assert slots[3]["key"] not in kept

    op = _batch(asked)  # a rerun reconnects to every success: nothing read or sent, the same results
    again = op.execute(_context(store, op, try_number=2, cleared=True))
    assert [r["input_image"] for r in again] == [r["input_image"] for r in results]
    assert [r["task_id"] for r in again] == [r["task_id"] for r in results]
    assert (_stats(sim)["uploads_total"], _calls(sim, "generate")) == (2, 4)


def test_a_relative_path_is_read_from_the_working_directory(sim, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _file(tmp_path, "cat.png", "olive")
    op = _single("a cat in a hat", "cat.png")
    result = op.execute(_context(InMemoryTaskStateStore(), op))
    assert result["outcome"] == "success"
    assert (result["request"]["inputImage"], result["input_image"]["source"]) == ("cat.png", "cat.png")


def test_a_file_url_and_an_object_storage_path_are_one_content_one_upload(sim, tmp_path):
    path = _file(tmp_path, "teal.png", "teal")
    store = InMemoryTaskStateStore()
    op = _batch(
        [
            {"prompt": "by url", "input_image": f"file://{path}"},
            {"prompt": "by path", "input_image": ObjectStoragePath(f"file://{path}")},
        ]
    )
    results = op.execute(_context(store, op))
    assert [r["outcome"] for r in results] == ["success", "success"]
    # Kept as its URL string: the request, the ledger and the XCom stay JSON.
    assert [r["request"]["inputImage"] for r in results] == [f"file://{path}"] * 2
    assert [r["input_image"]["source"] for r in results] == [f"file://{path}"] * 2
    assert json.loads(json.dumps(results)) == results
    assert _stats(sim)["uploads_by_sha256"] == {_sha(_image("teal")): 1}


def test_an_s3_object_is_read_through_its_connection_and_uploaded(sim, moto_s3):
    png = _image("orange")
    moto_s3.put_object(Bucket="imagecb-archive", Key="inputs/fox.png", Body=png)
    op = _batch(
        [
            {"prompt": "a fox", "input_image": "s3://aws_moto@imagecb-archive/inputs/fox.png"},
            {
                "prompt": "a fox again",
                "input_image": ObjectStoragePath("s3://imagecb-archive/inputs/fox.png", conn_id="aws_moto"),
            },
        ]
    )
    results = op.execute(_context(InMemoryTaskStateStore(), op))
    assert [r["outcome"] for r in results] == ["success", "success"]
    assert [r["request"]["inputImage"] for r in results] == [
        "s3://aws_moto@imagecb-archive/inputs/fox.png"
    ] * 2
    # The source shown (and written to a manifest) names no connection.
    assert results[0]["input_image"] == {
        "source": "s3://imagecb-archive/inputs/fox.png",
        "sha256": _sha(png),
        "bytes": len(png),
        "uploaded": True,
    }
    assert _stats(sim)["uploads_by_sha256"] == {_sha(png): 1}


# ------------------------------------------------------------------- once per content
def test_one_upload_across_a_resubmission_a_cleared_rerun_and_a_retry(sim, tmp_path):
    path = _file(tmp_path, "owl.png", "navy")
    store = InMemoryTaskStateStore()

    op = _single("an owl [sim:flaky]", path, resubmit_outcomes=["internal_error"])
    first = op.execute(_context(store, op))
    assert (first["outcome"], first["earlier"][0]["outcome"]) == ("success", "internal_error")
    assert (_stats(sim)["uploads_total"], _calls(sim, "generate")) == (1, 2)  # resubmitted, not re-uploaded

    op = _single("an owl [sim:flaky]", path, resubmit_outcomes=["internal_error"])
    rerun = op.execute(_context(store, op, try_number=2, cleared=True))
    assert rerun["outcome"] == "success"
    assert rerun["task_id"] != first["task_id"]  # a single image cleared from the UI is made anew
    assert (_stats(sim)["uploads_total"], _calls(sim, "generate")) == (1, 3)

    for try_number in (3, 4):  # a failure Airflow retries: each try sends again, uploads nothing
        op = _single("an owl [sim:internal_error]", path, failure_mode="raise")
        with pytest.raises(ImageInternalError):
            op.execute(_context(store, op, try_number=try_number))
    stats = _stats(sim)
    assert stats["uploads_total"] == 1
    assert stats["uploads_by_sha256"] == {_sha(_image("navy")): 1}
    assert _calls(sim, "generate") == 5
    assert rerun["input_image"] == first["input_image"]
    assert first["input_image"]["uploaded"] is True


def test_a_link_that_may_have_expired_is_uploaded_again(sim, tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(generation, "UploadCache", functools.partial(UploadCache, clock=clock))
    sim.configure(upload_ttl=4)  # the vendor deletes an upload 4 s after it was made
    path = _file(tmp_path, "heron.png", "grey")
    store = InMemoryTaskStateStore()
    op = _single("a heron", path)
    assert op.execute(_context(store, op))["outcome"] == "success"
    link = store[upload_cache.STATE_KEY]["files"][_sha(_image("grey"))]["download_url"]

    time.sleep(4.2)
    assert requests.get(link, timeout=30).status_code == 404  # deleted on the vendor's side
    clock.now += UPLOAD_TTL  # and, as the cache counts, a day has passed
    op = _single("a heron", path)
    again = op.execute(_context(store, op, try_number=2, cleared=True))
    assert again["outcome"] == "success"  # the generate took the new upload (an expired one is a 422)
    assert _stats(sim)["uploads_by_sha256"] == {_sha(_image("grey")): 2}
    assert _calls(sim, "generate") == 2


# ------------------------------------------------------------------------ upload faults
@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ({"code": 429, "retry_after": 1, "times": ATTEMPTS}, 429),
        ({"code": 429, "retry_after": 3600, "times": ATTEMPTS}, 429),  # a cap's wait: no account hold
        ({"code": 500, "times": ATTEMPTS}, 500),
        ({"drop": True, "times": ATTEMPTS}, None),
    ],
    ids=["429", "429-long", "500", "drop"],
)
def test_an_upload_that_fails_ends_its_request_upload_failed_and_nothing_is_generated(
    sim, tmp_path, fault, code
):
    path = _file(tmp_path, "stork.png", "white")
    store = InMemoryTaskStateStore()
    asked = [{"prompt": "a stork", "input_image": path}, {"prompt": "a crane"}]
    sim.inject(endpoint=UPLOAD, **fault)
    op = _batch(asked)
    results = op.execute(_context(store, op))

    assert [r["outcome"] for r in results] == ["upload_failed", "success"]
    failed = results[0]
    assert (failed["task_id"], failed["code"], failed["result_image_url"]) == (None, code, None)
    assert failed["message"].startswith(f"The input image {path} could not be uploaded (")
    assert failed["message"].endswith("nothing was sent")
    assert failed["input_image"] == {
        "source": path,
        "sha256": _sha(_image("white")),
        "bytes": len(_image("white")),
        "uploaded": False,
    }
    stats = _stats(sim)
    assert stats["uploads_total"] == 0
    assert stats["submissions"] == {"a crane": 1}  # not one generate for the stork
    assert HoldStore("imagecb_default").get() is None  # an upload's refusal holds no submissions
    slot = store[STATE_KEY]["slots"][0]
    assert (slot["outcome"], slot["remote_task_id"], slot["sending"]) == ("upload_failed", None, False)

    op = _batch(asked)  # the next try uploads again; the crane is reconnected to, not paid twice
    retried = op.execute(_context(store, op, try_number=2))
    assert [r["outcome"] for r in retried] == ["success", "success"]
    assert retried[1]["task_id"] == results[1]["task_id"]
    assert retried[0]["input_image"]["uploaded"] is True
    stats = _stats(sim)
    assert stats["uploads_total"] == 1
    assert stats["submissions"] == {"a crane": 1, "a stork": 1}


def test_a_single_image_whose_upload_failed_raises_a_retryable_error(sim, tmp_path):
    path = _file(tmp_path, "ibis.png", "black")
    sim.inject(endpoint=UPLOAD, code=500, times=ATTEMPTS)
    op = _single("an ibis", path, failure_mode="raise")
    with pytest.raises(
        ImageUploadFailed, match=r"upload_failed: The input image .* could not be uploaded"
    ) as info:
        op.execute(_context(InMemoryTaskStateStore(), op))
    assert not isinstance(info.value, AirflowFailException)  # Airflow retries: the retry uploads again
    assert info.value.result["outcome"] == "upload_failed"

    sim.inject(endpoint=UPLOAD, drop=True, times=ATTEMPTS)
    op = _single("an ibis", path, wait_for_completion=False)
    assert op.execute(_context(InMemoryTaskStateStore(), op)) is None  # no remote task id to hand on
    assert (_calls(sim, "generate"), _stats(sim)["uploads_total"]) == (0, 0)


# ------------------------------------------------------------------- files it refuses
def test_bad_files_are_refused_before_any_request(sim, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("hello")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * (10 * 1024 * 1024))
    asked = [
        {"prompt": "not an image", "input_image": str(notes)},
        {"prompt": "too large", "input_image": str(big)},
        {"prompt": "missing", "input_image": str(tmp_path / "missing.png")},
        {"prompt": "a gannet"},
    ]
    op = _batch(asked)
    results = op.execute(_context(InMemoryTaskStateStore(), op))
    assert [r["outcome"] for r in results] == ["upload_failed"] * 3 + ["success"]
    for result, reason in zip(
        results,
        ["not those of a PNG, JPEG or WEBP image", "over 10485760 bytes", "no such file"],
        strict=False,
    ):
        assert result["message"].startswith("Invalid input_image ")
        assert reason in result["message"]
        assert result["message"].endswith("Nothing was uploaded or sent")
        assert (result["code"], result["input_image"]) == (None, None)
    stats = _stats(sim)
    assert (_calls(sim, UPLOAD), stats["uploads_total"]) == (0, 0)
    assert stats["submissions"] == {"a gannet": 1}

    op = _single("not an image", str(notes), failure_mode="return")
    with pytest.raises(InvalidInputImage, match="not those of a PNG, JPEG or WEBP image") as info:
        op.execute(_context(InMemoryTaskStateStore(), op))
    assert isinstance(info.value, AirflowFailException)  # one request: fails at once, whatever the mode
    assert (_calls(sim, UPLOAD), _calls(sim, "generate")) == (0, 1)


def test_a_credential_in_the_source_is_refused_when_the_dag_is_parsed(sim, tmp_path):
    from imagecb_provider.exceptions import InvalidGenerationRequest

    for source in (
        "s3://AKIA:secret@bucket/a.png",
        "https://user:pw@example.com/a.png",
        "https://bucket.s3.amazonaws.com/a.png?X-Amz-Signature=abc123",
    ):
        with pytest.raises(InvalidGenerationRequest, match="input_image") as info:
            _single("x", source)
        assert "secret" not in str(info.value)
        assert "abc123" not in str(info.value)
        assert "pw@" not in str(info.value)
    assert _stats(sim)["requests"] == {}


# ---------------------------------------------------------------------------- secrets
def test_the_key_and_the_links_never_reach_results_or_logs(monkeypatch, sim, tmp_path, caplog, capsys):
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps({"conn_type": "imagecb", "host": sim.url, "password": SECRET_KEY}),
    )
    sim.configure(api_key=SECRET_KEY)
    caplog.set_level(logging.DEBUG)
    first, second = _file(tmp_path, "a.png", "red"), _file(tmp_path, "b.png", "blue")
    # The upload API (or a proxy) echoes the request, Authorization header included, into its msg.
    sim.inject(endpoint=UPLOAD, code=500, echo=True, times=ATTEMPTS)
    store = InMemoryTaskStateStore()
    op = _batch([{"prompt": "a bee", "input_image": first}, {"prompt": "a wasp", "input_image": second}])
    results = op.execute(_context(store, op))
    assert [r["outcome"] for r in results] == ["upload_failed", "success"]
    assert "Bearer ***" in results[0]["message"]
    texts = [caplog.text, *capsys.readouterr(), json.dumps(results), json.dumps(dict(store))]
    assert not [text for text in texts if SECRET_KEY in text]
    assert "/uploads/" not in json.dumps(results)


# ------------------------------------------------------------------------- chained edits
def test_two_edits_chain_through_the_archive_operators_path(sim, tmp_path):
    source = _file(tmp_path, "door.png", "red")
    archive = str(tmp_path / "archive")
    op = _single("paint the door blue", source, output_format="png")
    first = op.execute(_context(InMemoryTaskStateStore(), op))
    kept = ImageArchiveOperator(task_id="archive", results=first, destination=archive).execute({})
    path = kept["files"][0]["path"]
    assert path.startswith("file://")

    def next_edit(previous: dict) -> dict:
        """A TaskFlow step: edit what the previous step archived."""
        return {"prompt": "now add a brass knocker", "input_image": previous["files"][0]["path"]}

    step = _ImageGenerateDecoratedOperator(
        task_id="next_edit",
        python_callable=next_edit,
        op_args=[kept],
        deferrable=False,
        poll_interval=0.1,
        failure_mode="return",
    )
    step.hook.retry_policy = FAST
    second = step.execute(_context(InMemoryTaskStateStore(), step))
    assert second["outcome"] == "success"
    assert second["request"]["inputImage"] == path
    # Before and after: the second edit's input is exactly the file the first one archived.
    assert second["input_image"] == {
        "source": path,
        "sha256": kept["files"][0]["sha256"],
        "bytes": kept["files"][0]["bytes"],
        "uploaded": True,
    }
    assert _sent_input(second).startswith(f"{sim.url}/uploads/")
    kept_again = ImageArchiveOperator(task_id="archive", results=second, destination=archive).execute({})
    assert kept_again["files"][0]["sha256"] != kept["files"][0]["sha256"]
    assert _stats(sim)["uploads_by_sha256"] == {_sha(_image("red")): 1, kept["files"][0]["sha256"]: 1}


def test_a_sensor_waits_on_the_id_of_an_edit_submitted_with_a_file(sim, tmp_path):
    from imagecb_provider.sensors.task import ImageTaskSensor

    op = _single("a lynx", _file(tmp_path, "lynx.png", "tan"), wait_for_completion=False)
    remote_id = op.execute(_context(InMemoryTaskStateStore(), op))
    sensor = ImageTaskSensor(task_id="wait", remote_task_id=remote_id, deferrable=False, poke_interval=0.1)
    done = sensor.poke({})
    while done is False:
        time.sleep(0.1)
        done = sensor.poke({})
    result = done.xcom_value
    assert (result["task_id"], result["outcome"]) == (remote_id, "success")
    # The sensor knows the task only by its id: its request is the vendor's echo, no file to describe.
    assert result["input_image"] is None
    assert _stats(sim)["uploads_total"] == 1
