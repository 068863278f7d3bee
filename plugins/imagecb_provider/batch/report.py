"""
The batch report: ``summary.json`` (counts by outcome, credits, durations, one entry per prompt)
and ``report.html`` (a contact sheet: a thumbnail of every kept image, the reason of every prompt
left without one, the rejected rows).

Each run writes into its own folder, ``<day folder>/runs/<run id>/``, next to the day's shared
``images/`` (files and ``manifest.jsonl``) and ``quarantine.jsonl``. A report task that runs again
after a rerun keeps the batch time of the first pass and adds the rerun's own time.

An edit's card shows its input beside its result, before and after. The input is read again and
copied once per content into the run's own ``inputs/<sha256>.<ext>`` (:func:`copy_inputs`), so
the sheet needs no access to the source (a bucket, another machine's folder) and keeps working
offline; nothing is written outside the run's folder. A public ``http(s)`` input is not fetched:
its card names the link.
"""

from __future__ import annotations

import html
import json
import logging
import re
import statistics
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from airflow.sdk import ObjectStoragePath

from imagecb_provider.batch.archive import MANIFEST_NAME, JsonlLedger, archive_target
from imagecb_provider.exceptions import InputImageUnavailable, InvalidInputImage
from imagecb_provider.models import Outcome, parse_timestamp, request_key, to_iso
from imagecb_provider.utils.inputs import display_name, is_http_url, read_input_image

NOT_RUN = "not_run"
#: The outcome of a prompt whose image succeeded but could not be kept (its archive task failed).
NOT_ARCHIVED = "not_archived"
#: The run's copies of the edited images' inputs: ``runs/<run folder>/inputs/<sha256>.<ext>``.
INPUTS_FOLDER = "inputs"
#: Inputs read at once while copying them for the sheet.
INPUT_COPY_CONCURRENCY = 4

log = logging.getLogger(__name__)


