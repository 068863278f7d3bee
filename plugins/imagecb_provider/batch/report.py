"""
The batch report: ``summary.json`` (counts by outcome, credits, durations) and ``report.html``
(a contact sheet with a thumbnail of every archived image and the reason of every failure).

Pure functions over the batch's XComs, so the report task only gathers and writes.
"""

from __future__ import annotations

import html
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from imagecb_provider.batch.prompts import request_key
from imagecb_provider.models import Outcome, parse_timestamp


def _by_key(results: Iterable[Mapping[str, Any] | None]) -> dict[str, dict[str, Any]]:
    return {request_key(r.get("request") or {}): dict(r) for r in results if isinstance(r, Mapping)}


def _seconds(result: Mapping[str, Any]) -> float | None:
    submitted, completed = (
        parse_timestamp(result.get("submitted_at")),
        parse_timestamp(result.get("completed_at")),
    )
    return round((completed - submitted).total_seconds(), 1) if submitted and completed else None


def _entry(
    item: Mapping[str, Any], first: dict | None, second: dict | None, files: list[dict]
) -> dict[str, Any]:
    final = second or first or {}
    outcome = final.get("outcome") or "not_run"
    return {
        "line": item["line"],
        "prompt": item["request"]["prompt"],
        "outcome": outcome,
        "first_outcome": first.get("outcome") if first else None,
        "resubmitted": second is not None,
        "task_id": final.get("task_id"),
        "reason": None if outcome == Outcome.SUCCESS else (final.get("message") or "the task did not run"),
        "seconds": _seconds(final) if final else None,
        "files": files,
        "reused": False,
    }


