"""
The nightly image batch: one image per prompt in a file, failures routed by their code, every
image archived, one report for the whole batch.

Per prompt (a mapped task group ``image``):
    generate ─▶ route ─┬─▶ archive                         (success)
                       ├─▶ quarantine                      (content policy, timeout: prompt and reason)
                       └─▶ resubmit ─▶ archive_resubmit    (internal error, generation failed: one more try)
Then ``report`` writes ``summary.json`` and ``report.html`` into ``<archive_root>/<date>/``.

Safe to rerun: the run folder is keyed by the logical date, a prompt whose image is already in
that folder's manifest is not generated again, a cleared task reconnects to or replaces only its
own image, and manifests never take a line twice. Nothing is read or sent at parse time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task, task_group

from imagecb_provider.operators.archive import ImageArchiveOperator
from imagecb_provider.operators.branch import ImageOutcomeBranchOperator
from imagecb_provider.operators.generate import ImageGenerateOperator

DEMO_PROMPTS = str(Path(__file__).resolve().parents[1] / "include" / "prompts" / "demo.csv")
# The run's folder is keyed by its day: the logical date, or for a manual run without one (the
# Airflow 3 default), the day it was triggered for. Tasks get it rendered, so the rule lives here only.
RUN_DAY = "{{ (dag_run.logical_date or dag_run.run_after).strftime('%Y-%m-%d') }}"
RUN_FOLDER = "{{ params.archive_root.rstrip('/') }}/" + RUN_DAY
IMAGES = f"{RUN_FOLDER}/images"
CONN_ID = "{{ params.imagecb_conn_id }}"
BATCH_XCOM = "batch"

ROUTES = {
    "success": "image.archive",
    "content_policy": "image.quarantine",
    "timeout": "image.quarantine",
    "internal_error": "image.resubmit",
    "generation_failed": "image.resubmit",
}


def _folder(url: str):
    from imagecb_provider.batch.archive import storage_path

    return storage_path(url)


@dag(
    dag_id="imagecb_batch_generate",
    description="Generate one image per prompt, route failures by code, archive everything, report",
    doc_md=__doc__,
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["imagecb", "images", "batch"],
    default_args={"owner": "imagecb", "retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "prompts_path": Param(
            DEMO_PROMPTS, type="string", description="CSV (prompt column) or JSONL of prompts"
        ),
        "archive_root": Param("/tmp/imagecb-archive", type="string", description="Folder or URL (s3://…)"),
        "poll_interval": Param(30, type="number", minimum=0.1, description="Seconds between status calls"),
        "timeout": Param(1800, type="number", minimum=1, description="Seconds one image may take"),
        "model": Param("flux-kontext-pro", enum=["flux-kontext-pro", "flux-kontext-max"]),
        "aspect_ratio": Param("16:9", enum=["21:9", "16:9", "4:3", "1:1", "3:4", "9:16"]),
        "imagecb_conn_id": Param("imagecb_default", type="string"),
    },
    render_template_as_native_obj=False,
)
def imagecb_batch_generate():
    @task
    def read_prompts(run_folder: str, params: dict) -> list[dict]:
        """
        Validate every row before anything is sent; reuse images this date's run already kept.

        Returns the requests to generate (what the group maps over); the rest of the batch (all
        rows, rejected ones, reused images, credits before) goes to the report as XCom ``batch``.
        """
        from imagecb_provider.batch.archive import JsonlLedger
        from imagecb_provider.batch.prompts import parse_prompt_file
        from imagecb_provider.hooks.imagecb import ImageCbHook

        path = params["prompts_path"]
        batch = parse_prompt_file(
            Path(path).read_text(encoding="utf-8"),
            path,
            defaults={"model": params["model"], "aspect_ratio": params["aspect_ratio"]},
        )
        manifest = JsonlLedger(_folder(run_folder) / "images" / "manifest.jsonl", ())
        kept = {}
        for entry in manifest.read():
            kept.setdefault(entry.get("request_key"), []).append(entry)
        to_generate = [item for item in batch.requests if item["key"] not in kept]
        reused = [{**item, "files": kept[item["key"]]} for item in batch.requests if item["key"] in kept]
        print(
            f"{len(batch.requests)} valid prompts ({len(reused)} already archived in {run_folder}), "
            f"{len(batch.rejected)} rejected rows"
        )
        for row in batch.rejected:
            print(f"  rejected line {row['line']}: {row['error']}")
        get_current_context()["ti"].xcom_push(
            key=BATCH_XCOM,
            value={
                "items": to_generate,
                "rejected": batch.rejected,
                "reused": reused,
                "credits_before": ImageCbHook(imagecb_conn_id=params["imagecb_conn_id"]).get_credits(),
                "started_at": datetime.now(UTC).isoformat(),
            },
        )
        return [item["request"] for item in to_generate]

    @task
    def quarantine(result: dict, run_folder: str) -> dict:
        """Set the prompt aside with its reason; the manifest-like ledger never takes it twice."""
        from imagecb_provider.batch.archive import JsonlLedger

        entry = {
            key: result.get(key) for key in ("task_id", "prompt", "outcome", "code", "message", "request")
        }
        ledger = JsonlLedger(_folder(run_folder) / "quarantine.jsonl", ("task_id",))
        ledger.add([entry])
        print(f"Quarantined {result.get('prompt')!r}: {result.get('outcome')} ({result.get('message')})")
        return entry

    @task_group(group_id="image")
    def image(request: dict):
        # The first try and the one resubmission are the same request, waited for the same way.
        wait = {
            "failure_mode": "return",
            "poll_interval": "{{ params.poll_interval }}",
            "timeout": "{{ params.timeout }}",
            "imagecb_conn_id": CONN_ID,
        }
        keep = {"destination": IMAGES, "imagecb_conn_id": CONN_ID}
        generate = ImageGenerateOperator(task_id="generate", request=request, **wait)
        route = ImageOutcomeBranchOperator(task_id="route", result=generate.output, branches=ROUTES)
        archive = ImageArchiveOperator(task_id="archive", results=generate.output, **keep)
        resubmit = ImageGenerateOperator(task_id="resubmit", request=request, **wait)
        archive_resubmit = ImageArchiveOperator(task_id="archive_resubmit", results=resubmit.output, **keep)
        generate >> route >> [archive, quarantine(generate.output, run_folder=RUN_FOLDER), resubmit]
        resubmit >> archive_resubmit

    @task(trigger_rule="all_done")
    def report(run_folder: str, params: dict) -> dict:
        """Write summary.json and the HTML contact sheet for the whole batch."""
        import json

        from imagecb_provider.batch.report import build_summary, render_contact_sheet
        from imagecb_provider.hooks.imagecb import ImageCbHook

        context = get_current_context()
        ti, dag_run = context["ti"], context["dag_run"]
        batch = ti.xcom_pull(task_ids="read_prompts", key=BATCH_XCOM)
        run_folder = _folder(run_folder)

        def pulled(task_id: str) -> list:
            # A list of task ids gives every map index's value, as a list even when only one exists.
            return list(ti.xcom_pull(task_ids=[task_id]) or [])

        summary = build_summary(
            run_id=dag_run.run_id,
            prompts_path=params["prompts_path"],
            requests=batch["items"],
            rejected=batch["rejected"],
            reused=batch["reused"],
            generated=pulled("image.generate"),
            resubmitted=pulled("image.resubmit"),
            archived=pulled("image.archive") + pulled("image.archive_resubmit"),
            credits_before=batch["credits_before"],
            credits_after=ImageCbHook(imagecb_conn_id=params["imagecb_conn_id"]).get_credits(),
            started_at=datetime.fromisoformat(batch["started_at"]),
            finished_at=datetime.now(UTC),
        )
        run_folder.mkdir(parents=True, exist_ok=True)
        (run_folder / "summary.json").write_text(json.dumps(summary, indent=2))
        (run_folder / "report.html").write_text(render_contact_sheet(summary, str(run_folder)))
        print(f"Summary: {json.dumps(summary['counts'])}; report: {run_folder / 'report.html'}")
        return {"summary": str(run_folder / "summary.json"), "report": str(run_folder / "report.html")}

    image.expand(request=read_prompts(run_folder=RUN_FOLDER)) >> report(run_folder=RUN_FOLDER)


imagecb_batch_generate()
