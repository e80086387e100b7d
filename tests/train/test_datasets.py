"""prepare_data: identical pairs counted, named and dropped; the built-in set loses nothing; the
tokenization goes through the rank-ordered cache."""

from __future__ import annotations

import json
import logging

import pytest

from hpalign.config import Config
from hpalign.data import token_cache
from hpalign.data.templates import drop_identical_pairs, resolve_template
from hpalign.data.types import LoadReport, TokenizedExample
from hpalign.tiny_model import build_byte_tokenizer
from hpalign.train.datasets import prepare_data


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def pair(i: int, chosen: str = "", rejected: str = "") -> dict:
    return {"prompt": f"question {i}", "chosen": chosen or f"good {i}", "rejected": rejected or f"bad {i}"}


def test_drop_identical_pairs_counts_and_names_them():
    examples = [TokenizedExample([1], [[2, 3], [2, 3]], "f.jsonl:1"), TokenizedExample([1], [[2], [3]], "f.jsonl:2"),
                TokenizedExample([1], [[4]], "f.jsonl:3")]  # one response (KTO / SFT): never a pair
    report = LoadReport()
    assert drop_identical_pairs(examples, report) == examples[1:]
    assert (report.num_identical_pairs, report.identical_pairs) == (1, ["f.jsonl:1"])


@pytest.mark.parametrize("rlhf_type", ["dpo", "cpo", "orpo", "simpo", "rm"])
def test_identical_pairs_are_dropped_counted_and_logged_with_their_lines(tmp_path, caplog, rlhf_type):
    from hpalign.algorithms import get_algorithm

    rows = [pair(i) for i in range(10)]
    for i in (2, 5, 6, 7, 8, 9):
        rows[i]["rejected"] = rows[i]["chosen"]
    rows[3] = pair(3, chosen="same start " + "x" * 300 + " tail A", rejected="same start " + "x" * 300 + " tail B")
    cfg = Config()
    cfg.data.dataset = [write_jsonl(tmp_path / "t.jsonl", rows)]
    cfg.data.val_dataset = [write_jsonl(tmp_path / "v.jsonl", [pair(0), pair(1, chosen="dup", rejected="dup")])]
    cfg.data.max_length = 128  # row 4 (line 4) differs only past the cut: identical tokens too
    with caplog.at_level(logging.WARNING, logger="hpalign"):
        data = prepare_data(cfg, get_algorithm(rlhf_type).data_kind, resolve_template(build_byte_tokenizer()))
    path = cfg.data.dataset[0]
    assert [ex.source for ex in data.train] == [f"{path}:{line}" for line in (1, 2, 5)]
    assert [ex.source for ex in data.val] == [ex.source for ex in data.val_pairs] == [f"{cfg.data.val_dataset[0]}:1"]
    assert data.report.num_identical_pairs == 8
    assert data.report.identical_pairs == [f"{path}:{line}" for line in (3, 4, 6, 7, 8, 9, 10)] + [
        f"{cfg.data.val_dataset[0]}:2"]
    assert (f"dropped 8 pairs whose chosen and rejected answers are identical (no preference to learn; their NLL "
            f"term goes with them): {path}:3; {path}:4; {path}:6; {path}:7; {path}:8 ...") in caplog.text


def test_only_identical_pairs_is_an_error(tmp_path):
    cfg = Config()
    cfg.data.dataset = [write_jsonl(tmp_path / "t.jsonl", [pair(i, chosen="same", rejected="same") for i in range(3)])]
    cfg.data.split_dataset_ratio = 0
    with pytest.raises(ValueError, match="all 3 training pairs have identical chosen and rejected answers"):
        prepare_data(cfg, "pair", resolve_template(build_byte_tokenizer()))


def test_kto_and_sft_rows_from_pair_files_are_not_dropped(tmp_path):
    cfg = Config()
    cfg.data.dataset = [write_jsonl(tmp_path / "t.jsonl", [pair(0), pair(1, chosen="same", rejected="same")])]
    cfg.data.split_dataset_ratio = 0
    template = resolve_template(build_byte_tokenizer())
    assert len(prepare_data(cfg, "sft", template).train) == 2
    kto = prepare_data(cfg, "kto", template)
    assert len(kto.train) == 4 and kto.report.num_identical_pairs == 0


def test_builtin_set_has_no_identical_pairs_and_loses_no_row():
    data = prepare_data(Config(), "pair", resolve_template(build_byte_tokenizer()))
    assert (len(data.train), len(data.val), data.report.num_identical_pairs) == (400, 64, 0)


def test_prepare_data_reuses_the_token_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(token_cache, "MIN_CACHED_EXAMPLES", 0)
    monkeypatch.setattr("hpalign.models.cache_root", lambda: tmp_path)  # token_cache_dir() default
    cfg = Config()
    cfg.data.dataset = [write_jsonl(tmp_path / "t.jsonl", [pair(i) for i in range(20)])]
    cfg.data.split_dataset_ratio = 0.1
    template = resolve_template(build_byte_tokenizer())
    with caplog.at_level(logging.INFO, logger="hpalign"):
        first = prepare_data(cfg, "pair", template)
        assert "read from the cache" not in caplog.text
        second = prepare_data(cfg, "pair", template)
    assert caplog.text.count("read from the cache") == 2  # train and held-out
    assert len(list((tmp_path / "tokenized").iterdir())) == 2
    assert (second.train, second.val, second.report) == (first.train, first.val, first.report)
