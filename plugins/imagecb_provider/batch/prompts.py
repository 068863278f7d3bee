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

A row may edit an image: its ``input_image`` is a public ``http(s)`` link, a local path, or a
``file://``, ``s3://``, ``gs://``... URL (:func:`resolve_input_image`). A relative path is read
from the prompt file's folder and sent as an absolute path; that is the one other change made to a
row. A link or URL carrying credentials (``user:password@``) is refused, and so is a local file
that is missing, not a PNG, JPEG or WEBP image, or over the input cap: the row is rejected, not
sent. Files in object stores are checked when their group is submitted.

A batch can also come from a folder (:func:`list_input_images`): every image in it whose name
matches a pattern, sorted by path, edited with one instruction.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
import re
import stat
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args, get_type_hints
from urllib.parse import unquote, urlsplit

from imagecb_provider.exceptions import (
    ImageCbConfigurationError,
    InputImageUnavailable,
    InvalidGenerationRequest,
    InvalidInputImage,
)
from imagecb_provider.hooks.protocol import without_query
from imagecb_provider.models import MAX_PROMPT_LENGTH, GenerationRequest, request_key
from imagecb_provider.utils.inputs import MAX_INPUT_IMAGE_BYTES, display_name, sniff_image_type

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

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
#: The files a folder batch takes by default (DAG param ``input_glob``), matched without case.
DEFAULT_INPUT_GLOB = "*.png,*.jpg,*.jpeg,*.webp"
#: The most images one folder batch takes: more would make one run's XComs tens of megabytes.
MAX_INPUT_IMAGES = 20_000
_HTTP_SCHEMES = ("http", "https")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
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


def parse_prompt_file(
    text: str,
    name: str,
    defaults: Mapping[str, Any] | None = None,
    *,
    base: str | os.PathLike[str] | None = None,
    check_inputs: bool = True,
) -> PromptBatch:
    """
    Validate every row of a prompt file's ``text``; ``name`` tells the format (``.jsonl``/``.csv``).

    ``defaults`` (e.g. the DAG's ``model`` and ``aspect_ratio`` params) fill what a row leaves
    empty; the aspect ratio is not defaulted for edit rows (``input_image`` set), where leaving it
    out keeps the input image's ratio.

    :param text: the file's text (read it with :func:`read_prompt_file`); a leading BOM is dropped.
    :param name: the file's name or path, for its format and for error texts.
    :param defaults: request fields for what a row leaves empty.
    :param base: the folder a relative ``input_image`` path is read from (default: ``name``'s folder).
    :param check_inputs: reject a row whose local input image is missing, not an image or too large.
    :raises ImageCbConfigurationError: a problem of the whole file; then nothing may be sent.
    """
    folder = os.fspath(base) if base is not None else os.path.dirname(os.path.abspath(name))
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
            request = _request_from_row(row, defaults, folder, check_inputs)
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
    """
    ``line 7: a red bicycle...`` for one prompt, ``lines 2-51 (48 prompts)`` for a group; from a
    folder, ``image 3: shoe.png`` and ``images 1-25 (25 images)``.
    """
    folder = all("name" in m for m in members)
    if len(members) == 1:
        text = members[0]["name"] if folder else members[0]["request"]["prompt"]
        shown = text if len(text) <= 48 else text[:47].rstrip() + "…"
        return f"{'image' if folder else 'line'} {members[0]['line']}: {shown}"
    first, last = members[0]["line"], members[-1]["line"]
    if folder:
        return f"images {first}-{last} ({len(members)} images)"
    return f"lines {first}-{last} ({len(members)} prompts)"


