"""
``make bench``: the batch DAG on the real stack at the documented limit, against its physical bound.

With no ``--n``, the two documented cases, one after the other on one stack: 120 prompts with
20 s renders polled every 5 s, and 200 prompts with 60 s renders polled every 30 s, in the DAG's
default groups (``make bench``). With ``--n``, one batch three ways (``make bench-compare``).

For the comparison, one stack (api-server, scheduler, dag-processor, triggerer, LocalExecutor
with 16 slots, on a PostgreSQL database of its own) and one simulator run the same batch three
ways, side by side:
the default groups, one prompt per group (``chunk_size=1``), and the non-deferrable operator
(``deferrable=false``, one prompt per group, the pool widened to every worker slot, as a user
without the triggerer would run it). The figures go to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse

from benchmarks.common import bench_stack, measure_batch, print_table, save

COLUMNS = [
    "label",
    "state",
    "wall_s",
    "bound_s",
    "ratio",
    "peak_worker_slots",
    "triggerer_peak_rss_mb",
    "triggerer_cpu_percent",
    "status_calls_per_image",
    "submissions_per_image",
    "rate_limited",
    "failed_tasks",
    "task_runs",
]


#: The documented cases: (label, prompts, render seconds, poll interval).
DOCUMENTED = [("120x20s", 120, 20.0, 5.0), ("200x60s", 200, 60.0, 30.0)]


def documented(slots: int) -> None:
    """Run the documented cases on one stack; print and save their figures."""
    rows = []
    with bench_stack(latency=DOCUMENTED[0][2], slots=slots) as (stack, sim):
        for label, n, latency, poll in DOCUMENTED:
            rows.append(
                measure_batch(stack, sim, label=label, n=n, latency=latency, poll_interval=poll, conf={})
            )
    print()
    print_table(rows, COLUMNS)
    print(f"figures: {save(f'documented_{slots}_slot.json', {'submission_slots': slots, 'cases': rows})}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks batch", description=__doc__)
    parser.add_argument(
        "--n", type=int, default=None, help="prompts: compare three ways (default: the documented cases)"
    )
    parser.add_argument("--slots", type=int, default=1, help="submission pool slots (default 1)")
    parser.add_argument("--latency", type=float, default=60.0, help="render seconds (default 60)")
    parser.add_argument("--poll", type=float, default=30.0, help="poll interval (default 30)")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the DAG's default")
    parser.add_argument(
        "--variants", default="batch,chunk_1,sync", help="which of batch, chunk_1, sync (default all)"
    )
    parser.add_argument("--output", default="latest.json", help="file name under bench/results/")
    args = parser.parse_args(argv)
    if args.n is None:
        documented(args.slots)
        return
    variants = {
        "batch": {} if args.chunk_size is None else {"chunk_size": args.chunk_size},
        "chunk_1": {"chunk_size": 1},
        "sync": {"chunk_size": 1, "deferrable": False},
    }
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = []
    with bench_stack(latency=args.latency) as (stack, sim):
        for label in chosen:
            # Without the triggerer a task holds its slot for the whole render: one pool slot
            # would make the run sequential, so the sync run gets every worker slot.
            stack.client.set_pool("imagecb_submissions", slots=16 if label == "sync" else 1)
            rows.append(
                measure_batch(
                    stack,
                    sim,
                    label=label,
                    n=args.n,
                    latency=args.latency,
                    poll_interval=args.poll,
                    conf=variants[label],
                )
            )
    print()
    print_table(rows, COLUMNS)
    result = {**rows[0], "variants": {row["label"]: row for row in rows}}
    if "sync" in chosen:
        result["sync"] = next(row for row in rows if row["label"] == "sync")
        result["speedup_vs_sync"] = round(result["sync"]["wall_s"] / rows[0]["wall_s"], 2)
        print(f"\n{rows[0]['label']} is {result['speedup_vs_sync']}x faster than the non-deferrable run")
    print(f"figures: {save(args.output, result)}")