def _reused_entry(item: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt whose image an earlier run of the same day already archived (``files`` from the manifest)."""
    kept = {"outcome": Outcome.SUCCESS.value, "task_id": item["files"][0]["remote_task_id"]}
    return {**_entry(item, kept, None, list(item["files"])), "reused": True}


def build_summary(
    *,
    run_id: str,
    prompts_path: str,
    requests: list[Mapping[str, Any]],
    rejected: list[Mapping[str, Any]],
    reused: list[Mapping[str, Any]],  # batch items with the ``files`` the manifest already lists
    generated: Iterable[Mapping[str, Any] | None],
    resubmitted: Iterable[Mapping[str, Any] | None],
    archived: Iterable[Mapping[str, Any] | None],
    credits_before: float | None,
    credits_after: float | None,
    started_at: datetime | None,
    finished_at: datetime,
) -> dict[str, Any]:
    """Join the per-prompt XComs by request fingerprint into one summary of the batch."""
    first, second = _by_key(generated), _by_key(resubmitted)
    files: dict[str, list[dict]] = {}
    for result in archived:
        if isinstance(result, Mapping):
            files.setdefault(request_key(result.get("request") or {}), []).extend(result.get("files") or [])
    images = [
        _entry(item, first.get(item["key"]), second.get(item["key"]), files.get(item["key"], []))
        for item in requests
    ]
    images += [_reused_entry(item) for item in reused]
    images.sort(key=lambda image: image["line"])
    counts = Counter(image["outcome"] for image in images)
    durations = [image["seconds"] for image in images if image["seconds"] is not None and not image["reused"]]
    return {
        "run_id": run_id,
        "prompts_path": prompts_path,
        "counts": {outcome.value: counts.get(outcome.value, 0) for outcome in Outcome}
        | _extra_counts(counts),
        "prompts": len(images) + len(rejected),
        "rejected": len(rejected),
        "resubmitted": sum(image["resubmitted"] for image in images),
        "reused_from_earlier_run": len(reused),
        "archived_files": sum(len(image["files"]) for image in images),
        "credits": {
            "before": credits_before,
            "after": credits_after,
            "used": round(credits_before - credits_after, 2)
            if None not in (credits_before, credits_after)
            else None,
        },
        "durations": {
            "batch_seconds": round((finished_at - started_at).total_seconds(), 1) if started_at else None,
            "image_seconds_min": min(durations, default=None),
            "image_seconds_median": statistics.median(durations) if durations else None,
            "image_seconds_max": max(durations, default=None),
        },
        "images": images,
        "rejected_rows": [dict(row) for row in rejected],
    }


def _extra_counts(counts: Counter) -> dict[str, int]:
    known = {outcome.value for outcome in Outcome}
    return {name: count for name, count in counts.items() if name not in known}


# --------------------------------------------------------------------------- the sheet
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} .meta{color:#666;margin-bottom:16px}
.counts span{display:inline-block;margin:0 8px 8px 0;padding:4px 10px;border-radius:12px;font-size:14px}
.counts .rejected{background:#eee;color:#222}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;overflow:hidden}
.card img{width:100%;height:150px;object-fit:cover;display:block;background:#eee}
.card .none{height:150px;display:flex;align-items:center;justify-content:center;color:#999;background:#f1f1f1}
.card .body{padding:8px 10px} .prompt{font-weight:600;word-break:break-word}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff}
.success{background:#2e7d32}.content_policy{background:#c62828}.internal_error{background:#ef6c00}
.generation_failed{background:#ad1457}.timeout{background:#6a1b9a}.not_run{background:#757575}
.reason{color:#b71c1c;font-size:12px;margin-top:4px} .small{color:#777;font-size:12px}
table{border-collapse:collapse;margin-top:8px} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
"""


def _thumbnail(image: Mapping[str, Any], run_url: str) -> str:
    result = next((f for f in image["files"] if f.get("source") == "result"), None)
    if not result:
        return '<div class="none">no image</div>'
    path = str(result["path"])
    src = path[len(run_url) :].lstrip("/") if path.startswith(run_url) else path
    return f'<img src="{html.escape(src)}" alt="{html.escape(image["prompt"])}" loading="lazy">'


def _card(image: Mapping[str, Any], run_url: str) -> str:
    notes = []
    if image.get("resubmitted"):
        notes.append(f"resubmitted after {image.get('first_outcome')}")
    if image.get("reused"):
        notes.append("kept from an earlier run of this batch")
    if image.get("seconds") is not None:
        notes.append(f"{image['seconds']:g} s")
    reason = f'<div class="reason">{html.escape(str(image["reason"]))}</div>' if image.get("reason") else ""
    return (
        f'<div class="card">{_thumbnail(image, run_url)}<div class="body">'
        f'<span class="badge {html.escape(image["outcome"])}">{html.escape(image["outcome"])}</span> '
        f'<span class="small">line {image["line"]} · {html.escape(" · ".join(notes))}</span>'
        f'<div class="prompt">{html.escape(image["prompt"])}</div>{reason}</div></div>'
    )


def render_contact_sheet(summary: Mapping[str, Any], run_url: str) -> str:
    """The HTML contact sheet; image paths are made relative to ``run_url`` so the folder is portable."""
    counts = "".join(
        f'<span class="badge {html.escape(k)}">{html.escape(k)}: {v}</span>'
        for k, v in summary["counts"].items()
        if v
    )
    credits = summary["credits"]
    rejected = "".join(
        f"<tr><td>{row['line']}</td><td>{html.escape(str(row.get('prompt') or ''))}</td>"
        f"<td>{html.escape(row['error'])}</td></tr>"
        for row in summary["rejected_rows"]
    )
    rejected_table = (
        "<h2>Rejected rows (never sent)</h2>"
        f"<table><tr><th>line</th><th>prompt</th><th>reason</th></tr>{rejected}</table>"
        if rejected
        else ""
    )
    cards = "".join(_card(image, run_url) for image in summary["images"])
    run_id = html.escape(summary["run_id"])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>imagecb batch {run_id}"
        f"</title><style>{_CSS}</style></head><body><h1>Image batch {run_id}</h1>"
        f'<div class="meta">{summary["prompts"]} prompts from {html.escape(summary["prompts_path"])} · '
        f"{summary['archived_files']} files archived · credits used: {credits['used']} · "
        f"batch time: {summary['durations']['batch_seconds']} s</div>"
        f'<div class="counts">{counts}<span class="rejected">rejected: {summary["rejected"]}</span></div>'
        f'<div class="grid">{cards}</div>{rejected_table}</body></html>'
    )
