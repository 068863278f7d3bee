"""
Input images read before anything is sent, and the checks of the upload answer, without a server.

Reading covers a local folder and ``file://`` through ``ObjectStoragePath``; S3 and the uploads
themselves are in ``tests/integration/test_uploads.py`` (moto's server, the simulator).
"""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from imagecb_provider.exceptions import (
    ImageCbMalformedAnswer,
    InvalidGenerationRequest,
    InvalidInputImage,
)
from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings
from imagecb_provider.hooks.uploads import (
    VENDOR_UPLOAD_BASE_URL,
    checked_download_url,
    parse_upload_base_url,
    upload_base_url,
    uploaded_file,
)
from imagecb_provider.utils.inputs import (
    MAX_INPUT_IMAGE_BYTES,
    display_name,
    is_http_url,
    read_input_image,
    sniff_image_type,
)

SIGNATURES = {
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff",
}
KEY = "sk-unit-3c1f9e0a7b5d"


def _encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "teal").save(buffer, format=image_format)
    return buffer.getvalue()


def _settings(base_url: str = "https://api.kie.ai", upload: str | None = None) -> ImageCbConnectionSettings:
    return ImageCbConnectionSettings(conn_id="c", base_url=base_url, api_key=KEY, upload_base_url=upload)


