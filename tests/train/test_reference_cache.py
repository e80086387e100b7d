"""The reference log-prob cache: its key, its file, and the one pass that fills it."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hpalign.data.builtin import builtin_dataset
from hpalign.data.collate import pack_batch, pad_batch
from hpalign.data.templates import resolve_template, tokenize_examples
from hpalign.data.types import LoadReport, TokenizedExample
from hpalign.ops.attention import enable_varlen_attention
from hpalign.tiny_model import build_tiny_llama
from hpalign.train.forward import sequence_stats
from hpalign.train.reference_cache import (
    load_reference_cache,
    model_fingerprint,
    precompute_reference_logps,
    reference_cache_key,
    save_reference_cache,
)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_llama(seed=0)
    return model.float().eval(), tokenizer


@pytest.fixture(scope="module")
def examples(tiny) -> list[TokenizedExample]:
    _, tokenizer = tiny
    pairs = builtin_dataset("pair")[:7]
    return tokenize_examples(pairs, resolve_template(tokenizer), max_length=128, report=LoadReport())


def key_of(examples, *, spec="tiny-random-llama", fingerprint="f" * 64, template="chatml", max_length=128):
    return reference_cache_key(model_spec=spec, model_fingerprint=fingerprint, template_name=template,
                               examples=examples, max_length=max_length)


def test_key_is_stable_and_changes_with_each_input(examples):
    base = key_of(examples)
    assert base == key_of(copy.deepcopy(examples)), "same inputs, same key"
    assert len(base) == 64
    changed = copy.deepcopy(examples)
    changed[3].responses[1][-1] += 1  # one token of one rejected answer
    moved = copy.deepcopy(examples)  # the same tokens, a boundary moved from prompt to response
    moved[0].responses[0].insert(0, moved[0].prompt_ids.pop())
    others = [
        key_of(changed), key_of(moved), key_of(examples[:-1]), key_of(examples[::-1]),
        key_of(examples, spec="/models/other"), key_of(examples, fingerprint="0" * 64),
        key_of(examples, template="tokenizer"), key_of(examples, max_length=256),
    ]
    assert base not in others and len(set(others)) == len(others)


def test_key_ignores_what_the_numbers_do_not_depend_on(examples):
    renamed = copy.deepcopy(examples)
    for ex in renamed:
        ex.source = "elsewhere.jsonl:1"
    assert key_of(renamed) == key_of(examples)


def test_model_fingerprint_tracks_weights_and_config(tiny):
    model, _ = tiny
    same = copy.deepcopy(model)
    assert model_fingerprint(same) == model_fingerprint(model)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        next(edited.parameters()).view(-1)[0] += 1.0
    assert model_fingerprint(edited) != model_fingerprint(model)
    reseeded, _ = build_tiny_llama(seed=1)
    assert model_fingerprint(reseeded.float()) != model_fingerprint(model)
    reconfigured = copy.deepcopy(model)
    reconfigured.config.rope_theta = 1234.0
    assert model_fingerprint(reconfigured) != model_fingerprint(model)


def test_save_load_round_trip_and_mismatch(tmp_path, caplog):
    logps_ER = torch.randn(5, 2, dtype=torch.float64)
    path = tmp_path / "cache" / "ref_logps.safetensors"
    save_reference_cache(path, logps_ER, "k" * 64)
    loaded = load_reference_cache(path, "k" * 64)
    assert loaded is not None and loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, logps_ER.float(), rtol=0, atol=0)
    assert not list(path.parent.glob("*.tmp")), "the temporary file was left behind"
    with caplog.at_level(logging.INFO, logger="hpalign"):
        assert load_reference_cache(path, "j" * 64) is None
        assert "another model, template or data set" in caplog.text
        assert load_reference_cache(tmp_path / "missing.safetensors", "k" * 64) is None
        assert "not found" in caplog.text
        (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
        assert load_reference_cache(tmp_path / "junk.safetensors", "k" * 64) is None
        assert "unreadable" in caplog.text


@pytest.mark.parametrize("packed", [False, True])
def test_precompute_equals_per_batch_reference_stats(tiny, examples, packed):
    model, tokenizer = tiny
    enable_varlen_attention(model)
    pad_id = tokenizer.pad_token_id

    def make_batch(indices: list[int]):
        chosen = [examples[i] for i in indices]
        return pack_batch(chosen, pad_id=pad_id, max_tokens_per_row=256) if packed else pad_batch(chosen, pad_id=pad_id)

    calls: list[list[int]] = []

    def reference_stats(batch):
        calls.append(batch.num_examples)
        assert not torch.is_grad_enabled()
        return sequence_stats(model, batch, packed=packed)

    logps_ER = precompute_reference_logps(reference_stats, make_batch, len(examples), batch_size=3,
                                          show_progress=False)
    assert logps_ER.shape == (len(examples), 2) and logps_ER.dtype == torch.float32
    assert calls == [3, 3, 1] and not logps_ER.requires_grad
    # The same numbers as the reference run on each training micro-batch (other groupings too).
    for indices in ([0, 1], [2, 3, 4, 5], [6]):
        with torch.no_grad():
            want = sequence_stats(model, make_batch(indices), packed=packed).logps_ER
        torch.testing.assert_close(logps_ER[indices], want, rtol=1e-5, atol=1e-5)


def test_precompute_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        precompute_reference_logps(lambda b: b, lambda i: i, 3, batch_size=0, show_progress=False)
