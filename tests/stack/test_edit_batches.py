"""
Batch editing on a real stack: ``imagecb_batch_generate`` edits 50 images from a local folder, then
50 from an S3 prefix, with one instruction, on the LocalExecutor stack the batch tests share
(separate API server, scheduler, DAG processor and triggerer on PostgreSQL), against the simulator
in its own process. The same under ``dag.test()``: tests/e2e/test_batch_edit.py.

S3 is moto's server, started here on loopback; the stack's task processes reach it through an
``aws`` connection added to the running stack over its REST API (so the shared stack keeps its
options), and read the prefix as ``s3://<that conn id>@bucket/prefix/``.

Each case checks every image uploaded once (the simulator's ``uploads_by_sha256``) and submitted
once, 50 results archived with their input named in the manifest, the contact sheet showing 50
before/after cards, and no try failed; then it prints uploads and submissions per image and the
wall time against the bound: 50 submissions at the vendor's 20 per 10 s (the connection used here
is paced at that rate), plus one render and one status call.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batch_checks import (
    DAG_ID,
    Batch,
    Figures,
    check_file,
    failed_tries,
    finish,
    prepare_simulator,
    read_jsonl,
    report_case,
    stale_event_races,
    summary_of,
    ti_name,
    trigger,
)
from PIL import Image

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]

IMAGES = 50
CHUNK_SIZE = 25
INSTRUCTION = "put the product on a pure white background"
#: A connection to the simulator paced at the vendor's documented limit: the bound's rate.
EDIT_CONN_ID = "imagecb_edit"
SUBMISSIONS_PER_10S = 20
MOTO_CONN_ID = "aws_moto_edit"
BUCKET = "imagecb-edit-inputs"
LATENCY = 3.0  # the simulator's render time (batch_checks.BASE_CONFIG)
POLL_INTERVAL = 1.0


def photos() -> dict[str, bytes]:
    """Fifty small, distinct product photos (PNG): name -> bytes."""
    drawn = {}
    for i in range(IMAGES):
        red, green, blue = (round(255 * c) for c in colorsys.hsv_to_rgb(i / IMAGES, 0.7, 0.9))
        image = Image.new("RGB", (64, 48), (red, green, blue))
        image.paste((255 - red, 255 - green, 255 - blue), (16 + i % 16, 12, 40 + i % 16, 36))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        drawn[f"product-{i:02d}.png"] = buffer.getvalue()
    return drawn


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _put_connection(stack: Any, conn_id: str, body: dict[str, Any]) -> None:
    """Add (or replace) a connection of the running stack through its REST API."""
    from imagecb_dev.stack.errors import StackAPIError

    try:
        stack.client.delete(f"connections/{conn_id}")
    except StackAPIError as error:
        if error.status_code != 404:
            raise
    stack.client.post("connections", {"connection_id": conn_id, **body})


@pytest.fixture
def edit_conn(batch_local_stack: Any, batch_simulator: Any) -> str:
    """The connection to the simulator paced at 20 submissions per 10 s, on the shared stack."""
    conn = json.loads(batch_simulator.connection_json())
    extra = json.dumps({"submissions_per_10s": SUBMISSIONS_PER_10S})
    _put_connection(batch_local_stack, EDIT_CONN_ID, {**conn, "extra": extra})
    return EDIT_CONN_ID


@pytest.fixture
def moto_bucket(batch_local_stack: Any) -> Iterator[Any]:
    """moto's S3 server on loopback, an empty bucket, its connection on the stack; the boto3 client."""
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    extra = json.dumps({"endpoint_url": endpoint, "region_name": "us-east-1"})
    body = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": extra}
    _put_connection(batch_local_stack, MOTO_CONN_ID, body)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    yield client
    batch_local_stack.client.delete(f"connections/{MOTO_CONN_ID}")
    server.stop()


