"""
``make bench-triggerer``: what 1,000 waiting images cost one triggerer, on the real stack.

The images never finish while measured (a one-hour render), are polled every 30 s, and are
held two ways: in groups (the batch DAG's default: a few dozen triggers) and one trigger per image
(``chunk_size=1``: a thousand deferred task instances). Memory is the triggerer's process tree
(resident set) above its idle baseline; CPU is its average use over a window of several polls.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import DAG_ID, bench_stack, print_table, save, write_prompts

RENDER = 3600.0
FAST_RATE = 10_000  # submissions per 10 s: submitting is not what is measured here


def _hold(stack, sim, *, label: str, n: int, chunk_size: int | None, window: float, baseline) -> dict:
    import tempfile
    from pathlib import Path

    work = Path(tempfile.mkdtemp(prefix=f"imagecb-bench-trig-{label}-"))
    conf = {
        "prompts_path": write_prompts(work, n, f"{label}-{int(time.time())}"),
        "archive_root": str(work / "archive"),
        "poll_interval": 30,
        "timeout": 7200,
    }
    if chunk_size:
        conf["chunk_size"] = chunk_size
    sim.reset()
    run_id = stack.trigger(DAG_ID, conf=conf)
    started = time.monotonic()
    while sim.stats(tasks=False)["submissions_total"] < n or stack.client.count_task_instances(
        "running", DAG_ID, run_id
    ) + stack.client.count_task_instances(["queued", "scheduled"], DAG_ID, run_id):
        if time.monotonic() - started > 3600:
            raise TimeoutError(f"{label}: the {n} images were not all waiting after an hour")
        time.sleep(2)
    deferred = stack.client.count_task_instances("deferred", DAG_ID, run_id)
    time.sleep(35)  # a full poll cycle first, so every trigger runs
    calls_before = sim.stats(tasks=False)["status_calls_total"]
    with stack.sample("triggerer", interval=1.0) as sampler:
        time.sleep(window)
    calls = sim.stats(tasks=False)["status_calls_total"] - calls_before
    stack.client.patch(f"dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
    stats = sampler.stats
    figures = {
        "label": label,
        "waiting_images": n,
        "deferred_task_instances": deferred,
        "seconds_to_all_waiting": round(time.monotonic() - started - window - 35, 1),
        "baseline_rss_mb": round(baseline.peak_rss_mb, 1),
        "peak_rss_mb": round(stats.peak_rss_mb, 1),
        "extra_rss_mb": round(stats.peak_rss_mb - baseline.peak_rss_mb, 1),
        "cpu_percent_of_a_core": round(stats.cpu_percent, 2),
        "baseline_cpu_percent": round(baseline.cpu_percent, 2),
        "status_calls_per_s": round(calls / window, 1),
        "window_s": window,
    }
    print(figures, flush=True)
    time.sleep(20)  # let the failed run's triggers go before the next measurement
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks triggerer", description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="waiting images (default 1000)")
    parser.add_argument("--window", type=float, default=120.0, help="seconds measured (default 120)")
    parser.add_argument("--variants", default="groups,one_per_image")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = []
    with bench_stack(latency=RENDER, per_10s=FAST_RATE) as (stack, sim):
        with stack.sample("triggerer", interval=1.0) as idle:
            time.sleep(30)
        for label in chosen:
            one_each = label == "one_per_image"
            # one task per image: let many submit at once (the rate limit is not what is measured)
            stack.client.set_pool("imagecb_submissions", slots=16 if one_each else 1)
            rows.append(
                _hold(
                    stack,
                    sim,
                    label=label,
                    n=args.n,
                    chunk_size=1 if one_each else None,
                    window=args.window,
                    baseline=idle.stats,
                )
            )
    print()
    print_table(rows, list(rows[0]))
    print(f"figures: {save('triggerer.json', {'variants': rows})}")
