"""
What the real-stack benchmarks share: a simulator and a stack wired together, prompt files, and
the figures of one batch run (wall time against the physical bound, submissions, status calls,
429s, failed tries, worker slots, the triggerer's memory and CPU).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from imagecb_dev.stack import AirflowStack
from imagecb_provider.testing.simulator import run_in_subprocess

ROOT = Path(__file__).resolve().parents[1]

DAG_ID = "imagecb_batch_generate"
RESULTS = ROOT / "bench" / "results"
#: Whole figures, timelines included (not committed).
RAW_RESULTS = ROOT / "artifacts" / "bench"
#: The vendor's documented account limit.
RATE_PER_10S = 20


def bound_seconds(n: int, latency: float, poll_interval: float, per_10s: float = RATE_PER_10S) -> float:
    """The physical bound: n submissions under the limit, one render, one poll interval."""
    return n / (per_10s / 10) + latency + poll_interval


def warm_up(stack: AirflowStack, sim: Any) -> None:
    """Run a 2-prompt batch, not measured: the first run of a fresh stack pays its cold start."""
    work = Path(tempfile.mkdtemp(prefix="imagecb-bench-warm-up-"))
    conf = {
        "prompts_path": write_prompts(work, 2, f"warm-up-{int(time.time())}"),
        "archive_root": str(work / "archive"),
        "poll_interval": 1,
    }
    sim.configure(latency=0.5)
    run_id = stack.trigger(DAG_ID, conf=conf)
    print(f"warm-up run: {stack.wait_for_run(DAG_ID, run_id, timeout=300)}", flush=True)


@contextmanager
def bench_stack(
    *,
    latency: float,
    per_10s: float = RATE_PER_10S,
    parallelism: int = 16,
    sim_fields: dict[str, Any] | None = None,
    executor: str = "LocalExecutor",
    slots: int = 1,
) -> Iterator[tuple[AirflowStack, Any]]:
    """
    A simulator (``latency`` s renders, the account limit) and a stack whose connection uses it.

    :param slots: the submission pool's slots, and the connection's ``submission_slots``.
    """
    fields = {
        "latency": latency,
        "credits": 1e12,
        "rate_limit_count": int(per_10s),
        "rate_limit_window": 10.0,
        **(sim_fields or {}),
    }
    with run_in_subprocess(**fields) as sim:
        extra = {"submissions_per_10s": per_10s, "submission_slots": slots}
        conn = {**json.loads(sim.connection_json()), "extra": extra}
        started = time.monotonic()
        with AirflowStack(
            executor=executor,
            parallelism=parallelism,
            connections={"imagecb_default": conn},
            dag_ids=[DAG_ID],
        ) as stack:
            print(f"stack up in {time.monotonic() - started:.1f} s at {stack.url}", flush=True)
            stack.client.set_pool("imagecb_submissions", slots=slots)
            warm_up(stack, sim)
            yield stack, sim


def write_prompts(folder: Path, n: int, prefix: str, marker: str = "") -> str:
    """A CSV of ``n`` distinct prompts (distinct per run, so no image is reused from another)."""
    path = folder / f"{prefix}.csv"
    rows = "".join(f'"{prefix} image {i} {marker}"\n'.replace(' "', '"') for i in range(n))
    path.write_text("prompt\n" + rows)
    return str(path)


def measure_batch(
    stack: AirflowStack,
    sim: Any,
    *,
    label: str,
    n: int,
    latency: float,
    poll_interval: float,
    conf: dict[str, Any],
    per_10s: float = RATE_PER_10S,
    timeout: float = 7200.0,
) -> dict[str, Any]:
    """Run the batch DAG once on ``n`` fresh prompts and return its figures."""
    work = Path(tempfile.mkdtemp(prefix=f"imagecb-bench-{label}-"))
    conf = {
        "prompts_path": write_prompts(work, n, f"{label}-{int(time.time())}"),
        "archive_root": str(work / "archive"),
        "poll_interval": poll_interval,
        "timeout": max(600, latency * 5),
        "fail_run_on_lost": True,
        **conf,
    }
    sim.reset()
    sim.configure(latency=latency)
    slots = stack.sample_slots(interval=1.0)
    triggerer = stack.sample("triggerer", interval=1.0)
    started = time.time()
    run_id = stack.trigger(DAG_ID, conf=conf)
    state = stack.wait_for_run(DAG_ID, run_id, timeout=timeout)
    # From the trigger to the run's own end: not the second the benchmark takes to see it.
    ended = stack.client.dag_run(DAG_ID, run_id).get("end_date")
    wall = (_ts(ended) if ended else time.time()) - started
    slots.halt()
    triggerer.halt()
    stats = sim.stats()
    tis = stack.client.task_instances(DAG_ID, run_id)
    bound = bound_seconds(n, latency, poll_interval, per_10s)
    figures = {
        "label": label,
        "n": n,
        "latency_s": latency,
        "poll_interval_s": poll_interval,
        "conf": {k: v for k, v in conf.items() if k not in ("prompts_path", "archive_root")},
        "state": state,
        "wall_s": round(wall, 1),
        "bound_s": round(bound, 1),
        "ratio": round(wall / bound, 3),
        "submissions_per_image": round(stats["submissions_total"] / n, 3),
        "status_calls_per_image": round(stats["status_calls_total"] / n, 2),
        "rate_limited": int(stats["rejected"].get("429", 0)),
        "failed_tasks": _failed_tries(stack, run_id, tis),
        "task_runs": sum(ti["try_number"] for ti in tis),
        "peak_worker_slots": slots.peak_running,
        "peak_deferred": slots.peak_deferred,
        "triggerer_peak_rss_mb": round(triggerer.stats.peak_rss_mb, 1),
        "triggerer_cpu_percent": round(triggerer.stats.cpu_percent, 1),
        "timeline": timeline(tis, stats),
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "timeline"}), flush=True)
    if figures["failed_tasks"]:
        print(f"failed tries' logs: {_keep_failed_logs(stack, run_id, label, tis)}", flush=True)
    groups = sorted(ti["map_index"] for ti in tis if ti["task_id"] == "image.generate")
    if groups:  # where a group's time goes, for the timeline
        sample = stack.task_log(DAG_ID, run_id, "image.generate", groups[len(groups) // 2], 1)
        RAW_RESULTS.mkdir(parents=True, exist_ok=True)
        (RAW_RESULTS / f"{label}-generate-sample.log").write_text(sample)
    return figures


def _keep_failed_logs(stack: AirflowStack, run_id: str, label: str, tis: list[dict[str, Any]]) -> Path:
    """Copy the log of every try that failed to ``artifacts/bench/<label>-failed.log``: the stack goes."""
    parts = []
    for ti in tis:
        if ti["try_number"] > 1 or ti["state"] == "failed":
            for t in stack.client.tries(DAG_ID, run_id, ti["task_id"], ti["map_index"]):
                if t["state"] in ("failed", "up_for_retry"):
                    log = stack.task_log(DAG_ID, run_id, ti["task_id"], ti["map_index"], t["try_number"])
                    parts.append(f"===== {ti['task_id']}[{ti['map_index']}] try {t['try_number']}\n{log}")
    RAW_RESULTS.mkdir(parents=True, exist_ok=True)
    path = RAW_RESULTS / f"{label}-failed.log"
    path.write_text("\n".join(parts))
    return path


def _failed_tries(stack: AirflowStack, run_id: str, tis: list[dict[str, Any]]) -> int:
    """Tries that ended failed, the latest ones and the earlier ones a retry replaced."""
    failed = 0
    for ti in tis:
        if ti["try_number"] > 1 or ti["state"] == "failed":
            tries = stack.client.tries(DAG_ID, run_id, ti["task_id"], ti["map_index"])
            failed += sum(t["state"] in ("failed", "up_for_retry") for t in tries)
    return failed


def timeline(tis: list[dict[str, Any]], stats: dict[str, Any]) -> dict[str, Any]:
    """Where the time went: first and last submission, and each task's start and end, in seconds."""
    starts = [_ts(ti["start_date"]) for ti in tis if ti["start_date"]]
    zero = min(starts) if starts else 0.0
    submitted = sorted(_ts(t["submitted_at"]) for t in stats.get("tasks", {}).values())
    rows = [
        {
            "task": ti["task_id"],
            "map_index": ti["map_index"],
            "state": ti["state"],
            "try": ti["try_number"],
            "start": round(_ts(ti["start_date"]) - zero, 1) if ti["start_date"] else None,
            "end": round(_ts(ti["end_date"]) - zero, 1) if ti["end_date"] else None,
        }
        for ti in sorted(tis, key=lambda t: t["start_date"] or "")
    ]
    return {
        "first_submission_s": round(submitted[0] - zero, 1) if submitted else None,
        "last_submission_s": round(submitted[-1] - zero, 1) if submitted else None,
        "tasks": rows,
    }


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def save(name: str, figures: dict[str, Any]) -> Path:
    """
    Write the figures' summary to ``bench/results/<name>`` (committed) and the whole to ``artifacts/bench/``.

    :param name: the file name, e.g. ``scale.json``.
    :param figures: what the benchmark measured; its ``timeline`` entries (one row per task
        instance) stay out of the committed summary.
    """
    RAW_RESULTS.mkdir(parents=True, exist_ok=True)
    (RAW_RESULTS / name).write_text(json.dumps(figures, indent=2) + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(summary(figures), indent=2) + "\n")
    return path


def summary(figures: Any) -> Any:
    """Return the figures without their timelines, at any depth."""
    if isinstance(figures, dict):
        return {key: summary(value) for key, value in figures.items() if key != "timeline"}
    if isinstance(figures, list):
        return [summary(value) for value in figures]
    return figures
