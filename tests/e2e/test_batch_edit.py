"""
Batch editing end to end: ``imagecb_batch_generate`` on a folder of product photos with one
instruction, on a prompt file whose rows edit images, and on an S3 prefix (moto's server), in real
Airflow (``dag.test()``) against the simulator. The same on the real stack: tests/stack/test_edit_batches.py.

Each image is uploaded once (``uploads_by_sha256``) and submitted once; its manifest lines say
where its input came from (path or URL, sha256, never credentials); its card in the contact sheet
shows the input, copied into the run's folder, beside the result.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
LOGICAL_DATE = datetime(2026, 3, 2, tzinfo=UTC)
EXAMPLE_DAGS_RUN = {"imagecb_batch_generate"}  # see tests/dags/test_examples_covered.py
WHITE = "put the product on a pure white background"
#: Six product photos: (file name, format, colour): told apart by their bytes.
PRODUCTS = [
    ("mug.png", "PNG", "teal"),
    ("shoe.jpg", "JPEG", "crimson"),
    ("lamp.jpeg", "JPEG", "gold"),
    ("chair.webp", "WEBP", "sienna"),
    ("bag.png", "PNG", "navy"),
    ("vase.png", "PNG", "olive"),
]
BUCKET = "imagecb-inputs"

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def batch_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "imagecb_batch_generate.py"))
    assert bag.import_errors == {}
    return bag.dags["imagecb_batch_generate"]


def _run(run_dag, dag, archive_root: Path, **conf):
    # Every param this module changes is given: the module's DAG object is shared by its tests.
    conf = {
        "archive_root": str(archive_root),
        "prompts_path": str(ROOT / "include" / "prompts" / "demo.csv"),
        "input_images": "",
        "input_glob": "*.png,*.jpg,*.jpeg,*.webp",
        "instruction": "",
        "poll_interval": 0.2,
        "timeout": 30,
        "fail_run_on_lost": True,
        "chunk_size": 25,
        **conf,
    }
    return run_dag(dag, logical_date=LOGICAL_DATE, run_conf=conf)


def _encoded(image_format: str, colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(buffer, format=image_format)
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def products(tmp_path) -> dict[str, bytes]:
    """A folder of six product photos and files the default input_glob does not take; name -> bytes."""
    folder = tmp_path / "products"
    folder.mkdir()
    photos = {name: _encoded(image_format, colour) for name, image_format, colour in PRODUCTS}
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    (folder / "prices.txt").write_text("mug 12.00\n")
    (folder / "._mug.png").write_bytes(b"\0\5\26\7")  # macOS's resource fork: hidden, not an image
    return photos


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run_folder(day: Path, dag_run) -> Path:
    from imagecb_provider.batch.report import run_folder_name

    return day / "runs" / run_folder_name(dag_run.run_id)


def _check_edits(day: Path, dag_run, inputs: dict[str, bytes], shown: dict[str, str]) -> dict:
    """
    Check the manifest, the summary and the sheet of a run that edited ``inputs`` (name -> bytes).

    :param shown: name -> the source each manifest line must name (no credentials or query).
    :return: the summary.
    """
    run = _run_folder(day, dag_run)
    summary = json.loads((run / "summary.json").read_text())
    lines = [line for line in _jsonl(day / "images" / "manifest.jsonl") if line["source"] == "result"]
    by_source = {line["input_source"]: line for line in lines}
    assert set(by_source) == set(shown.values())
    for name, data in inputs.items():
        line = by_source[shown[name]]
        assert line["input_sha256"] == _sha(data)
        assert "@" not in line["input_source"]
        assert "?" not in line["input_source"]
    report = (run / "report.html").read_text()
    assert report.count('class="card edit"') == len(inputs)
    for name, data in inputs.items():
        entry = next(i for i in summary["images"] if i["input"] and i["input"]["source"] == shown[name])
        assert entry["outcome"] == "success"
        assert entry["input"]["sha256"] == _sha(data)
        before = entry["input"]["before"]
        assert re.fullmatch(rf"inputs/{_sha(data)}\.(png|jpg|webp)", before)
        assert (run / before).read_bytes() == data  # the run's own copy of the input
        after = "../../images/" + Path(by_source[shown[name]]["path"]).name
        card = re.search(rf'<div class="card edit" id="line-{entry["line"]}">(.*?)</div></div>', report)
        assert card is not None
        # before and after side by side, before first
        assert card[1].index(f'src="{before}"') < card[1].index(f'src="{after}"')
        assert "<figcaption>before</figcaption>" in card[1]
        assert "<figcaption>after</figcaption>" in card[1]
    copies = {p.name for p in (run / "inputs").iterdir()}
    assert copies == {Path(i["input"]["before"]).name for i in summary["images"] if i["outcome"] == "success"}
    return summary


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def _per_image(stats: dict, images: int) -> tuple[float, float]:
    """Uploads per image and submissions per image, as the simulator counted them."""
    return sum(stats["uploads_by_sha256"].values()) / images, stats["submissions_total"] / images


def test_a_folder_of_product_photos_is_edited_once_each(
    run_dag, batch_dag, imagecb_simulator, tmp_path, products
):
    archive = tmp_path / "archive"
    dag_run = _run(
        run_dag, batch_dag, archive, input_images=str(tmp_path / "products"), instruction=WHITE, chunk_size=4
    )
    assert dag_run.state == "success"
    day = archive / "2026-03-02"
    shown = {name: str(tmp_path / "products" / name) for name in products}
    summary = _check_edits(day, dag_run, products, shown)

    assert summary["counts"]["success"] == 6
    assert (summary["prompts"], summary["rejected"], summary["lost"]) == (6, 0, 0)
    assert summary["source"] == {
        "kind": "folder",
        "folder": str(tmp_path / "products"),
        "glob": "*.png,*.jpg,*.jpeg,*.webp",
        "instruction": WHITE,
    }
    assert summary["prompts_path"] is None  # the prompt file was not read
    # sorted by path, numbered from 1, each group named by its images
    assert [i["name"] for i in summary["images"]] == sorted(products)
    assert [i["line"] for i in summary["images"]] == [1, 2, 3, 4, 5, 6]
    rendered = {(t.task_id, t.map_index): t.rendered_map_index for t in dag_run.get_task_instances()}
    assert rendered[("image.generate", 0)] == "images 1-4 (4 images)"
    assert rendered[("image.generate", 1)] == "images 5-6 (2 images)"
    report = next((day / "runs").glob("*/report.html")).read_text()
    assert f"6 images from {tmp_path / 'products'} matching *.png,*.jpg,*.jpeg,*.webp" in report
    assert "image 1 · " in report

    stats = imagecb_simulator.stats()
    assert stats["uploads_by_sha256"] == {_sha(data): 1 for data in products.values()}
    assert _per_image(stats, 6) == (1.0, 1.0)
    assert stats["submissions"] == {WHITE: 6}

    # nothing is written outside the day's images/ and this run's folder
    run = _run_folder(day, dag_run).relative_to(day)
    assert {f.split("/")[0] for f in _files_under(day)} == {"images", "runs"}
    assert all(f.startswith(f"{run}/") for f in _files_under(day) if f.startswith("runs/"))

    # the same day again: nothing uploaded or sent again, and the sheet still shows before and after
    again = _run(
        run_dag, batch_dag, archive, input_images=str(tmp_path / "products"), instruction=WHITE, chunk_size=4
    )
    assert again.state == "success"
    stats_again = imagecb_simulator.stats()
    assert stats_again["uploads_by_sha256"] == stats["uploads_by_sha256"]
    assert stats_again["submissions_total"] == 6
    summary_again = _check_edits(day, again, products, shown)
    assert summary_again["reused_from_earlier_run"] == 6


def test_a_prompt_file_edits_the_images_its_rows_name(
    run_dag, batch_dag, imagecb_simulator, tmp_path, products
):
    """Paths relative to the prompt file's folder, absolute ones, file://; bad rows rejected at their line."""
    folder = tmp_path / "products"
    edits = tmp_path / "edits.csv"
    edits.write_text(
        "prompt,input_image\n"
        f"{WHITE},products/mug.png\n"  # line 2: relative to the prompt file's folder
        "make the mug red,products/mug.png\n"  # line 3: the same file, another edit: uploaded once
        f"{WHITE},{folder / 'shoe.jpg'}\n"  # line 4: absolute
        f"{WHITE},file://{folder / 'lamp.jpeg'}\n"  # line 5: file://
        f"{WHITE},products/missing.png\n"  # line 6: rejected
        f"{WHITE},s3://AKIAEXAMPLE:s3cr3t@bucket/shoe.png\n"  # line 7: rejected, never shown
        f"{WHITE},https://ann:hunter2@example.com/mug.png\n"  # line 8: rejected, never shown
        "a brand new teapot on a shelf,\n"  # line 9: not an edit
    )
    archive = tmp_path / "archive"
    dag_run = _run(run_dag, batch_dag, archive, prompts_path=str(edits))
    assert dag_run.state == "success"
    day = archive / "2026-03-02"
    inputs = {name: products[name] for name in ("mug.png", "shoe.jpg", "lamp.jpeg")}
    shown = {"mug.png": str(folder / "mug.png"), "shoe.jpg": str(folder / "shoe.jpg")}
    shown["lamp.jpeg"] = f"file://{folder / 'lamp.jpeg'}"
    run = _run_folder(day, dag_run)
    summary = json.loads((run / "summary.json").read_text())

    assert summary["counts"]["success"] == 5
    rejected = {row["line"]: row["error"] for row in summary["rejected_rows"]}
    assert set(rejected) == {6, 7, 8}
    assert (
        "no such file; check the path (a relative path is read from the prompt file's folder" in rejected[6]
    )
    assert "credentials" in rejected[7]
    assert "credentials" in rejected[8]
    report = (run / "report.html").read_text()
    assert "s3cr3t" not in report
    assert "hunter2" not in report
    assert "s3cr3t" not in (run / "summary.json").read_text()

    stats = imagecb_simulator.stats()
    assert stats["uploads_by_sha256"] == {_sha(data): 1 for data in inputs.values()}  # the mug once
    assert stats["submissions_total"] == 5
    lines = [line for line in _jsonl(day / "images" / "manifest.jsonl") if line["source"] == "result"]
    assert sorted(line.get("input_source") or "" for line in lines) == sorted(
        ["", shown["mug.png"], shown["mug.png"], shown["shoe.jpg"], shown["lamp.jpeg"]]
    )
    teapot = next(line for line in lines if "input_source" not in line)
    assert "input_sha256" not in teapot  # a line of an image not edited keeps its old shape
    assert report.count('class="card edit"') == 4
    assert report.count('class="card"') == 1
    mug_copies = {
        i["input"]["before"] for i in summary["images"] if i["input"] and "mug" in i["input"]["source"]
    }
    assert mug_copies == {f"inputs/{_sha(products['mug.png'])}.png"}  # one copy for the two edits
    assert len(list((run / "inputs").iterdir())) == 3