def run_folder_name(run_id: str) -> str:
    """A run id as a folder name that needs no escaping in a path or a URL."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)


def lost_entry(result: Mapping[str, Any]) -> dict[str, Any]:
    """The quarantine line of a prompt left without an image: what was asked, how it ended, why."""
    earlier = [e.get("outcome") for e in result.get("earlier") or ()]
    entry = {
        "request_key": request_key(result.get("request") or {}),
        "task_id": result.get("task_id"),
        "prompt": result.get("prompt") or "",
        "outcome": result.get("outcome"),
        "code": result.get("code"),
        "message": result.get("message") or "",
        "resubmitted_after": earlier,
        "request": result.get("request"),
        "quarantined_at": to_iso(datetime.now(UTC)),
    }
    if result.get("input_image"):  # an edit of a file: what was read of it
        entry["input_image"] = result["input_image"]
    return entry


def _flatten(values: Iterable[Any]) -> list[dict[str, Any]]:
    """Per-group XComs (each a list of results, or None for a group that produced none) as one list."""
    flat: list[dict[str, Any]] = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        flat.extend(dict(item) for item in items if isinstance(item, Mapping))
    return flat


def _by_key(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {request_key(r.get("request") or {}): dict(r) for r in results}


def _seconds(result: Mapping[str, Any]) -> float | None:
    submitted = parse_timestamp(result.get("submitted_at"))
    completed = parse_timestamp(result.get("completed_at"))
    if not (submitted and completed):
        return None
    # The API's completion time has whole seconds only; ours has microseconds: never below zero.
    return max(0.0, round((completed - submitted).total_seconds(), 1))


def _entry(
    item: Mapping[str, Any], result: Mapping[str, Any] | None, files: list[dict], group: Mapping | None
) -> dict[str, Any]:
    outcome = (result or {}).get("outcome") or NOT_RUN
    if outcome == Outcome.SUCCESS and not any(f.get("source") == "result" for f in files):
        outcome = NOT_ARCHIVED
    reasons = {NOT_RUN: "its group's generate task did not run", NOT_ARCHIVED: "the archive task failed"}
    reason = None if outcome == Outcome.SUCCESS else ((result or {}).get("message") or reasons.get(outcome))
    return {
        "line": item["line"],
        "prompt": item["request"]["prompt"],
        "key": item["key"],
        "name": item.get("name"),
        "group": item.get("group"),
        "label": (group or {}).get("label"),
        "outcome": outcome,
        "earlier": [e.get("outcome") for e in (result or {}).get("earlier") or ()],
        "task_id": (result or {}).get("task_id"),
        "reason": reason,
        "submitted_at": (result or {}).get("submitted_at"),
        "completed_at": (result or {}).get("completed_at"),
        "seconds": _seconds(result) if result else None,
        "files": files,
        "input": _input(item, result, files),
        "reused": False,
    }


def _input(item: Mapping[str, Any], result: Mapping[str, Any] | None, files: list[dict]) -> dict | None:
    """
    An edit's input, for its card: ``{"source", "sha256", "before", "note"}``; ``None`` for no edit.

    ``source`` is shown without credentials or query; ``sha256`` is what was uploaded (from the
    result, else the manifest), ``None`` when it never was; ``before`` (the run's copy) and
    ``note`` are filled by :func:`copy_inputs`.
    """
    source = item["request"].get("input_image")
    if not source:
        return None
    described = (result or {}).get("input_image")
    sent = described.get("sha256") if isinstance(described, Mapping) else None
    kept = next((f.get("input_sha256") for f in files if f.get("input_sha256")), None)
    return {
        "source": display_name(source),
        "sha256": sent or kept,
        "before": None,
        "note": None,
    }


def _reused_entry(item: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt whose image an earlier run of the same day already kept (``files`` from the manifest)."""
    kept = {"outcome": Outcome.SUCCESS.value, "task_id": item["files"][0]["remote_task_id"]}
    return {**_entry(item, kept, list(item["files"]), None), "reused": True}


def build_summary(
    *,
    batch: Mapping[str, Any],
    generated: Iterable[Any],
    manifest: list[dict[str, Any]],
    dag_id: str,
    run_id: str,
    generate_task_id: str,
    prompts_path: str,
    credits_after: float | None,
    previous: Mapping[str, Any] | None,
    finished_at: datetime,
) -> dict[str, Any]:
    """
    Join the batch's XComs and the day's manifest, by request fingerprint, into one summary.

    ``generated`` are the generate tasks' XComs (a list of results per group); the files of each
    prompt are its current manifest lines, so the counts always equal the manifest.
    ``previous`` is this run's earlier summary, when the report runs again after a rerun.
    ``generate_task_id`` is the mapped task whose instances the sheet links to, one per group.
    """
    results = _by_key(_flatten(generated))
    files: dict[str, list[dict]] = {}
    for line in manifest:
        files.setdefault(line.get("request_key"), []).append(line)
    groups = batch.get("groups") or []
    images = [
        _entry(item, results.get(item["key"]), files.get(item["key"], []), _group(groups, item))
        for item in batch["items"]
    ]
    images += [_reused_entry(item) for item in batch["reused"]]
    images.sort(key=lambda image: image["line"])
    counts = Counter(image["outcome"] for image in images)
    durations = [i["seconds"] for i in images if i["seconds"] is not None and not i["reused"]]
    credits_before = batch.get("credits_before")
    source = batch.get("source") or {"kind": "file", "path": prompts_path}
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "generate_task_id": generate_task_id,
        # a folder batch read no prompt file
        "prompts_path": prompts_path if source.get("kind") != "folder" else None,
        "source": source,
        "counts": {o.value: counts.get(o.value, 0) for o in Outcome} | _extra_counts(counts),
        "prompts": len(images) + len(batch["rejected"]),
        "rejected": len(batch["rejected"]),
        "lost": sum(i["outcome"] != Outcome.SUCCESS for i in images),
        "not_sent": _not_sent(images),
        "resubmitted": sum(bool(i["earlier"]) for i in images),
        "reused_from_earlier_run": len(batch["reused"]),
        "archived_files": sum(len(i["files"]) for i in images),
        "credits": {
            "before": credits_before,
            "after": credits_after,
            "used": round(credits_before - credits_after, 2)
            if None not in (credits_before, credits_after)
            else None,
        },
        "durations": _durations(batch, images, previous, finished_at)
        | {
            "image_seconds_min": min(durations, default=None),
            "image_seconds_median": statistics.median(durations) if durations else None,
            "image_seconds_max": max(durations, default=None),
        },
        "finished_at": to_iso(finished_at),
        "images": images,
        "rejected_rows": [dict(row) for row in batch["rejected"]],
    }


