"""
``batch/prompts.py`` for edits: a row's ``input_image`` (a link, a path relative to the prompt file,
an object-store URL) and a batch built from a folder of images with one instruction.

Every bad row is rejected at its line with the field and the fix, and never shows a credential; a
folder that gives no image, an empty instruction or a relative folder fails the whole batch before
anything is sent. Listing S3 runs in the e2e tests (moto); here local folders and ``file://``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from imagecb_provider.batch.prompts import (
    DEFAULT_INPUT_GLOB,
    glob_patterns,
    group_requests,
    list_input_images,
    parse_prompt_file,
    resolve_input_image,
)
from imagecb_provider.exceptions import ImageCbConfigurationError, InvalidInputImage
from imagecb_provider.utils.inputs import MAX_INPUT_IMAGE_BYTES

WHITE = "put the product on a pure white background"


def _image(path: Path, image_format: str = "PNG", colour: str = "teal") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format=image_format)
    path.write_bytes(buffer.getvalue())
    return path


def _rows(tmp_path: Path, text: str, name: str = "edits.csv", **kwargs):
    """Parse ``text`` as a prompt file in ``tmp_path``; return ``({line: request}, {line: error})``."""
    batch = parse_prompt_file(text, str(tmp_path / name), **kwargs)
    return (
        {item["line"]: item["request"] for item in batch.requests},
        {row["line"]: row["error"] for row in batch.rejected},
    )


# ------------------------------------------------------------------- a prompt file's input_image
def test_a_relative_path_is_read_from_the_prompt_files_folder(tmp_path, monkeypatch):
    shoe = _image(tmp_path / "photos" / "shoe.png")
    monkeypatch.chdir("/")  # not the worker's working directory
    accepted, rejected = _rows(tmp_path, f"prompt,input_image\n{WHITE},photos/shoe.png\n")
    assert rejected == {}
    assert accepted == {2: {"prompt": WHITE, "input_image": str(shoe)}}


def test_two_spellings_of_one_file_are_one_request_not_paid_twice(tmp_path):
    _image(tmp_path / "photos" / "shoe.png")
    text = f"prompt,input_image\n{WHITE},photos/shoe.png\n{WHITE},./photos/../photos/shoe.png\n"
    accepted, rejected = _rows(tmp_path, text)
    assert list(accepted) == [2]
    assert rejected == {3: "duplicate of line 2: not paid twice"}


def test_absolute_paths_file_urls_links_and_object_store_urls_are_kept_as_written(tmp_path):
    shoe = _image(tmp_path / "shoe.jpg", "JPEG")
    rows = [
        str(shoe),
        f"file://{shoe}",
        "https://example.com/shoe.png",
        "s3://imagecb-inputs/products/shoe.png",
        "s3://aws_moto@imagecb-inputs/products/shoe.png",  # a connection id, not a credential
        "gs://bucket/shoe.webp",
    ]
    text = "prompt,input_image\n" + "".join(f"edit {i},{row}\n" for i, row in enumerate(rows))
    accepted, rejected = _rows(tmp_path, text)
    assert rejected == {}
    assert [accepted[line]["input_image"] for line in sorted(accepted)] == rows


@pytest.mark.parametrize(
    ("value", "shown", "fix"),
    [
        ("https://ann:hunter2@example.com/a.png", "https://example.com/a.png", "a public link"),
        ("s3://AKIAXX:wJalrXUtn@bucket/a.png", "s3://bucket/a.png", "s3://<conn_id>@bucket/key"),
        ("gs://user:pass@bucket/a.png", "gs://bucket/a.png", "gs://<conn_id>@bucket/key"),
    ],
)
def test_a_url_with_credentials_is_rejected_without_showing_them(tmp_path, value, shown, fix):
    accepted, rejected = _rows(tmp_path, f'{{"prompt": "x", "input_image": "{value}"}}\n', "e.jsonl")
    assert accepted == {}
    assert rejected[1].startswith(f"Invalid input_image {shown!r}: ")
    assert "credentials" in rejected[1]
    assert fix in rejected[1]
    for secret in ("hunter2", "wJalrXUtn", "pass@"):
        assert secret not in rejected[1]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("photos/missing.png", "no such file; check the path (a relative path is read from the prompt"),
        ("photos", "it is a folder"),
        ("photos/", "it names a folder"),
        ("notes.txt", "it is not a PNG, JPEG or WEBP image"),
        ("empty.png", "it is empty"),
        ("s3://bucket/products/", "it names a bucket or a folder, not a file"),
        ("s3://bucket", "it names a bucket or a folder, not a file"),
        ("s3://bucket/a.png?versionId=3", "it has a query or a fragment"),
        ("file://host/a.png", "a file:// URL names a file on the worker by its absolute path"),
        ("https:///a.png", "it is not an absolute link with a host"),
        ("1nvalid scheme://x", "it is neither a path nor a URL"),
    ],
)
def test_an_input_image_that_cannot_be_sent_rejects_its_row_naming_the_field(tmp_path, value, reason):
    _image(tmp_path / "photos" / "shoe.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    accepted, rejected = _rows(tmp_path, f'prompt,input_image\nfine,photos/shoe.png\nbad,"{value}"\n')
    assert list(accepted) == [2]  # a bad row never stops the good ones
    assert rejected[3].startswith("Invalid input_image ")
    assert reason in rejected[3]


def test_an_input_over_the_cap_is_rejected_before_it_is_read(tmp_path):
    big = tmp_path / "big.png"
    with big.open("wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n")
        file.truncate(MAX_INPUT_IMAGE_BYTES + 1)
    accepted, rejected = _rows(tmp_path, "prompt,input_image\nx,big.png\n")
    assert accepted == {}
    assert "over 10485760 bytes" in rejected[2]


def test_a_line_break_in_an_input_image_is_rejected_shown_escaped(tmp_path):
    accepted, rejected = _rows(tmp_path, '{"prompt": "x", "input_image": "a.png\\nb.png"}\n', "e.jsonl")
    assert accepted == {}
    assert rejected[1].startswith("Invalid input_image 'a.png\\nb.png': it holds a control character")


def test_local_files_are_not_read_when_checks_are_off(tmp_path):
    accepted, _ = _rows(tmp_path, "prompt,input_image\nx,later.png\n", check_inputs=False)
    assert accepted[2]["input_image"] == str(tmp_path / "later.png")


def test_a_given_base_folder_wins_over_the_prompt_files(tmp_path):
    shoe = _image(tmp_path / "elsewhere" / "shoe.png")
    accepted, _ = _rows(tmp_path, "prompt,input_image\nx,shoe.png\n", base=tmp_path / "elsewhere")
    assert accepted[2]["input_image"] == str(shoe)


def test_edit_rows_keep_their_input_ratio_and_plain_rows_take_the_default(tmp_path):
    _image(tmp_path / "shoe.png")
    text = "prompt,input_image\nedit it,shoe.png\na new one,\n"
    accepted, _ = _rows(tmp_path, text, defaults={"aspect_ratio": "16:9", "model": "flux-kontext-max"})
    assert "aspect_ratio" not in accepted[2]
    assert accepted[3]["aspect_ratio"] == "16:9"
    assert accepted[2]["model"] == accepted[3]["model"] == "flux-kontext-max"


def test_resolve_input_image_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shoe = _image(tmp_path / "shoe.png")
    assert resolve_input_image("~/shoe.png", "/elsewhere") == str(shoe)
    with pytest.raises(InvalidInputImage, match=r"no such file; check the path$"):
        resolve_input_image("~/missing.png", "/elsewhere")


# ------------------------------------------------------------------------------ input_glob
@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        (DEFAULT_INPUT_GLOB, ["*.png", "*.jpg", "*.jpeg", "*.webp"]),
        ("*.{png,jpg}", ["*.png", "*.jpg"]),
        ("*.{png, jp{e,}g} , */*.webp", ["*.png", "*.jpeg", "*.jpg", "*/*.webp"]),
        ("*.png,*.png,", ["*.png"]),
    ],
)
def test_input_glob_takes_comma_lists_and_braces(text, patterns):
    assert glob_patterns(text) == patterns


@pytest.mark.parametrize(
    ("text", "match"),
    [("", "at least one"), (" , ", "at least one"), ("*.{png", "never closed"), ("*.png}", "without its")],
)
def test_a_bad_input_glob_is_refused(text, match):
    with pytest.raises(ImageCbConfigurationError, match=match):
        glob_patterns(text)


# ------------------------------------------------------------------------- a folder of images
@pytest.fixture
def products(tmp_path) -> Path:
    """Six product photos (PNG, JPEG, WEBP, an upper-case extension), and files that are not taken."""
    folder = tmp_path / "products"
    for name, image_format in [
        ("mug.png", "PNG"),
        ("shoe.jpg", "JPEG"),
        ("lamp.jpeg", "JPEG"),
        ("chair.webp", "WEBP"),
        ("BAG.PNG", "PNG"),
        ("vase.png", "PNG"),
    ]:
        _image(folder / name, image_format)
    (folder / "notes.txt").write_text("prices")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._mug.png").write_bytes(b"\0\5\26\7")  # macOS's resource fork beside the photo
    _image(folder / "old" / "kettle.png")
    return folder


def test_a_folder_gives_one_edit_per_image_sorted_by_path(products):
    batch = list_input_images(str(products), DEFAULT_INPUT_GLOB, f"  {WHITE} ", {"model": "flux-kontext-max"})
    assert batch.rejected == []
    names = [item["name"] for item in batch.requests]
    assert names == ["BAG.PNG", "chair.webp", "lamp.jpeg", "mug.png", "shoe.jpg", "vase.png"]
    assert [item["line"] for item in batch.requests] == [1, 2, 3, 4, 5, 6]
    for item in batch.requests:
        assert item["request"] == {
            "prompt": WHITE,
            "input_image": str(products / item["name"]),
            "model": "flux-kontext-max",
        }
    assert len({item["key"] for item in batch.requests}) == 6


def test_a_folder_batch_never_takes_the_default_aspect_ratio(products):
    batch = list_input_images(str(products), "*.png", WHITE, {"aspect_ratio": "16:9"})
    assert all("aspect_ratio" not in item["request"] for item in batch.requests)


def test_a_pattern_with_a_slash_takes_subfolders(products):
    batch = list_input_images(f"file://{products}", "*.png", WHITE)
    assert [item["name"] for item in batch.requests] == ["BAG.PNG", "mug.png", "vase.png"]
    deep = list_input_images(f"file://{products}/", "*/*.png", WHITE)
    assert [item["name"] for item in deep.requests] == ["old/kettle.png"]


def test_folder_groups_are_labelled_by_image_and_file_name(products):
    batch = list_input_images(str(products), DEFAULT_INPUT_GLOB, WHITE)
    one = group_requests([dict(i) for i in batch.requests], 1)
    assert [g["label"] for g in one[:2]] == ["image 1: BAG.PNG", "image 2: chair.webp"]
    groups = group_requests(batch.requests, 4)
    assert [g["label"] for g in groups] == ["images 1-4 (4 images)", "images 5-6 (2 images)"]


def test_files_that_cannot_be_sent_are_rejected_at_their_position(products):
    (products / "broken.png").write_text("not a png")
    (products / "empty.jpg").write_bytes(b"")
    with (products / "huge.png").open("wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n")
        file.truncate(MAX_INPUT_IMAGE_BYTES + 1)
    batch = list_input_images(str(products), DEFAULT_INPUT_GLOB, WHITE)
    rejected = {row["prompt"]: (row["line"], row["error"]) for row in batch.rejected}
    assert rejected["broken.png"][0] == 2
    assert "not a PNG, JPEG or WEBP image" in rejected["broken.png"][1]
    assert "it is empty" in rejected["empty.jpg"][1]
    assert "over the 10 MiB an input image may be" in rejected["huge.png"][1]
    assert len(batch.requests) == 6


@pytest.mark.parametrize("instruction", ["", "   ", None])
def test_an_empty_instruction_is_refused(products, instruction):
    with pytest.raises(ImageCbConfigurationError, match="instruction is empty"):
        list_input_images(str(products), DEFAULT_INPUT_GLOB, instruction)


def test_an_instruction_over_the_prompt_limit_is_refused(products):
    with pytest.raises(ImageCbConfigurationError, match="instruction: is 5001 characters long"):
        list_input_images(str(products), DEFAULT_INPUT_GLOB, "x" * 5001)


def test_no_image_found_fails_naming_the_folder_and_the_glob(products, tmp_path):
    with pytest.raises(ImageCbConfigurationError) as refused:
        list_input_images(str(products), "*.tiff", WHITE)
    message = str(refused.value)
    assert f"No images found in input_images={str(products)!r} matching input_glob='*.tiff'" in message
    assert "holds 7 file(s), none matching" in message  # hidden files aside, subfolders not listed
    with pytest.raises(ImageCbConfigurationError, match=r"holds no file \(no such folder, or empty\)"):
        list_input_images(str(tmp_path / "missing"), DEFAULT_INPUT_GLOB, WHITE)


@pytest.mark.parametrize(
    ("folder", "match"),
    [
        ("products", "give an absolute folder path"),
        ("https://example.com/photos/", "an http\\(s\\) address cannot be listed"),
        ("s3://AKIAXX:secret@bucket/photos/", "carries credentials"),
        ("nosuchfs://bucket/photos/", "no filesystem for nosuchfs:// is installed"),
    ],
)
def test_a_folder_that_cannot_be_listed_is_refused_naming_the_fix(folder, match):
    with pytest.raises(ImageCbConfigurationError, match=match) as refused:
        list_input_images(folder, DEFAULT_INPUT_GLOB, WHITE)
    assert "secret" not in str(refused.value)


def test_a_file_given_as_the_folder_is_refused(products):
    with pytest.raises(ImageCbConfigurationError, match="is a file, not a folder"):
        list_input_images(str(products / "mug.png"), DEFAULT_INPUT_GLOB, WHITE)


def test_too_many_images_are_refused_naming_the_cap(products):
    with pytest.raises(ImageCbConfigurationError, match=r"6 images .* at most 5 .*MAX_INPUT_IMAGES"):
        list_input_images(str(products), DEFAULT_INPUT_GLOB, WHITE, max_images=5)


def test_a_folder_under_the_home_is_read(products, monkeypatch):
    monkeypatch.setenv("HOME", str(products.parent))
    batch = list_input_images("~/products", "mug.png", WHITE)
    assert [item["request"]["input_image"] for item in batch.requests] == [os.fspath(products / "mug.png")]


def test_the_demo_folder_gives_six_edits():
    """include/edit-demo (docs/editing.md's example): six PNG products, its script left out."""
    demo = Path(__file__).resolve().parents[2] / "include" / "edit-demo"
    batch = list_input_images(str(demo), DEFAULT_INPUT_GLOB, WHITE)
    assert batch.rejected == []
    assert [item["name"] for item in batch.requests] == [
        "bag.png",
        "chair.png",
        "lamp.png",
        "mug.png",
        "shoe.png",
        "vase.png",
    ]
    for item in batch.requests:
        Image.open(item["request"]["input_image"]).verify()


# ------------------------------------------------------- what the manifest and the sheet keep of an input
@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (
            {"input_image": {"source": "/data/mug.png", "sha256": "ab" * 32, "bytes": 9, "uploaded": True}},
            {"input_source": "/data/mug.png", "input_sha256": "ab" * 32},
        ),
        (  # whatever a result holds, no credentials or query reach the manifest
            {"input_image": {"source": "s3://conn@bucket/a.png?x=1", "sha256": "not a hash"}},
            {"input_source": "s3://bucket/a.png", "input_sha256": None},
        ),
        (
            {"input_image": None, "request": {"inputImage": "https://example.com/mug.png?v=2"}},
            {"input_source": "https://example.com/mug.png", "input_sha256": None},
        ),
        ({"input_image": None, "request": {"prompt": "a new teapot"}}, {}),
        ({"request": {"prompt": "a result of an older provider"}}, {}),
    ],
)
def test_the_manifest_names_an_edits_input_without_credentials_or_query(result, expected):
    from imagecb_provider.batch.archive import input_fields

    assert input_fields(result) == expected