def test_a_batch_that_finds_nothing_to_edit_fails_before_anything_is_sent(
    run_dag, batch_dag, imagecb_simulator, tmp_path, products
):
    for conf in (
        {"input_images": str(tmp_path / "products"), "input_glob": "*.tiff", "instruction": WHITE},
        {"input_images": str(tmp_path / "products"), "instruction": "  "},
        {"instruction": WHITE},  # no folder: the demo prompts must not run instead
    ):
        dag_run = _run(run_dag, batch_dag, tmp_path / "archive", **conf)
        states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
        assert states["read_prompts"] == "failed", conf
        assert dag_run.state == "failed"
    stats = imagecb_simulator.stats()
    assert stats["submissions_total"] == 0
    assert stats["uploads_total"] == 0


# ----------------------------------------------------------------------------------- S3
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_inputs(monkeypatch):
    """
    moto's S3 server on loopback with the bucket ``imagecb-inputs``, read through the ``aws_moto``
    connection; return its boto3 client. (tests/integration's ``moto_s3`` is not visible from here,
    and this test only reads objects: no conditional writes to make atomic.)
    """
    import urllib.request

    import boto3
    import s3fs
    from airflow.sdk.io import store
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_MOTO",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
        ),
    )
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    store._STORE_CACHE.clear()  # each test's server has its own port: no filesystem of an earlier one
    s3fs.S3FileSystem.clear_instance_cache()
    yield client
    server.stop()
    store._STORE_CACHE.clear()
    s3fs.S3FileSystem.clear_instance_cache()


