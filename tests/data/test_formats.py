"""Every input format, every error message, skip counting and the held-out split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hpalign.data.formats import load_examples, parse_label, split_examples
from hpalign.data.types import (
    DataFormatError,
    KTOExample,
    LoadReport,
    PreferenceExample,
    PromptExample,
    SFTExample,
    pairs_to_kto,
)

USER = {"role": "user", "content": "Hi"}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def load_one(tmp_path, row, kind="pair", **kwargs):
    return load_examples([write_jsonl(tmp_path / "d.jsonl", [row])], kind=kind, **kwargs)


# ----------------------------------------------------------------------------- pair formats


def test_flat_prompt_with_system_and_history(tmp_path):
    row = {"prompt": "And 3+3?", "chosen": "6", "rejected": "7", "system": "Be brief.",
           "history": [["1+1?", "2"], ["2+2?", "4"]], "margin": 1.5}
    [ex] = load_one(tmp_path, row)
    assert ex.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert (ex.chosen, ex.rejected, ex.margin) == ("6", "7", 1.5)
    assert ex.source.endswith("d.jsonl:1")


def test_swift_query_response_rejected_response(tmp_path):
    row = {"query": "Hi", "response": "Hello 😊", "rejected_response": "Hello", "history": []}
    [ex] = load_one(tmp_path, row)
    assert (ex.prompt, ex.chosen, ex.rejected) == ([USER], "Hello 😊", "Hello")


def test_trl_conversational_with_and_without_prompt_prefix(tmp_path):
    prompt = [{"role": "system", "content": "S"}, USER]
    rows = [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "A"}],
         "rejected": [{"role": "assistant", "content": "B"}]},
        {"prompt": prompt, "chosen": prompt + [{"role": "assistant", "content": "A"}], "rejected": "B"},
    ]
    loaded = load_examples([write_jsonl(tmp_path / "d.jsonl", rows)], kind="pair")
    assert [(ex.prompt, ex.chosen, ex.rejected) for ex in loaded] == [(prompt, "A", "B")] * 2


def test_trl_implicit_prompt(tmp_path):
    row = {"chosen": [USER, {"role": "assistant", "content": "A"}],
           "rejected": [USER, {"role": "assistant", "content": "B"}]}
    [ex] = load_one(tmp_path, row)
    assert (ex.prompt, ex.chosen, ex.rejected) == ([USER], "A", "B")


def test_messages_plus_rejected_response(tmp_path):
    row = {"messages": [USER, {"role": "assistant", "content": "A"}], "rejected_response": "B"}
    [ex] = load_one(tmp_path, row)
    assert (ex.prompt, ex.chosen, ex.rejected) == ([USER], "A", "B")


def test_hh_rlhf_raw_text_multi_turn(tmp_path):
    shared = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    row = {"chosen": shared + " 6.", "rejected": shared + " I won't say."}
    [ex] = load_one(tmp_path, row)
    assert ex.prompt == [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert (ex.chosen, ex.rejected) == ("6.", "I won't say.")


def test_chosen_identical_to_rejected_is_allowed(tmp_path):
    # loading keeps the row; pair training drops it, counted (tests/train/test_datasets.py)
    [ex] = load_one(tmp_path, {"prompt": "Hi", "chosen": "Same", "rejected": "Same"})
    assert ex.chosen == ex.rejected == "Same"


# ----------------------------------------------------------------------------- file types


ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]


def _check_rows(loaded, path):
    assert [(ex.prompt[-1]["content"], ex.chosen) for ex in loaded] == [(f"q{i}", f"good {i}") for i in range(3)]
    assert [ex.source for ex in loaded] == [f"{path}:row {i}" for i in range(3)]


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_and_data_object(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS} if wrap else ROWS))
    _check_rows(load_examples([str(path)], kind="pair"), str(path))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    _check_rows(load_examples([path], kind="pair"), path)


def test_csv_with_json_history_column(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected", "history", "margin"])
        writer.writeheader()
        for row in ROWS:
            writer.writerow({**row, "history": json.dumps([["a", "b"]]), "margin": "0.5"})
    loaded = load_examples([str(path)], kind="pair")
    _check_rows(loaded, str(path))
    assert loaded[0].prompt[:2] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert loaded[0].margin == 0.5


def test_save_to_disk_folder_and_concatenation(tmp_path):
    import datasets

    folder = str(tmp_path / "saved")
    datasets.Dataset.from_list(ROWS).save_to_disk(folder)
    _check_rows(load_examples([folder], kind="pair"), folder)
    jsonl = write_jsonl(tmp_path / "more.jsonl", ROWS[:1])
    report = LoadReport()
    assert len(load_examples([folder, jsonl], kind="pair", report=report)) == 4
    assert report.num_rows == 4


def test_missing_path_says_hub_ids_are_not_fetched():
    with pytest.raises(ValueError, match=r"shareai-llama3-dpo-zh-en-emoji.*does not fetch hub ids"):
        load_examples(["shareai-llama3-dpo-zh-en-emoji"], kind="pair")


def test_builtin_name_loads_builtin():
    assert len(load_examples(["builtin-emoji:test"], kind="pair")) == 64


# ----------------------------------------------------------------------------- errors


def test_bad_json_line_names_line_and_json_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x", "chosen" "y"}\n')
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: invalid JSON \(Expecting ':' delimiter") as info:
        load_examples([str(path)], kind="pair")
    assert info.value.source == f"{path}:2"


def test_missing_field_lists_columns_and_formats(tmp_path):
    with pytest.raises(DataFormatError, match=r"field 'rejected': missing\. Columns found: chosen, prompt\. "
                       r"Accepted formats: .*HH-RLHF") as info:
        load_one(tmp_path, {"prompt": "Hi", "chosen": "A"})
    assert info.value.field_name == "rejected"


def test_wrong_type(tmp_path):
    with pytest.raises(DataFormatError, match=r"d\.jsonl:1, field 'chosen': expected a string .* got a int"):
        load_one(tmp_path, {"prompt": "Hi", "chosen": 3, "rejected": "B"})


@pytest.mark.parametrize("field_name", ["chosen", "rejected"])
def test_empty_response(tmp_path, field_name):
    row = {"prompt": "Hi", "chosen": "A", "rejected": "B", field_name: "  \n"}
    with pytest.raises(DataFormatError, match=rf"field '{field_name}': the response is empty"):
        load_one(tmp_path, row)


def test_prompt_must_end_with_user(tmp_path):
    row = {"prompt": [USER, {"role": "assistant", "content": "x"}], "chosen": "A", "rejected": "B"}
    with pytest.raises(DataFormatError, match="must end with a user turn"):
        load_one(tmp_path, row)


def test_skip_bad_rows_counts_and_lists(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(ROWS[0])
    path.write_text("\n".join([good, "{not json", json.dumps({"prompt": "x", "chosen": "", "rejected": "r"}), good]) + "\n")
    report = LoadReport()
    loaded = load_examples([str(path)], kind="pair", skip_bad_rows=True, report=report)
    assert len(loaded) == 2
    assert (report.num_rows, report.num_skipped) == (4, 2)
    assert report.skipped[0].startswith(f"{path}:2: invalid JSON")
    assert report.skipped[1].startswith(f"{path}:3, field 'chosen'")


def test_error_hints_skip_flag_and_empty_dataset_is_error(tmp_path):
    with pytest.raises(DataFormatError, match="--skip_bad_rows"):
        load_one(tmp_path, {"prompt": "Hi"})
    with pytest.raises(ValueError, match="no usable pair examples"):
        load_one(tmp_path, {"prompt": "Hi"}, skip_bad_rows=True)


# ----------------------------------------------------------------------------- KTO and SFT


@pytest.mark.parametrize("raw, expected", [(True, True), (0, False), (1, True), ("TRUE", True), ("false", False),
                                           ("1", True), ("0", False)])
def test_kto_label_parsing(raw, expected):
    assert parse_label(raw, "s") is expected


@pytest.mark.parametrize("raw", ["yes", 2, None, "", [1]])
def test_kto_bad_label_names_the_row(raw):
    with pytest.raises(DataFormatError, match=r"^f\.jsonl:7, field 'label': expected true/false or 1/0"):
        parse_label(raw, "f.jsonl:7")


def test_kto_rows_and_pair_rows(tmp_path):
    rows = [
        {"prompt": "Hi", "completion": "Hello", "label": "False"},
        {"prompt": [USER], "completion": "Hey", "label": 1},
        {"messages": [USER, {"role": "assistant", "content": "Yo"}], "label": True},
        {"prompt": "Hi", "chosen": "A", "rejected": "B"},
    ]
    loaded = load_examples([write_jsonl(tmp_path / "k.jsonl", rows)], kind="kto")
    assert all(isinstance(ex, KTOExample) and ex.prompt == [USER] for ex in loaded)
    assert [(ex.completion, ex.label) for ex in loaded] == [
        ("Hello", False), ("Hey", True), ("Yo", True), ("A", True), ("B", False)]
    with pytest.raises(DataFormatError, match=r"d\.jsonl:1, field 'label': expected true/false"):
        load_one(tmp_path, {"prompt": "Hi", "completion": "x", "label": "maybe"}, kind="kto")


def test_pairs_to_kto():
    pair = PreferenceExample([USER], "A", "B", "s", margin=None)
    assert pairs_to_kto([pair]) == [KTOExample([USER], "A", True, "s"), KTOExample([USER], "B", False, "s")]


def test_sft_formats(tmp_path):
    rows = [
        {"query": "Hi", "response": "A"},
        {"messages": [USER, {"role": "assistant", "content": "B"}]},
        {"prompt": "Hi", "chosen": "C", "rejected": "x"},
    ]
    loaded = load_examples([write_jsonl(tmp_path / "s.jsonl", rows)], kind="sft")
    assert loaded == [SFTExample([USER], r, f"{tmp_path}/s.jsonl:{i + 1}") for i, r in enumerate("ABC")]


# ----------------------------------------------------------------------------- prompt (PPO)

SYSTEM = {"role": "system", "content": "Be brief."}
HISTORY_TURNS = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
ANSWER = {"role": "assistant", "content": "A"}


def load_prompts(tmp_path, rows, **kwargs) -> tuple[list, LoadReport]:
    report = LoadReport()
    loaded = load_examples([write_jsonl(tmp_path / "p.jsonl", rows)], kind="prompt", report=report, **kwargs)
    return loaded, report


# (row, the kind whose parser also reads it, responses dropped)
RESPONSE_ROWS = [
    ({"prompt": "Hi", "chosen": "A", "rejected": "B", "system": "Be brief.", "history": [["1+1?", "2"]]}, "pair", 2),
    ({"query": "Hi", "response": "A", "rejected_response": "B", "history": [["1+1?", "2"]]}, "pair", 2),
    ({"prompt": [SYSTEM, USER], "chosen": [ANSWER], "rejected": "B"}, "pair", 2),
    ({"messages": [SYSTEM, *HISTORY_TURNS, USER, ANSWER], "rejected_response": "B"}, "pair", 2),
    ({"chosen": [*HISTORY_TURNS, USER, ANSWER], "rejected": [*HISTORY_TURNS, USER, {**ANSWER, "content": "B"}]},
     "pair", 2),
    ({"chosen": "\n\nHuman: 1+1?\n\nAssistant: 2\n\nHuman: Hi\n\nAssistant: A",
      "rejected": "\n\nHuman: 1+1?\n\nAssistant: 2\n\nHuman: Hi\n\nAssistant: B"}, "pair", 2),
    ({"prompt": "Hi", "completion": "A", "label": False, "system": "Be brief."}, "kto", 1),
    ({"query": "Hi", "response": "A", "label": 1, "history": [["1+1?", "2"]]}, "kto", 1),
    ({"messages": [*HISTORY_TURNS, USER, ANSWER], "label": True}, "kto", 1),
    ({"query": "Hi", "response": "A", "system": "Be brief.", "history": [["1+1?", "2"]]}, "sft", 1),
    ({"prompt": [SYSTEM, *HISTORY_TURNS, USER], "response": [ANSWER]}, "sft", 1),
    ({"messages": [SYSTEM, USER, ANSWER]}, "sft", 1),
]


@pytest.mark.parametrize("row, kind, num_dropped", RESPONSE_ROWS,
                         ids=[f"{kind}-{i}" for i, (_, kind, _) in enumerate(RESPONSE_ROWS)])
def test_prompt_of_a_response_row_is_the_one_its_own_parser_builds(tmp_path, row, kind, num_dropped):
    [own] = load_one(tmp_path, row, kind=kind)[:1]
    [ex], report = load_prompts(tmp_path, [row])
    assert ex == PromptExample(own.prompt, f"{tmp_path}/p.jsonl:1")
    assert ex.prompt[-1] == USER
    assert report.num_dropped_responses == num_dropped


def test_prompt_keeps_system_and_history_of_response_rows(tmp_path):
    rows = [RESPONSE_ROWS[0][0], RESPONSE_ROWS[9][0]]  # pair prompt/chosen/rejected, SFT query/response
    loaded, report = load_prompts(tmp_path, rows)
    assert [ex.prompt for ex in loaded] == [[SYSTEM, *HISTORY_TURNS, USER]] * 2
    assert report.num_dropped_responses == 3


@pytest.mark.parametrize("row, prompt", [
    ({"prompt": "Hi"}, [USER]),
    ({"query": "Hi"}, [USER]),
    ({"prompt": "Hi", "system": "Be brief.", "history": [["1+1?", "2"]]}, [SYSTEM, *HISTORY_TURNS, USER]),
    ({"prompt": [SYSTEM, *HISTORY_TURNS, USER]}, [SYSTEM, *HISTORY_TURNS, USER]),
    ({"prompt": [{"from": "human", "value": "Hi"}], "response": None}, [USER]),  # a null response is none
    ({"messages": [SYSTEM, *HISTORY_TURNS, USER]}, [SYSTEM, *HISTORY_TURNS, USER]),
], ids=["string", "query", "string-system-history", "messages", "sharegpt-null-response", "conversation"])
def test_prompt_only_rows_drop_nothing(tmp_path, row, prompt):
    [ex], report = load_prompts(tmp_path, [row])
    assert isinstance(ex, PromptExample)
    assert ex.prompt == prompt
    assert report.num_dropped_responses == 0


def test_messages_with_and_without_final_assistant_turn(tmp_path):
    conversation = [SYSTEM, *HISTORY_TURNS, USER]
    rows = [{"messages": conversation + [ANSWER]}, {"messages": conversation}]
    loaded, report = load_prompts(tmp_path, rows)
    assert [ex.prompt for ex in loaded] == [conversation, conversation]
    assert report.num_dropped_responses == 1  # only the first row had an answer
    assert (report.num_rows, report.num_skipped) == (2, 0)


def test_prompt_dropped_responses_are_summed_over_rows(tmp_path):
    rows = [row for row, _, _ in RESPONSE_ROWS] + [{"prompt": "Hi"}]
    loaded, report = load_prompts(tmp_path, rows)
    assert len(loaded) == len(rows)  # one prompt per row, a pair row included
    assert report.num_dropped_responses == sum(n for _, _, n in RESPONSE_ROWS) == 18


@pytest.mark.parametrize("row, field_name, problem", [
    ({"prompt": [USER, ANSWER]}, "prompt", "the prompt must end with a user turn; it ends with assistant"),
    ({"messages": [ANSWER]}, "messages", "the prompt must end with a user turn; it ends with nothing"),
    ({"messages": [USER, {"role": "user", "content": " "}]}, "messages", "the last user turn is empty"),
    ({"prompt": 3}, "prompt", "expected a string or chat messages, got a int"),
    ({"prompt": "Hi", "history": "1+1?"}, "history", "expected a list of [query, response] pairs"),
    ({"prompt": "Hi", "chosen": "A", "rejected": ""}, "rejected", "the response is empty"),
    ({"query": "Hi", "response": 5}, "response", "expected a string or assistant messages, got a int"),
    ({"text": "Hi"}, "prompt", "missing. Columns found: text. Accepted formats: prompt or query"),
])
def test_prompt_bad_row_names_file_line_and_field(tmp_path, row, field_name, problem):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "fine"}, row])
    with pytest.raises(DataFormatError, match="--skip_bad_rows") as info:
        load_examples([str(path)], kind="prompt")
    assert str(info.value).startswith(f"{path}:2, field '{field_name}': {problem}")
    assert (info.value.source, info.value.field_name) == (f"{path}:2", field_name)


def test_prompt_skip_bad_rows_counts_and_does_not_count_their_responses(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": "Hi", "chosen": "A", "rejected": "B"}), "{not json",
             json.dumps({"prompt": "Hi", "chosen": "A", "rejected": ""}), json.dumps({"messages": [ANSWER]}),
             json.dumps({"prompt": "Hi"})]
    path.write_text("\n".join(lines) + "\n")
    report = LoadReport()
    loaded = load_examples([str(path)], kind="prompt", skip_bad_rows=True, report=report)
    assert [ex.source for ex in loaded] == [f"{path}:1", f"{path}:5"]
    assert (report.num_rows, report.num_skipped, report.num_dropped_responses) == (5, 3, 2)
    assert [entry.split(": ", 1)[0] for entry in report.skipped] == [
        f"{path}:2", f"{path}:3, field 'rejected'", f"{path}:4, field 'messages'"]


@pytest.mark.parametrize("suffix", ["json", "parquet", "csv"])
def test_prompt_rows_from_every_file_type(tmp_path, suffix):
    rows = [{"prompt": f"q{i}", "history": json.dumps([["a", "b"]]) if suffix == "csv" else [["a", "b"]]}
            for i in range(3)]
    path = str(tmp_path / f"p.{suffix}")
    if suffix == "json":
        Path(path).write_text(json.dumps(rows))
    elif suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "history"])
            writer.writeheader()
            writer.writerows(rows)
    loaded = load_examples([path], kind="prompt")
    assert [ex.prompt for ex in loaded] == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": f"q{i}"}]
        for i in range(3)]
    assert [ex.source for ex in loaded] == [f"{path}:row {i}" for i in range(3)]


def test_prompt_kind_builtin_and_unknown_kind():
    loaded = load_examples(["builtin-emoji:test"], kind="prompt")
    assert len(loaded) == 64 and all(isinstance(ex, PromptExample) for ex in loaded)
    with pytest.raises(ValueError, match=r"unknown data kind 'ppo'; expected one of \['kto', 'pair', 'prompt', 'sft'\]"):
        load_examples(["builtin-emoji"], kind="ppo")


# ----------------------------------------------------------------------------- split


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, held = split_examples(items, ratio=0.1, seed=3)
    assert (len(train), len(held)) == (90, 10)
    assert sorted(train + held) == items
    assert split_examples(items, ratio=0.1, seed=3) == (train, held)
    assert split_examples(items, ratio=0.1, seed=4) != (train, held)


def test_split_keeps_at_least_one_held_out():
    assert [len(part) for part in split_examples([1, 2, 3], ratio=0.01, seed=0)] == [2, 1]
    assert split_examples([1], ratio=0.5, seed=0) == ([1], [])
    assert split_examples([1, 2], ratio=0.0, seed=0) == ([1, 2], [])
    with pytest.raises(ValueError, match="split ratio"):
        split_examples([1, 2], ratio=1.0, seed=0)


def test_json_file_errors_and_jsonl_named_json(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "a",\n "chosen" 1}]')
    with pytest.raises(DataFormatError, match=r"broken\.json:3: invalid JSON \(Expecting ':' delimiter"):
        load_examples([str(broken)], kind="pair")
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(row) for row in ROWS))
    assert [ex.source for ex in load_examples([str(lines)], kind="pair")][-1] == f"{lines}:3"
    odd = tmp_path / "d.xlsx"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.xlsx'"):
        load_examples([str(odd)], kind="pair")


def test_sharegpt_roles_and_bad_role(tmp_path):
    row = {"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A"}], "rejected_response": "B"}
    [ex] = load_one(tmp_path, row)
    assert (ex.prompt, ex.chosen) == ([USER], "A")
    row = {"prompt": [{"role": "robot", "content": "Hi"}], "chosen": "A", "rejected": "B"}
    with pytest.raises(DataFormatError, match="message 0 has role 'robot'"):
        load_one(tmp_path, row)
