"""
Reading a batch of prompts: a CSV with a ``prompt`` column (other columns named like
``GenerationRequest`` fields) or JSONL with the same keys.

Every row is validated here, before anything is sent: a bad row (more or fewer fields than the
header, an empty prompt, an unknown key, a JSON value of the wrong type, a value out of range) is
reported with its line number and reason and left out; a row identical to an earlier one is left
out too, so the batch never pays for the same image twice. A row that is accepted is sent as
written, except that the whitespace around each CSV field and around the prompt is trimmed.

A problem of the whole file (over :data:`MAX_PROMPT_FILE_BYTES`, not UTF-8, a CSV header without
a ``prompt`` column or with a duplicate or unknown column, a quote that is never closed) raises
:class:`ImageCbConfigurationError`: nothing is sent. A UTF-8 byte order mark (Excel's "CSV UTF-8")
is accepted.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

from imagecb_provider.exceptions import ImageCbConfigurationError, InvalidGenerationRequest
from imagecb_provider.models import MAX_PROMPT_LENGTH, GenerationRequest, request_key

#: The largest prompt file read (16 MiB: hundreds of thousands of prompts). A larger file is
#: refused whole, before it is parsed, instead of filling a worker's memory.
MAX_PROMPT_FILE_BYTES = 16 * 1024 * 1024

_BOM = "\ufeff"
# The JSON type each request field takes in a JSONL line: str, bool or int (null leaves it unset).
_FIELD_TYPES: dict[str, type] = {
    name: next(t for t in get_args(hint) or (hint,) if t is not type(None))
    for name, hint in get_type_hints(GenerationRequest).items()
}
_JSON_TYPE_NAMES = {str: "a string", bool: "true or false", int: "a whole number"}
_QUOTE_HINT = (
    "after a closing quote only a comma or the end of the line may follow; to keep quotes in a "
    'prompt, quote the whole prompt and double the quotes inside it: "a sign that says ""open"""'
)


