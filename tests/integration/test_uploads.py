"""
Users' own input images over real HTTP: the simulator's File Upload API, the hook's upload, the cache.

No mocks: the simulator serves the vendor's three upload endpoints and the files they make, the
hook uploads through ``requests``, S3 is moto's server. What was sent is read from the
simulator's counters (``uploads``, ``uploads_by_sha256``, ``requests``), so "one upload per
content" and "nothing sent" are asserted on what arrived, not on what the client meant to do.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from PIL import Image

from imagecb_provider.exceptions import (
    ImageCbAuthenticationError,
    ImageCbConnectionError,
    ImageCbPermanentApiError,
    ImageCbServerError,
    ImageCbValidationError,
    InvalidInputImage,
)
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.hooks.protocol import RetryPolicy
from imagecb_provider.hooks.uploads import STREAM_UPLOAD_PATH, UploadedFile
from imagecb_provider.models import GenerationRequest
from imagecb_provider.testing.airflow import InMemoryTaskStateStore
from imagecb_provider.utils.inputs import (
    STATE_KEY,
    UPLOAD_PATH,
    UploadCache,
    input_image_url,
    read_input_image,
)

pytestmark = pytest.mark.timeout(120)

BASE64_UPLOAD = "/api/file-base64-upload"
URL_UPLOAD = "/api/file-url-upload"
GENERATE = "/api/v1/flux/kontext/generate"
UPLOAD_ENDPOINTS = ("file-stream-upload", "file-base64-upload", "file-url-upload")
SECRET_KEY = "sk-live-upload-4e2d9a7c1b3f5e60"
DROPPED = (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)


class Waits(list):
    """Records the retry waits instead of sleeping them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class Clock:
    """A clock a test moves forward by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def hook(imagecb_simulator, waits) -> ImageCbHook:
    return ImageCbHook(
        retry_policy=RetryPolicy(max_attempts=4, initial_delay=1.0, max_delay=8.0, jitter=0.5, sleep=waits)
    )


@pytest.fixture
def api(imagecb_simulator) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = "Bearer test-key"
    return session


def _image(colour: str, image_format: str = "PNG", size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format=image_format)
    return buffer.getvalue()


def _stats(sim) -> dict[str, Any]:
    return sim.stats(tasks=False)


def _upload_requests(sim) -> int:
    return sum(_stats(sim)["requests"].get(name, 0) for name in UPLOAD_ENDPOINTS)


def _stream(api, sim, data: bytes, *, upload_path: str = "in", file_name: str | None = "a.png"):
    fields = {"uploadPath": upload_path} | ({"fileName": file_name} if file_name else {})
    return api.post(
        sim.url + STREAM_UPLOAD_PATH, files={"file": ("orig.png", data, "image/png")}, data=fields, timeout=30
    )


def _generate(api, sim, input_image: str) -> dict[str, Any]:
    return api.post(
        sim.url + GENERATE, json={"prompt": "a cat", "inputImage": input_image}, timeout=30
    ).json()


# ----------------------------------------------------------------- the simulator
def test_the_three_upload_endpoints_answer_the_vendors_envelope(imagecb_simulator, api):
    sim, png = imagecb_simulator, _image("red")
    stream = _stream(api, sim, png, upload_path="images/user-uploads", file_name="my image.png").json()
    assert (stream["success"], stream["code"], stream["msg"]) == (True, 200, "File uploaded successfully")
    data = stream["data"]
    assert set(data) == {"fileName", "filePath", "downloadUrl", "fileSize", "mimeType", "uploadedAt"}
    assert (data["fileName"], data["filePath"]) == ("my image.png", "images/user-uploads/my image.png")
    assert (data["fileSize"], data["mimeType"]) == (len(png), "image/png")
    assert data["downloadUrl"].startswith(sim.url + "/uploads/")
    assert data["downloadUrl"].endswith("/images/user-uploads/my%20image.png")
    assert datetime.fromisoformat(data["uploadedAt"].replace("Z", "+00:00")).tzinfo is not None
    served = requests.get(data["downloadUrl"], timeout=30)
    assert (served.status_code, served.headers["content-type"], served.content) == (200, "image/png", png)

    jpeg = _image("blue", "JPEG")
    encoded = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    b64 = api.post(sim.url + BASE64_UPLOAD, json={"base64Data": encoded, "uploadPath": "b64"}, timeout=30)
    b64_data = b64.json()["data"]
    assert b64_data["mimeType"] == "image/jpeg"
    assert b64_data["fileName"].endswith(".jpg")  # no fileName: a random one, as the vendor makes up
    assert requests.get(b64_data["downloadUrl"], timeout=30).content == jpeg

    by_url = api.post(
        sim.url + URL_UPLOAD,
        json={"fileUrl": data["downloadUrl"], "uploadPath": "copies", "fileName": "copy.png"},
        timeout=30,
    ).json()
    assert requests.get(by_url["data"]["downloadUrl"], timeout=30).content == png

    stats = _stats(sim)
    assert stats["uploads"] == dict.fromkeys(UPLOAD_ENDPOINTS, 1)
    assert stats["uploads_total"] == 3
    assert stats["uploads_by_sha256"] == {
        hashlib.sha256(png).hexdigest(): 2,
        hashlib.sha256(jpeg).hexdigest(): 1,
    }
    assert stats["uploads_stored"] == 3
    assert stats["credits"] == 1000  # uploads are free


def test_the_same_name_in_the_same_path_overwrites(imagecb_simulator, api):
    first = _stream(api, imagecb_simulator, _image("red")).json()["data"]["downloadUrl"]
    second = _stream(api, imagecb_simulator, _image("green")).json()["data"]["downloadUrl"]
    assert first == second
    assert requests.get(first, timeout=30).content == _image("green")
    assert _stats(imagecb_simulator)["uploads_stored"] == 1


@pytest.mark.parametrize("http_status_errors", [False, True])
def test_bad_uploads_are_refused_in_the_envelope(imagecb_simulator, api, http_status_errors):
    sim = imagecb_simulator
    sim.configure(upload_max_bytes=100, http_status_errors=http_status_errors)
    cases = [
        (_stream(api, sim, b"\x89PNG" + b"\x00" * 200), 400, "File too large: at most 100 bytes"),
        (_stream(api, sim, b"\x89PNG", upload_path=""), 400, "uploadPath is required"),
        (_stream(api, sim, b"\x89PNG", upload_path="a/../b"), 400, "without . or .."),
        (_stream(api, sim, b"\x89PNG", file_name="x/y.png"), 400, "fileName"),
        (api.post(sim.url + STREAM_UPLOAD_PATH, files={"uploadPath": (None, "in")}), 400, "file is required"),
        (api.post(sim.url + STREAM_UPLOAD_PATH, data={"uploadPath": "in"}), 400, "multipart/form-data"),
        (
            api.post(sim.url + BASE64_UPLOAD, json={"base64Data": "%%%", "uploadPath": "x"}, timeout=30),
            400,
            "",
        ),
        (api.post(sim.url + URL_UPLOAD, json={"fileUrl": "ftp://x", "uploadPath": "x"}, timeout=30), 400, ""),
        (api.get(sim.url + STREAM_UPLOAD_PATH, timeout=30), 405, "use POST"),
        (
            requests.post(
                sim.url + BASE64_UPLOAD, json={"base64Data": "AAAA", "uploadPath": "x"}, timeout=30
            ),
            401,
            "API key",
        ),
    ]
    for answer, code, text in cases:
        body = answer.json()
        assert (body["success"], body["code"], body["data"]) == (False, code, None), body
        assert text in body["msg"]
        assert answer.status_code == (code if http_status_errors else 200)
    stats = _stats(sim)
    assert stats["uploads_total"] == 0
    assert stats["rejected"] == {"400": 8, "405": 1, "401": 1}


def test_an_upload_expires_after_upload_ttl(imagecb_simulator, api):
    url = _stream(api, imagecb_simulator, _image("red")).json()["data"]["downloadUrl"]
    assert requests.get(url, timeout=30).status_code == 200
    imagecb_simulator.configure(upload_ttl=0)  # read live: every upload made so far has expired
    assert requests.get(url, timeout=30).status_code == 404
    assert _stats(imagecb_simulator)["uploads_stored"] == 0
    assert requests.get(imagecb_simulator.url + "/uploads/nobody/x.png", timeout=30).status_code == 404


def test_generate_refuses_an_upload_link_it_cannot_fetch(imagecb_simulator, api):
    sim = imagecb_simulator
    url = _stream(api, sim, _image("red")).json()["data"]["downloadUrl"]
    assert _generate(api, sim, url)["code"] == 200  # a live upload is fetched
    unknown = _generate(api, sim, sim.url + "/uploads/nobody/in/missing.png")
    assert (unknown["code"], unknown["data"]) == (422, None)
    assert unknown["msg"].startswith("inputImage could not be fetched")
    sim.configure(upload_ttl=0)
    expired = _generate(api, sim, url)
    assert expired["code"] == 422
    assert "inputImage" in expired["msg"]
    assert "expired" in expired["msg"]
    # A public image that is not an upload link keeps today's behaviour: never fetched, accepted.
    assert _generate(api, sim, "https://example.com/uploads/anything.png")["code"] == 200
    stats = _stats(sim)
    assert (stats["submissions_total"], stats["rejected"]) == (2, {"422": 2})
    assert stats["credits"] == 1000 - 2 * 5  # refused submissions cost nothing


@pytest.mark.parametrize("endpoint", UPLOAD_ENDPOINTS)
def test_upload_faults_are_injected_and_drawn_like_the_others(imagecb_simulator, api, endpoint):
    sim = imagecb_simulator
    path = {"file-stream-upload": STREAM_UPLOAD_PATH, "file-base64-upload": BASE64_UPLOAD}.get(
        endpoint, URL_UPLOAD
    )
    body = {
        "base64Data": base64.b64encode(_image("red")).decode(),
        "fileUrl": "https://x/y.png",
        "uploadPath": "i",
    }
    sim.inject(endpoint=endpoint, code=429, retry_after=3)
    limited = api.post(sim.url + path, json=body, timeout=30)
    assert (limited.json()["success"], limited.json()["code"], limited.headers["Retry-After"]) == (
        False,
        429,
        "3",
    )
    sim.inject(endpoint=endpoint, drop=True)
    with pytest.raises(DROPPED):
        api.post(sim.url + path, json=body, timeout=30)
    sim.configure(fault_rate=1.0, fault_kinds=["500"], fault_endpoints=[endpoint])
    assert api.post(sim.url + path, json=body, timeout=30).json()["code"] == 500
    stats = _stats(sim)
    assert stats["faults_by_endpoint"] == {endpoint: {"500": 1}}
    assert stats["injected"] == {"429": 1, "drop": 1}
    assert stats["requests"][endpoint] == 3
    assert stats["uploads_total"] == 0


# ------------------------------------------------------------------------ the hook
def test_the_hook_uploads_a_file_and_gets_a_checked_link(hook, imagecb_simulator):
    png = _image("red")
    uploaded = hook.upload_file(png, file_name="cat.png", upload_path="imagecb/tests")
    assert isinstance(uploaded, UploadedFile)
    assert uploaded.download_url.startswith(imagecb_simulator.url + "/uploads/")
    assert (uploaded.file_name, uploaded.size, uploaded.mime_type) == ("cat.png", len(png), "image/png")
    assert uploaded.sha256 == hashlib.sha256(png).hexdigest()
    assert abs(uploaded.uploaded_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert requests.get(uploaded.download_url, timeout=30).content == png
    assert hook.submit(GenerationRequest(prompt="a cat in a hat", input_image=uploaded.download_url))
    assert _stats(imagecb_simulator)["uploads"] == {"file-stream-upload": 1}


@pytest.mark.parametrize("http_status", [False, True], ids=["body-code", "http-status"])
def test_a_rate_limited_upload_is_retried_then_succeeds(hook, imagecb_simulator, waits, http_status):
    imagecb_simulator.inject(endpoint="file-stream-upload", code=429, retry_after=2, http_status=http_status)
    assert hook.upload_file(_image("red"), file_name="a.png", upload_path="in").size > 0
    assert waits == [2.0]
    stats = _stats(imagecb_simulator)
    assert (stats["requests"]["file-stream-upload"], stats["uploads_total"]) == (2, 1)


def test_server_errors_are_retried_then_the_last_is_raised(hook, imagecb_simulator, waits):
    imagecb_simulator.inject(endpoint="file-stream-upload", code=500, times=2)
    assert hook.upload_file(_image("red"), file_name="a.png", upload_path="in")
    assert len(waits) == 2
    imagecb_simulator.inject(endpoint="file-stream-upload", code=500, times=50)
    with pytest.raises(ImageCbServerError, match=r"answered 500 on /api/file-stream-upload"):
        hook.upload_file(_image("red"), file_name="a.png", upload_path="in")
    assert _stats(imagecb_simulator)["requests"]["file-stream-upload"] == 3 + hook.retry_policy.max_attempts


def test_a_dropped_upload_is_sent_again(hook, imagecb_simulator, waits):
    imagecb_simulator.inject(endpoint="file-stream-upload", drop=True, times=2)
    uploaded = hook.upload_file(_image("red"), file_name="a.png", upload_path="in")
    assert requests.get(uploaded.download_url, timeout=30).status_code == 200
    assert len(waits) == 2
    imagecb_simulator.configure(fault_rate=1.0, fault_kinds=["drop"], fault_endpoints=["file-stream-upload"])
    with pytest.raises(ImageCbConnectionError, match="Could not reach the upload API"):
        hook.upload_file(_image("red"), file_name="a.png", upload_path="in")
    assert _stats(imagecb_simulator)["uploads_total"] == 1


@pytest.mark.parametrize(
    ("code", "error"), [(401, ImageCbAuthenticationError), (400, ImageCbPermanentApiError)]
)
def test_permanent_upload_errors_fail_at_once(hook, imagecb_simulator, waits, code, error):
    imagecb_simulator.inject(endpoint="file-stream-upload", code=code, times=5)
    with pytest.raises(error):
        hook.upload_file(_image("red"), file_name="a.png", upload_path="in")
    assert waits == []
    assert _stats(imagecb_simulator)["requests"]["file-stream-upload"] == 1


def test_the_simulators_size_cap_is_a_permanent_error(hook, imagecb_simulator, waits):
    imagecb_simulator.configure(upload_max_bytes=10)
    with pytest.raises(ImageCbPermanentApiError, match="File too large"):
        hook.upload_file(_image("red"), file_name="a.png", upload_path="in")
    assert waits == []


def test_the_vendor_host_gets_uploads_unless_the_extra_says_otherwise(monkeypatch, imagecb_simulator, waits):
    """A connection on the vendor's API whose upload_base_url points at the simulator uploads there."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps(
            {
                "conn_type": "imagecb",
                "host": imagecb_simulator.url,
                "password": "test-key",
                "extra": {"upload_base_url": imagecb_simulator.url + "/"},
            }
        ),
    )
    hook = ImageCbHook(retry_policy=RetryPolicy(max_attempts=1, sleep=waits))
    assert hook.settings.upload_base_url == imagecb_simulator.url
    assert hook.upload_file(_image("red"), file_name="a.png", upload_path="in").download_url