def _not_sent(images: list[dict[str, Any]]) -> dict[str, Any]:
    """How many prompts the account refused before they were sent, and the first refusal's reason."""
    refused = [i for i in images if i["outcome"] == Outcome.NOT_SENT]
    reason = str(refused[0]["reason"] or "").removeprefix("Not sent: ") if refused else None
    return {"count": len(refused), "reason": reason}


def _group(groups: list[Mapping[str, Any]], item: Mapping[str, Any]) -> Mapping[str, Any] | None:
    index = item.get("group")
    return groups[index] if isinstance(index, int) and 0 <= index < len(groups) else None


def _durations(
    batch: Mapping[str, Any], images: list[dict], previous: Mapping[str, Any] | None, finished_at: datetime
) -> dict[str, Any]:
    """The first pass's wall time, kept across reruns, and each rerun's own time."""
    if not previous:
        started = parse_timestamp(batch.get("started_at"))
        seconds = round((finished_at - started).total_seconds(), 1) if started else None
        return {"batch_seconds": seconds, "reruns": []}
    reruns = list(previous["durations"].get("reruns") or [])
    since = parse_timestamp(previous.get("finished_at"))
    # A rerun submits anew or reconnects to an image made earlier: either way it ends after the
    # previous report.
    again = [i for i in images if since and _after(since, i["submitted_at"], i["completed_at"])]
    starts = [t for i in again for t in (parse_timestamp(i["submitted_at"]),) if t and t > since]
    starts = starts or [parse_timestamp(i["completed_at"]) for i in again]
    if again:
        reruns.append(
            {
                "images": len(again),
                "lines": [i["line"] for i in again],
                "seconds": round((finished_at - min(starts)).total_seconds(), 1),
                "finished_at": to_iso(finished_at),
            }
        )
    return {"batch_seconds": previous["durations"]["batch_seconds"], "reruns": reruns}


def _after(since: datetime, *moments: str | None) -> bool:
    return any((parse_timestamp(moment) or since) > since for moment in moments)


def report_paths(folder: ObjectStoragePath, run_id: str) -> dict[str, str]:
    """Where this run's ``summary.json`` and ``report.html`` are written (the report task's XCom)."""
    out = folder / "runs" / run_folder_name(run_id)
    return {"summary": str(out / "summary.json"), "report": str(out / "report.html")}


def _extra_counts(counts: Counter) -> dict[str, int]:
    known = {outcome.value for outcome in Outcome}
    return {name: count for name, count in counts.items() if name not in known}


