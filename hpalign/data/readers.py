"""Reading rows from local files: .jsonl, .json, .parquet, .csv/.tsv and `datasets.save_to_disk`
folders. Each row comes with its source ("path:LINE", 1-based, for jsonl; "path:row N", 0-based,
otherwise); a row that cannot be read is yielded as a DataFormatError instead of stopping the file."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from typing import Any

from hpalign.data.types import DataFormatError

CSV_LIST_COLUMNS = ("prompt", "chosen", "rejected", "messages", "history", "completion")

Row = dict[str, Any]


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

        yield from _indexed(path, pq.read_table(path).to_pylist())
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


def _read_jsonl(path: str) -> Iterator[tuple[str, Row | DataFormatError]]:
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{path}:{line_no}"
            yield source, _parse_json_line(line, source)


def _parse_json_line(line: str, source: str) -> Row | DataFormatError:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        start = line.strip()[:60]
        return DataFormatError(source, None, f"invalid JSON ({err.msg}, column {err.colno}); line starts {start!r}")
    if not isinstance(row, dict):
        return DataFormatError(source, None, f"line is a JSON {type_name(row)}, expected an object")
    return row


def _read_json(path: str) -> Iterator[tuple[str, Row | DataFormatError]]:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a JSON-lines file named .json
            yield from _read_jsonl(path)
            return
        raise DataFormatError(f"{path}:{err.lineno}", None,
                              f"invalid JSON ({err.msg}, column {err.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataFormatError(path, None, "a .json data file must hold a list of objects or {\"data\": [...]}; "
                              f"found a {type_name(data)}")
    yield from _indexed(path, data)


def _read_csv(path: str, *, delimiter: str) -> Iterator[tuple[str, Row | DataFormatError]]:
    """CSV cells are strings: empty cells count as missing, JSON lists (history, messages) are decoded."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for index, raw in enumerate(csv.DictReader(handle, delimiter=delimiter)):
            row = {key: value for key, value in raw.items() if key is not None and value not in ("", None)}
            for key in CSV_LIST_COLUMNS:
                value = row.get(key)
                if isinstance(value, str) and value.lstrip().startswith("["):
                    try:
                        decoded = json.loads(value)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(decoded, list) and all(isinstance(item, (dict, list)) for item in decoded):
                        row[key] = decoded
            yield f"{path}:row {index}", row


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
    yield from _indexed(path, dataset.to_list())
