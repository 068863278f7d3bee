"""
The archive never writes outside its destination, whatever id a result or a caller hands it.

Two independent guards are proven: every file name comes from a remote task id of the one strict
form, and every target path, symlinks resolved (local) or key normalized (object stores), stays
directly in the destination. A refusal writes nothing, downloads nothing and adds no manifest line.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from pathlib import Path

import fsspec
import pytest
from airflow.sdk import ObjectStoragePath
from airflow.sdk.io import attach
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagecb_provider.batch.archive import (
    SOURCES,
    ArchiveStore,
    archive_target,
    storage_path,
)
from imagecb_provider.exceptions import ImageCbArchiveTargetRefused
from imagecb_provider.models import REMOTE_TASK_ID
from imagecb_provider.operators.archive import ImageArchiveOperator
from imagecb_provider.operators.generate import ImageGenerateOperator

pytestmark = pytest.mark.timeout(300)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()

#: Path tricks, encodings, lookalikes, lengths and types: every one is refused.
ATTACKS = [
    "../../escaped",
    "/abs",
    "a/../../b",
    "..",
    ".",
    "a\\..\\b",
    "%2e%2e",
    "%2e%2e%2f%2e%2e%2fescaped",
    "\u2024\u2024",  # ONE DOT LEADER twice: looks like ".."
    "\uff0e\uff0e\uff0fescaped",  # FULLWIDTH "../escaped"
    "\u2215etc\u2215x",  # DIVISION SLASH: looks like "/etc/x"
    "t\u0430sk1",  # Cyrillic a
    "task\x00",
    "task\n",
    "x" * 129,
    "",
    None,
    12345,
]


class FileHook:
    """Stands in for ``ImageCbHook``: every link serves one small PNG, and every download is counted."""

    def __init__(self) -> None:
        self.fetched: list[str] = []

    def fetch_file(self, url: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        self.fetched.append(url)
        return PNG, "image/png"

    def get_download_url(self, url: str) -> str:  # pragma: no cover - links never expire here
        raise AssertionError("no link refresh expected")


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``, symlinks not followed: folders, files (by checksum), link targets."""
    entries: dict[str, str] = {}
    for folder, names, files in os.walk(root, followlinks=False):
        for name in names + files:
            path = Path(folder, name)
            relative = str(path.relative_to(root))
            if path.is_symlink():
                entries[relative] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                entries[relative] = "dir"
            else:
                entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@pytest.fixture
def layout(tmp_path):
    """``root/`` holding a file outside the archive and the (not yet created) ``root/a/b/dest``."""
    root = tmp_path / "root"
    (root / "outside").mkdir(parents=True)
    (root / "outside" / "victim.png").write_bytes(b"not yours")
    return root, root / "a" / "b" / "dest"


def _refused(store: ArchiveStore, value, source: str = "result") -> ImageCbArchiveTargetRefused:
    with pytest.raises(ImageCbArchiveTargetRefused) as refused:
        store.keep(value, source, "http://127.0.0.1:9/files/r.png", prompt="a fig")
    return refused.value


# ------------------------------------------------------------------- the attack table
@pytest.mark.parametrize("value", ATTACKS, ids=repr)
def test_keep_refuses_a_hostile_id_before_downloading_and_writes_nothing(layout, value):
    root, destination = layout
    before, root_had_abs = _tree(root), Path("/abs.png").exists()
    hook = FileHook()
    store = ArchiveStore(storage_path(str(destination)), hook)
    error = _refused(store, value)
    assert str(error).startswith("Refused to archive remote task id ")
    assert f" into file://{destination}: " in str(error)
    assert "1 to 128 letters, digits, '_' or '-'" in str(error)
    assert str(error).endswith("; nothing was written")
    assert (error.remote_task_id, error.destination) == (value, f"file://{destination}")
    assert hook.fetched == []  # refused before the download
    assert _tree(root) == before  # nothing written anywhere, not even the destination folder
    assert Path("/abs.png").exists() == root_had_abs


def test_an_absolute_id_naming_another_folder_is_refused(layout):
    root, destination = layout
    before = _tree(root)
    _refused(ArchiveStore(storage_path(str(destination)), FileHook()), str(root / "outside" / "victim"))
    assert _tree(root) == before


@pytest.mark.parametrize("source", ["../../escaped", "/abs", "origin/../..", "", None])
def test_a_source_other_than_result_or_origin_is_refused(layout, source):
    root, destination = layout
    before = _tree(root)
    with pytest.raises(ValueError, match="must be one of result, origin"):
        ArchiveStore(storage_path(str(destination)), FileHook()).keep(
            "t1", source, "http://h/r.png", prompt=None
        )
    assert _tree(root) == before