def write_report(
    *,
    folder: ObjectStoragePath,
    batch: Mapping[str, Any] | None,
    generated: Iterable[Any],
    archived: Iterable[Any],
    dag_id: str,
    run_id: str,
    generate_task_id: str,
    prompts_path: str,
    credits_after: float | None,
    ui_url: str,
    fail_on_lost: bool,
) -> dict[str, str]:
    """
    Write this run's ``summary.json`` and ``report.html`` under ``folder/runs/<run id>``.

    Raises ``AirflowFailException`` after writing when the batch never started, or when prompts
    were left without an image and ``fail_on_lost``, so the run fails and Airflow's alerts fire.

    :param folder: the day folder (holds ``images/`` and ``quarantine.jsonl``).
    :param batch: the ``batch`` XCom of ``read_prompts``; ``None`` when it did not run.
    :param generated: the generate tasks' XComs; ``archived`` the archive tasks' (unused but for
        reading: the files are taken from the manifest).
    :param generate_task_id: the mapped generate task (one instance per group) the sheet links to.
    """
    from airflow.sdk.exceptions import AirflowFailException

    del archived  # the manifest is the truth about kept files
    out = folder / "runs" / run_folder_name(run_id)
    out.mkdir(parents=True, exist_ok=True)
    if batch is None:
        (out / "summary.json").write_text(json.dumps({"run_id": run_id, "started": False}, indent=2))
        raise AirflowFailException(
            "The batch could not start: read_prompts did not finish (see its log); nothing was generated"
        )
    previous_path = out / "summary.json"
    previous = json.loads(previous_path.read_text()) if previous_path.exists() else None
    manifest = JsonlLedger(folder / "images" / MANIFEST_NAME, ()).current()
    summary = build_summary(
        batch=batch,
        generated=generated,
        manifest=manifest,
        dag_id=dag_id,
        run_id=run_id,
        generate_task_id=generate_task_id,
        prompts_path=prompts_path,
        credits_after=credits_after,
        previous=previous if previous and previous.get("durations") else None,
        finished_at=datetime.now(UTC),
    )
    paths = report_paths(folder, run_id)
    copy_inputs(out, summary["images"], _sources(batch))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.html").write_text(render_contact_sheet(summary, ui_url=ui_url))
    print(f"Summary: {json.dumps(summary['counts'])}; report: {paths['report']}")
    not_sent = summary["not_sent"]["count"]
    if not_sent:
        # Said first and plainly: these prompts cost nothing and a rerun sends exactly them.
        print(f"{not_sent} prompt(s) were not sent. {summary['not_sent']['reason']}")
    if summary["lost"] and fail_on_lost:
        lines = ", ".join(str(i["line"]) for i in summary["images"] if i["outcome"] != Outcome.SUCCESS)
        if not_sent:
            raise AirflowFailException(
                f"{not_sent} of {summary['lost']} prompt(s) without an image were never sent "
                f"(lines {lines}): {summary['not_sent']['reason']}; the report is written"
            )
        raise AirflowFailException(
            f"{summary['lost']} prompt(s) ended without an image (lines {lines}); the report is written. "
            "The run fails because fail_run_on_lost is on: clear a failed group to retry its prompts"
        )
    return paths


# --------------------------------------------------------------------------- the inputs
def _sources(batch: Mapping[str, Any]) -> dict[str, str]:
    """Each edit's ``input_image`` as its request holds it (with its connection id), by request key."""
    items = [*batch.get("items", ()), *batch.get("reused", ())]
    return {i["key"]: i["request"]["input_image"] for i in items if i["request"].get("input_image")}


def copy_inputs(out: ObjectStoragePath, images: list[dict[str, Any]], sources: Mapping[str, str]) -> None:
    """
    Copy the input of every edit into ``out/inputs/<sha256>.<ext>``, once per content; fill its ``before``.

    Each source is read once (:func:`~imagecb_provider.utils.inputs.read_input_image`: the same
    checks and cap as the upload). A copy already there with the same size is not written again,
    so a report that runs again writes nothing new. An input that cannot be read now gets a
    ``note`` instead (the card says why), and one whose content differs from what was uploaded
    is shown as it is now, with a ``note`` saying so; the report never fails for an input.
    An ``http(s)`` input is not fetched.

    :param out: the run's folder (``runs/<run folder>``).
    :param images: the summary's entries (their ``input`` is updated).
    :param sources: each edit's ``input_image`` by request key (:func:`_sources`).
    """
    by_source: dict[str, list[dict[str, Any]]] = {}
    for image in images:
        source = sources.get(image["key"])
        if image.get("input") and source and not is_http_url(source):
            by_source.setdefault(source, []).append(image)
    if not by_source:
        return
    folder = out / INPUTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=INPUT_COPY_CONCURRENCY) as pool:
        list(pool.map(lambda pair: _copy_input(folder, *pair), by_source.items()))


