"""Reading rows from local files: .jsonl, .json, .parquet, .csv/.tsv and `datasets.save_to_disk`
folders. Each row comes with its source ("path:LINE", 1-based, for jsonl; "path:row N", 0-based,
otherwise); a row that cannot be read is yielded as a DataFormatError instead of stopping the file.

Bytes that are not UTF-8 are such a row too: text files are decoded with `errors="surrogateescape"`
(each bad byte becomes a lone surrogate U+DC80..U+DCFF, which valid UTF-8 never decodes to), so the
line or record holding one is named with its line, byte column and file offset, and only that row
is lost under --skip_bad_rows. A .json list is parsed whole: a bad byte in it stops the file.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from hpalign.data.types import DataFormatError

CSV_LIST_COLUMNS = ("prompt", "chosen", "rejected", "messages", "history", "completion")

Row = dict[str, Any]
BAD_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as errors="surrogateescape" decodes it
UTF8_HINT = ("re-encode the file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 FILE > FILE.utf8` for Windows/Latin-1 "
             "text)")


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for error messages."""
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- reading files


def read_rows(path: str) -> Iterator[tuple[str, Row | DataFormatError]]:
    """Yield (source, row) for each row of one local file or folder; a row that cannot even be
    parsed (bad JSON line) is yielded as its `DataFormatError` so the caller may skip it."""
    if not os.path.exists(path):
        raise ValueError(
            f"dataset '{path}' not found: no such local file or folder. hpalign does not fetch hub ids; "
            "download the data set and pass a local .jsonl/.json/.parquet/.csv file or a "
            "datasets.save_to_disk folder (or pass 'builtin-emoji').")
    if os.path.isdir(path):
        yield from _read_saved_dataset(path)
        return
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix in ("jsonl", "ndjson"):
        yield from _read_jsonl(path)
    elif suffix == "json":
        yield from _read_json(path)
    elif suffix == "parquet":
        import pyarrow.parquet as pq

        yield from _table_rows(path, pq.read_table(path))
    elif suffix in ("csv", "tsv"):
        yield from _read_csv(path, delimiter="\t" if suffix == "tsv" else ",")
    else:
        raise ValueError(f"{path}: unsupported file type '.{suffix}'; use .jsonl, .json, .parquet, .csv, "
                         ".tsv or a datasets.save_to_disk folder.")


def _indexed(path: str, rows: list[Any]) -> Iterator[tuple[str, Row | DataFormatError]]:
    for index, row in enumerate(rows):
        source = f"{path}:row {index}"
        yield source, row if isinstance(row, dict) else DataFormatError(
            source, None, f"row is a {type_name(row)}, expected an object with named columns")


# ----------------------------------------------------------------------------- bytes that are not UTF-8


def _byte_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))  # isascii: O(1)


def _has_bad_byte(line: str) -> bool:
    return not line.isascii() and BAD_BYTE.search(line) is not None


def _not_utf8_problem(line: str, *, line_no: int, line_offset: int) -> str:
    """Where the first bad byte of `line` (decoded with surrogateescape) sits, and what to do."""
    char = BAD_BYTE.search(line).start()
    column = _byte_len(line[:char]) + 1  # 1-based, in bytes
    return (f"not valid UTF-8: byte 0x{ord(line[char]) - 0xDC00:02x} at line {line_no}, column {column} "
            f"(byte offset {line_offset + column - 1} in the file); {UTF8_HINT}")


def _field_with_bad_byte(row: Any) -> str | None:
    """The column of a parsed row whose value holds a bad byte (best effort: None when unknown)."""
    if not isinstance(row, dict):
        return None
    return next((str(key) for key, value in row.items() if BAD_BYTE.search(json.dumps(value, ensure_ascii=False))
                 or BAD_BYTE.search(str(key))), None)


