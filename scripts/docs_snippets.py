"""
Keep the code shown in the docs equal to the example DAGs it comes from.

Markdown has no include, so a doc shows a DAG's code in a block between two comments::

    <!-- [START include dags/imagecb_quickstart.py howto_quickstart] -->
    ```python
    ...the lines between "# [START howto_quickstart]" and "# [END howto_quickstart]", dedented...
    ```
    <!-- [END include] -->

The source marks the part with comment lines, in Airflow's style: ``# [START howto_<name>]`` and
``# [END howto_<name>]``. Marker lines of other parts nested inside are left out of the block,
as are blank lines at its start and end. Include comments inside a code fence are examples and
are left alone.

``--check`` exits 1 and names every block that differs from its source, every marker that is
missing and every block that is not closed; ``--write`` rewrites the blocks from their sources.
Scanned: README.md, CONTRIBUTING.md and docs/*.md. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_GLOBS = ("README.md", "CONTRIBUTING.md", "docs/*.md")

INCLUDE_START = re.compile(r"^<!-- \[START include (?P<source>\S+) (?P<name>\S+)\] -->$")
INCLUDE_END = "<!-- [END include] -->"
#: Any line that looks like an include comment, to catch misspelled ones.
INCLUDE_LIKE = re.compile(r"^<!--\s*\[(START|END) include\b")
FENCES = ("```", "~~~")
SOURCE_MARKER = re.compile(r"^\s*# \[(?P<kind>START|END) (?P<name>[A-Za-z0-9_]+)\]\s*$")


class SnippetError(Exception):
    """A marker or block that cannot be resolved; the message says where."""


@dataclass
class Block:
    """One include block of a doc: where it is, what it shows, what it holds now."""

    doc: Path
    line: int  # 1-based line of the START comment
    source: str
    name: str
    start: int  # index of the START comment line
    end: int  # index of the END comment line
    body: str  # the text between the two comment lines


def doc_files(root: Path) -> list[Path]:
    """
    Return the docs to scan under a root, in a stable order.

    :param root: the repository root.
    """
    found: list[Path] = []
    for pattern in DOC_GLOBS:
        found.extend(sorted(p for p in root.glob(pattern) if p.is_file()))
    return found


def extract(source: Path, name: str, root: Path) -> str:
    """
    Return the lines between a source's START and END markers, dedented, nested markers left out.

    :param source: the source file.
    :param name: the marker's name, e.g. ``howto_quickstart``.
    :param root: the repository root, to name the file in messages.
    """
    shown = _relative(source, root)
    if not source.is_file():
        raise SnippetError(f"{shown}: no such file")
    lines = source.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if _marker(line) == ("START", name)]
    ends = [i for i, line in enumerate(lines) if _marker(line) == ("END", name)]
    if not starts:
        raise SnippetError(f"{shown}: marker '# [START {name}]' is missing")
    if not ends:
        raise SnippetError(f"{shown}: marker '# [END {name}]' is missing")
    if len(starts) > 1 or len(ends) > 1:
        raise SnippetError(f"{shown}: marker {name} appears more than once")
    if ends[0] < starts[0]:
        raise SnippetError(f"{shown}: '# [END {name}]' comes before '# [START {name}]'")
    kept = [line for line in lines[starts[0] + 1 : ends[0]] if _marker(line) is None]
    while kept and not kept[0].strip():
        kept.pop(0)
    while kept and not kept[-1].strip():
        kept.pop()
    if not kept:
        raise SnippetError(f"{shown}: marker {name} encloses no code")
    return textwrap.dedent("\n".join(kept) + "\n")


def render(snippet: str) -> str:
    """
    Return the text an include block holds for a snippet: a fenced Python block.

    :param snippet: the source lines, as returned by :func:`extract`.
    """
    return f"```python\n{snippet}```\n"


def find_blocks(doc: Path, root: Path) -> list[Block]:
    """
    Return the include blocks of a doc.

    :param doc: the Markdown file.
    :param root: the repository root, to name the file in messages.
    :raises SnippetError: a block is not closed, or an include comment is malformed.
    """
    shown = _relative(doc, root)
    lines = doc.read_text(encoding="utf-8").splitlines(keepends=True)
    blocks: list[Block] = []
    in_fence = False  # include comments shown inside a code fence are examples, not blocks
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        if text.startswith(FENCES):
            in_fence = not in_fence
        match = None if in_fence else INCLUDE_START.match(text)
        if match is None:
            if not in_fence and text == INCLUDE_END:
                raise SnippetError(f"{shown}:{i + 1}: '{INCLUDE_END}' without its START comment")
            if not in_fence and INCLUDE_LIKE.match(text):
                raise SnippetError(f"{shown}:{i + 1}: malformed include comment: {text}")
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == INCLUDE_END), None)
        inside = range(i + 1, end or len(lines))
        nested = next((j for j in inside if INCLUDE_LIKE.match(lines[j].strip())), None)
        if end is None or nested is not None:
            raise SnippetError(
                f"{shown}:{i + 1}: block {match['source']} {match['name']} is not closed by '{INCLUDE_END}'"
            )
        body = "".join(lines[i + 1 : end])
        blocks.append(Block(doc, i + 1, match["source"], match["name"], i, end, body))
        i = end + 1
    return blocks


def _compared(root: Path, problems: list[str]) -> Iterator[tuple[Path, list[tuple[Block, str, str]]]]:
    """
    Yield each doc with its blocks, each block with where it is and what its source gives.

    :param root: the repository root.
    :param problems: where a doc or a block that cannot be read is reported.
    """
    for doc in doc_files(root):
        try:
            blocks = find_blocks(doc, root)
        except SnippetError as error:
            problems.append(str(error))
            continue
        compared = []
        for block in blocks:
            where = f"{_relative(doc, root)}:{block.line}: block {block.source} {block.name}"
            try:
                compared.append(
                    (block, where, render(extract(_source_path(block.source, root), block.name, root)))
                )
            except SnippetError as error:
                problems.append(f"{where}: {error}")
        yield doc, compared


def check(root: Path) -> tuple[list[str], int]:
    """
    Return the problems found under a root, and how many blocks were checked.

    :param root: the repository root.
    """
    problems: list[str] = []
    count = 0
    for _, compared in _compared(root, problems):
        count += len(compared)
        problems += [
            f"{where} differs from its source (run scripts/docs_snippets.py --write)"
            for block, where, expected in compared
            if block.body != expected
        ]
    return problems, count


def write(root: Path) -> tuple[list[str], list[str]]:
    """
    Rewrite every include block from its source; return the blocks rewritten and the problems.

    :param root: the repository root.
    """
    rewritten: list[str] = []
    problems: list[str] = []
    for doc, compared in _compared(root, problems):
        lines = doc.read_text(encoding="utf-8").splitlines(keepends=True)
        changed = [(block, where, expected) for block, where, expected in compared if block.body != expected]
        for block, where, expected in reversed(changed):
            lines[block.start + 1 : block.end] = expected.splitlines(keepends=True)
            rewritten.append(where)
        if changed:
            doc.write_text("".join(lines), encoding="utf-8")
    return rewritten, problems


def main(argv: list[str] | None = None) -> int:
    """
    Run the check or the rewrite; return the exit status.

    :param argv: the command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="scripts/docs_snippets.py", description="Check or rewrite the DAG code included in the docs."
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 naming each block that differs")
    mode.add_argument("--write", action="store_true", help="rewrite the blocks from their sources")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.write:
        rewritten, problems = write(root)
        for line in rewritten:
            print(f"rewrote {line}")
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    problems, count = check(root)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {count} include block(s)", file=sys.stderr)
        return 1
    print(f"{count} include block(s) match their sources")
    return 0


def _marker(line: str) -> tuple[str, str] | None:
    match = SOURCE_MARKER.match(line)
    return (match["kind"], match["name"]) if match else None


def _source_path(source: str, root: Path) -> Path:
    path = (root / source).resolve()
    if not path.is_relative_to(root):
        raise SnippetError(f"{source}: outside the repository")
    return path


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