def test_good_ids_still_name_their_files_in_the_destination(layout):
    _, destination = layout
    store = ArchiveStore(storage_path(str(destination)), FileHook())
    result = store.keep("task_flux-2_1765175490366", "result", "http://h/r.png", prompt="a fig")
    origin = store.keep("task_flux-2_1765175490366", "origin", "http://h/o.png", prompt="a fig")
    assert result.path == f"file://{destination}/task_flux-2_1765175490366.png"
    assert origin.path == f"file://{destination}/task_flux-2_1765175490366.origin.png"
    assert sorted(p.name for p in destination.iterdir()) == [
        "task_flux-2_1765175490366.origin.png",
        "task_flux-2_1765175490366.png",
    ]


# ------------------------------------------------- the path guard, whatever the name
def test_a_symlink_in_the_destination_pointing_outside_is_refused(layout):
    root, destination = layout
    destination.mkdir(parents=True)
    (destination / "t1.png").symlink_to(root / "outside" / "victim.png")
    (destination / "t2.png").symlink_to(root / "outside" / "not-there-yet.png")
    before = _tree(root)
    store = ArchiveStore(storage_path(str(destination)), FileHook())
    for value in ("t1", "t2"):
        error = _refused(store, value)
        assert "outside" in error.reason
        assert str(root / "outside") in error.reason
    assert _tree(root) == before  # the victim is untouched and the links are left as they were


def test_a_symlink_staying_in_the_destination_and_a_symlinked_destination_are_fine(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "older.png").write_bytes(PNG)
    (real / "t1.png").symlink_to(real / "older.png")  # same folder: allowed (the link is replaced)
    linked = tmp_path / "linked"
    linked.symlink_to(real, target_is_directory=True)
    store = ArchiveStore(storage_path(str(linked)), FileHook())
    store.keep("t1", "result", "http://h/r.png", prompt=None)
    store.keep("t3", "result", "http://h/r.png", prompt=None)
    assert (real / "t3.png").read_bytes() == PNG
    assert (real / "older.png").read_bytes() == PNG


REFUSED_NAMES = [
    "../escaped.png",
    "../../escaped.png",
    "/abs.png",
    "a/../../b.png",
    "a/b.png",
    "..",
    ".",
    "",
    "a\\..\\b.png",
    "..\\escaped.png",
    "x\x00.png",
]


@pytest.mark.parametrize("name", REFUSED_NAMES, ids=repr)
@pytest.mark.parametrize(
    "url", ["file:///srv/archive/dest", "s3://bucket/batches/2026-11-25", "memory://bucket/dest"]
)
def test_the_path_guard_refuses_a_name_that_is_not_one_segment_whatever_the_store(url, name):
    destination = ObjectStoragePath(url)
    with pytest.raises(ImageCbArchiveTargetRefused, match=r"^Refused to archive remote task id 'rid' into "):
        archive_target(destination, name, "rid")


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("file:///srv/archive/dest", "/srv/archive/dest/t1.origin.png"),
        ("s3://bucket/batches/2026-11-25", "bucket/batches/2026-11-25/t1.origin.png"),
        ("s3://bucket/batches/", "bucket/batches/t1.origin.png"),
        ("memory://bucket/dest", "/bucket/dest/t1.origin.png"),
    ],
)
def test_the_path_guard_passes_one_segment_under_the_destination(url, key):
    assert archive_target(ObjectStoragePath(url), "t1.origin.png", "t1").path == key


@pytest.fixture
def memory_store():
    """fsspec's in-memory filesystem: an object store, as S3, GCS or Azure are."""
    memory = fsspec.filesystem("memory")
    attach("memory", fs=memory)
    prefix = f"/imagecb-archive/{uuid.uuid4().hex}"
    yield memory, prefix
    if memory.exists("/imagecb-archive"):
        memory.rm("/imagecb-archive", recursive=True)


@pytest.mark.parametrize(
    "value", ["../../escaped", "/abs", "a/../../b", "a\\..\\b", "%2e%2e", ".."], ids=repr
)
def test_an_object_store_destination_refuses_hostile_ids_too(memory_store, value):
    memory, prefix = memory_store
    destination = ObjectStoragePath(f"memory:/{prefix}/batches/day")
    before = sorted(memory.find("/"))
    _refused(ArchiveStore(destination, FileHook()), value)
    assert sorted(memory.find("/")) == before


def test_an_object_store_destination_keeps_good_ids_under_its_prefix(memory_store):
    memory, prefix = memory_store
    store = ArchiveStore(ObjectStoragePath(f"memory:/{prefix}/batches/day"), FileHook())
    store.keep("task12345", "result", "http://h/r.png", prompt=None)
    assert memory.find(prefix) == [f"{prefix}/batches/day/task12345.png"]