def _copy_input(folder: ObjectStoragePath, source: str, images: list[dict[str, Any]]) -> None:
    try:
        image = read_input_image(source)
        # The name is the hash we computed and the sniffed type: one segment, checked all the same.
        target = archive_target(folder, image.upload_name, image.sha256)
        if not (target.exists() and target.stat().st_size == image.size):
            partial = folder / f".{target.name}.{uuid.uuid4().hex}.partial"
            try:
                partial.write_bytes(image.data)
                partial.rename(target)
            finally:
                if partial.exists():
                    partial.unlink()
    except (InvalidInputImage, InputImageUnavailable) as error:
        for entry in images:
            entry["input"]["note"] = f"not shown: {error}"
        return
    except Exception as error:  # the sheet goes on without this picture
        log.warning("Could not copy the input %s for the contact sheet: %s", display_name(source), error)
        for entry in images:
            entry["input"]["note"] = f"not shown: it could not be copied ({type(error).__name__})"
        return
    for entry in images:
        entry["input"]["before"] = f"{INPUTS_FOLDER}/{image.upload_name}"
        sent = entry["input"].get("sha256")
        if sent and sent != image.sha256:
            entry["input"]["note"] = (
                f"the file changed after it was sent (sent sha256 {sent[:12]}…): shown as it is now"
            )


