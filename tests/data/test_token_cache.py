"""Tokenization through a cached `datasets.map`: the same tokens and counts as in memory, reused while
the key holds, a new file when the data, template, tokenizer or max_length change."""

from __future__ import annotations

import copy

import pytest

from hpalign.data import token_cache
from hpalign.data.builtin import builtin_dataset
from hpalign.data.templates import resolve_template, tokenize_examples
from hpalign.data.types import LoadReport, PreferenceExample
from hpalign.tiny_model import build_byte_tokenizer


@pytest.fixture
def encode_calls(monkeypatch) -> list:
    """Every example the map function encodes."""
    calls: list = []
    real = token_cache.encode_examples
    monkeypatch.setattr(token_cache, "encode_examples", lambda examples, *a, **k: calls.extend(examples) or real(
        examples, *a, **k))
    return calls


def cached(examples, template, cache_dir, *, max_length=64) -> tuple[list, LoadReport]:
    report = LoadReport()
    tokenized = token_cache.tokenize_cached(examples, template, max_length=max_length, report=report,
                                            cache_dir=cache_dir, min_examples=0)
    return tokenized, report


@pytest.mark.parametrize("kind", ["pair", "kto", "sft", "prompt"])
def test_cached_tokens_and_counts_equal_the_in_memory_path(tmp_path, kind):
    template = resolve_template(build_byte_tokenizer())
    examples = builtin_dataset(kind, "test")
    expected_report = LoadReport()
    expected = tokenize_examples(examples, template, max_length=40, report=expected_report)
    assert expected_report.num_truncated + expected_report.num_truncated_response > 0  # truncation exercised
    for _ in range(2):  # written, then read back
        tokenized, report = cached(examples, template, tmp_path, max_length=40)
        assert tokenized == expected
        assert report == expected_report


def test_second_call_reads_the_cache_and_max_length_is_in_the_key(tmp_path, encode_calls):
    template = resolve_template(build_byte_tokenizer())
    pairs = builtin_dataset("pair", "test")
    first, _ = cached(pairs, template, tmp_path)
    assert len(encode_calls) == len(pairs) and len(list(tmp_path.iterdir())) == 1
    second, _ = cached(pairs, template, tmp_path)
    assert second == first and len(encode_calls) == len(pairs)  # nothing tokenized again
    other, _ = cached(pairs, template, tmp_path, max_length=32)
    assert len(encode_calls) == 2 * len(pairs) and len(list(tmp_path.iterdir())) == 2
    assert other != first


def test_key_changes_with_data_template_and_tokenizer_not_with_the_file_name():
    tokenizer = build_byte_tokenizer()
    template = resolve_template(tokenizer)
    pairs = builtin_dataset("pair", "test")
    key = token_cache.cache_key(pairs, template, max_length=64)
    edited = pairs[:5] + [PreferenceExample(pairs[5].prompt, pairs[5].chosen + "!", pairs[5].rejected,
                                            pairs[5].source)] + pairs[6:]
    moved = [PreferenceExample(p.prompt, p.chosen, p.rejected, p.source.replace("builtin", "elsewhere"))
             for p in pairs]
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["<extra>"])
    assert token_cache.cache_key(pairs, template, max_length=64) == key  # stable
    assert token_cache.cache_key(moved, template, max_length=64) == key
    assert token_cache.cache_key(edited, template, max_length=64) != key
    assert token_cache.cache_key(pairs, template, max_length=65) != key
    assert token_cache.cache_key(pairs, resolve_template(tokenizer, "chatml"), max_length=64) != key
    assert token_cache.cache_key(pairs, resolve_template(other_tokenizer), max_length=64) != key


def test_small_sets_stay_in_memory(tmp_path, encode_calls):
    template = resolve_template(build_byte_tokenizer())
    pairs = builtin_dataset("pair", "test")
    report = LoadReport()
    token_cache.tokenize_cached(pairs, template, max_length=64, report=report, cache_dir=tmp_path,
                                min_examples=len(pairs) + 1)
    assert list(tmp_path.iterdir()) == [] and encode_calls == []  # tokenize_examples, not the map


def test_unwritable_cache_falls_back_to_memory(tmp_path, caplog):
    template = resolve_template(build_byte_tokenizer())
    pairs = builtin_dataset("pair", "test")
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache folder should be: mkdir fails
    report = LoadReport()
    with caplog.at_level("WARNING", logger="hpalign"):
        tokenized = token_cache.tokenize_cached(pairs, template, max_length=64, report=report,
                                                cache_dir=blocker / "tokenized", min_examples=0)
    assert tokenized == tokenize_examples(pairs, template, max_length=64, report=LoadReport())
    assert "cannot write the token cache" in caplog.text