# ------------------------------------------------------------- the property
def _ids() -> st.SearchStrategy:
    return st.one_of(
        st.text(max_size=140),
        st.from_regex(REMOTE_TASK_ID, fullmatch=True),
        st.lists(st.sampled_from(["..", ".", "/", "\\", "a", "%2e", "\uff0e", "_", "-"]), max_size=8).map(
            "".join
        ),
        st.sampled_from(ATTACKS),
        st.none(),
        st.integers(),
    )


_FOLDER = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1,
    max_size=12,
).filter(lambda name: name not in (".", "..") and len(name.encode()) < 200)


@settings(
    max_examples=250,
    deadline=None,
    database=None,  # a shared checkout: no .hypothesis folder left behind
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=_ids(), folders=st.lists(_FOLDER, min_size=1, max_size=3), source=st.sampled_from(SOURCES))
def test_no_id_ever_writes_outside_the_destination(tmp_path, value, folders, source):
    """Either the archive refuses the id with its clear error, or the file lands in the destination."""
    base = tmp_path / uuid.uuid4().hex
    destination = base.joinpath(*folders)
    parent = tmp_path.parent
    before = _tree(parent)
    hook = FileHook()
    store = ArchiveStore(storage_path(str(destination)), hook)
    refused = kept = None
    try:
        kept = store.keep(value, source, "http://h/r.png", prompt=None)
    except ImageCbArchiveTargetRefused as error:
        refused = error
    if refused is not None:
        assert refused.remote_task_id == value
        assert hook.fetched == []
        assert _tree(parent) == before  # nothing written, anywhere
        return
    assert isinstance(value, str)
    assert REMOTE_TASK_ID.fullmatch(value)
    written = Path(kept.path.removeprefix("file://"))
    assert written.resolve().parent == destination.resolve()
    assert written.read_bytes() == PNG
    # The only change anywhere: the destination (with its parents) and the one file in it.
    after = _tree(parent)
    new = {path for path in after if path not in before}
    expected_folders = {str(base.relative_to(parent).joinpath(*folders[:i])) for i in range(len(folders) + 1)}
    assert new == expected_folders | {str(written.relative_to(parent))}
    assert {path: sha for path, sha in after.items() if path in before} == before


@pytest.mark.parametrize("last", ["?", "#", "a?", "b#", "?x"])
def test_a_destination_folder_named_like_a_url_part_is_taken_literally(tmp_path, last):
    """Found by the property above: parsed as a URL, a last folder "?" vanished (files went to its parent)."""
    destination = tmp_path / "day" / last
    kept = ArchiveStore(storage_path(str(destination)), FileHook()).keep(
        "t1", "result", "http://h/r.png", prompt=None
    )
    assert Path(kept.path.removeprefix("file://")) == destination / "t1.png"
    assert [p.name for p in (tmp_path / "day").iterdir()] == [last]


# ------------------------------------------------------------------ the operator
def _generate(prompt: str) -> dict:
    op = ImageGenerateOperator(task_id="g", prompt=prompt, deferrable=False, poll_interval=0.1)
    return op.execute({})


def _archive(results, destination: Path):
    return ImageArchiveOperator(task_id="a", results=results, destination=str(destination)).execute({})


#: Stands for an absolute path into the test's own "outside" folder: with a system path such as
#: /etc/cron.d/x, a regression would write there whenever the tests run as root.
ABSOLUTE = "<absolute path to outside/victim>"


@pytest.mark.parametrize("forged", ["../../escaped", ABSOLUTE, "a\\..\\b", "", None], ids=repr)
def test_a_forged_result_fails_the_archive_task_before_anything_is_kept(imagecb_simulator, layout, forged):
    root, destination = layout
    forged = str(root / "outside" / "victim") if forged == ABSOLUTE else forged
    good, bad = _generate("a fig"), _generate("a pear")
    bad["task_id"] = forged
    before = _tree(root)
    with pytest.raises(ImageCbArchiveTargetRefused, match=r"nothing was written$") as refused:
        _archive([good, bad], destination)
    assert refused.value.remote_task_id == forged
    assert _tree(root) == before  # not the good result's files either, and no manifest
    assert imagecb_simulator.stats()["downloads"] == {}
    # Without the forged result, the archive keeps the good one: two files, two manifest lines.
    archived = _archive([good], destination)
    assert len(archived[0]["files"]) == 2
    assert len((destination / "manifest.jsonl").read_text().splitlines()) == 2
    assert {p.name for p in destination.iterdir() if not p.name.startswith(".")} == {
        f"{good['task_id']}.jpg",
        f"{good['task_id']}.origin.jpg",
        "manifest.jsonl",
    }


def test_a_result_without_a_task_id_is_refused(imagecb_simulator, tmp_path):
    result = _generate("a plum")
    del result["task_id"]
    with pytest.raises(ImageCbArchiveTargetRefused, match=r"remote task id None"):
        _archive(result, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
