"""
A report location a DAG author chose: the contact sheet reads only under the archive roots.

One run's ``report`` task returned a placeholder; each test points that XCom at a location of its
own (as any DAG author can) and asks the API server for the sheet, the report and an image. The
http(s) "locations" are on a server of this test on 127.0.0.1, which records every connection:
none may come. Files are laid out under each test's ``tmp_path``: ``root/`` (the one configured
archive root) and ``outside/`` (a day folder with a report and an image, never served).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from airflow.sdk import DAG, task
from uihelpers import IMAGE, SECRET

pytestmark = pytest.mark.airflow

# Spelled out, not imported: the documented names and caps are what the tests hold the code to.
ENV_VAR = "AIRFLOW__IMAGECB__ARCHIVE_ROOTS"
IMAGE_CAP = 32 * 1024 * 1024
REPORT_CAP = 8 * 1024 * 1024
DAG_ID = "imagecb_ui_hostile_locations"
DAY = "2026-01-02"
RUN_FOLDER = "x"
TAILS = ("view", f"files/runs/{RUN_FOLDER}/report.html", "files/images/t1.png")


class Hostile:
    """The run whose report XCom each test rewrites."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def url(self, tail: str) -> str:
        return f"/imagecb/dags/{DAG_ID}/runs/{quote(self.run_id, safe='')}/{tail}"

    def point_report_at(self, location: str) -> None:
        """Store ``{"report": location}`` as the report task's XCom, as a DAG author can."""
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import update

        with create_session() as session:
            done = session.execute(
                update(XComModel)
                .where(
                    XComModel.dag_id == DAG_ID,
                    XComModel.run_id == self.run_id,
                    XComModel.task_id == "report",
                    XComModel.key == "return_value",
                )
                .values(value=XComModel.serialize_value({"report": location}))
            )
            assert done.rowcount == 1