class _Lines:
    """The lines of a text file (bytes that are not UTF-8 kept as lone surrogates, line ends as they
    are), numbered, with the byte offset of each; remembers the lines read since `mark()`, so a
    record that spans lines (a quoted CSV cell) can name the line of its bad byte."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self.line_no, self.offset = 0, 0
        self.since_mark: list[tuple[int, int, str]] = []  # (line number, byte offset, line)

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.line_no += 1
        self.since_mark.append((self.line_no, self.offset, line))
        self.offset += _byte_len(line)
        return line.removeprefix("\ufeff") if self.line_no == 1 else line  # the BOM (utf-8-sig) is no text

    def mark(self) -> None:
        self.since_mark = []

    def bad_byte_problem(self) -> str | None:
        """Where the first bad byte of the lines since `mark()` is, or None."""
        for line_no, offset, line in self.since_mark:
            if _has_bad_byte(line):
                return _not_utf8_problem(line, line_no=line_no, line_offset=offset)
        return None


def _open_text(path: str):
    # newline="": lines keep their ends, so byte offsets add up; splitting is still universal
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


# ----------------------------------------------------------------------------- formats


def _read_jsonl(path: str) -> Iterator[tuple[str, Row | DataFormatError]]:
    with _open_text(path) as handle:
        offset = 0  # of the line, in bytes
        for line_no, raw in enumerate(handle, start=1):
            line_offset, offset = offset, offset + _byte_len(raw)
            line = raw.removeprefix("\ufeff") if line_no == 1 else raw  # a UTF-8 BOM is no text
            if not line.strip():
                continue
            source = f"{path}:{line_no}"
            if _has_bad_byte(raw):
                problem = _not_utf8_problem(raw, line_no=line_no, line_offset=line_offset)
                yield source, _not_utf8_row(line, source, problem)
            else:
                yield source, _parse_json_line(line, source)


def _not_utf8_row(line: str, source: str, problem: str) -> DataFormatError:
    try:
        field_name = _field_with_bad_byte(json.loads(line))
    except json.JSONDecodeError:
        field_name = None
    return DataFormatError(source, field_name, problem)


def _parse_json_line(line: str, source: str) -> Row | DataFormatError:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        start = line.strip()[:60]
        return DataFormatError(source, None, f"invalid JSON ({err.msg}, column {err.colno}); line starts {start!r}")
    if not isinstance(row, dict):
        return DataFormatError(source, None, f"line is a JSON {type_name(row)}, expected an object")
    return row


def _json_text_problem(path: str, text: str) -> DataFormatError | None:
    """A bad byte anywhere in a whole-file .json: an error for the whole file (it is parsed at once)."""
    bad = BAD_BYTE.search(text)
    if bad is None:
        return None
    start = text.rfind("\n", 0, bad.start()) + 1
    line_no = text.count("\n", 0, start) + 1
    end = text.find("\n", bad.start())
    line = text[start: end if end >= 0 else len(text)]
    problem = _not_utf8_problem(line, line_no=line_no, line_offset=_byte_len(text[:start]))
    return DataFormatError(f"{path}:{line_no}", None, f"{problem}. A .json list is read whole, so "
                           "--skip_bad_rows cannot skip this row: fix the file or convert it to JSON lines")


def _read_json(path: str) -> Iterator[tuple[str, Row | DataFormatError]]:
    with _open_text(path) as handle:
        text = handle.read()
    try:
        data = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a JSON-lines file named .json
            yield from _read_jsonl(path)
            return
        raise _json_text_problem(path, text) or DataFormatError(
            f"{path}:{err.lineno}", None, f"invalid JSON ({err.msg}, column {err.colno})") from None
    problem = _json_text_problem(path, text)
    if problem is not None:
        raise problem
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataFormatError(path, None, "a .json data file must hold a list of objects or {\"data\": [...]}; "
                              f"found a {type_name(data)}")
    yield from _indexed(path, data)


def _read_csv(path: str, *, delimiter: str) -> Iterator[tuple[str, Row | DataFormatError]]:
    """CSV cells are strings: empty cells count as missing, JSON lists (history, messages) are decoded.
    Rows as `csv.DictReader` gives them (blank lines skipped, cells past the header dropped); a record
    with a byte that is not UTF-8 is a bad row naming its line (a quoted cell may span lines)."""
    with _open_text(path) as handle:
        lines = _Lines(handle)
        records = csv.reader(lines, delimiter=delimiter)
        header = next(records, [])
        problem = lines.bad_byte_problem()
        if problem is not None:
            raise DataFormatError(f"{path}:1", None, f"the header: {problem}")
        lines.mark()
        index = 0
        for cells in records:
            if not cells:
                lines.mark()
                continue
            source, problem = f"{path}:row {index}", lines.bad_byte_problem()
            lines.mark()
            index += 1
            row = {key: value for key, value in zip(header, cells, strict=False) if value != ""}  # as DictReader
            yield source, _csv_row(row) if problem is None else DataFormatError(
                source, _field_with_bad_byte(row), problem)


def _csv_row(row: Row) -> Row:
    for key in CSV_LIST_COLUMNS:
        value = row.get(key)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                continue
            if isinstance(decoded, list) and all(isinstance(item, (dict, list)) for item in decoded):
                row[key] = decoded
    return row


def _table_rows(path: str, table: Any) -> Iterator[tuple[str, Row | DataFormatError]]:
    """Rows of a pyarrow table; a string cell that is not UTF-8 (parquet does not check) is a bad row."""
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:
        rows = None
    if rows is not None:
        yield from _indexed(path, rows)
        return
    for index in range(table.num_rows):  # slow path, only for a table with a bad cell
        source = f"{path}:row {index}"
        try:
            yield source, table.slice(index, 1).to_pylist()[0]
        except UnicodeDecodeError:
            yield source, _bad_cell(table.slice(index, 1), source)


def _bad_cell(row_table: Any, source: str) -> DataFormatError:
    for name in row_table.column_names:
        try:
            row_table.column(name).to_pylist()
        except UnicodeDecodeError as err:
            return DataFormatError(source, name, f"not valid UTF-8: byte 0x{err.object[err.start]:02x} at byte "
                                   f"{err.start} of the value; write the column as UTF-8 text (decode the source bytes with "
                                   "their real encoding before saving)")
    raise AssertionError(f"{source}: no column fails to decode")


def _read_saved_dataset(path: str) -> Iterator[tuple[str, Row | DataFormatError]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise ValueError(f"{path}: a folder must be a datasets.save_to_disk folder ({err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if "train" not in splits and len(splits) != 1:
            raise ValueError(f"{path}: DatasetDict with splits {splits} and no 'train'; save one split.")
        dataset = dataset["train" if "train" in splits else splits[0]]
    yield from _table_rows(path, dataset.with_format("arrow")[:])
