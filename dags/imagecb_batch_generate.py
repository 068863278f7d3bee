"""
The image batch: one image per prompt in a file, generated in groups, every image archived,
every prompt without an image quarantined with its reason, one report for the whole batch.

Per group of prompts (a mapped task group ``image``, labelled by the prompts' lines):

    generate ─┬─▶ archive   the successes: downloaded, verified, described in manifest.jsonl
              └─▶ settle    the prompts left without an image (content policy, timeout, failed
                            again after their one resubmission): quarantined; the task fails, so
                            the grid shows red where a prompt was lost

``read_prompts`` first checks the archive root, the connection and, in callback mode, the
callback receiver: a wrong setting fails there, naming the fix, before anything is paid for.
``generate`` submits the group's prompts (paced under the account's rate limit, in the
``imagecb_submissions`` pool, which ``airflow db migrate`` creates) and waits for all of them in
the triggerer; an internal error or a failed generation is resubmitted once. Then ``report``
writes ``summary.json`` and the contact sheet ``report.html``, and fails the run when a prompt
was lost (param ``fail_run_on_lost``) or the batch could not start.

Batch editing: set ``input_images`` (a folder, or an ``s3://``/``gs://`` prefix) and
``instruction``, and every image there matching ``input_glob`` is edited with that one
instruction, sorted by path, in the same groups, archive, quarantine and report (the prompt file
is not read then). Each image is uploaded once (the vendor's free File Upload API) and its card
in the contact sheet shows it before and after. A prompt file may edit images too: its
``input_image`` column takes a link, a path (relative to the prompt file's folder) or a URL.

Safe to rerun: images live in ``<archive_root>/<day>/images`` and a prompt whose image that
folder already keeps is not generated again; clearing a group reruns only its prompts that did not
succeed; manifests never take a line twice; each run writes its report in its own folder.
Nothing is read or sent at parse time. The schedule is off unless ``IMAGECB_BATCH_SCHEDULE``
(a cron expression or preset) is set in the environment of the DAG processor.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, dag, get_current_context, task, task_group

from imagecb_provider.operators.archive import ImageArchiveOperator
from imagecb_provider.operators.generate import ImageBatchGenerateOperator
from imagecb_provider.utils.pacing import SUBMISSION_POOL

PROJECT = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = str(PROJECT / "include" / "prompts" / "demo.csv")
DEFAULT_ARCHIVE = str(PROJECT / "archive")
# Images are kept per day (a rerun that day reuses them), reports per run. The day is the logical
# date, or for a manual run without one (the Airflow 3 default), the day it was triggered for.
RUN_DAY = "{{ (dag_run.logical_date or dag_run.run_after).strftime('%Y-%m-%d') }}"
DAY_FOLDER = "{{ params.archive_root.rstrip('/') }}/" + RUN_DAY
CONN_ID = "{{ params.imagecb_conn_id }}"
#: The files a folder batch edits by default (param ``input_glob``), matched without case.
INPUT_GLOB = "*.png,*.jpg,*.jpeg,*.webp"
BATCH_XCOM = "batch"
#: The mapped generate task (group "image", task "generate"): the contact sheet links each prompt to it.
GENERATE_TASK_ID = "image.generate"
# [START howto_batch_asset]
#: Every archive task announces its new images on this asset (see dags/imagecb_asset_consumer.py).
BATCH_IMAGES = Asset("imagecb_batch_images")
# [END howto_batch_asset]
LABEL = "{{ task.group_label }}"


def _folder(url: str):
    from imagecb_provider.batch.archive import storage_path

    return storage_path(url)


# [START howto_batch_edit_read]
def _read_batch(params: dict) -> tuple:
    """
    The batch to run: every image of ``input_images`` with one ``instruction``, else the prompt file.

    :return: the validated batch, and what it was read from (for the report).
    """
    from imagecb_provider.batch.prompts import list_input_images, parse_prompt_file, read_prompt_file
    from imagecb_provider.exceptions import ImageCbConfigurationError

    defaults = {"model": params["model"], "aspect_ratio": params["aspect_ratio"]}
    folder, instruction = (params.get("input_images") or "").strip(), params.get("instruction") or ""
    if folder:
        # One edit per image found, sorted by path; an edit keeps its input's aspect ratio.
        batch = list_input_images(folder, params["input_glob"], instruction, defaults)
        return batch, {
            "kind": "folder",
            "folder": _shown(folder),
            "glob": params["input_glob"],
            "instruction": instruction.strip(),
        }
    if instruction.strip():  # else the demo prompts would run instead of the edit meant
        raise ImageCbConfigurationError(
            "instruction is set but input_images is empty: set input_images to the folder (or s3:// "
            "prefix) of the images to edit, or clear instruction to run the prompt file. Nothing was sent"
        )
    path = params["prompts_path"]
    return parse_prompt_file(read_prompt_file(path), path, defaults), {"kind": "file", "path": path}


# [END howto_batch_edit_read]
def _shown(source: str) -> str:
    from imagecb_provider.utils.inputs import display_name

    return display_name(source)


@dag(
    dag_id="imagecb_batch_generate",
    description="Generate one image per prompt in groups, archive the images, quarantine the rest, report",
    doc_md=__doc__,
    schedule=os.environ.get("IMAGECB_BATCH_SCHEDULE") or None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["imagecb", "images", "batch"],
    # IMAGECB_BATCH_RETRY_DELAY (seconds): test stacks and dag.test() runs shorten the wait.
    default_args={
        "owner": "imagecb",
        "retries": 2,
        "retry_delay": timedelta(seconds=float(os.environ.get("IMAGECB_BATCH_RETRY_DELAY") or 30)),
    },
    params={
        "prompts_path": Param(
            DEMO_PROMPTS,
            type="string",
            description="CSV (prompt column) or JSONL of prompts; not read when input_images is set",
        ),
        # [START howto_batch_edit_params]
        # Optional: the UI's trigger form refuses an empty plain "string" (it sends null).
        "input_images": Param(
            None,
            type=["null", "string"],
            description="Batch editing: a folder (absolute path) or an s3://, gs://... prefix "
            "(s3://conn_id@bucket/prefix/ for a connection) of images to edit, each with the "
            "instruction; empty: run the prompt file",
        ),
        "input_glob": Param(
            INPUT_GLOB,
            type="string",
            description="Which files of input_images to edit: patterns separated by commas "
            "(*.{png,jpg} works too), matched against the path under the folder without case; "
            "*/*.png takes subfolders",
        ),
        "instruction": Param(
            None,
            type=["null", "string"],
            description="Batch editing: how to edit every image of input_images, e.g. put the "
            "product on a pure white background",
        ),
        # [END howto_batch_edit_params]
        "archive_root": Param(
            DEFAULT_ARCHIVE, type="string", description="Folder or URL (s3://…) where images and reports go"
        ),
        "wait_mode": Param(
            "poll",
            enum=["poll", "callback"],
            description="poll: a status call every poll_interval; callback: woken by the vendor's "
            "callback (needs the connection extra callback_base_url), polling only as a safety net",
        ),
        "poll_interval": Param(
            30,
            type="number",
            minimum=0.1,
            description="Seconds between status calls of an image (in callback mode, the safety net: "
            "300 is a good value)",
        ),
        "timeout": Param(1800, type="number", minimum=1, description="Seconds one image may take"),
        "chunk_size": Param(
            25,
            type="integer",
            minimum=1,
            description="Prompts per group (one mapped instance each); 1 gives one instance per "
            "prompt. Raised automatically when the file would need more groups than Airflow maps",
        ),
        "deferrable": Param(
            True,
            type="boolean",
            description="Wait in the triggerer (true) or hold a worker slot while images render (false)",
        ),
        "fail_run_on_lost": Param(
            True,
            type="boolean",
            description="Fail the run when a prompt ends without an image (the report is still written)",
        ),
        "model": Param("flux-kontext-pro", enum=["flux-kontext-pro", "flux-kontext-max"]),
        "aspect_ratio": Param("16:9", enum=["21:9", "16:9", "4:3", "1:1", "3:4", "9:16"]),
        "imagecb_conn_id": Param("imagecb_default", type="string"),
    },
    render_template_as_native_obj=False,
)
def imagecb_batch_generate():
    @task
    def read_prompts(day_folder: str, params: dict) -> list[dict]:
        """
        Check the setup and validate every row before anything is sent; reuse images already kept.

        Returns the groups to generate (what ``image`` maps over); the rest of the batch (rejected
        rows, reused images, credits before) goes to the report as XCom ``batch``.
        """
        from airflow.configuration import conf

        from imagecb_provider.batch.archive import JsonlLedger, check_archive_destination
        from imagecb_provider.batch.prompts import group_requests
        from imagecb_provider.callbacks.client import check_receiver
        from imagecb_provider.hooks.imagecb import ImageCbHook
        from imagecb_provider.utils.waiting import connection_settings

        # A wrong setting fails here, once, naming the fix: not in every group after paying.
        check_archive_destination(day_folder)
        hook = ImageCbHook(imagecb_conn_id=params["imagecb_conn_id"])
        settings = connection_settings(hook)
        if params["wait_mode"] == "callback":
            print(f"Callback mode: callbacks go to {check_receiver(settings)}")

        batch, source = _read_batch(params)
        kept: dict[str, list[dict]] = {}
        for entry in JsonlLedger(_folder(day_folder) / "images" / "manifest.jsonl", ()).current():
            kept.setdefault(entry.get("request_key"), []).append(entry)
        to_generate = [item for item in batch.requests if item["key"] not in kept]
        reused = [{**item, "files": kept[item["key"]]} for item in batch.requests if item["key"] in kept]
        groups = group_requests(to_generate, params["chunk_size"], conf.getint("core", "max_map_length"))
        what, unit = ("images", "image") if source["kind"] == "folder" else ("prompts", "line")
        print(
            f"{len(batch.requests)} valid {what} ({len(reused)} already archived in {day_folder}), "
            f"{len(batch.rejected)} rejected; {len(to_generate)} to generate in {len(groups)} group(s)"
        )
        for row in batch.rejected:
            print(f"  rejected {unit} {row['line']}: {row['error']}")
        get_current_context()["ti"].xcom_push(
            key=BATCH_XCOM,
            value={
                "groups": [{"label": g["label"], "lines": g["lines"]} for g in groups],
                "items": to_generate,
                "rejected": batch.rejected,
                "reused": reused,
                "credits_before": hook.get_credits(),
                "started_at": datetime.now(UTC).isoformat(),
                "source": source,
            },
        )
        return [{"requests": g["requests"], "label": g["label"]} for g in groups]

    # [START howto_batch_settle]
    @task(map_index_template="{{ imagecb_label }}")
    def settle(results: list[dict] | None, label: str, day_folder: str) -> dict:
        """Quarantine the prompts left without an image, with their reason; fail if there are any."""
        from airflow.sdk.exceptions import AirflowFailException

        from imagecb_provider.batch.archive import JsonlLedger
        from imagecb_provider.batch.report import lost_entry

        context = get_current_context()
        context["imagecb_label"] = label
        lost = [lost_entry(r) for r in results or () if r and r.get("outcome") != "success"]
        JsonlLedger(_folder(day_folder) / "quarantine.jsonl", ("request_key", "task_id")).add(lost)
        for entry in lost:
            print(f"Quarantined {entry['prompt']!r}: {entry['outcome']} ({entry['message']})")
        if lost:
            # The grid shows the reason in the failed instance's name.
            outcomes = ", ".join(sorted({str(e["outcome"]) for e in lost}))
            context["imagecb_label"] = f"{label} · {len(lost)} lost: {outcomes}"
            not_sent = [e for e in lost if e["outcome"] == "not_sent"]
            if not_sent:  # the account refused them: nothing was paid, a rerun sends exactly these
                raise AirflowFailException(
                    f"{len(not_sent)} of {len(results or ())} prompt(s) of {label} were not sent. "
                    + not_sent[0]["message"].removeprefix("Not sent: ")
                )
            raise AirflowFailException(
                f"{len(lost)} of {len(results or ())} prompt(s) of {label} ended without an image: "
                + "; ".join(f"{e['prompt'][:60]!r}: {e['outcome']}" for e in lost)
            )
        return {"label": label, "images": len(results or ()), "lost": 0}

    # [END howto_batch_settle]
    # [START howto_batch_group]
    @task_group(group_id="image")
    def image(requests: list[dict], label: str):
        # [START howto_operator_batch_generate]
        generate = ImageBatchGenerateOperator(
            task_id="generate",
            requests=requests,
            group_label=label,
            map_index_template=LABEL,
            pool=os.environ.get("IMAGECB_SUBMISSION_POOL", SUBMISSION_POOL),
            failure_mode="return",
            resubmit_outcomes=["internal_error", "generation_failed"],
            wait_mode="{{ params.wait_mode }}",
            deferrable="{{ params.deferrable }}",
            poll_interval="{{ params.poll_interval }}",
            timeout="{{ params.timeout }}",
            imagecb_conn_id=CONN_ID,
        )
        # [END howto_operator_batch_generate]
        # [START howto_batch_archive]
        ImageArchiveOperator(
            task_id="archive",
            results=generate.output,
            group_label=label,
            map_index_template=LABEL,
            destination=f"{DAY_FOLDER}/images",
            asset=BATCH_IMAGES,
            imagecb_conn_id=CONN_ID,
        )
        # [END howto_batch_archive]
        settle(generate.output, label=label, day_folder=DAY_FOLDER)

    # [END howto_batch_group]
    @task(trigger_rule="all_done")
    def report(day_folder: str, params: dict) -> dict:
        """Write summary.json and the contact sheet; fail the run if the batch lost prompts or never ran."""
        from airflow.configuration import conf

        from imagecb_provider.batch.archive import check_archive_destination
        from imagecb_provider.batch.report import report_paths, write_report
        from imagecb_provider.hooks.imagecb import ImageCbHook

        context = get_current_context()
        ti, dag_run = context["ti"], context["dag_run"]
        # Pushed first: when the run is failed below, the report is still found from the UI.
        paths = report_paths(_folder(day_folder), dag_run.run_id)
        ti.xcom_push(key="return_value", value=paths)
        batch = ti.xcom_pull(task_ids="read_prompts", key=BATCH_XCOM)
        if batch is None:
            # read_prompts failed, perhaps on the archive root: fail naming it, not retry writing there.
            check_archive_destination(day_folder)
        # Only this pass's groups: a run cleared after a partial pass may map fewer, and an
        # instance it no longer maps keeps its old XCom.
        groups = list(range(len(batch["groups"]))) if batch else []
        write_report(
            folder=_folder(day_folder),
            batch=batch,
            generated=ti.xcom_pull(task_ids=[GENERATE_TASK_ID], map_indexes=groups) if groups else [],
            archived=[],  # unused: the manifest is the truth about kept files
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            generate_task_id=GENERATE_TASK_ID,
            prompts_path=params["prompts_path"],
            # Without a batch the connection may be what stopped it: nothing was spent anyway.
            credits_after=None
            if batch is None
            else ImageCbHook(imagecb_conn_id=params["imagecb_conn_id"]).get_credits(),
            ui_url=conf.get("api", "base_url", fallback=""),
            fail_on_lost=params["fail_run_on_lost"],
        )
        return paths

    # [START howto_batch_wiring]
    image.expand_kwargs(read_prompts(day_folder=DAY_FOLDER)) >> report(day_folder=DAY_FOLDER)
    # [END howto_batch_wiring]


imagecb_batch_generate()