def test_the_api_key_never_reaches_logs_or_error_text(monkeypatch, imagecb_simulator, waits, caplog, capsys):
    monkeypatch.setenv(
        "AIRFLOW_CONN_IMAGECB_DEFAULT",
        json.dumps({"conn_type": "imagecb", "host": imagecb_simulator.url, "password": SECRET_KEY}),
    )
    imagecb_simulator.configure(api_key=SECRET_KEY)
    caplog.set_level(logging.DEBUG)
    hook = ImageCbHook(retry_policy=RetryPolicy(max_attempts=2, sleep=waits))
    uploaded = hook.upload_file(_image("red"), file_name="a.png", upload_path="in")
    errors: list[BaseException] = []
    # The upload API (or a proxy) echoes the request, Authorization header included, into its msg.
    imagecb_simulator.inject(endpoint="file-stream-upload", code=400, echo=True)
    imagecb_simulator.inject(endpoint="file-stream-upload", code=500, echo=True, times=2)
    for _ in range(2):
        with pytest.raises(ImageCbPermanentApiError if not errors else ImageCbServerError) as info:
            hook.upload_file(_image("red"), file_name="a.png", upload_path="in")
        assert "Bearer ***" in str(info.value)
        errors.append(info.value)
    texts = [caplog.text, *capsys.readouterr(), uploaded.download_url, repr(uploaded)]
    texts += [str(e) + repr(e.args) for e in errors]
    assert not [text for text in texts if SECRET_KEY in text]


