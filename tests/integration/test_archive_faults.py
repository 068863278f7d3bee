"""The archive's "whole or not at all" under real failures: a write failing before its rename, a big file."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from airflow.sdk import ObjectStoragePath

from imagecb_provider.batch.archive import ArchiveStore, storage_path
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


@contextmanager
def _file_host(body: bytes) -> Iterator[str]:
    """Serve ``body`` for any path, as a pre-signed file link's host would; yield its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_cut_off_download_is_refused_naming_its_link_without_the_signature(imagecb_simulator, tmp_path):
    cut_off_jpeg = b"\xff\xd8\xff\xe0" + b"x" * 2000  # no end marker: the transfer stopped early
    with _file_host(cut_off_jpeg) as host:
        store = ArchiveStore(storage_path(str(tmp_path)), ImageCbHook())
        with pytest.raises(ImageCbCorruptFile) as refused:
            store.keep("t-1", "result", f"{host}/files/t-1.jpg?X-Signature=s3cr3t", prompt="a lamp")
    assert (
        str(refused.value) == f"The file from {host}/files/t-1.jpg is a truncated image/jpeg (no end marker)"
    )
    assert not list(tmp_path.iterdir())  # nothing written, not even a partial file
