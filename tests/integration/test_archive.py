"""ImageArchiveOperator over real HTTP: verified whole files, one manifest line each, fresh links, S3."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from imagecb_provider.batch.archive import ArchiveStore, sniff_image, storage_path
from imagecb_provider.exceptions import ImageCbCorruptFile, ImageCbLinkExpired
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.models import request_key
from imagecb_provider.operators.archive import ImageArchiveOperator
from imagecb_provider.operators.generate import ImageGenerateOperator


def _generate(prompt: str, **fields) -> dict:
    op = ImageGenerateOperator(
        task_id="g", prompt=prompt, deferrable=False, poll_interval=0.1, failure_mode="return", **fields
    )
    return op.execute({})


def _archive(results, destination: str, **kwargs):
    return ImageArchiveOperator(
        task_id="archive", results=results, destination=destination, **kwargs
    ).execute({})


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_files_are_valid_images_matching_their_manifest_lines(imagecb_simulator, tmp_path):
    results = [_generate("a fig", output_format="png", aspect_ratio="1:1"), _generate("a pear")]
    archived = _archive(results, str(tmp_path))
    lines = _manifest(tmp_path)
    assert len(lines) == 4
    assert {(line["remote_task_id"], line["source"]) for line in lines} == {
        (r["task_id"], s) for r in results for s in ("result", "origin")
    }
    for line in lines:
        path = Path(line["path"].removeprefix("file://"))
        body = path.read_bytes()
        assert hashlib.sha256(body).hexdigest() == line["sha256"]
        assert len(body) == line["bytes"]
        image = Image.open(io.BytesIO(body))
        image.verify()
        assert line["content_type"] == f"image/{image.format.lower()}"
        assert line["fetched_via"] == "direct"
        result = next(r for r in results if r["task_id"] == line["remote_task_id"])
        assert line["request_key"] == request_key(result["request"])
        assert line["prompt"] == result["prompt"]
    assert Path(lines[0]["path"].removeprefix("file://")).name == f"{results[0]['task_id']}.png"
    assert [len(result["files"]) for result in archived] == [2, 2]
    assert not list(tmp_path.glob(".*.partial"))


def test_a_file_left_with_other_bytes_under_the_final_name_is_replaced(imagecb_simulator, tmp_path):
    result = _generate("a medlar")
    destination = tmp_path / "runs"
    destination.mkdir()
    stale = destination / f"{result['task_id']}.jpg"
    stale.write_bytes(b"an older, different file")
    deep = tmp_path / "new" / "deep" / "folder"
    assert len(_archive(result, str(deep))["files"]) == 2  # the folder is created with its parents
    assert len(list(deep.glob("*.jpg"))) == 2
    _archive(result, str(destination))
    body = stale.read_bytes()
    assert hashlib.sha256(body).hexdigest() == _manifest(destination)[0]["sha256"]
    # The same bytes already there (a try that died before its manifest line): not written again.
    written = stale.stat().st_mtime_ns, stale.stat().st_ino
    (destination / "manifest.jsonl").unlink()
    _archive(result, str(destination))
    assert (stale.stat().st_mtime_ns, stale.stat().st_ino) == written
    assert len(_manifest(destination)) == 2


def test_a_new_image_for_the_same_request_supersedes_the_old_one_per_source(imagecb_simulator, tmp_path):
    first, second, third = _generate("a sloe"), _generate("a sloe"), _generate("a sloe")
    started = datetime.now(UTC)
    for result in (first, second, third):
        _archive(result, str(tmp_path))
    lines = {(line["remote_task_id"], line["source"]): line for line in _manifest(tmp_path)}
    assert len(lines) == 6  # the old files are kept
    for source in ("result", "origin"):
        # each line names the image that replaced it, and keeps that name when a newer one comes
        assert lines[first["task_id"], source]["superseded_by"] == second["task_id"]
        assert lines[second["task_id"], source]["superseded_by"] == third["task_id"]
        assert "superseded_by" not in lines[third["task_id"], source]
    current = ArchiveStore(storage_path(str(tmp_path)), ImageCbHook()).manifest.current()
    assert {(line["remote_task_id"], line["source"]) for line in current} == {
        (third["task_id"], "result"),
        (third["task_id"], "origin"),
    }
    for line in lines.values():
        assert started <= datetime.fromisoformat(line["archived_at"]) <= datetime.now(UTC)


def test_a_rerun_adds_no_file_and_no_line(imagecb_simulator, tmp_path):
    result = _generate("a plum")
    _archive(result, str(tmp_path))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if not p.name.startswith(".")}
    again = _archive(result, str(tmp_path))
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert len(_manifest(tmp_path)) == 2
    assert after == before  # the files and the manifest alike: nothing written again
    assert again["files"][0]["sha256"] == _manifest(tmp_path)[0]["sha256"]


def test_failed_and_missing_results_are_passed_over(imagecb_simulator, tmp_path):
    failed = _generate("a lime [sim:content_policy]")
    assert _archive([failed, None], str(tmp_path)) == []
    assert _archive(failed, str(tmp_path)) is None
    assert not (tmp_path / "manifest.jsonl").exists()


def _archive_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "imagecb_provider.batch.archive"]


def test_an_expired_origin_link_is_refreshed_through_the_api(imagecb_simulator, tmp_path, caplog):
    imagecb_simulator.configure(origin_ttl=0.3)
    result = _generate("a quince")
    time.sleep(0.5)
    with pytest.raises(ImageCbLinkExpired, match=r"refused") as expired:
        ImageCbHook().fetch_file(result["origin_image_url"])
    with caplog.at_level(logging.INFO, logger="imagecb_provider.batch.archive"):
        archived = _archive(result, str(tmp_path))
    assert _archive_log(caplog) == [f"{expired.value}; asking the API for a fresh link"]
    origin = next(f for f in archived["files"] if f["source"] == "origin")
    assert origin["fetched_via"] == "download_url"
    assert imagecb_simulator.stats()["requests"].get("download-url") == 1


def test_when_the_refresh_fails_the_long_lived_result_url_is_used(imagecb_simulator, tmp_path, caplog):
    imagecb_simulator.configure(origin_ttl=0.3)
    result = _generate("a date")
    time.sleep(0.5)
    imagecb_simulator.inject(endpoint="download-url", code=422, msg="url not recognised")
    with caplog.at_level(logging.INFO, logger="imagecb_provider.batch.archive"):
        archived = _archive(result, str(tmp_path))
    refused = _archive_log(caplog)[1]
    assert refused.startswith("Could not refresh the link (")
    assert "url not recognised" in refused
    assert refused.endswith("); using the long-lived result URL instead")
    origin = next(f for f in archived["files"] if f["source"] == "origin")
    kept = next(f for f in archived["files"] if f["source"] == "result")
    assert origin["fetched_via"] == "result_url"
    assert origin["sha256"] == kept["sha256"]
    assert (
        next(line for line in _manifest(tmp_path) if line["source"] == "origin")["fetched_via"]
        == "result_url"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "only 0 bytes"),
        (b"<html>" + b"x" * 100, "not a JPEG, PNG or WebP"),
        (b"\xff\xd8\xff" + b"x" * 100, "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"x" * 100, "truncated"),
    ],
)
def test_broken_downloads_are_refused(body, message):
    with pytest.raises(ImageCbCorruptFile, match=message):
        sniff_image(body, "http://x/y")


# ------------------------------------------------------------------------------ S3 (moto)
def test_archive_to_s3_through_moto(imagecb_simulator, moto_s3):
    result = _generate("a kiwi")
    destination = "s3://imagecb-archive/batches/2026-11-25"
    archived = _archive(result, destination, storage_conn_id="aws_moto")
    _archive(result, destination, storage_conn_id="aws_moto")  # rerun: nothing added
    keys = sorted(o["Key"] for o in moto_s3.list_objects_v2(Bucket="imagecb-archive")["Contents"])
    assert keys == sorted(
        [
            "batches/2026-11-25/manifest.jsonl",
            f"batches/2026-11-25/{result['task_id']}.jpg",
            f"batches/2026-11-25/{result['task_id']}.origin.jpg",
        ]
    )
    manifest = moto_s3.get_object(Bucket="imagecb-archive", Key="batches/2026-11-25/manifest.jsonl")[
        "Body"
    ].read()
    lines = [json.loads(line) for line in manifest.decode().splitlines()]
    assert len(lines) == 2
    body = moto_s3.get_object(Bucket="imagecb-archive", Key=f"batches/2026-11-25/{result['task_id']}.jpg")[
        "Body"
    ].read()
    assert (
        hashlib.sha256(body).hexdigest()
        == next(f for f in archived["files"] if f["source"] == "result")["sha256"]
    )
    Image.open(io.BytesIO(body)).verify()