# ---------------------------------------------------------------- inputs and cache
def _folder(tmp_path, colours: list[str]) -> list[str]:
    paths = []
    for index, colour in enumerate(colours):
        path = tmp_path / f"{index:02d}-{colour}.png"
        path.write_bytes(_image(colour))
        paths.append(str(path))
    return paths


def test_a_folder_of_inputs_is_uploaded_once_per_content(hook, imagecb_simulator, tmp_path):
    store = InMemoryTaskStateStore()
    paths = _folder(tmp_path, ["red", "green", "red", "blue"])  # two files share a content
    cache = UploadCache({"task_state_store": store})
    links = [input_image_url(path, hook, cache) for path in paths]
    assert links[0] == links[2]
    assert len(set(links)) == 3
    # The task's next try reads the same store: nothing is uploaded again.
    retry = UploadCache({"task_state_store": store})
    assert [input_image_url(path, hook, retry) for path in paths] == links
    stats = _stats(imagecb_simulator)
    assert stats["uploads_total"] == 3
    assert set(stats["uploads_by_sha256"].values()) == {1}
    assert set(stats["uploads_by_sha256"]) == {read_input_image(p).sha256 for p in paths}
    stored = store.get(STATE_KEY)
    assert stored["version"] == 1
    assert set(stored["files"]) == set(stats["uploads_by_sha256"])
    assert len(store.writes) == 3  # one save per upload, none for a reuse
    for link in links:
        assert f"/{UPLOAD_PATH}/" in link
        assert hook.submit(GenerationRequest(prompt="a fox", input_image=link))