# ----------------------------------------------------------------------- the sniffer
@pytest.mark.parametrize(
    ("image_format", "mime_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_the_three_formats_the_model_takes_are_recognised(image_format, mime_type):
    assert sniff_image_type(_encoded(image_format)) == mime_type


@pytest.mark.parametrize("image_format", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_not_taken(image_format):
    assert sniff_image_type(_encoded(image_format)) is None


@given(st.binary(max_size=64))
def test_random_bytes_are_refused_or_carry_a_known_signature(data):
    found = sniff_image_type(data)
    if found == "image/webp":
        assert data[:4] == b"RIFF"
        assert data[8:12] == b"WEBP"
    elif found is not None:
        assert data.startswith(SIGNATURES[found])
    else:
        assert not any(data.startswith(s) for s in SIGNATURES.values())
        assert not (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


@given(st.sampled_from([*SIGNATURES.values(), b"RIFF\x00\x00\x00\x00WEBP"]), st.binary(max_size=32))
def test_any_bytes_after_a_signature_are_accepted(signature, tail):
    assert sniff_image_type(signature + tail) is not None


@given(st.binary(max_size=64))
def test_reading_random_bytes_only_accepts_or_refuses(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("random") / "in.bin"
    path.write_bytes(data)
    if sniff_image_type(data) is None:
        with pytest.raises(InvalidInputImage, match="PNG, JPEG or WEBP") as info:
            read_input_image(path)
        assert str(path) in str(info.value)
    else:
        image = read_input_image(path)
        assert image.data == data
        assert image.mime_type == sniff_image_type(data)


# --------------------------------------------------------------------- reading files
@pytest.mark.parametrize("as_url", [False, True], ids=["local-path", "file-url"])
def test_a_local_image_is_read_with_its_hash_and_type(tmp_path, as_url):
    data = _encoded("PNG")
    path = tmp_path / "in" / "cat.png"
    path.parent.mkdir()
    path.write_bytes(data)
    image = read_input_image(f"file://{path}" if as_url else str(path))
    assert (image.data, image.mime_type) == (data, "image/png")
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert image.size == len(data)
    assert image.upload_name == f"{image.sha256}.png"
    assert image.name == (f"file://{path}" if as_url else str(path))
    assert repr(data[:8]) not in repr(image)  # the bytes stay out of logs


def test_an_object_storage_path_is_read(tmp_path):
    from airflow.sdk import ObjectStoragePath

    data = _encoded("JPEG")
    (tmp_path / "dog.jpg").write_bytes(data)
    image = read_input_image(ObjectStoragePath(f"file://{tmp_path}/dog.jpg"))
    assert (image.data, image.mime_type, image.name) == (data, "image/jpeg", f"{tmp_path}/dog.jpg")
    assert read_input_image(tmp_path / "dog.jpg").sha256 == image.sha256  # a pathlib.Path too


def test_a_missing_file_is_refused_naming_it_and_the_fix(tmp_path):
    with pytest.raises(InvalidInputImage, match=r"missing\.png.*no such file; check the path") as info:
        read_input_image(tmp_path / "missing.png")
    assert isinstance(info.value, InvalidGenerationRequest)  # fails the task at once, like a bad field
    with pytest.raises(InvalidInputImage, match="no such file"):
        read_input_image(f"file://{tmp_path}/missing.png")


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(InvalidInputImage, match="it is a folder"):
        read_input_image(tmp_path)


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(InvalidInputImage, match=r"notes\.png.*not those of a PNG, JPEG or WEBP image"):
        read_input_image(tmp_path / "notes.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidInputImage, match="it is empty"):
        read_input_image(tmp_path / "empty.png")


def test_the_size_cap_is_inclusive(tmp_path):
    data = _encoded("PNG")
    (tmp_path / "a.png").write_bytes(data)
    assert read_input_image(tmp_path / "a.png", max_bytes=len(data)).size == len(data)
    with pytest.raises(InvalidInputImage, match=f"over {len(data) - 1} bytes.*shrink or recompress"):
        read_input_image(tmp_path / "a.png", max_bytes=len(data) - 1)
    assert MAX_INPUT_IMAGE_BYTES == 10 * 1024 * 1024


def test_an_http_link_is_not_read_but_passed_on(tmp_path):
    assert is_http_url("https://example.com/a.png")
    assert is_http_url(" HTTP://example.com/a.png")
    assert not is_http_url(str(tmp_path / "a.png"))
    assert not is_http_url("s3://bucket/a.png")
    with pytest.raises(InvalidInputImage, match="not read here: the API fetches it itself"):
        read_input_image("https://example.com/a.png?token=secret-ish")


def test_an_unknown_scheme_names_what_to_install():
    with pytest.raises(InvalidInputImage, match="no filesystem for nosuchfs://"):
        read_input_image("nosuchfs://bucket/a.png")


def test_a_source_of_another_type_is_refused_without_showing_it():
    with pytest.raises(InvalidInputImage, match=r"a bytes.*neither a path, a URL nor an ObjectStoragePath"):
        read_input_image(b"\x89PNG")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("s3://aws_moto@bucket/in/a.png", "s3://bucket/in/a.png"),
        ("gs://user:pw@bucket/a.png?X-Goog-Signature=abc#frag", "gs://bucket/a.png"),
        ("/data/in/a.png", "/data/in/a.png"),
    ],
)
def test_the_display_name_has_no_credentials_or_query(source, shown):
    assert display_name(source) == shown


# ----------------------------------------------------------------- the upload host
def test_the_upload_host_follows_the_connection():
    assert upload_base_url("https://api.kie.ai", None) == VENDOR_UPLOAD_BASE_URL
    assert upload_base_url("https://api.kie.ai/", None) == VENDOR_UPLOAD_BASE_URL
    assert upload_base_url("http://127.0.0.1:8089", None) == "http://127.0.0.1:8089"
    assert upload_base_url("https://api.kie.ai", "https://up.example.com") == "https://up.example.com"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        (" https://up.example.com/ ", "https://up.example.com"),
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
    ],
)
def test_a_good_upload_base_url_is_read(value, expected):
    assert parse_upload_base_url(value) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("ftp://up.example.com", "http:// or https://"),
        ("up.example.com", "http:// or https://"),
        ("https://user:hunter2@up.example.com", "credentials"),
        ("https://up.example.com/?k=1", "query"),
        ("https://up.example.com:99999", "port"),
        (["https://up.example.com"], "string"),
    ],
)
def test_a_bad_upload_base_url_is_refused_without_quoting_it(value, why):
    with pytest.raises(ValueError, match=why) as info:
        parse_upload_base_url(value)
    assert "hunter2" not in str(info.value)


