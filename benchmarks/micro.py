"""
``python -m benchmarks micro``: in-process figures of the trigger, without an Airflow stack.

Every figure runs against the simulator in its own process (so its memory is not counted),
with time scaled where a real run would take minutes: a 95 s generation polled every 30 s is
measured as 0.95 s polled every 0.3 s, which gives the same number of status calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="imagecb-bench-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")

from imagecb_provider.hooks.imagecb import ImageCbHook  # noqa: E402
from imagecb_provider.models import GenerationRequest  # noqa: E402
from imagecb_provider.testing.simulator import run_in_subprocess  # noqa: E402
from imagecb_provider.triggers.task import ImageTaskTrigger  # noqa: E402


def _use(sim) -> None:
    os.environ["AIRFLOW_CONN_IMAGECB_DEFAULT"] = sim.connection_json()


def _submit_many(count: int, prefix: str) -> list[str]:
    hook = ImageCbHook()
    return [hook.submit(GenerationRequest(prompt=f"{prefix} {i}")) for i in range(count)]


async def _wait(remote_task_id: str, poll_interval: float, timeout: float) -> dict:
    trigger = ImageTaskTrigger(
        remote_task_id=remote_task_id, deadline=time.time() + timeout, poll_interval=poll_interval
    )
    async for event in trigger.run():
        payload = event.payload
        record = payload["records"].get(remote_task_id)
        return {"status": payload["status"], "record": record}
    raise RuntimeError("no event")


async def _wait_all(ids: list[str], poll_interval: float, timeout: float) -> list[dict]:
    return await asyncio.gather(*(_wait(i, poll_interval, timeout) for i in ids))


async def _submit_and_wait(
    prompts: list[str], poll_interval: float, timeout: float
) -> list[tuple[str, dict]]:
    """Each image's wait starts right after its own submission, as in the operator."""
    hook = ImageCbHook()

    async def one(prompt: str) -> tuple[str, dict]:
        remote_task_id = await asyncio.to_thread(hook.submit, GenerationRequest(prompt=prompt))
        return remote_task_id, await _wait(remote_task_id, poll_interval, timeout)

    return await asyncio.gather(*(one(p) for p in prompts))


def bench_polls_per_image(images: int) -> dict:
    """
    Status calls per image for a 95 s generation at a 30 s interval, time scaled by 1/10.

    At 1/100 the few milliseconds of each HTTP call weigh like seconds and make the count too low.
    """
    scale = 0.1
    with run_in_subprocess(latency=95 * scale, rate_limit_count=100_000, credits=1e9) as sim:
        _use(sim)
        prompts = [f"bench polls {i}" for i in range(images)]
        waited = asyncio.run(_submit_and_wait(prompts, poll_interval=30 * scale, timeout=1800 * scale))
        stats = sim.stats()
    polls = [stats["status_calls"][remote_task_id] for remote_task_id, _ in waited]
    assert all(event["status"] == "done" for _, event in waited)
    return {
        "images": images,
        "status_calls_mean": round(statistics.mean(polls), 2),
        "status_calls_min": min(polls),
        "status_calls_max": max(polls),
        "floor": 4,
    }


def bench_triggers(count: int, latency: float, poll_interval: float) -> dict:
    """Wall time and memory of ``count`` triggers waiting in one event loop."""
    with run_in_subprocess(latency=latency, rate_limit_count=1_000_000, credits=1e9) as sim:
        _use(sim)
        ids = _submit_many(count, f"bench triggers {count}")
        rss_before = _rss_mb()
        started = time.monotonic()
        events = asyncio.run(_wait_all(ids, poll_interval=poll_interval, timeout=600))
        elapsed = time.monotonic() - started
        peak = _rss_mb()
        stats = sim.stats()
    done = sum(e["status"] == "done" and e["record"]["outcome"] == "success" for e in events)
    return {
        "triggers": count,
        "succeeded": done,
        "latency_s": latency,
        "poll_interval_s": poll_interval,
        "wall_s": round(elapsed, 2),
        "overhead_s": round(elapsed - latency, 2),
        "peak_rss_growth_mb": round(peak - rss_before, 1),
        "peak_rss_kb_per_trigger": round((peak - rss_before) * 1024 / count, 1),
        "status_calls": stats["status_calls_total"],
    }


def bench_completion_delay(poll_interval: float, latency: float, samples: int) -> dict:
    """Delay from the remote task's completion to the Airflow task's end, under ``dag.test()``."""
    from datetime import datetime

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.sdk import DAG
    from airflow.utils import db

    from imagecb_provider.operators.generate import ImageGenerateOperator

    db.initdb()
    delays = []
    with run_in_subprocess(latency=latency, timestamp_format="epoch_ms") as sim:
        _use(sim)
        for sample in range(samples):
            with DAG(f"bench_delay_{sample}", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
                ImageGenerateOperator(
                    task_id="generate", prompt=f"bench delay {sample}", poll_interval=poll_interval
                )
            DagBundlesManager().sync_bundles_to_db()
            bag = DagBag(dag_folder=None, collect_dags=False)
            bag.bag_dag(dag)
            sync_bag_to_db(bag, "dags-folder", None)
            ti = dag.test().get_task_instances()[0]
            completed = datetime.fromisoformat(
                ti.xcom_pull(task_ids="generate")["completed_at"].replace("Z", "+00:00")
            )
            delays.append((ti.end_date - completed).total_seconds())
    return {
        "poll_interval_s": poll_interval,
        "latency_s": latency,
        "samples": samples,
        "delay_s_mean": round(statistics.mean(delays), 2),
        "delay_s_min": round(min(delays), 2),
        "delay_s_max": round(max(delays), 2),
        "expected_wait_for_next_poll_s": f"0 to {poll_interval * 1.1:g}",
    }


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks micro", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args(argv)
    runs = {
        "polls_per_95s_image_at_30s": lambda: bench_polls_per_image(20 if args.quick else 100),
        "triggers_200": lambda: bench_triggers(200, latency=10.0, poll_interval=1.0),
        "completion_delay_dag_test": lambda: bench_completion_delay(
            poll_interval=2.0, latency=3.0, samples=5
        ),
    }
    if not args.quick:
        runs["triggers_1000"] = lambda: bench_triggers(1000, latency=20.0, poll_interval=2.0)
    for name, run in runs.items():
        print(json.dumps({name: run()}), flush=True)


if __name__ == "__main__":
    main()