def test_an_input_is_uploaded_again_once_its_link_nears_expiry(hook, imagecb_simulator, tmp_path):
    sim = imagecb_simulator
    clock = Clock()
    cache = UploadCache({"task_state_store": InMemoryTaskStateStore()}, clock=clock)
    image = read_input_image(_folder(tmp_path, ["red"])[0])
    first = cache.link_for(image, hook)
    clock.now += timedelta(hours=22, minutes=59)  # still an hour and a minute from the assumed 24 h
    assert cache.link_for(image, hook) == first
    sim.configure(upload_ttl=0)  # the vendor deleted it
    with pytest.raises(ImageCbValidationError, match="inputImage could not be fetched"):
        hook.submit(GenerationRequest(prompt="a fox", input_image=first))
    sim.configure(upload_ttl=86400)
    clock.now += timedelta(minutes=2)  # now inside the safety margin
    second = cache.link_for(image, hook)
    assert second == first  # the same content, the same name: the file is back under its link
    assert hook.submit(GenerationRequest(prompt="a fox", input_image=second))
    assert _stats(sim)["uploads_by_sha256"] == {image.sha256: 2}
    assert cache.link_for(image, hook, timedelta(hours=30), margin=timedelta(0)) == second  # fresh again


def test_a_link_uploaded_to_another_host_is_not_reused(hook, imagecb_simulator, tmp_path):
    store = InMemoryTaskStateStore()
    image = read_input_image(_folder(tmp_path, ["red"])[0])
    UploadCache({"task_state_store": store}).link_for(image, hook)
    stored = store.get(STATE_KEY)
    stored["files"][image.sha256]["upload_base_url"] = "https://kieai.redpandaai.co"
    store.set(STATE_KEY, stored)
    UploadCache({"task_state_store": store}).link_for(image, hook)
    assert _stats(imagecb_simulator)["uploads_total"] == 2


