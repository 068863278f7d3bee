"""
``batch/prompts.py``: a prompt file's rows are sent exactly as written, or rejected with their line.

The attack tests each reproduce a way a file used to lose or change a prompt silently (or stop the
whole file with a bare error); the properties check, for any rows written with the ``csv`` module,
any JSON values and any raw text, that every row is accepted as written or rejected with a reason.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from unittest.mock import ANY

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecb_provider.batch import prompts
from imagecb_provider.batch.prompts import parse_prompt_file
from imagecb_provider.exceptions import ImageCbConfigurationError, InvalidGenerationRequest
from imagecb_provider.models import GenerationRequest

DEMO = Path(__file__).resolve().parents[2] / "include" / "prompts" / "demo.csv"
FIELDS = GenerationRequest.field_names()
FIELD_TYPES = {
    "enable_translation": bool,
    "upload_cn": bool,
    "prompt_upsampling": bool,
    "safety_tolerance": int,
}  # the others are strings
# No example database in a shared checkout (hypothesis still keeps caches in .hypothesis/, git-ignored).
PROPERTY = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def parsed(text: str, name: str = "prompts.csv", **defaults):
    """Parse ``text``; return ``({line: prompt}, {line: error})``."""
    batch = parse_prompt_file(text, name, defaults)
    accepted = {item["line"]: item["request"]["prompt"] for item in batch.requests}
    rejected = {row["line"]: row["error"] for row in batch.rejected}
    return accepted, rejected


# --------------------------------------------------------------------- CSV: the row's fields
def test_a_prompt_with_a_comma_in_a_prompt_only_csv_is_rejected_with_the_quoted_fix():
    accepted, rejected = parsed("prompt\na red cat, sitting on a mat\na blue dog\n")
    assert accepted == {3: "a blue dog"}  # never "a red cat", never the fields joined back
    assert "2 fields, but the header has 1 column (prompt)" in rejected[2]
    assert '"a red cat, sitting on a mat"' in rejected[2]


def test_a_row_with_more_fields_than_the_header_is_rejected_not_cut():
    text = "prompt,aspect_ratio\na red cat, sitting on a mat,16:9\na blue dog,1:1\n"
    accepted, rejected = parsed(text)
    assert accepted == {3: "a blue dog"}
    assert rejected[2].startswith("3 fields, but the header has 2 columns (prompt, aspect_ratio)")
    assert '"a red cat, sitting on a mat"' in rejected[2]


def test_a_row_with_fewer_fields_than_the_header_is_rejected():
    accepted, rejected = parsed("prompt,aspect_ratio,model\na red cat,16:9\n")
    assert accepted == {}
    assert "2 fields, but the header has 3 columns" in rejected[2]
    assert "one field per column" in rejected[2]


def test_a_value_under_an_unnamed_column_is_rejected_not_dropped():
    accepted, rejected = parsed("prompt,\na red cat,\na blue dog,sitting\n")
    assert accepted == {2: "a red cat"}  # an empty unnamed column (Excel's trailing comma) is fine
    assert "column 2 has a value but no name" in rejected[3]


def test_text_after_a_closing_quote_is_rejected_not_merged():
    text = 'prompt\n"Hello," she said\n"a fox\nin the snow" at night\na blue dog\n'
    accepted, rejected = parsed(text)
    assert accepted == {5: "a blue dog"}  # never "Hello, she said"
    assert "after a closing quote only a comma" in rejected[2]
    assert "(lines 3-4, read as one row)" in rejected[3]


def test_a_quoted_prompt_over_several_lines_is_kept_whole_at_its_first_line():
    accepted, rejected = parsed('prompt\r\n"a fox\r\nin the snow"\r\n\r\na blue dog\r\n')
    assert accepted == {2: "a fox\r\nin the snow", 5: "a blue dog"}
    assert rejected == {}


# --------------------------------------------------------------------- CSV: the whole file
def test_a_duplicate_header_is_an_error_naming_it():
    with pytest.raises(ImageCbConfigurationError, match=r"line 1: the header names the column 'prompt' 2"):
        parse_prompt_file("prompt,aspect_ratio,prompt\na red cat,16:9,a blue dog\n", "p.csv")


def test_an_unknown_column_is_an_error_naming_it():
    with pytest.raises(ImageCbConfigurationError, match=r"the column 'colour' is not a request field"):
        parse_prompt_file("prompt,colour\na red cat,\na blue dog,red\n", "p.csv")


@pytest.mark.parametrize("end", ["\n", ""])
def test_an_unclosed_quote_is_an_error_naming_its_line_not_one_merged_prompt(end):
    text = f'prompt\na blue dog\n"a red cat\na green frog\na white horse{end}'
    with pytest.raises(ImageCbConfigurationError, match=r"p\.csv line 3: the quote .* is never closed"):
        parse_prompt_file(text, "p.csv")


def test_a_field_over_the_csv_limit_is_an_error_naming_its_line():
    text = 'prompt\na blue dog\n"' + "x" * (csv.field_size_limit() + 10) + '"\na red cat\n'
    with pytest.raises(ImageCbConfigurationError, match=r"p\.csv line 3: field larger than field limit"):
        parse_prompt_file(text, "p.csv")


def test_a_byte_order_mark_is_accepted():
    assert parsed("\ufeffprompt,model\r\na red cat,flux-kontext-max\r\n")[0] == {2: "a red cat"}


def test_a_header_that_cannot_be_read_or_is_missing_is_an_error():
    with pytest.raises(ImageCbConfigurationError, match=r"line 1: the header row is not valid CSV"):
        parse_prompt_file('"prompt"x\na\n', "p.csv")
    with pytest.raises(ImageCbConfigurationError, match=r"header row with a 'prompt' column"):
        parse_prompt_file("\n\n", "p.csv")


# ------------------------------------------------------------------------ integers and size
@pytest.mark.parametrize("value", ["²", "\u0661", "1²", pytest.param("9" * 5000, id="5000-digits")])
def test_a_tolerance_that_is_not_ascii_digits_is_a_rejected_row_not_a_crash(value):
    accepted, rejected = parsed(f"prompt,safety_tolerance\na red cat,{value}\na blue dog,2\n")
    assert accepted == {3: "a blue dog"}
    assert "expected a whole number" in rejected[2]
    with pytest.raises(InvalidGenerationRequest, match="whole number"):
        GenerationRequest(prompt="a red cat", safety_tolerance=value)


def test_a_file_over_the_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(prompts, "MAX_PROMPT_FILE_BYTES", 64)
    path = tmp_path / "p.csv"
    path.write_text("prompt\n" + "a red cat\n" * 6)  # 67 bytes
    with pytest.raises(ImageCbConfigurationError, match=r"p\.csv: a prompt file is at most"):
        prompts.read_prompt_file(path)
    with pytest.raises(ImageCbConfigurationError, match=r"p\.csv: a prompt file is at most"):
        parse_prompt_file(path.read_text(), "p.csv")
    path.write_text("prompt\n" + "a red cat\n" * 5 + "abcdef\n")  # 64 bytes: just within
    assert parsed(prompts.read_prompt_file(path)) == (
        {2: "a red cat", 7: "abcdef"},
        dict.fromkeys(range(3, 7), ANY),
    )


def test_read_prompt_file_drops_a_bom_and_names_the_line_of_a_byte_that_is_not_utf8(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt\r\na cat\r\n")
    assert prompts.read_prompt_file(path) == "prompt\r\na cat\r\n"
    path.write_bytes("prompt\na cat\na café\n".encode("cp1252"))
    with pytest.raises(ImageCbConfigurationError, match=r"p\.csv line 3: not UTF-8 text \(byte 0xe9\)"):
        prompts.read_prompt_file(path)


# ------------------------------------------------------------------------------------ JSONL
@pytest.mark.parametrize(
    ("line", "error"),
    [
        ('{"prompt": 42}', "Invalid prompt=42: must be a string in JSON, not a whole number"),
        ('{"prompt": {"text": "a cat"}}', "must be a string in JSON, not an object"),
        ('{"prompt": "a cat", "upload_cn": "true"}', "upload_cn='true': must be true or false in JSON"),
        ('{"prompt": "a cat", "enable_translation": 1}', "must be true or false in JSON, not a whole"),
        ('{"prompt": "a cat", "safety_tolerance": "2"}', "must be a whole number in JSON, not a string"),
        ('{"prompt": "a cat", "safety_tolerance": 2.0}', "not a decimal number"),
        ('{"prompt": "a cat", "watermark": ["acme"]}', "watermark=['acme']: must be a string in JSON"),
        ('{"prompt": "a cat", "colour": null}', "colour=None: is not a request field"),
        ('{"prompt": "a cat", "prompt": "a dog"}', "the key 'prompt' appears twice"),
        ('["a cat"]', "not a JSON object but an array"),
        ('"a cat"', "not a JSON object but a string"),
        ("[" * 100_000, "not valid JSON"),
        ('{"prompt": "\\ud83d"}', "holds a lone surrogate"),
    ],
)
def test_a_jsonl_line_of_the_wrong_shape_or_type_is_rejected_with_the_field_named(line, error):
    accepted, rejected = parsed(f'{{"prompt": "a blue dog"}}\n{line}\n', "p.jsonl")
    assert accepted == {1: "a blue dog"}
    assert error in rejected[2]


def test_a_jsonl_prompt_with_a_unicode_line_separator_is_one_line():
    text = json.dumps({"prompt": "a cat\u2028on a\x85mat"}, ensure_ascii=False) + '\n{"prompt": "a dog"}\n'
    assert parsed(text, "p.jsonl") == ({1: "a cat\u2028on a\x85mat", 2: "a dog"}, {})


def test_a_rejected_prompt_with_a_lone_surrogate_is_shown_escaped():
    batch = parse_prompt_file('{"prompt": "a cat \\udc80", "model": "x"}\n', "p.jsonl")
    assert batch.rejected[0]["prompt"] == "a cat \\udc80"
    batch.rejected[0]["prompt"].encode("utf-8")  # the report can write it


# ------------------------------------------------------------------------------ good and bad
def test_bad_rows_never_stop_the_good_ones():
    text = (
        "prompt,safety_tolerance,upload_cn\n"
        "a fox,1,yes\n"
        "a red cat, on a mat,2,no\n"
        "a dog,²,\n"
        '"Hello," she said,,\n'
        ",3,\n"
        "an owl,,true\n"
        "a fox,1,yes\n"
    )
    batch = parse_prompt_file(text, "p.csv")
    assert [(i["line"], i["request"]) for i in batch.requests] == [
        (2, {"prompt": "a fox", "safety_tolerance": 1, "upload_cn": True}),
        (7, {"prompt": "an owl", "upload_cn": True}),
    ]
    assert [row["line"] for row in batch.rejected] == [3, 4, 5, 6, 8]


def test_the_demo_file_still_gives_eleven_prompts_and_three_rejected_rows():
    batch = parse_prompt_file(prompts.read_prompt_file(DEMO), str(DEMO), {"model": "flux-kontext-pro"})
    assert (len(batch.requests), len(batch.rejected)) == (11, 3)


# ------------------------------------------------------------------------------- properties
def line_lengths(text: str) -> list[int]:
    """0, then the length of each line as the parser splits them (\\r, \\n, \\r\\n): offsets by sum."""
    return [0, *(len(line) for line in io.StringIO(text, newline=""))]


def line_count(text: str) -> int:
    return len(io.StringIO(text, newline="").readlines())


def check_entries(batch) -> dict[int, dict]:
    """Every entry has its own line and, if rejected, a reason; return them by line."""
    entries = [*batch.requests, *batch.rejected]
    by_line = {entry["line"]: entry for entry in entries}
    assert len(by_line) == len(entries), "two entries for one line"
    for row in batch.rejected:
        assert isinstance(row["line"], int)
        assert row["line"] >= 1
        assert isinstance(row["error"], str)
        assert row["error"]
    return by_line


OTHER_COLUMNS = st.lists(st.sampled_from(["watermark", "aspect_ratio", "upload_cn", ""]), unique=True)


@st.composite
def csv_files(draw):
    """A header with a prompt column and rows of any text (some of the wrong length), as csv writes them."""
    header = draw(OTHER_COLUMNS)
    header.insert(draw(st.integers(0, len(header))), "prompt")
    cell = st.text() | st.sampled_from(["", " ", "a, b", '"', "16:9", "yes", "\r\n", "a\rb"])
    rows = draw(
        st.lists(
            st.lists(cell, min_size=len(header), max_size=len(header))
            | st.lists(cell, min_size=0, max_size=len(header) + 2),
            max_size=12,
        )
    )
    out = io.StringIO()
    writer = csv.writer(out)  # the excel dialect: "\r\n" ends a row and "\r" in a field is quoted
    writer.writerow(header)
    starts = []
    for row in rows:
        starts.append(line_count(out.getvalue()) + 1)
        writer.writerow(row)
    return header, rows, starts, out.getvalue()


@PROPERTY
@given(csv_files(), st.booleans())
def test_every_csv_row_is_accepted_as_written_or_rejected_at_its_line(file, bom):
    header, rows, starts, text = file
    batch = parse_prompt_file(("\ufeff" if bom else "") + text, "p.csv")
    by_line = check_entries(batch)
    assert set(by_line) <= set(starts)
    for row, line in zip(rows, starts, strict=True):
        entry = by_line.get(line)
        if not any(cell.strip() for cell in row):
            assert entry is None  # a blank row: skipped
            continue
        assert entry is not None, f"row at line {line} neither accepted nor rejected"
        if "request" in entry:
            assert len(row) == len(header)
            written = dict(zip(header, row, strict=True))
            request = entry["request"]
            # the one documented change: the whitespace around a field is trimmed
            assert request["prompt"] == written["prompt"].strip()
            if "watermark" in written:
                assert request.get("watermark") == (written["watermark"].strip() or None)
        elif len(row) != len(header):
            assert re.match(r"\d+ fields?, but the header has", entry["error"])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
# Values of the right JSON type, valid or not, so that lines with several fields are accepted too.
TYPED_VALUES = {
    str: st.sampled_from(["", " 16:9", "png", "flux-kontext-max", "https://e.com/a.png", "ftp://x"])
    | st.text(),
    bool: st.booleans(),
    int: st.integers(-1, 7),
}
JSON_LINES = (
    JSON_VALUES
    | st.fixed_dictionaries(
        {"prompt": st.text() | JSON_VALUES},
        optional={name: JSON_VALUES for name in (*FIELDS[1:], "colour", "Prompt")},
    )
    | st.fixed_dictionaries(
        {"prompt": st.text()},
        optional={name: TYPED_VALUES[FIELD_TYPES.get(name, str)] | st.none() for name in FIELDS[1:]},
    )
)


@PROPERTY
@given(st.lists(JSON_LINES, max_size=10), st.booleans())
def test_every_jsonl_line_is_accepted_as_written_or_rejected_at_its_line(values, ascii_only):
    text = "\n".join(json.dumps(value, ensure_ascii=ascii_only) for value in values)
    batch = parse_prompt_file(text, "p.jsonl")
    by_line = check_entries(batch)
    assert set(by_line) == set(range(1, len(values) + 1))
    for item in batch.requests:
        value, request = values[item["line"] - 1], item["request"]
        assert isinstance(value, dict)
        assert set(value) <= set(FIELDS)
        assert request["prompt"] == value["prompt"].strip()
        for name, given_value in value.items():
            if isinstance(given_value, bool | int) or (name == "watermark" and given_value):
                assert request[name] == given_value
                assert type(request[name]) is type(given_value)


RAW_CSV = st.lists(
    st.sampled_from(['"', '""', ",", "\n", "\r\n", "\r", " ", "a cat", "\u2028", "\ufeff", "\x00"])
    | st.characters(),
    max_size=80,
).map("".join)


@PROPERTY
@given(st.sampled_from(["prompt\n", "prompt,watermark\r\n", ",prompt\n", "\ufeffprompt\n", ""]), RAW_CSV)
def test_raw_text_as_csv_gives_rows_as_written_or_a_configuration_error(header, body):
    text = header + body
    try:
        batch = parse_prompt_file(text, "p.csv")
    except ImageCbConfigurationError:
        return
    check_entries(batch)
    lengths = line_lengths(text)
    for item in batch.requests:
        prompt = item["request"]["prompt"]
        after = text[sum(lengths[: item["line"]]) :]  # the text from the row's first line on
        # as written: verbatim, or quoted with its quotes doubled; never cut, merged or unquoted
        assert prompt in after or prompt.replace('"', '""') in after
        assert prompt == prompt.strip()


RAW_JSONL = st.lists(
    st.sampled_from(['{"prompt": ', '"a cat"', "1", "true", "}", "{", "[", "]", ",", '"model"', ":", "\n"])
    | st.sampled_from(['{"prompt": "a cat"}', '{"prompt": " a dog ", "upload_cn": true}', '"\\u2028"'])
    | st.text(max_size=3),
    max_size=40,
).map("".join)


@PROPERTY
@given(RAW_JSONL)
def test_raw_text_as_jsonl_gives_lines_as_written(text):
    batch = parse_prompt_file(text, "p.jsonl")
    check_entries(batch)
    lines = text.split("\n")
    for item in batch.requests:
        assert json.loads(lines[item["line"] - 1])["prompt"].strip() == item["request"]["prompt"]