def run_edit(
    stack: Any, simulator: Any, folder: Path, name: str, input_images: str, inputs: dict[str, bytes]
) -> tuple[Batch, Figures]:
    """Edit ``inputs`` (name -> bytes) found at ``input_images``; check the run; return its figures."""
    prepare_simulator(simulator)
    root = folder / "archive"
    root.mkdir()
    conf = {
        "input_images": input_images,
        "instruction": INSTRUCTION,
        "archive_root": str(root),
        "chunk_size": CHUNK_SIZE,
        "poll_interval": POLL_INTERVAL,
        "timeout": 600,
        "imagecb_conn_id": EDIT_CONN_ID,
    }
    batch = Batch(name=name, root=root, prompts=sorted(inputs), chunk_size=CHUNK_SIZE, conf=conf)
    trigger(stack, batch)
    state = finish(stack, batch)
    assert state == "success", f"run {batch.run_id} ({name}) ended {state}\n{stack.diagnostics()}"

    stats = simulator.stats()
    hashes = {_sha(data) for data in inputs.values()}
    assert stats["uploads_by_sha256"] == dict.fromkeys(hashes, 1), "an image uploaded twice, or not at all"
    assert stats["submissions"] == {INSTRUCTION: IMAGES}
    assert stats["held"] == []
    check_archive(batch, inputs)
    check_sheet(batch, inputs)
    tis = stack.client.task_instances(DAG_ID, batch.run_id)
    groups = -(-IMAGES // CHUNK_SIZE)
    assert {ti_name(ti): ti["state"] for ti in tis} == {
        "read_prompts": "success",
        "report": "success",
        **{f"image.{t}[{g}]": "success" for t in ("generate", "archive", "settle") for g in range(groups)},
    }
    labels = {ti["map_index"]: ti["rendered_map_index"] for ti in tis if ti["task_id"] == "image.generate"}
    assert labels == {0: "images 1-25 (25 images)", 1: "images 26-50 (25 images)"}
    tries = failed_tries(stack, batch, tis)
    races = set(stale_event_races(stack, batch))
    assert {k: v for k, v in tries.items() if k not in races} == {}, tries

    bound = IMAGES / SUBMISSIONS_PER_10S * 10 + LATENCY + POLL_INTERVAL
    figures = Figures(
        case=name,
        executor=batch.executor,
        state=state,
        wall_seconds=batch.wall_seconds,
        prompts=IMAGES,
        images_expected=IMAGES,
        images_archived=IMAGES,
        submissions_per_prompt={1: IMAGES},
        failed_tries=tries,
        races=races,
        notes={
            "uploads per image": f"{sum(stats['uploads_by_sha256'].values()) / IMAGES:.2f}",
            "submissions per image": f"{stats['submissions_total'] / IMAGES:.2f}",
            "wall vs bound": f"{batch.wall_seconds:.0f}s vs {bound:.0f}s ({batch.wall_seconds / bound:.2f}x; "
            f"bound = {IMAGES} submissions at {SUBMISSIONS_PER_10S} per 10 s + {LATENCY:g}s render "
            f"+ {POLL_INTERVAL:g}s poll)",
        },
    )
    return batch, figures


def check_archive(batch: Batch, inputs: dict[str, bytes]) -> None:
    """One result and one origin line per image, each naming its input and its hash; files whole."""
    lines = read_jsonl(batch.day / "images" / "manifest.jsonl")
    assert len(lines) == 2 * IMAGES
    results = [line for line in lines if line["source"] == "result"]
    by_hash = {line["input_sha256"]: line for line in results}
    assert set(by_hash) == {_sha(data) for data in inputs.values()}
    shown = batch.conf["input_images"].replace(f"{MOTO_CONN_ID}@", "")  # never the connection id
    for name, data in inputs.items():
        line = by_hash[_sha(data)]
        assert line["input_source"] == shown.rstrip("/") + "/" + name
    for line in lines:
        check_file(Path(line["path"].removeprefix("file://")), line)


def check_sheet(batch: Batch, inputs: dict[str, bytes]) -> None:
    """50 before/after cards; each input copied once into the run's folder, byte for byte."""
    summary = summary_of(batch)
    assert summary["counts"]["success"] == IMAGES
    assert (summary["prompts"], summary["rejected"], summary["lost"]) == (IMAGES, 0, 0)
    assert summary["archived_files"] == 2 * IMAGES
    run = next((batch.day / "runs").iterdir())
    report = (run / "report.html").read_text()
    assert report.count('class="card edit"') == IMAGES
    assert report.count("<img ") == 2 * IMAGES
    copies = {p.name: p.read_bytes() for p in (run / "inputs").iterdir()}
    assert copies == {f"{_sha(data)}.png": data for data in inputs.values()}


def test_batch_edit_of_a_local_folder_on_local_executor(
    batch_local_stack: Any,
    batch_simulator: Any,
    edit_conn: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Edit 50 images of a local folder the stack's workers read."""
    inputs = photos()
    folder = tmp_path / "products"
    folder.mkdir()
    for name, data in inputs.items():
        (folder / name).write_bytes(data)
    (folder / "prices.txt").write_text("not an image\n")
    _, figures = run_edit(batch_local_stack, batch_simulator, tmp_path, "edit-local", str(folder), inputs)
    report_case(request.config, figures)


def test_batch_edit_of_an_s3_prefix_on_local_executor(
    batch_local_stack: Any,
    batch_simulator: Any,
    edit_conn: str,
    moto_bucket: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Edit 50 images under an S3 prefix, read through a connection of the stack."""
    inputs = photos()
    for name, data in inputs.items():
        moto_bucket.put_object(Bucket=BUCKET, Key=f"products/{name}", Body=data)
    moto_bucket.put_object(Bucket=BUCKET, Key="products/prices.txt", Body=b"not an image\n")
    prefix = f"s3://{MOTO_CONN_ID}@{BUCKET}/products/"
    _, figures = run_edit(batch_local_stack, batch_simulator, tmp_path, "edit-s3", prefix, inputs)
    report_case(request.config, figures)
