"""
Reading a batch of prompts: a CSV with a ``prompt`` column (other columns named like
``GenerationRequest`` fields) or JSONL with the same keys.

Every row is validated here, before anything is sent: a bad row (empty prompt, unknown
option, value out of range) is reported with its line number and reason and left out; a row
identical to an earlier one is left out too, so the batch never pays for the same image twice.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagecb_provider.exceptions import ImageCbConfigurationError, InvalidGenerationRequest
from imagecb_provider.models import GenerationRequest, request_key

_UNREADABLE = "__unreadable__"


@dataclass
class PromptBatch:
    """The valid requests (snake_case dicts, each with its ``line``) and the rejected rows."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def parse_prompt_file(text: str, name: str, defaults: Mapping[str, Any] | None = None) -> PromptBatch:
    """
    Validate every row of a prompt file's ``text``; ``name`` tells the format (``.jsonl``/``.csv``).

    ``defaults`` (e.g. the DAG's ``model`` and ``aspect_ratio`` params) fill what a row leaves
    empty; the aspect ratio is not defaulted for edit rows (``input_image`` set), where leaving it
    out keeps the input image's ratio.
    """
    defaults = {k: v for k, v in (defaults or {}).items() if v not in (None, "")}
    _check_defaults(defaults)
    batch = PromptBatch()
    seen: dict[str, int] = {}
    for line, row in _rows(text, name):
        if _UNREADABLE in row:
            batch.rejected.append({"line": line, "prompt": None, "error": row[_UNREADABLE]})
            continue
        try:
            request = _request_from_row(row, defaults)
        except InvalidGenerationRequest as error:
            batch.rejected.append({"line": line, "prompt": _prompt_of(row), "error": str(error)})
            continue
        key = request_key(request.to_payload())
        if key in seen:
            batch.rejected.append(
                {
                    "line": line,
                    "prompt": request.prompt,
                    "error": f"duplicate of line {seen[key]}: not paid twice",
                }
            )
            continue
        seen[key] = line
        batch.requests.append({"line": line, "key": key, "request": request.to_dict()})
    return batch


def group_requests(
    items: list[dict[str, Any]], chunk_size: int, max_groups: int = 1024
) -> list[dict[str, Any]]:
    """
    Split validated batch items into groups of ``chunk_size``, each labelled by its lines.

    The size grows when the items would need more than ``max_groups`` groups (Airflow's
    ``[core] max_map_length``), so any file runs in one DAG run without raising an Airflow limit.
    Each item gets its group's index as ``group`` (the mapped instance that generates it).

    :return: ``{"label", "lines", "requests"}`` per group, in file order.
    """
    if chunk_size < 1:
        raise ImageCbConfigurationError(f"chunk_size={chunk_size!r}: must be 1 or more")
    size = max(chunk_size, -(-len(items) // max(max_groups, 1)))
    groups = []
    for start in range(0, len(items), size):
        members = items[start : start + size]
        for item in members:
            item["group"] = len(groups)
        lines = [item["line"] for item in members]
        groups.append({"label": _label(members), "lines": lines, "requests": [m["request"] for m in members]})
    return groups


def _label(members: list[dict[str, Any]]) -> str:
    """``line 7: a red bicycle...`` for one prompt, ``lines 2-51 (48 prompts)`` for a group."""
    if len(members) == 1:
        prompt = members[0]["request"]["prompt"]
        shown = prompt if len(prompt) <= 48 else prompt[:47].rstrip() + "…"
        return f"line {members[0]['line']}: {shown}"
    first, last = members[0]["line"], members[-1]["line"]
    return f"lines {first}-{last} ({len(members)} prompts)"


def _check_defaults(defaults: Mapping[str, Any]) -> None:
    try:
        GenerationRequest.from_dict({"prompt": "defaults check", **defaults})
    except InvalidGenerationRequest as error:
        raise ImageCbConfigurationError(f"Batch default {error}") from error


def _request_from_row(row: Mapping[str, Any], defaults: Mapping[str, Any]) -> GenerationRequest:
    values = {k: v for k, v in row.items() if v not in (None, "")}
    if "prompt" not in values:
        raise InvalidGenerationRequest("prompt", row.get("prompt"), "must be a non-empty string")
    applicable = {
        k: v for k, v in defaults.items() if not (k == "aspect_ratio" and values.get("input_image"))
    }
    return GenerationRequest.from_dict({**applicable, **values})


def _prompt_of(row: Mapping[str, Any]) -> str | None:
    prompt = row.get("prompt")
    return prompt if isinstance(prompt, str) else None


def _rows(text: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if name.lower().endswith((".jsonl", ".ndjson")):
        yield from _jsonl_rows(text)
    elif name.lower().endswith(".csv"):
        yield from _csv_rows(text, name)
    else:
        raise ImageCbConfigurationError(f"prompts_path={name!r}: expected a .csv or .jsonl file")


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "prompt" not in [f.strip() for f in reader.fieldnames]:
        raise ImageCbConfigurationError(f"{name}: the CSV needs a header row with a 'prompt' column")
    for row in reader:
        cleaned = {(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
        if any(cleaned.values()):
            yield reader.line_num, cleaned


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as error:
            yield line, {_UNREADABLE: f"not valid JSON: {error}"}
            continue
        yield line, row if isinstance(row, dict) else {_UNREADABLE: "not a JSON object"}