def test_an_s3_prefix_is_edited_once_each(
    run_dag, batch_dag, imagecb_simulator, tmp_path, products, s3_inputs
):
    for name, data in products.items():
        s3_inputs.put_object(Bucket=BUCKET, Key=f"products/{name}", Body=data)
    s3_inputs.put_object(Bucket=BUCKET, Key="products/prices.txt", Body=b"mug 12.00\n")
    s3_inputs.put_object(Bucket=BUCKET, Key="elsewhere/mug.png", Body=products["mug.png"])
    # listed (an object's bytes are not read at listing), refused when its group reads it
    s3_inputs.put_object(Bucket=BUCKET, Key="products/zz-broken.png", Body=b"<html>not found</html>")
    archive = tmp_path / "archive"
    prefix = f"s3://aws_moto@{BUCKET}/products/"
    dag_run = _run(
        run_dag,
        batch_dag,
        archive,
        input_images=prefix,
        instruction=WHITE,
        chunk_size=4,
        fail_run_on_lost=False,
    )
    assert dag_run.state == "success"
    day = archive / "2026-03-02"
    # the manifest and the sheet name the objects without the connection id
    shown = {name: f"s3://{BUCKET}/products/{name}" for name in products}
    summary = _check_edits(day, dag_run, products, shown)
    assert summary["source"]["folder"] == f"s3://{BUCKET}/products/"
    assert summary["counts"]["success"] == 6

    stats = imagecb_simulator.stats()
    assert stats["uploads_by_sha256"] == {_sha(data): 1 for data in products.values()}
    assert _per_image(stats, 6) == (1.0, 1.0)

    # the broken object: upload_failed, never sent, quarantined, its card red with the reason
    assert summary["counts"]["upload_failed"] == 1
    broken = next(i for i in summary["images"] if i["name"] == "zz-broken.png")
    assert broken["outcome"] == "upload_failed"
    assert f"s3://{BUCKET}/products/zz-broken.png" in broken["reason"]
    assert "not those of a PNG, JPEG or WEBP image" in broken["reason"]
    assert broken["input"]["before"] is None
    assert broken["input"]["note"].startswith(
        f"not shown: Invalid input_image 's3://{BUCKET}/products/zz-broken.png'"
    )
    quarantined = _jsonl(day / "quarantine.jsonl")
    assert [(q["outcome"], q["request"]["inputImage"]) for q in quarantined] == [
        ("upload_failed", prefix + "zz-broken.png")
    ]
    report = (_run_folder(day, dag_run) / "report.html").read_text()
    assert report.count('class="card lost edit"') == 1
    assert "aws_moto" not in report