@dataclass
class PromptBatch:
    """The valid requests (snake_case dicts, each with its ``line``) and the rejected rows."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Rejection:
    """A row refused before it could become a request: what to show as its prompt, and why."""

    prompt: str | None
    error: str


def read_prompt_file(path: str | os.PathLike[str]) -> str:
    """
    Read a prompt file as UTF-8 text, without its byte order mark if it has one.

    :param path: the CSV or JSONL file.
    :raises ImageCbConfigurationError: the file is over :data:`MAX_PROMPT_FILE_BYTES` or not UTF-8.
    """
    with open(path, "rb") as file:
        data = file.read(MAX_PROMPT_FILE_BYTES + 1)
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise ImageCbConfigurationError(f"{path}: {_too_large()}")
    try:
        return data.decode("utf-8").removeprefix(_BOM)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ImageCbConfigurationError(
            f"{path} line {line}: not UTF-8 text (byte {data[error.start]:#04x}); save the file as "
            'UTF-8 (in Excel: "CSV UTF-8")'
        ) from error


def parse_prompt_file(text: str, name: str, defaults: Mapping[str, Any] | None = None) -> PromptBatch:
    """
    Validate every row of a prompt file's ``text``; ``name`` tells the format (``.jsonl``/``.csv``).

    ``defaults`` (e.g. the DAG's ``model`` and ``aspect_ratio`` params) fill what a row leaves
    empty; the aspect ratio is not defaulted for edit rows (``input_image`` set), where leaving it
    out keeps the input image's ratio.

    :param text: the file's text (read it with :func:`read_prompt_file`); a leading BOM is dropped.
    :param name: the file's name or path, for its format and for error texts.
    :param defaults: request fields for what a row leaves empty.
    :raises ImageCbConfigurationError: a problem of the whole file; then nothing may be sent.
    """
    defaults = {k: v for k, v in (defaults or {}).items() if v not in (None, "")}
    _check_defaults(defaults)
    # Characters, not bytes: a file within the byte cap always passes, and csv's field size limit
    # (128 KiB) is only reached by a quote that is never closed.
    if len(text) > MAX_PROMPT_FILE_BYTES:
        raise ImageCbConfigurationError(f"{name}: {_too_large()}")
    batch = PromptBatch()
    seen: dict[str, int] = {}
    for line, row in _rows(text.removeprefix(_BOM), name):
        if isinstance(row, _Rejection):
            prompt = _shown(row.prompt) if row.prompt is not None else None
            batch.rejected.append({"line": line, "prompt": prompt, "error": row.error})
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


def _too_large() -> str:
    return (
        f"a prompt file is at most {MAX_PROMPT_FILE_BYTES // 2**20} MiB (MAX_PROMPT_FILE_BYTES); "
        "split it into several files"
    )


def _check_defaults(defaults: Mapping[str, Any]) -> None:
    try:
        GenerationRequest.from_dict({"prompt": "defaults check", **defaults})
    except InvalidGenerationRequest as error:
        raise ImageCbConfigurationError(f"Batch default {error}") from error


def _request_from_row(row: Mapping[str, Any], defaults: Mapping[str, Any]) -> GenerationRequest:
    values = {k: v for k, v in row.items() if v is not None and v != ""}
    for key, value in values.items():
        if isinstance(value, str) and not _is_utf8(value):
            # JSON's "\ud800" escape: not text; the report and the archive could not write it
            raise InvalidGenerationRequest(key, _shown(value), "holds a lone surrogate (\\ud800-\\udfff)")
    if "prompt" not in values:
        raise InvalidGenerationRequest("prompt", row.get("prompt"), "must be a non-empty string")
    applicable = {
        k: v for k, v in defaults.items() if not (k == "aspect_ratio" and values.get("input_image"))
    }
    return GenerationRequest.from_dict({**applicable, **values})


def _prompt_of(row: Mapping[str, Any]) -> str | None:
    prompt = row.get("prompt")
    return _shown(prompt) if isinstance(prompt, str) else None


def _shown(text: str) -> str:
    """``text`` with any lone surrogate written as an escape, so that the report can show it."""
    return text if _is_utf8(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _rows(text: str, name: str) -> Iterator[tuple[int, dict[str, Any] | _Rejection]]:
    if name.lower().endswith((".jsonl", ".ndjson")):
        yield from _jsonl_rows(text)
    elif name.lower().endswith(".csv"):
        yield from _csv_rows(text, name)
    else:
        raise ImageCbConfigurationError(f"prompts_path={name!r}: expected a .csv or .jsonl file")


# ------------------------------------------------------------------------------------- CSV
def _csv_rows(text: str, name: str) -> Iterator[tuple[int, dict[str, str] | _Rejection]]:
    header: list[str] | None = None
    for line, cells, raw in _csv_records(text, name):
        shown = raw.rstrip("\r\n")
        if cells is None:
            if header is None:
                raise ImageCbConfigurationError(f"{name} line {line}: the header row is not valid CSV")
            breaks = len(io.StringIO(shown, newline="").readlines()) - 1
            span = f" (lines {line}-{line + breaks}, read as one row)" if breaks else ""
            yield line, _Rejection(shown, _QUOTE_HINT + span)
        elif not any(cell.strip() for cell in cells):
            continue  # a blank row: nothing to send, nothing lost
        elif header is None:
            header = _csv_header(cells, name, line)
        else:
            yield line, _csv_row(header, cells, shown)
    if header is None:
        raise ImageCbConfigurationError(f"{name}: the CSV needs a header row with a 'prompt' column")


def _csv_records(text: str, name: str) -> Iterator[tuple[int, list[str] | None, str]]:
    """
    Each CSV record with its first line and raw text; its cells are ``None`` if strict CSV refuses it.

    A forgiving reader finds where each record ends; a record with a quote is then read again
    strictly, so that ``"a"b`` is refused instead of becoming ``ab``.
    """
    consumed: list[str] = []

    def physical_lines() -> Iterator[str]:
        # newline="": the csv module sees \r\n inside a quoted field as written
        for physical in io.StringIO(text, newline=""):
            consumed.append(physical)
            yield physical

    reader = csv.reader(physical_lines())  # reads no line ahead: ``consumed`` is this record's
    line = 1
    while True:
        consumed.clear()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            # A field over csv.field_size_limit() (128 KiB), left global: nothing valid is that long.
            # Where the record would end is unknown, so the rest of the file cannot be read.
            raise ImageCbConfigurationError(
                f"{name} line {line}: {error} (a prompt has at most {MAX_PROMPT_LENGTH} characters): "
                "close the quote that opens on or after this line, or shorten the field; nothing was sent"
            ) from error
        raw = "".join(consumed)
        if '"' in raw:
            try:
                list(csv.reader(consumed, strict=True))
            except csv.Error as error:
                if _closed_by_a_quote(consumed):
                    raise ImageCbConfigurationError(
                        f"{name} line {line}: the quote that opens a field here is never closed, so "
                        "every line after it would be read as part of one field; nothing was sent. "
                        'Close it, or double the quotes inside a quoted prompt ("")'
                    ) from error
                cells = None
        yield line, cells, raw
        line += len(consumed)


def _closed_by_a_quote(record: list[str]) -> bool:
    """Whether the record is valid CSV once a closing quote is added: a quote left open."""
    try:
        list(csv.reader([*record, '"'], strict=True))
    except csv.Error:
        return False
    return True


def _csv_header(cells: list[str], name: str, line: int) -> list[str]:
    names = [cell.strip() for cell in cells]
    duplicates = [(n, count) for n, count in Counter(names).items() if n and count > 1]
    if duplicates:
        column, count = duplicates[0]
        raise ImageCbConfigurationError(
            f"{name} line {line}: the header names the column {column!r} {count} times; keep one "
            "(each row would otherwise lose all but one of its values)"
        )
    if "prompt" not in names:
        found = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
        raise ImageCbConfigurationError(
            f"{name} line {line}: the CSV needs a header row with a 'prompt' column (found {found}; "
            "column names are lower case)"
        )
    unknown = [n for n in names if n and n not in _FIELD_TYPES]
    if unknown:
        raise ImageCbConfigurationError(
            f"{name} line {line}: the column {unknown[0]!r} is not a request field; columns are "
            f"named like the fields: {', '.join(_FIELD_TYPES)}"
        )
    return names


def _csv_row(header: list[str], cells: list[str], shown: str) -> dict[str, str] | _Rejection:
    if len(cells) != len(header):
        return _Rejection(shown, _field_count_error(header, cells))
    unnamed = [i for i, (n, cell) in enumerate(zip(header, cells, strict=True)) if not n and cell.strip()]
    if unnamed:
        return _Rejection(
            shown, f"column {unnamed[0] + 1} has a value but no name in the header: name it or empty it"
        )
    return {n: cell.strip() for n, cell in zip(header, cells, strict=True) if n}


def _field_count_error(header: list[str], cells: list[str]) -> str:
    columns = ", ".join(n or "(unnamed)" for n in header)
    found = f"{_count(len(cells), 'field')}, but the header has {_count(len(header), 'column')} ({columns})"
    if len(cells) < len(header):
        return f"{found}: give every row one field per column, an empty one for a value left out"
    # Never joined back: the user must see the row; the likely prompt is shown, quoted, as the fix.
    start = header.index("prompt")
    guess = ",".join(cells[start : start + len(cells) - len(header) + 1]).strip().replace('"', '""')
    return f'{found}: a prompt with a comma must be quoted: "{guess}"'


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


# ----------------------------------------------------------------------------------- JSONL
class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, refusing a repeated key (``json`` would keep only the last)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | _Rejection]]:
    # "\n" only: str.splitlines() also breaks at U+2028 and U+0085, which JSON strings may hold.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw, object_pairs_hook=_object)
        except _DuplicateKey as error:
            yield line, _Rejection(None, f"the key {error.key!r} appears twice in the object; keep one")
            continue
        except (ValueError, RecursionError) as error:
            yield line, _Rejection(None, f"not valid JSON: {error}")
            continue
        if not isinstance(value, dict):
            yield line, _Rejection(None, f"not a JSON object but {_json_type(value)}")
            continue
        try:
            row: dict[str, Any] | _Rejection = _checked_json_fields(value)
        except InvalidGenerationRequest as error:
            row = _Rejection(_prompt_of(value), str(error))
        yield line, row


def _checked_json_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The row itself if every key is a request field and every value has that field's JSON type."""
    for key, value in row.items():
        expected = _FIELD_TYPES.get(key)
        if expected is None:
            raise InvalidGenerationRequest(
                key, value, f"is not a request field; known fields: {', '.join(_FIELD_TYPES)}"
            )
        if value is None:
            continue
        # bool is an int in Python, and the strings "yes" or "1" are accepted from CSV, not JSON.
        if type(value) is not expected:
            raise InvalidGenerationRequest(
                key, value, f"must be {_JSON_TYPE_NAMES[expected]} in JSON, not {_json_type(value)}"
            )
    return row


def _json_type(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a whole number"}
    return kinds.get(type(value), "a decimal number" if isinstance(value, float) else "null")
