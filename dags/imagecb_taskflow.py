"""
The TaskFlow way: read rows, make one image per row with ``@task.imagecb``, use the results.

* ``read_rows`` reads the prompt file (``prompts_path``: CSV with a ``prompt`` column and optional
  request-field columns, or JSONL), checks every row and returns the valid ones; bad rows (empty
  prompt, unknown option, duplicate) are printed and never sent.
* ``image`` is mapped over the rows: its function computes each request from its row and the
  DAG's params (the row's fields, the default aspect ratio, the style appended to the prompt), and
  the task submits it and waits in the triggerer, exactly as ``ImageGenerateOperator`` does. The
  request it computed is the task's rendered field ``request``.
* ``summarize`` uses the results: counts by outcome, and the images made.

With ``failure_mode="return"`` a flagged prompt or a failed generation is a result, not a failed
task; an internal error or a failed generation is resubmitted once. Nothing is read or sent at
parse time.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Param, dag, task

DEMO_PROMPTS = str(Path(__file__).resolve().parents[1] / "include" / "prompts" / "demo.csv")


@dag(
    dag_id="imagecb_taskflow",
    description="Read rows, generate one image per row with @task.imagecb, summarize the results",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["imagecb", "example", "taskflow"],
    default_args={"owner": "imagecb", "retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "prompts_path": Param(DEMO_PROMPTS, type="string", description="CSV or JSONL of prompts"),
        "style": Param(
            None, type=["null", "string"], description="Appended to every prompt, e.g. ', watercolor'"
        ),
        "aspect_ratio": Param("1:1", enum=["21:9", "16:9", "4:3", "1:1", "3:4", "9:16"]),
        "poll_interval": Param(30, type="number", minimum=0.1, description="Seconds between status calls"),
    },
)
def imagecb_taskflow():
    # [START howto_taskflow]
    @task
    def read_rows(params: dict[str, Any]) -> list[dict[str, Any]]:
        """The prompt file's valid rows, as request fields; bad rows are reported, never sent."""
        from imagecb_provider.batch.prompts import parse_prompt_file, read_prompt_file

        path = params["prompts_path"]
        batch = parse_prompt_file(read_prompt_file(path), path)
        for row in batch.rejected:
            print(f"line {row['line']} left out: {row['error']}")
        return [item["request"] for item in batch.requests]

    @task.imagecb(
        failure_mode="return",
        resubmit_outcomes=["internal_error", "generation_failed"],
        poll_interval="{{ params.poll_interval }}",
        map_index_template="{{ task.request.prompt[:60] }}",
    )
    def image(row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """The request for one row: its fields, the default aspect ratio, the style."""
        return {
            "aspect_ratio": params["aspect_ratio"],
            **row,
            "prompt": row["prompt"] + (params["style"] or ""),
        }

    @task
    def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
        """Count the results by outcome and list the images made."""
        outcomes: dict[str, int] = {}
        for result in results:
            outcomes[result["outcome"]] = outcomes.get(result["outcome"], 0) + 1
            print(f"{result['outcome']:>18}  {result['prompt'][:70]}  {result['result_image_url'] or ''}")
        return {
            "outcomes": outcomes,
            "images": [r["result_image_url"] for r in results if r["outcome"] == "success"],
        }

    summarize(image.expand(row=read_rows()))
    # [END howto_taskflow]


imagecb_taskflow()