def _entry(key: str, sha: str | None = None) -> dict:
    return {"key": key, "input": {"source": key, "sha256": sha, "before": None, "note": None}}


def test_the_sheet_copies_each_input_once_into_the_run_folder_and_says_what_it_could_not_show(tmp_path):
    from airflow.sdk import ObjectStoragePath

    from imagecb_provider.batch.report import copy_inputs

    mug = _image(tmp_path / "in" / "mug.png")
    data = mug.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    images = [
        _entry("a", sha),
        _entry("b", sha),  # the same file edited twice: one copy
        _entry("c", "0" * 64),  # uploaded with other bytes: shown as it is now, with a note
        _entry("d"),  # gone since
        _entry("e"),  # a public link: not fetched
        {"key": "f", "input": None},  # not an edit
    ]
    sources = {"a": str(mug), "b": str(mug), "c": str(mug), "d": str(tmp_path / "in" / "gone.png")}
    sources["e"] = "https://example.com/mug.png"
    run = ObjectStoragePath(f"file://{tmp_path / 'runs' / 'r1'}")
    copy_inputs(run, images, sources)

    assert [p.name for p in (tmp_path / "runs" / "r1" / "inputs").iterdir()] == [f"{sha}.png"]
    assert (tmp_path / "runs" / "r1" / "inputs" / f"{sha}.png").read_bytes() == data
    assert [i["input"]["before"] for i in images[:3]] == [f"inputs/{sha}.png"] * 3
    assert images[0]["input"]["note"] is None
    assert images[2]["input"]["note"].startswith(
        "the file changed after it was sent (sent sha256 000000000000…)"
    )
    assert images[3]["input"]["before"] is None
    assert images[3]["input"]["note"].startswith(
        f"not shown: Invalid input_image '{tmp_path}/in/gone.png': no such file"
    )
    assert images[4]["input"] == {"source": "e", "sha256": None, "before": None, "note": None}
    assert not list((tmp_path / "runs").rglob("*.partial"))
