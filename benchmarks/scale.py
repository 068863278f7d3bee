"""
``make bench-scale``: big batches in one DAG run, with no Airflow limit raised.

* 2,000 prompts at a high simulated rate limit (2,000 per 10 s), 5 s renders, in groups of 25 (the
  default) and of 100;
* a 10,000-prompt file in groups of 100, at 10,000 per 10 s, 5 s renders (any file runs in one
  DAG run: a file that needs more groups than ``[core] max_map_length`` gets larger groups).

Each case's account allows many submissions at once, so its submission pool has 4 slots (and the
connection ``submission_slots: 4``): four groups submit at once, each at a quarter of the rate.
Client seconds per image: the wall time beyond the physical bound, per image.
"""

from __future__ import annotations

import argparse

from benchmarks.common import bench_stack, measure_batch, print_table, save

SLOTS = 4
CASES = {
    "2000_groups_of_25": {"n": 2000, "latency": 5.0, "per_10s": 2000, "poll": 10.0},
    "2000_groups_of_100": {
        "n": 2000,
        "latency": 5.0,
        "per_10s": 2000,
        "poll": 10.0,
        "conf": {"chunk_size": 100},
    },
    # Groups of 100 (100 mapped instances, not 400): the figure is about one DAG run holding the
    # whole file, and the machine's 3 task runs a second would otherwise set the wall time.
    "10000_file": {"n": 10_000, "latency": 5.0, "per_10s": 10_000, "poll": 10.0, "conf": {"chunk_size": 100}},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    args = parser.parse_args(argv)
    rows = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        case = CASES[name]
        sim_fields = {"rate_limit_count": case["per_10s"]}
        with bench_stack(
            latency=case["latency"], per_10s=case["per_10s"], sim_fields=sim_fields, slots=SLOTS
        ) as (stack, sim):
            row = measure_batch(
                stack,
                sim,
                label=name,
                n=case["n"],
                latency=case["latency"],
                poll_interval=case["poll"],
                per_10s=case["per_10s"],
                conf=case.get("conf", {}),
                timeout=4 * 3600,
            )
            row["client_s_per_image"] = round(max(0.0, row["wall_s"] - row["bound_s"]) / row["n"], 3)
            rows.append(row)
    print()
    columns = ["label", "state", "n", "wall_s", "bound_s", "client_s_per_image", "task_runs", "failed_tasks"]
    print_table(rows, [*columns, "submissions_per_image", "rate_limited", "peak_worker_slots"])
    print(f"figures: {save('scale.json', {'cases': rows})}")