class _Recorder(ThreadingHTTPServer):
    """An HTTP server that notes every connection it accepts."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Bait)
        self.connections: list[Any] = []

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.append(client_address)
        super().process_request(request, client_address)


class _Bait(BaseHTTPRequestHandler):
    """Answers any GET or HEAD with a page that must never reach a browser."""

    def do_GET(self) -> None:
        body = f"<html><body>{SECRET}</body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def internal() -> Iterator[_Recorder]:
    """An "internal service" on 127.0.0.1 that records every connection."""
    server = _Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def hostile(run_module_dag) -> Hostile:
    """A finished run whose ``report`` task returned a report location (rewritten by each test)."""
    with DAG(DAG_ID, schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:

        @task
        def report() -> dict[str, str]:
            return {"report": "/nonexistent/runs/x/report.html"}

        report()
    dag_run = run_module_dag(dag)
    assert dag_run.state == "success"
    return Hostile(dag_run.run_id)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The one configured archive root, holding a day folder with a report and an image."""
    folder = tmp_path / "root"
    _day_folder(folder)
    monkeypatch.setenv(ENV_VAR, str(folder))
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the archive root, holding a day folder with a report and an image."""
    folder = tmp_path / "outside"
    _day_folder(folder)
    return folder


def _day_folder(base: Path) -> Path:
    """Lay out ``base/<day>/runs/x/report.html`` (holding the bait text) and ``images/t1.png``."""
    day = base / DAY
    (day / "runs" / RUN_FOLDER).mkdir(parents=True)
    (day / "runs" / RUN_FOLDER / "report.html").write_text(f"<html><body>{SECRET}</body></html>")
    (day / "images").mkdir()
    (day / "images" / "t1.png").write_bytes(IMAGE)
    return day


def _report_in(base: Path | str) -> str:
    return f"{base}/{DAY}/runs/{RUN_FOLDER}/report.html"


def _ask_all(viewer: Any, hostile: Hostile) -> dict[str, Any]:
    """Ask for the sheet, the report and an image."""
    return {tail: viewer.get(hostile.url(tail)) for tail in TAILS}


def _assert_refused(viewer: Any, hostile: Hostile, answers: dict[str, Any] | None = None) -> None:
    """Each of the sheet, the report and the image is refused (403), naming the setting, without the bait."""
    for tail, answer in (answers or _ask_all(viewer, hostile)).items():
        assert answer.status_code == 403, (tail, answer.status_code, answer.text[:300])
        assert SECRET not in answer.text
        assert answer.content != IMAGE
        assert ENV_VAR in answer.text, tail
        assert answer.headers["content-type"].startswith("text/html")


# ------------------------------------------------------------------ not over the network
@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}",
        "https://127.0.0.1:{port}",
        "HTTP://127.0.0.1:{port}",
        "http://localhost:{port}",
    ],
)
def test_a_report_at_an_http_url_is_refused_and_never_fetched(viewer, hostile, internal, root, template):
    hostile.point_report_at(_report_in(template.format(port=internal.server_port)))
    internal.connections.clear()
    answers = _ask_all(viewer, hostile)
    assert internal.connections == []
    _assert_refused(viewer, hostile, answers)


def test_an_http_archive_root_is_not_a_root(viewer, hostile, internal, monkeypatch):
    base = f"http://127.0.0.1:{internal.server_port}"
    monkeypatch.setenv(ENV_VAR, base)
    hostile.point_report_at(_report_in(base))
    internal.connections.clear()
    answers = _ask_all(viewer, hostile)
    assert internal.connections == []
    _assert_refused(viewer, hostile, answers)
    assert "holds an entry that is not a local folder" in answers["view"].text


# ------------------------------------------------------------------ not elsewhere on disk
@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_a_report_outside_the_roots_is_refused(viewer, hostile, root, outside, as_url):
    location = _report_in(outside)
    hostile.point_report_at(f"file://{location}" if as_url else location)
    _assert_refused(viewer, hostile)


def test_a_link_inside_the_root_leading_outside_is_refused(viewer, hostile, root, outside):
    (root / "linked").symlink_to(outside, target_is_directory=True)
    hostile.point_report_at(_report_in(root / "linked"))
    _assert_refused(viewer, hostile)


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_dot_dot_in_the_location_is_refused(viewer, hostile, root, outside, as_url):
    location = _report_in(f"{root}/{DAY}/../../{outside.name}")
    hostile.point_report_at(f"file://{location}" if as_url else location)
    _assert_refused(viewer, hostile)


# ------------------------------------------------------------------ size caps
def test_an_image_over_the_cap_is_refused_unread(viewer, hostile, root):
    big = root / DAY / "images" / "t2.png"
    with big.open("wb") as sparse:  # takes no disk: the size is all that is looked at
        sparse.truncate(IMAGE_CAP + 1)
    hostile.point_report_at(_report_in(root))
    answer = viewer.get(hostile.url("files/images/t2.png"))
    assert answer.status_code == 413
    assert f"more than the {IMAGE_CAP}" in answer.text
    assert len(answer.content) < 10_000


def test_a_report_over_the_cap_is_refused(viewer, hostile, root):
    report = root / DAY / "runs" / RUN_FOLDER / "report.html"
    with report.open("r+b") as sparse:
        sparse.truncate(REPORT_CAP + 1)
    hostile.point_report_at(_report_in(root))
    answer = viewer.get(hostile.url(f"files/runs/{RUN_FOLDER}/report.html"))
    assert answer.status_code == 413
    assert SECRET not in answer.text


class _Endless:
    """A file that never ends, counting what was read of it."""

    def __init__(self) -> None:
        self.read_bytes = 0
        self.closed = False

    def read(self, size: int) -> bytes:
        self.read_bytes += size
        return b"\0" * size

    def __enter__(self) -> _Endless:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.closed = True


def test_the_caps_are_as_documented():
    from imagecb_provider.ui import files

    assert (files.IMAGE_MAX_BYTES, files.REPORT_MAX_BYTES) == (IMAGE_CAP, REPORT_CAP)


def test_a_file_growing_past_the_cap_while_streamed_is_cut_there():
    from imagecb_provider.ui import files

    endless = _Endless()
    chunks = files.read_capped(endless, 1_000_000)  # type: ignore[arg-type]
    with pytest.raises(files.FileTooLarge):
        for _ in chunks:
            pass
    assert endless.read_bytes == 1_000_001
    assert endless.closed


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("value", [None, "", " , "])
def test_without_roots_the_sheet_says_which_setting_to_set(viewer, hostile, root, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV_VAR)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    hostile.point_report_at(_report_in(root))
    answers = _ask_all(viewer, hostile)
    _assert_refused(viewer, hostile, answers)
    assert all("No archive root is configured" in answer.text for answer in answers.values())


def test_a_report_under_a_root_is_served(viewer, hostile, root, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, f"s3://bucket/prefix, file://{tmp_path}/elsewhere ,{root}/")
    hostile.point_report_at(f"file://{_report_in(root)}")
    view = viewer.get(hostile.url("view"))
    assert (view.status_code, view.headers["location"]) == (307, TAILS[1])
    report = viewer.get(hostile.url(TAILS[1]))
    assert (report.status_code, SECRET in report.text) == (200, True)
    image = viewer.get(hostile.url(TAILS[2]))
    assert (image.status_code, image.headers["content-type"], image.content) == (200, "image/png", IMAGE)


def test_a_root_that_is_a_link_counts_where_it_leads(viewer, hostile, tmp_path, outside, monkeypatch):
    (tmp_path / "root-link").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "root-link"))
    hostile.point_report_at(_report_in(outside))
    assert viewer.get(hostile.url(TAILS[2])).content == IMAGE


@pytest.fixture
def s3_in_memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """
    ``s3://`` locations read from fsspec's in-memory file system, with every connection off loopback
    failing the test (nothing may reach a real bucket).
    """
    import socket

    from upath import UPath

    from imagecb_provider.ui.roots import Location

    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else ""
        assert not host or host.startswith("127.") or host in ("::1", "localhost"), f"connection to {address}"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setattr(Location, "storage_path", lambda self: UPath(f"memory://{self.path}"))
    monkeypatch.setenv(ENV_VAR, "s3://bucket/prefix")
    memory = UPath("memory://bucket")
    yield memory
    memory.fs.rm("/bucket", recursive=True)


def test_a_report_in_an_s3_root_is_served_and_one_outside_refused(viewer, hostile, s3_in_memory, monkeypatch):
    from imagecb_provider.ui import files

    monkeypatch.setattr(files, "IMAGE_MAX_BYTES", 1024)  # the store's own size is what is looked at
    day = s3_in_memory / "prefix" / DAY
    (day / "runs" / RUN_FOLDER).mkdir(parents=True, exist_ok=True)
    (day / "runs" / RUN_FOLDER / "report.html").write_text(f"<html><body>{SECRET}</body></html>")
    (day / "images" / "t1.png").write_bytes(IMAGE)
    with (day / "images" / "t2.png").open("wb") as big:
        big.write(b"\0" * 1025)

    hostile.point_report_at(f"s3://bucket/prefix/{DAY}/runs/{RUN_FOLDER}/report.html")
    assert viewer.get(hostile.url("view")).status_code == 307
    assert SECRET in viewer.get(hostile.url(TAILS[1])).text
    assert viewer.get(hostile.url(TAILS[2])).content == IMAGE
    assert viewer.get(hostile.url("files/images/t2.png")).status_code == 413

    for outside in (f"s3://bucket/prefix2/{DAY}", f"s3://other/prefix/{DAY}", f"gs://bucket/prefix/{DAY}"):
        hostile.point_report_at(f"{outside}/runs/{RUN_FOLDER}/report.html")
        _assert_refused(viewer, hostile)


@pytest.mark.parametrize(
    ("name", "served"),
    [
        ("t1.png", True),
        ("t1.origin.png", True),
        ("t1.other.png", False),
        ("t1.png.png", False),
        ("t1.PNG", False),
        ("t.1.png", False),
        ("t1 .png", False),
        (f"{'t' * 129}.png", False),
    ],
)
def test_image_names_are_archived_names_only(viewer, hostile, root, name, served):
    (root / DAY / "images" / name).write_bytes(IMAGE)
    hostile.point_report_at(_report_in(root))
    answer = viewer.get(hostile.url(f"files/images/{quote(name)}"))
    assert answer.status_code == (200 if served else 404)


# ------------------------------------------------------------------ parsing, without Airflow's app
@pytest.mark.parametrize(
    ("text", "scheme", "path"),
    [
        ("/data/archive/", "file", "/data/archive"),
        ("file:///data/archive", "file", "/data/archive"),
        ("file://localhost/data/a", "file", "/data/a"),
        ("local:///data/a", "file", "/data/a"),
        ("s3://bucket/prefix/", "s3", "bucket/prefix"),
        ("s3a://bucket/prefix", "s3", "bucket/prefix"),
        ("gs://bucket", "gs", "bucket"),
        ("gcs://bucket/p", "gs", "bucket/p"),
    ],
)
def test_locations_that_parse(text, scheme, path):
    from imagecb_provider.ui.roots import parse_location

    assert (parse_location(text).scheme, parse_location(text).path) == (scheme, path)


@pytest.mark.parametrize(
    "text",
    [
        "http://127.0.0.1/a",
        "https://127.0.0.1/a",
        "ftp://127.0.0.1/a",
        "memory://a/b",
        "file::http://127.0.0.1/a",
        "simplecache::s3://bucket/a",
        "file://otherhost/a",
        "s3:///a",
        "s3://bucket/a/../b",
        "/a/./b",
        "/a//b",
        "relative/path",
        "~/archive",
        "/a/b\x00c",
        "/a/b\nc",
        "s3://bucket/a?endpoint_url=http://127.0.0.1",
        "file:///a#b",
        "",
    ],
)
def test_locations_that_are_refused(text):
    from imagecb_provider.ui.roots import LocationRefused, parse_location

    with pytest.raises(LocationRefused):
        parse_location(text)


def test_a_root_setting_with_an_http_entry_is_refused_whole(monkeypatch):
    from imagecb_provider.ui.roots import LocationRefused, configured_roots

    monkeypatch.setenv(ENV_VAR, "/data/archive,http://127.0.0.1:9/")
    with pytest.raises(LocationRefused, match="archive_roots"):
        configured_roots()
