"""Bytes that are not UTF-8: every reader names file, line (or row), column and field, and
--skip_bad_rows skips such a row where the format has rows it can read one by one."""

from __future__ import annotations

import csv
import json

import pytest

from hpalign.data.formats import load_examples
from hpalign.data.types import DataFormatError, LoadReport

ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]


def jsonl_with_bad_byte_on_line_3(path) -> tuple[str, int]:
    """ROWS as JSON lines, line 3's chosen answer holding a Latin-1 byte (0xff); the byte's file offset."""
    lines = [json.dumps(row).encode() for row in ROWS]
    lines[2] = lines[2].replace(b"good 2", b"good \xff2")
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(data)
    return str(path), data.index(b"\xff")


def test_jsonl_bad_byte_names_file_line_column_field_and_the_fix(tmp_path):
    path, offset = jsonl_with_bad_byte_on_line_3(tmp_path / "d.jsonl")
    column = offset - len(json.dumps(ROWS[0])) - len(json.dumps(ROWS[1])) - 2 + 1
    with pytest.raises(DataFormatError) as info:
        load_examples([path], kind="pair")
    assert info.value.source == f"{path}:3"
    assert info.value.field_name == "chosen"
    assert f"byte 0xff at line 3, column {column} (byte offset {offset} in the file)" in str(info.value)
    assert "re-encode the file as UTF-8" in str(info.value) and "--skip_bad_rows" in str(info.value)
    assert "codec can't decode" not in str(info.value)


@pytest.mark.parametrize("suffix", ["jsonl", "json"])  # a .json file holding JSON lines reads as JSONL
def test_jsonl_bad_byte_row_is_skipped_and_counted(tmp_path, suffix):
    path, _ = jsonl_with_bad_byte_on_line_3(tmp_path / f"d.{suffix}")
    report = LoadReport()
    loaded = load_examples([path], kind="pair", skip_bad_rows=True, report=report)
    assert [ex.source for ex in loaded] == [f"{path}:{line}" for line in (1, 2, 4)]
    assert (report.num_rows, report.num_skipped) == (4, 1)
    assert report.skipped[0].startswith(f"{path}:3, field 'chosen': not valid UTF-8: byte 0xff at line 3")


def write_csv_with_bad_byte(path, *, delimiter=",") -> tuple[str, int]:
    """Row 0 has a quoted two-line prompt, so row 1 (chosen 0xff) sits on line 4; a UTF-8 BOM first."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"], delimiter=delimiter)
        writer.writeheader()
        writer.writerow({"prompt": "line one\nline two", "chosen": "a", "rejected": "b"})
        writer.writerow({"prompt": "q", "chosen": "BAD", "rejected": "b"})
        writer.writerow({"prompt": "q3", "chosen": "c", "rejected": "d"})
    data = b"\xef\xbb\xbf" + path.read_bytes().replace(b"BAD", b"B\xffD")
    path.write_bytes(data)
    return str(path), data.index(b"\xff")


@pytest.mark.parametrize("suffix, delimiter", [("csv", ","), ("tsv", "\t")])
def test_csv_bad_byte_names_its_line_and_is_skipped(tmp_path, suffix, delimiter):
    path, offset = write_csv_with_bad_byte(tmp_path / f"d.{suffix}", delimiter=delimiter)
    with pytest.raises(DataFormatError) as info:
        load_examples([path], kind="pair")
    assert (info.value.source, info.value.field_name) == (f"{path}:row 1", "chosen")
    assert f"byte 0xff at line 4, column 4 (byte offset {offset} in the file)" in str(info.value)
    report = LoadReport()
    loaded = load_examples([path], kind="pair", skip_bad_rows=True, report=report)
    assert [(ex.source, ex.prompt[-1]["content"]) for ex in loaded] == [
        (f"{path}:row 0", "line one\nline two"), (f"{path}:row 2", "q3")]
    assert (report.num_rows, report.num_skipped) == (3, 1)


def test_csv_bad_byte_in_the_header_stops_the_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,ch\xffsen,rejected\nq,a,b\n")
    with pytest.raises(DataFormatError, match=r"d\.csv:1: the header: not valid UTF-8: byte 0xff at line 1, "
                       r"column 10 \(byte offset 9 in the file\)"):
        load_examples([str(path)], kind="pair", skip_bad_rows=True)


def test_json_list_bad_byte_names_line_and_cannot_be_skipped(tmp_path):
    path = tmp_path / "d.json"
    data = json.dumps(ROWS, indent=1).encode().replace(b"bad 3", b"b\xe9d 3")
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    line = data[:offset].count(b"\n") + 1
    with pytest.raises(DataFormatError, match=rf"d\.json:{line}: not valid UTF-8: byte 0xe9 at line {line}, "
                       rf"column 17 \(byte offset {offset} in the file\).*convert it to JSON lines"):
        load_examples([str(path)], kind="pair", skip_bad_rows=True)


def test_parquet_cell_that_is_not_utf8_is_a_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"good 0", b"go\xffod 1", b"good 2"], pa.binary())
    chosen = pa.Array.from_buffers(pa.string(), 3, raw.buffers())  # parquet stores it unchecked
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": ["q0", "q1", "q2"], "chosen": chosen, "rejected": ["b0", "b1", "b2"]}), path)
    with pytest.raises(DataFormatError) as info:
        load_examples([path], kind="pair")
    assert (info.value.source, info.value.field_name) == (f"{path}:row 1", "chosen")
    assert "not valid UTF-8: byte 0xff at byte 2 of the value" in str(info.value)
    report = LoadReport()
    loaded = load_examples([path], kind="pair", skip_bad_rows=True, report=report)
    assert [ex.chosen for ex in loaded] == ["good 0", "good 2"] and report.num_skipped == 1


def test_utf8_text_with_a_bom_and_crlf_reads_as_before(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(row, ensure_ascii=False) for row in
                                                   [{**ROWS[0], "chosen": "café 😊"}, ROWS[1]]).encode() + b"\r\n")
    loaded = load_examples([str(path)], kind="pair")
    assert [(ex.chosen, ex.source) for ex in loaded] == [("café 😊", f"{path}:1"), ("good 1", f"{path}:2")]