# ----------------------------------------------------------------------- a folder of images
def glob_patterns(text: str) -> list[str]:
    """
    Read ``input_glob``: patterns separated by commas, each with optional ``{a,b}`` alternatives.

    ``*.png,*.jpg`` and ``*.{png,jpg}`` are the same two patterns. A pattern is matched against a
    file's path under the folder, without case; ``*`` also matches a ``/`` (so ``*/*.png`` takes
    the images of every subfolder).

    :param text: the param's value.
    :raises ImageCbConfigurationError: no pattern, or a brace that is not closed.
    """
    patterns: list[str] = []
    for part in _split_top_level(text or ""):
        patterns.extend(_expanded(part.strip(), text))
    patterns = list(dict.fromkeys(p for p in patterns if p))
    if not patterns:
        raise ImageCbConfigurationError(
            f"input_glob={text!r}: give at least one file name pattern, like {DEFAULT_INPUT_GLOB}"
        )
    return patterns


def _split_top_level(text: str) -> list[str]:
    """``text`` cut at the commas outside braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expanded(pattern: str, text: str) -> list[str]:
    """Every pattern a ``{a,b}`` group stands for (groups may nest)."""
    opening = pattern.find("{")
    if opening < 0:
        if "}" in pattern:
            raise ImageCbConfigurationError(f"input_glob={text!r}: a '}}' without its '{{'")
        return [pattern]
    depth = 0
    for closing in range(opening, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[closing], 0)
        if depth == 0:
            break
    else:
        raise ImageCbConfigurationError(f"input_glob={text!r}: a '{{' that is never closed")
    head, body, tail = pattern[:opening], pattern[opening + 1 : closing], pattern[closing + 1 :]
    return [
        expanded
        for choice in _split_top_level(body)
        for expanded in _expanded(head + choice.strip() + tail, text)
    ]


def list_input_images(
    folder: str,
    glob: str,
    instruction: str,
    defaults: Mapping[str, Any] | None = None,
    *,
    conn_id: str | None = None,
    max_images: int = MAX_INPUT_IMAGES,
) -> PromptBatch:
    """
    One edit request per image in ``folder`` whose path matches ``glob``, sorted by path.

    Each request is ``instruction`` applied to one image; its ``line`` is the image's position (1
    for the first) and its ``name`` the path under the folder. Files whose name starts with a dot
    are left out (``.DS_Store``, macOS's ``._photo.jpg``). An image over the input cap, an empty
    file or, on local disk, a file that is not a PNG, JPEG or WEBP image by its first bytes is
    rejected at its position; object-store files are read when their group is submitted.

    :param folder: a local folder (absolute), a ``file://`` URL, or an object-store prefix such as
        ``s3://bucket/photos/`` (``s3://conn_id@bucket/photos/`` for another connection than the
        default one).
    :param glob: the file name patterns (:func:`glob_patterns`).
    :param instruction: the edit applied to every image (the requests' ``prompt``).
    :param defaults: request fields for every image (e.g. ``model``); never ``aspect_ratio``: an edit
        keeps its input's ratio.
    :param conn_id: the Airflow connection of an object store (else the URL's own, or the default).
    :param max_images: refuse a folder with more matching images.
    :raises ImageCbConfigurationError: an empty or too long instruction, a relative path, no
        filesystem for the scheme, a file instead of a folder, no image found, or too many.
    :raises InputImageUnavailable: the store failed the listing (credentials, network): retryable.
    """
    instruction = _checked_instruction(instruction)
    patterns = glob_patterns(glob)
    applicable = {k: v for k, v in (defaults or {}).items() if v not in (None, "") and k != "aspect_ratio"}
    _check_defaults(applicable)
    path, shown = _folder_path(folder, conn_id)
    files = _matching_files(path, shown, patterns, glob)
    if len(files) > max_images:
        raise ImageCbConfigurationError(
            f"{len(files)} images in {shown} match input_glob={glob!r}; a run takes at most {max_images} "
            "(MAX_INPUT_IMAGES): narrow input_glob or split the folder into several runs. Nothing was sent"
        )
    local = path.protocol in ("file", "local", "")
    batch = PromptBatch()
    for line, (name, size) in enumerate(files, start=1):
        source = os.path.join(path.path, name) if local else str(path / name)
        try:
            request = _folder_request(source, name, size, local, instruction, applicable)
        except InvalidGenerationRequest as error:
            batch.rejected.append({"line": line, "prompt": name, "error": str(error)})
            continue
        key = request_key(request.to_payload())
        batch.requests.append({"line": line, "key": key, "request": request.to_dict(), "name": name})
    return batch


def _checked_instruction(instruction: Any) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise ImageCbConfigurationError(
            "instruction is empty: say how to edit every image of input_images, e.g. "
            "'put the product on a pure white background'. Nothing was sent"
        )
    try:
        GenerationRequest(prompt=instruction)
    except InvalidGenerationRequest as error:
        raise ImageCbConfigurationError(f"instruction: {error.allowed}. Nothing was sent") from None
    if not _is_utf8(instruction):
        raise ImageCbConfigurationError("instruction holds a lone surrogate (\\ud800-\\udfff): retype it")
    return instruction.strip()


def _folder_path(folder: str, conn_id: str | None) -> tuple[ObjectStoragePath, str]:
    """The folder as an ``ObjectStoragePath`` and its display name, or a configuration error."""
    from imagecb_provider.batch.archive import NoFilesystem, storage_path, with_filesystem

    text = (folder or "").strip()
    shown = display_name(text)
    if "://" not in text and not os.path.isabs(os.path.expanduser(text)):
        raise ImageCbConfigurationError(
            f"input_images={shown!r}: give an absolute folder path (it is read on the workers) or a URL "
            "such as s3://bucket/photos/. Nothing was sent"
        )
    userinfo = urlsplit(text).netloc.rpartition("@")[0] if "://" in text else ""
    if ":" in userinfo or (userinfo and text.lower().startswith(_HTTP_SCHEMES)):
        raise ImageCbConfigurationError(
            f"input_images={shown!r} carries credentials (user:password@): keep them in an Airflow "
            "connection and name it instead (s3://<conn_id>@bucket/prefix/). Nothing was sent"
        )
    scheme = text.partition("://")[0].lower() if "://" in text else "file"
    if scheme in _HTTP_SCHEMES:
        raise ImageCbConfigurationError(
            f"input_images={shown!r}: an http(s) address cannot be listed; give a folder or an object-store "
            "prefix, or list the links in a prompt file's input_image column. Nothing was sent"
        )
    try:
        path = with_filesystem(lambda: storage_path(text, conn_id), scheme)
    except NoFilesystem as missing:
        raise ImageCbConfigurationError(
            f"input_images={shown!r} cannot be read: {missing.detail}. Install {missing.package} on every "
            "worker. Nothing was sent"
        ) from None
    return path, shown


def _matching_files(
    path: ObjectStoragePath, shown: str, patterns: list[str], glob: str
) -> list[tuple[str, int | None]]:
    """``(path under the folder, size)`` of every file matching a pattern, sorted; at least one."""
    root = path.path.rstrip("/") or "/"
    deep = any("/" in pattern for pattern in patterns)
    try:
        if path.protocol in ("file", "local", "") and os.path.isfile(root):
            found = {root: {"type": "file"}}
        else:
            found = path.fs.find(root, maxdepth=None if deep else 1, detail=True)
    except FileNotFoundError:
        found = {}
    except Exception as error:
        raise InputImageUnavailable(
            f"Could not list input_images={shown!r} ({type(error).__name__}: {without_query(str(error))}): "
            "check the store, the credentials of its connection and the network. Nothing was sent"
        ) from None
    if root in found and found[root].get("type") == "file":
        raise ImageCbConfigurationError(
            f"input_images={shown!r} is a file, not a folder: give its folder (and input_glob), or name it "
            "in a prompt file's input_image column. Nothing was sent"
        )
    prefix = root.rstrip("/") + "/"
    files, seen = [], 0
    for name, info in found.items():
        relative = name[len(prefix) :] if name.startswith(prefix) else None
        if not relative or info.get("type", "file") != "file":
            continue
        if any(part.startswith(".") for part in relative.split("/")):
            continue  # .DS_Store, macOS's ._photo.jpg, a partial write
        seen += 1
        if any(fnmatch.fnmatchcase(relative.lower(), pattern.lower()) for pattern in patterns):
            size = info.get("size")
            files.append((relative, size if isinstance(size, int) else None))
    if not files:
        what = f"{seen} file(s), none matching" if seen else "no file (no such folder, or empty)"
        raise ImageCbConfigurationError(
            f"No images found in input_images={shown!r} matching input_glob={glob!r}: the folder holds "
            f"{what}. Check the folder, or widen input_glob (patterns are matched against the path under "
            "the folder, without case; */*.png takes subfolders). Nothing was sent"
        )
    return sorted(files)


def _folder_request(
    source: str,
    name: str,
    size: int | None,
    local: bool,
    instruction: str,
    defaults: Mapping[str, Any],
) -> GenerationRequest:
    """The edit request of one listed file, or :class:`InvalidInputImage` naming why it is left out."""
    if size is not None and size > MAX_INPUT_IMAGE_BYTES:
        raise InvalidInputImage(
            name,
            f"it is {size} bytes, over the {MAX_INPUT_IMAGE_BYTES / 2**20:g} MiB an input image may be",
            "shrink or recompress it",
        )
    if size == 0:
        raise InvalidInputImage(name, "it is empty", "give a PNG, JPEG or WEBP file")
    if not local and ("?" in name or "#" in name):
        raise InvalidInputImage(name, "its name holds ? or #, which a URL cannot carry", "rename it")
    if local:
        _check_local_input(source, relative=False, base="")
    return GenerationRequest.from_dict({**defaults, "prompt": instruction, "input_image": source})


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


def _request_from_row(
    row: Mapping[str, Any], defaults: Mapping[str, Any], folder: str, check_inputs: bool
) -> GenerationRequest:
    values = {k: v for k, v in row.items() if v is not None and v != ""}
    for key, value in values.items():
        if isinstance(value, str) and not _is_utf8(value):
            # JSON's "\ud800" escape: not text; the report and the archive could not write it
            raise InvalidGenerationRequest(key, _shown(value), "holds a lone surrogate (\\ud800-\\udfff)")
    if "prompt" not in values:
        raise InvalidGenerationRequest("prompt", row.get("prompt"), "must be a non-empty string")
    if isinstance(values.get("input_image"), str):
        values["input_image"] = resolve_input_image(values["input_image"], folder, check=check_inputs)
    applicable = {
        k: v for k, v in defaults.items() if not (k == "aspect_ratio" and values.get("input_image"))
    }
    return GenerationRequest.from_dict({**applicable, **values})


# ----------------------------------------------------------------------- input images
def resolve_input_image(value: str, base: str | os.PathLike[str], *, check: bool = True) -> str:
    """
    Check an ``input_image`` value and make a relative path absolute; return what the request carries.

    A public ``http(s)`` link, a ``file://`` URL or an object-store URL (``s3://bucket/key``, with
    the Airflow connection as ``s3://conn_id@bucket/key`` if not the default) is kept as written; a
    local path is made absolute against ``base`` (a ``~`` is the worker's home). Refused, naming
    the fix, without showing any credentials: a URL with ``user:password@``, a URL without a host,
    an object-store URL with a query or naming a folder, a control character. With ``check``, a
    local file (path or ``file://``) must exist and be a PNG, JPEG or WEBP image within the cap.

    :param value: the row's ``input_image``.
    :param base: the folder a relative path is read from (the prompt file's).
    :param check: read the first bytes of a local file now, before anything is sent.
    :raises InvalidInputImage: the value cannot be sent; the row is rejected.
    """
    text = value.strip()
    shown = _shown(display_name(text))
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidInputImage(
            shown,  # shown as repr: the line break as \n
            "it holds a control character (a line break, a tab)",
            "give one path or URL per field",
        )
    if "://" not in text:
        path = os.path.normpath(os.path.join(os.fspath(base), os.path.expanduser(text)))
        if text.endswith(("/", os.sep)):
            raise InvalidInputImage(shown, "it names a folder", _FOLDER_FIX)
        if check:
            _check_local_input(path, relative=not os.path.isabs(os.path.expanduser(text)), base=base)
        return path
    scheme = text.partition("://")[0]
    if not _SCHEME.fullmatch(scheme):
        raise InvalidInputImage(
            shown, "it is neither a path nor a URL", "give a path, or a URL like s3://bucket/key"
        )
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - reading it is the check (a port that is no number raises)
    except ValueError:
        raise InvalidInputImage(
            f"{scheme}://…", "it is not a valid URL", "check the host part (brackets, port)"
        ) from None
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
    scheme = scheme.lower()
    if scheme in _HTTP_SCHEMES:
        if userinfo is not None:
            raise InvalidInputImage(
                shown,
                "the link carries credentials (user:password@), which would go to the API and into the logs",
                "give a public link, or the object's s3:// or gs:// URL (read with its connection)",
            )
        if not parts.hostname or any(c.isspace() for c in text):
            raise InvalidInputImage(
                shown, "it is not an absolute link with a host", "give https://host/path (spaces as %20)"
            )
        return text
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidInputImage(
                shown, "a file:// URL names a file on the worker by its absolute path", "write file:///path"
            )
        if parts.query or parts.fragment or "?" in text or "#" in text:
            raise InvalidInputImage(shown, _QUERY_REASON, "give the path alone (rename a file with ? or #)")
        if text.endswith("/"):
            raise InvalidInputImage(shown, "it names a folder", _FOLDER_FIX)
        if check:
            _check_local_input(unquote(parts.path), relative=False, base=base)
        return text
    if userinfo is not None and ":" in userinfo:
        raise InvalidInputImage(
            shown,
            "the URL carries credentials (user:password@)",
            "keep them in an Airflow connection and name it instead: "
            f"{scheme}://<conn_id>@bucket/key (or none, for the default connection)",
        )
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise InvalidInputImage(shown, _QUERY_REASON, f"give {scheme}://bucket/key alone")
    if not parts.hostname or not parts.path.strip("/") or text.endswith("/"):
        raise InvalidInputImage(shown, "it names a bucket or a folder, not a file", _FOLDER_FIX)
    return text


_FOLDER_FIX = "give the path of one image file (to edit every image of a folder: the DAG param input_images)"
_QUERY_REASON = "it has a query or a fragment (? or #), which an object-store URL does not take"


def _check_local_input(path: str, *, relative: bool, base: str | os.PathLike[str]) -> None:
    """Refuse a local input image that is missing, not a file, over the cap or not an image."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise InvalidInputImage(path, "it is a folder", _FOLDER_FIX)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputImage(path, "it is not a regular file", "give the path of an image file")
        if info.st_size > MAX_INPUT_IMAGE_BYTES:
            raise InvalidInputImage(
                path,
                f"it is over {MAX_INPUT_IMAGE_BYTES} bytes ({MAX_INPUT_IMAGE_BYTES / 2**20:g} MiB), the most "
                "an input image may be",
                "shrink or recompress it",
            )
        with open(path, "rb") as file:
            head = file.read(12)
    except FileNotFoundError:
        where = f" (a relative path is read from the prompt file's folder, {os.fspath(base)})"
        raise InvalidInputImage(path, "no such file", f"check the path{where if relative else ''}") from None
    except PermissionError:
        denied = "it cannot be read (permission denied)"
        raise InvalidInputImage(path, denied, "let the workers read it") from None
    except OSError as error:
        raise InvalidInputImage(path, f"it cannot be read ({error.strerror})", "check the path") from None
    if sniff_image_type(head) is None:
        what = "it is empty" if not head else "it is not a PNG, JPEG or WEBP image (by its first bytes)"
        raise InvalidInputImage(path, what, "give a PNG, JPEG or WEBP file, or convert it")


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