def test_without_a_task_state_store_the_cache_lives_in_the_object(hook, imagecb_simulator, tmp_path):
    cache = UploadCache({})
    assert not cache.available
    image = read_input_image(_folder(tmp_path, ["red"])[0])
    assert cache.link_for(image, hook) == cache.link_for(image, hook)
    assert _stats(imagecb_simulator)["uploads_total"] == 1


def test_bad_inputs_are_refused_before_any_request(hook, imagecb_simulator, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * (10 * 1024 * 1024))
    cache = UploadCache({"task_state_store": InMemoryTaskStateStore()})
    for source, reason in [
        (text, "not those of a PNG, JPEG or WEBP image"),
        (big, "over 10485760 bytes"),
        (tmp_path / "missing.png", "no such file"),
    ]:
        with pytest.raises(InvalidInputImage, match=reason):
            input_image_url(str(source), hook, cache)
    stats = _stats(imagecb_simulator)
    assert _upload_requests(imagecb_simulator) == 0
    assert (stats["uploads_total"], stats["uploads_by_sha256"]) == (0, {})


@pytest.mark.parametrize(
    ("image_format", "mime_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_each_format_the_model_takes_is_uploaded_as_itself(
    hook, imagecb_simulator, tmp_path, image_format, mime_type
):
    data = _image("purple", image_format)
    (tmp_path / "in.img").write_bytes(data)  # the type comes from the bytes, not the name
    link = input_image_url(str(tmp_path / "in.img"), hook, UploadCache({}))
    served = requests.get(link, timeout=30)
    assert (served.content, served.headers["content-type"]) == (data, mime_type)
    assert link.endswith(f"{hashlib.sha256(data).hexdigest()}.{link.rpartition('.')[2]}")
    assert hook.submit(GenerationRequest(prompt="a plum", input_image=link))


def test_an_http_link_is_passed_on_untouched(hook, imagecb_simulator):
    link = "https://example.com/cat.png?size=large"
    assert input_image_url(link, hook, UploadCache({})) == link
    assert _upload_requests(imagecb_simulator) == 0


def test_a_file_url_through_object_storage_is_uploaded(hook, imagecb_simulator, tmp_path):
    from airflow.sdk import ObjectStoragePath

    paths = _folder(tmp_path, ["teal"])
    cache = UploadCache({"task_state_store": InMemoryTaskStateStore()})
    by_url = input_image_url(f"file://{paths[0]}", hook, cache)
    by_path = input_image_url(ObjectStoragePath(f"file://{paths[0]}"), hook, cache)
    assert by_url == by_path
    assert requests.get(by_url, timeout=30).content == _image("teal")
    assert _stats(imagecb_simulator)["uploads_total"] == 1


def test_an_s3_input_is_read_through_object_storage(hook, imagecb_simulator, moto_s3):
    png = _image("orange")
    moto_s3.put_object(Bucket="imagecb-archive", Key="inputs/fox.png", Body=png)
    image = read_input_image("s3://imagecb-archive/inputs/fox.png", conn_id="aws_moto")
    assert (image.data, image.name) == (png, "s3://imagecb-archive/inputs/fox.png")
    link = input_image_url("s3://aws_moto@imagecb-archive/inputs/fox.png", hook, UploadCache({}))
    assert requests.get(link, timeout=30).content == png
    with pytest.raises(InvalidInputImage, match=r"s3://imagecb-archive/inputs/missing\.png.*no such file"):
        read_input_image("s3://imagecb-archive/inputs/missing.png", conn_id="aws_moto")
    assert _stats(imagecb_simulator)["uploads_total"] == 1