# -------------------------------------------------------------- the upload answer
@pytest.mark.parametrize(
    ("url", "base_url"),
    [
        ("https://tempfile.redpandaai.co/xxx/images/user-uploads/a.png", "https://api.kie.ai"),
        ("http://127.0.0.1:8089/uploads/acct/imagecb/inputs/a.png", "http://127.0.0.1:8089"),
    ],
)
def test_a_good_download_url_is_taken(url, base_url):
    settings = _settings(base_url)
    assert checked_download_url(url, settings, upload_base_url(base_url, None)) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://tempfile.redpandaai.co/a.png",  # plain http on a host that is not the connection's
        "http://127.0.0.1:9999/a.png",  # the connection's host, another port
        f"https://user:{KEY}@tempfile.redpandaai.co/a.png",
        "ftp://tempfile.redpandaai.co/a.png",
        "javascript:alert(1)",
        "https:///a.png",
        "https://host/a b.png",
        "https://[::1/a.png",
        "https://host:bad/a.png",
        "",
        None,
        42,
    ],
)
def test_a_bad_download_url_is_refused_without_showing_secrets(url):
    settings = _settings("http://127.0.0.1:8089")
    with pytest.raises(ImageCbMalformedAnswer, match=r"data\.downloadUrl") as info:
        checked_download_url(url, settings, "http://127.0.0.1:8089")
    assert KEY not in str(info.value)


def test_the_answer_gives_the_file_its_hash_and_the_vendors_time():
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
    answer = {
        "fileName": "x.png",
        "filePath": "imagecb/inputs/x.png",
        "downloadUrl": "https://tempfile.redpandaai.co/xxx/imagecb/inputs/x.png",
        "fileSize": len(data),
        "mimeType": "image/png",
        "uploadedAt": "2025-01-01T12:00:00.000Z",
    }
    started = datetime(2025, 1, 1, 11, 59, tzinfo=UTC)
    settings = _settings()
    uploaded = uploaded_file(
        answer,
        settings,
        VENDOR_UPLOAD_BASE_URL,
        data=data,
        file_name="y.png",
        mime_type="x/y",
        started=started,
    )
    assert uploaded.uploaded_at == datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert (uploaded.file_name, uploaded.mime_type, uploaded.size) == ("x.png", "image/png", len(data))
    assert uploaded.sha256 == hashlib.sha256(data).hexdigest()
    bare = uploaded_file(
        {"downloadUrl": answer["downloadUrl"], "uploadedAt": "yesterday"},
        settings,
        VENDOR_UPLOAD_BASE_URL,
        data=data,
        file_name="y.png",
        mime_type="image/png",
        started=started,
    )
    assert (bare.file_name, bare.uploaded_at) == ("y.png", started)
    with pytest.raises(ImageCbMalformedAnswer, match="its data is"):
        uploaded_file(
            None, settings, VENDOR_UPLOAD_BASE_URL, data=data, file_name="y", mime_type="x", started=started
        )


def test_the_upload_base_url_extra_is_read_from_the_connection(monkeypatch):
    import json

    from imagecb_provider.exceptions import ImageCbConfigurationError
    from imagecb_provider.hooks.imagecb import ImageCbHook

    def conn(extra: dict) -> None:
        monkeypatch.setenv(
            "AIRFLOW_CONN_IMAGECB_UP",
            json.dumps({"conn_type": "imagecb", "password": KEY, "extra": extra}),
        )

    conn({})
    assert ImageCbHook("imagecb_up").settings.upload_base_url is None
    conn({"upload_base_url": "https://up.example.com/"})
    assert ImageCbHook("imagecb_up").settings.upload_base_url == "https://up.example.com"
    conn({"upload_base_url": "https://me:hunter2@up.example.com"})
    with pytest.raises(ImageCbConfigurationError, match="invalid upload_base_url extra") as info:
        ImageCbHook("imagecb_up").settings  # noqa: B018
    assert "hunter2" not in str(info.value)


def test_paths_are_strings_in_messages(tmp_path):
    # A Path source is shown as its path, the way a person typed it.
    assert display_name(Path("/data/a.png")) == "/data/a.png"
