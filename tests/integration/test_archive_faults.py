"""The archive's "whole or not at all" under real failures: a write failing before its rename, a big file."""

from __future__ import annotations

import re

import pytest
from airflow.sdk import ObjectStoragePath

from imagecb_provider.exceptions import ImageCbCorruptFile
from imagecb_provider.hooks import imagecb as hook_module
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.operators.archive import ImageArchiveOperator
from imagecb_provider.operators.generate import ImageGenerateOperator

pytestmark = pytest.mark.timeout(60)


def _generate(prompt: str) -> dict:
    op = ImageGenerateOperator(task_id="g", prompt=prompt, deferrable=False, poll_interval=0.1)
    return op.execute({})


def _archive(result: dict, destination) -> list:
    return ImageArchiveOperator(task_id="a", results=[result], destination=str(destination)).execute({})


def test_a_write_that_fails_before_its_rename_leaves_no_file_and_no_line(imagecb_simulator, tmp_path):
    result = _generate("a lamp")
    blocker = tmp_path / f"{result['task_id']}.jpg"
    blocker.mkdir()  # the final name is taken by a folder: the rename fails after the bytes were written
    with pytest.raises(IsADirectoryError):
        _archive(result, tmp_path)
    assert not list(tmp_path.glob(".*.partial"))
    assert not (tmp_path / "manifest.jsonl").exists()
    blocker.rmdir()
    archived = _archive(result, tmp_path)  # the retry completes the archive, once
    assert len(archived[0]["files"]) == 2
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 2


def test_a_file_over_the_size_cap_is_refused_while_downloading(imagecb_simulator, tmp_path, monkeypatch):
    result = _generate("a rug")
    with pytest.raises(ImageCbCorruptFile, match="exceeds 1000 bytes"):
        ImageCbHook().fetch_file(result["result_image_url"], max_bytes=1000)
    monkeypatch.setattr(hook_module, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ImageCbCorruptFile):
        _archive(result, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".jpg", ".png", ".partial")]
    assert not (tmp_path / "manifest.jsonl").exists()


def test_a_store_that_keeps_fewer_bytes_than_sent_is_caught_and_nothing_is_kept(
    imagecb_simulator, tmp_path, monkeypatch
):
    result = _generate("a vase")
    write_bytes = ObjectStoragePath.write_bytes

    def short_write(path, data):  # an object store that silently drops the end of a body
        return write_bytes(path, data[:-10])

    monkeypatch.setattr(ObjectStoragePath, "write_bytes", short_write)
    with pytest.raises(ImageCbCorruptFile, match=r"stored (\d+) of \d+ bytes") as error:
        _archive(result, tmp_path)
    stored, sent = map(int, re.search(r"stored (\d+) of (\d+)", str(error.value)).groups())
    assert sent - stored == 10
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".jpg", ".png", ".partial")]
    assert not (tmp_path / "manifest.jsonl").exists()