# --------------------------------------------------------------------------- the sheet
#: The contact sheet's style, also used by the run view while a batch is going (``ui/pages.py``).
CONTACT_SHEET_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} .meta{color:#666;margin-bottom:16px}
.counts span{display:inline-block;margin:0 8px 8px 0;padding:4px 10px;border-radius:12px;font-size:14px}
.counts .rejected{background:#eee;color:#222}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;overflow:hidden}
.card.lost{border:2px solid #c62828}
.card img{width:100%;height:150px;object-fit:cover;display:block;background:#eee}
.card .none{height:150px;display:flex;align-items:center;justify-content:center;color:#999;background:#f1f1f1}
.card .body{padding:8px 10px} .prompt{font-weight:600;word-break:break-word}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff}
.success{background:#2e7d32}.content_policy{background:#c62828}.internal_error{background:#ef6c00}
.generation_failed{background:#ad1457}.timeout{background:#6a1b9a}.not_run,.not_archived{background:#757575}
.not_sent{background:#455a64}.upload_failed{background:#37474f}
.card.edit{grid-column:span 2}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:2px;background:#ddd}
.pair figure{margin:0;position:relative;min-width:0}
.pair figcaption{position:absolute;left:6px;top:6px;padding:0 6px;border-radius:8px;font-size:11px;
color:#fff;background:rgba(0,0,0,.55)}
.source{color:#555;font-size:12px;word-break:break-all}
.notice{background:#fff3e0;border:1px solid #ef6c00;border-radius:8px;padding:8px 12px;margin-bottom:12px}
.submission_uncertain{background:#4e342e}
.reason{color:#b71c1c;font-size:12px;margin-top:4px} .small{color:#777;font-size:12px}
a.ti{font-size:12px} table{border-collapse:collapse;margin-top:8px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
"""


def _thumbnail(image: Mapping[str, Any]) -> str:
    result = next((f for f in image["files"] if f.get("source") == "result"), None)
    if not result:
        return '<div class="none">no image</div>'
    # The report sits in runs/<run id>/ beside the day's images/ folder.
    src = "../../images/" + str(result["path"]).rsplit("/", 1)[-1]
    return f'<img src="{html.escape(src)}" alt="{html.escape(image["prompt"])}" loading="lazy">'


def _before_and_after(image: Mapping[str, Any]) -> str:
    """An edit's input beside its result, each captioned."""
    given = image["input"]
    if given.get("before"):
        alt = html.escape(f"before: {given['source']}")
        before = f'<img src="{html.escape(given["before"])}" alt="{alt}" loading="lazy">'
    else:
        link = "a link, not copied" if is_http_url(given["source"]) else "not copied"
        before = f'<div class="none">{html.escape(link)}</div>'
    return (
        f'<div class="pair"><figure>{before}<figcaption>before</figcaption></figure>'
        f"<figure>{_thumbnail(image)}<figcaption>after</figcaption></figure></div>"
    )


def task_instance_url(ui_url: str, dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """The Airflow UI page of a (mapped) task instance."""
    path = f"/dags/{quote(dag_id)}/runs/{quote(run_id, safe='')}/tasks/{quote(task_id)}"
    if map_index is not None:
        path += f"/mapped/{map_index}"
    return ui_url.rstrip("/") + path


def _card(image: Mapping[str, Any], summary: Mapping[str, Any], ui_url: str) -> str:
    notes = []
    if image.get("earlier"):
        notes.append(f"resubmitted after {', '.join(str(e) for e in image['earlier'])}")
    if image.get("reused"):
        notes.append("kept from an earlier run of this day")
    if image.get("seconds") is not None:
        notes.append(f"{image['seconds']:g} s")
    reason = f'<div class="reason">{html.escape(str(image["reason"]))}</div>' if image.get("reason") else ""
    link = ""
    if image.get("group") is not None and summary.get("generate_task_id"):
        task_id = summary["generate_task_id"]
        url = task_instance_url(ui_url, summary["dag_id"], summary["run_id"], task_id, image["group"])
        label = html.escape(image["label"] or "")
        link = f'<a class="ti" href="{html.escape(url)}" target="_top">{label}</a>'
    lost = " lost" if image["outcome"] != Outcome.SUCCESS else ""
    given = image.get("input")
    picture, source = _thumbnail(image), ""
    if given:
        picture = _before_and_after(image)
        note = f'<div class="reason">{html.escape(given["note"])}</div>' if given.get("note") else ""
        source = f'<div class="source">{html.escape(given["source"])}</div>{note}'
    where = "image" if (summary.get("source") or {}).get("kind") == "folder" else "line"
    return (
        f'<div class="card{lost}{" edit" if given else ""}" id="line-{image["line"]}">{picture}'
        f'<div class="body"><span class="badge {html.escape(image["outcome"])}">'
        f"{html.escape(image['outcome'])}</span> "
        f'<span class="small">{where} {image["line"]} · {html.escape(" · ".join(notes))}</span>'
        f'<div class="prompt">{html.escape(image["prompt"])}</div>{source}{reason}{link}</div></div>'
    )


def render_contact_sheet(summary: Mapping[str, Any], *, ui_url: str = "") -> str:
    """The HTML contact sheet; images are linked relatively, so the day folder is portable."""
    counts = "".join(
        f'<span class="badge {html.escape(k)}">{html.escape(k)}: {v}</span>'
        for k, v in summary["counts"].items()
        if v
    )
    credits, durations = summary["credits"], summary["durations"]
    reruns = "".join(
        f" · rerun of {r['images']} prompt(s): {r['seconds']} s" for r in durations.get("reruns") or ()
    )
    rejected = "".join(
        f"<tr><td>{row['line']}</td><td>{html.escape(str(row.get('prompt') or ''))}</td>"
        f"<td>{html.escape(row['error'])}</td></tr>"
        for row in summary["rejected_rows"]
    )
    source = summary.get("source") or {}
    folder = source.get("kind") == "folder"
    heads = "<th>image</th><th>file</th>" if folder else "<th>line</th><th>prompt</th>"
    rejected_table = (
        f"<h2>Rejected {'images' if folder else 'rows'} (never sent)</h2>"
        f"<table><tr>{heads}<th>reason</th></tr>{rejected}</table>"
        if rejected
        else ""
    )
    shown = {k: html.escape(str(source.get(k))) for k in ("folder", "glob", "instruction")}
    read = (
        f"images from {shown['folder']} matching {shown['glob']}, each edited with “{shown['instruction']}”"
        if folder
        else f"prompts from {html.escape(str(summary['prompts_path']))}"
    )
    cards = "".join(_card(image, summary, ui_url) for image in summary["images"])
    run_id = html.escape(summary["run_id"])
    refused = summary.get("not_sent") or {}
    notice = (
        f'<div class="notice"><b>{refused["count"]} prompt(s) were not sent</b>: '
        f"{html.escape(str(refused['reason'] or ''))}</div>"
        if refused.get("count")
        else ""
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>imagecb batch {run_id}"
        f"</title><style>{CONTACT_SHEET_CSS}</style></head><body><h1>Image batch {run_id}</h1>"
        f'<div class="meta">{summary["prompts"]} {read} · '
        f"{summary['archived_files']} files archived · {summary['lost']} without an image · "
        f"credits used: {credits['used']} · batch time: {durations['batch_seconds']} s{reruns}</div>"
        f'<div class="counts">{counts}<span class="rejected">rejected: {summary["rejected"]}</span></div>'
        f'{notice}<div class="grid">{cards}</div>{rejected_table}</body></html>'
    )
