"""
``python -m benchmarks latency``: from an image's completion to its task's end, on the real stack.

One prompt per group (``chunk_size=1``), so each ``image.generate`` instance waits for exactly one
image; its delay is the instance's end minus the image's completion at the simulator (its
submission time plus the render time). Measured in callback mode (signed callbacks posted to the
API server's ``/imagecb`` route, polling every 300 s only as a safety net) and when polling every
30 s, side by side on one stack. In the same run, Airflow's own resume floor: a trivial deferral
(``benchmarks/dags/imagecb_resume_floor.py``) whose delay is its end minus the moment its trigger
fired; the callback wake is reported against it.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchmarks.common import DAG_ID, ROOT, print_table, save, write_prompts
from imagecb_dev.stack import AirflowStack
from imagecb_provider.testing.simulator import run_in_subprocess

HMAC_KEY = "whk-bench-latency"


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _delays(stack: AirflowStack, sim, run_id: str, latency: float) -> list[float]:
    """Per image: its generate instance's end minus the image's completion."""
    tasks = sim.stats()["tasks"]
    delays = []
    for ti in stack.client.task_instances(DAG_ID, run_id):
        if ti["task_id"] != "image.generate" or not ti["end_date"]:
            continue
        result = stack.client.xcom(DAG_ID, run_id, "image.generate", map_index=ti["map_index"])[0]
        completed = _ts(tasks[result["task_id"]]["submitted_at"]) + latency
        delays.append(_ts(ti["end_date"]) - completed)
    return delays


def _measure(stack, sim, *, mode: str, n: int, latency: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"imagecb-bench-latency-{mode}-"))
    conf = {
        "prompts_path": write_prompts(work, n, f"latency-{mode}-{int(time.time())}"),
        "archive_root": str(work / "archive"),
        "chunk_size": 1,
        "wait_mode": mode,
        "poll_interval": 300 if mode == "callback" else 30,
    }
    sim.reset()
    run_id = stack.trigger(DAG_ID, conf=conf)
    state = stack.wait_for_run(DAG_ID, run_id, timeout=3600)
    delays = sorted(_delays(stack, sim, run_id, latency))
    stats = sim.stats(tasks=False)
    figures = {
        "mode": mode,
        "state": state,
        "images": len(delays),
        "median_s": round(statistics.median(delays), 2),
        "p95_s": round(delays[int(0.95 * (len(delays) - 1))], 2),
        "max_s": round(delays[-1], 2),
        "status_calls_per_image": round(stats["status_calls_total"] / n, 2),
        "callbacks": len(stats["callbacks"]),
    }
    print(json.dumps(figures), flush=True)
    return figures


FLOOR_DAG_ID = "imagecb_resume_floor"


def _floor(stack: AirflowStack) -> dict:
    """Airflow's resume floor: each instance's end minus the moment its trigger fired."""
    run_id = stack.trigger(FLOOR_DAG_ID)
    state = stack.wait_for_run(FLOOR_DAG_ID, run_id, timeout=1800)
    delays = []
    for ti in stack.client.task_instances(FLOOR_DAG_ID, run_id):
        moment = stack.client.xcom(FLOOR_DAG_ID, run_id, "wait", map_index=ti["map_index"])
        delays.append(_ts(ti["end_date"]) - _ts(moment))
    delays.sort()
    figures = {
        "mode": "airflow floor",
        "state": state,
        "images": len(delays),
        "median_s": round(statistics.median(delays), 2),
        "p95_s": round(delays[int(0.95 * (len(delays) - 1))], 2),
        "max_s": round(delays[-1], 2),
        "status_calls_per_image": 0,
        "callbacks": 0,
    }
    print(json.dumps(figures), flush=True)
    return figures


def _dags_folder() -> Path:
    """A DAG folder with the batch DAG and the floor DAG (links to the repository's files)."""
    folder = Path(tempfile.mkdtemp(prefix="imagecb-bench-latency-dags-"))
    for source in (
        ROOT / "dags" / "imagecb_batch_generate.py",
        ROOT / "benchmarks" / "dags" / "imagecb_resume_floor.py",
    ):
        (folder / source.name).symlink_to(source)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks latency", description=__doc__)
    parser.add_argument("--n", type=int, default=50, help="images per mode (default 50)")
    parser.add_argument("--latency", type=float, default=20.0, help="render seconds (default 20)")
    args = parser.parse_args(argv)
    port = _free_port()
    with run_in_subprocess(latency=args.latency, webhook_hmac_key=HMAC_KEY, credits=1e12) as sim:
        extra = {"callback_base_url": f"http://127.0.0.1:{port}", "webhook_hmac_key": HMAC_KEY}
        conn = {**json.loads(sim.connection_json()), "extra": extra}
        with AirflowStack(
            api_port=port,
            connections={"imagecb_default": conn},
            dag_ids=[DAG_ID, FLOOR_DAG_ID],
            dags_folder=_dags_folder(),
        ) as stack:
            rows = [_floor(stack)] + [
                _measure(stack, sim, mode=m, n=args.n, latency=args.latency) for m in ("callback", "poll")
            ]
    floor, callback = rows[0], rows[1]
    print(
        f"callback wake above Airflow's floor: median {callback['median_s'] - floor['median_s']:+.2f} s, "
        f"p95 {callback['p95_s'] - floor['p95_s']:+.2f} s"
    )
    print()
    print_table(rows, list(rows[0]))
    print(f"figures: {save('latency.json', {'render_s': args.latency, 'modes': rows})}")
