"""
The manifest ledger under concurrency: 16 archive tasks writing one manifest lose no line and
double none, on a local folder (a lock file) and on S3 through moto (conditional writes).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest
from airflow.sdk import ObjectStoragePath
from airflow.sdk.io import attach

from imagecb_provider.batch.archive import JsonlLedger, _is_precondition_failure, storage_path

pytestmark = pytest.mark.timeout(120)

WRITERS = 16
PER_WRITER = 5


def _ledger(url: str, conn_id: str | None = None, *, plain: bool = False) -> JsonlLedger:
    folder = ObjectStoragePath(url) if plain else storage_path(url, conn_id)
    return JsonlLedger(
        folder / "manifest.jsonl",
        key_fields=("remote_task_id", "source"),
        supersede_fields=("request_key", "source"),
    )


def _write_concurrently(make_ledger) -> list[int]:
    start = threading.Barrier(WRITERS)

    def writer(n: int) -> int:
        ledger = make_ledger()  # each task builds its own, as separate archive tasks do
        entries = [
            {"remote_task_id": f"w{n}-{i}", "source": "result", "request_key": f"k{n}-{i}"}
            for i in range(PER_WRITER)
        ]
        start.wait()
        added = 0
        for entry in entries:  # one add per file: the most contended pattern
            added += ledger.add([entry, dict(entry)])  # the same line twice in one call: kept once
        return added

    with ThreadPoolExecutor(WRITERS) as pool:
        return list(pool.map(writer, range(WRITERS)))


def _assert_every_line_once(ledger: JsonlLedger, added: list[int]) -> None:
    lines = ledger.read()
    keys = [(line["remote_task_id"], line["source"]) for line in lines]
    assert len(keys) == len(set(keys)) == WRITERS * PER_WRITER
    assert added == [PER_WRITER] * WRITERS


# "plain": an ObjectStoragePath built from a bare path has no protocol, and is local disk too.
@pytest.mark.parametrize(
    ("scheme", "plain"),
    [("", False), ("", True), ("local://", False)],
    ids=["file-url", "plain-path", "local-url"],
)
def test_sixteen_writers_on_a_local_folder(tmp_path, scheme, plain):
    url = f"{scheme}{tmp_path}"
    added = _write_concurrently(lambda: _ledger(url, plain=plain))
    _assert_every_line_once(_ledger(url, plain=plain), added)


@pytest.mark.timeout(300)  # 80 compare-and-swap writes one after another: minutes on a loaded machine
def test_sixteen_writers_on_s3(moto_s3, caplog):
    url = "s3://imagecb-archive/concurrency"
    with caplog.at_level(logging.INFO, logger="imagecb_provider.batch.archive"):
        added = _write_concurrently(lambda: _ledger(url, "aws_moto"))
    _assert_every_line_once(_ledger(url, "aws_moto"), added)
    # The writers did collide, and each collision was read again rather than overwritten.
    assert "The manifest changed while it was updated (attempt 1); reading it again" in caplog.messages


@pytest.fixture
def memory_store():
    """fsspec's in-memory filesystem: an object store without conditional writes, as GCS or Azure."""
    memory = fsspec.filesystem("memory")
    attach("memory", fs=memory)
    yield "memory://imagecb-archive/supersede"
    if memory.exists("/imagecb-archive"):
        memory.rm("/imagecb-archive", recursive=True)


@pytest.mark.parametrize("where", ["local", "s3", "memory"])
def test_a_new_image_of_the_same_request_supersedes_the_old_line(tmp_path, where, request):
    url = {"local": str(tmp_path), "s3": "s3://imagecb-archive/supersede"}.get(where)
    conn_id = "aws_moto" if where == "s3" else None
    if where == "s3":
        request.getfixturevalue("moto_s3")
    if where == "memory":
        url = request.getfixturevalue("memory_store")
    ledger = _ledger(url, conn_id)
    old = {"remote_task_id": "old", "source": "result", "request_key": "k1"}
    other = {"remote_task_id": "other", "source": "result", "request_key": "k2"}
    assert ledger.add([old, other]) == 2
    assert ledger.add([{"remote_task_id": "new", "source": "result", "request_key": "k1"}]) == 1
    lines = {line["remote_task_id"]: line for line in ledger.read()}
    assert lines["old"]["superseded_by"] == "new"
    assert "superseded_by" not in lines["other"]
    assert [line["remote_task_id"] for line in ledger.current()] == ["other", "new"]
    assert ledger.add([old]) == 0  # an old line is never added again


@pytest.mark.parametrize(
    ("error", "conflict"),
    [
        (OSError("At least one of the pre-conditions you specified did not hold"), True),  # s3fs
        (OSError("An error occurred (PreconditionFailed) when calling the PutObject operation"), True),
        (OSError("An error occurred (AccessDenied) when calling the PutObject operation"), False),
        (PermissionError("read-only file system"), False),
    ],
)
def test_only_a_failed_write_condition_counts_as_a_conflict(error, conflict):
    assert _is_precondition_failure(error) is conflict


def test_a_manifest_write_that_fails_for_another_reason_is_not_retried(moto_s3, caplog):
    ledger = _ledger("s3://no-such-bucket/batch", "aws_moto")
    entry = {"remote_task_id": "r", "source": "result", "request_key": "k"}
    # s3fs's own error for a missing bucket: any OSError but a failed condition
    with caplog.at_level(logging.INFO, logger="imagecb_provider.batch.archive"), pytest.raises(OSError):  # noqa: PT011
        ledger.add([entry])
    assert "reading it again" not in caplog.text
