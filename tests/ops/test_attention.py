"""Packed (varlen) attention: packed rows give the same logits and gradients as sequences run alone."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hpalign.ops.attention import (
    FLASH_IMPL,
    SEGMENTS_KWARG,
    PackedSegments,
    enable_varlen_attention,
    packed_forward_kwargs,
    register_varlen_attention,
)
from hpalign.ops.linear_logprobs import hidden_logprobs
from hpalign.ops.segments import segment_count, segment_sum
from hpalign.tiny_model import build_tiny_llama

ROW_LEN = 16
LENGTHS = [5, 9, 3, 7, 4]
LAYOUT = [[0, 1], [2, 3, 4]]  # row 0: 14 tokens + 2 padding; row 1: 14 tokens + 2 padding


def make_sequences(vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size - 4, (n,), generator=gen) for n in LENGTHS]


def pack(seqs: list[torch.Tensor], layout=LAYOUT, row_len: int = ROW_LEN, pad_id: int = 0) -> dict:
    """Packed rows the way data/collate.py lays them out: sequences back to back, padding at row ends."""
    input_ids = torch.full((len(layout), row_len), pad_id)
    position_ids = torch.zeros(len(layout), row_len, dtype=torch.long)
    seq_index = torch.full((len(layout), row_len), -1)
    lengths = []
    for row, members in enumerate(layout):
        col = 0
        for i in members:
            n = len(seqs[i])
            input_ids[row, col : col + n] = seqs[i]
            position_ids[row, col : col + n] = torch.arange(n)
            seq_index[row, col : col + n] = i
            lengths.append(n)
            col += n
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": input_ids, "position_ids": position_ids, "seq_index": seq_index,
            "attention_mask": (seq_index >= 0).long(), "cu_seqlens": cu_seqlens}


def packed_rows(batch: dict, layout=LAYOUT) -> list[tuple[int, int, int]]:
    """(seq, row, start) of every sequence in the packed batch."""
    out = []
    for row, members in enumerate(layout):
        col = 0
        for i in members:
            out.append((i, row, col))
            col += LENGTHS[i]
    return out


def per_sequence_logits(model, seqs) -> list[torch.Tensor]:
    return [model(input_ids=s[None]).logits[0] for s in seqs]


@pytest.fixture
def model():
    m, _ = build_tiny_llama(seed=0)
    m.set_attn_implementation("sdpa")
    return m.eval()


def test_tiny_model_uses_gqa(model):
    assert model.config.num_key_value_heads < model.config.num_attention_heads


@pytest.mark.parametrize("num_kv_heads", [2, 4])
def test_packed_logits_equal_sequences_run_alone(num_kv_heads):
    model, _ = build_tiny_llama(seed=1, num_key_value_heads=num_kv_heads)
    model.set_attn_implementation("sdpa")
    model.eval()
    seqs = make_sequences(model.config.vocab_size)
    batch = pack(seqs)
    with torch.no_grad():
        expected = per_sequence_logits(model, seqs)
        assert enable_varlen_attention(model) == "sdpa_per_sequence"
        logits = model(input_ids=batch["input_ids"], **packed_forward_kwargs(batch)).logits
    for i, row, start in packed_rows(batch):
        torch.testing.assert_close(logits[row, start : start + LENGTHS[i]], expected[i], atol=1e-5, rtol=1e-5)
    # Padding rows come out finite (zeros before the output projection), never NaN.
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("with_padding_mask", [True, False])
def test_plain_sdpa_with_position_ids_leaks_across_sequences(model, with_padding_mask):
    """The failure mode the op exists for: RoPE positions restart, the causal mask does not
    (with a 2D padding mask, or without one under the default use_cache=True)."""
    seqs = make_sequences(model.config.vocab_size)
    batch = pack(seqs)
    mask = {"attention_mask": batch["attention_mask"]} if with_padding_mask else {}
    with torch.no_grad():
        expected = per_sequence_logits(model, seqs)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **mask).logits
    for i, row, start in packed_rows(batch):
        err = (logits[row, start : start + LENGTHS[i]] - expected[i]).abs().max().item()
        if start == 0:  # first sequence of a row has nothing before it to leak from
            assert err < 1e-5
        else:
            assert err > 1e-2, f"sequence {i} unexpectedly isolated (err {err})"


def test_unpacked_calls_are_plain_sdpa(model):
    seqs = make_sequences(model.config.vocab_size)
    ids = torch.zeros(len(seqs), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        enable_varlen_attention(model)
        padded = model(input_ids=ids, attention_mask=mask).logits
        unmasked = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        expected_unmasked = model(input_ids=ids).logits
    torch.testing.assert_close(padded, expected, atol=0, rtol=0)
    torch.testing.assert_close(unmasked, expected_unmasked, atol=0, rtol=0)


def token_logps_sum(logits_RLV: torch.Tensor, ids_RL: torch.Tensor, keep_RL: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probs over kept positions (a DPO-like objective)."""
    logps = F.log_softmax(logits_RLV[:, :-1].float(), -1).gather(-1, ids_RL[:, 1:, None]).squeeze(-1)
    return (logps * keep_RL[:, 1:]).sum()


def packed_objective(model, batch, weights) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], use_cache=False, **packed_forward_kwargs(batch)).logits
    same_seq = (batch["seq_index"][:, 1:] == batch["seq_index"][:, :-1]) & (batch["seq_index"][:, 1:] >= 0)
    keep = torch.cat([torch.zeros(len(same_seq), 1, dtype=torch.bool), same_seq], 1)
    return token_logps_sum(logits, batch["input_ids"], keep.float() * weights)


def padded_objective(model, seqs, weights_per_seq) -> torch.Tensor:
    ids = torch.zeros(len(seqs), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    keep = torch.zeros(len(seqs), max(LENGTHS))
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
        keep[i, : len(s)] = weights_per_seq[i]
    return token_logps_sum(model(input_ids=ids, attention_mask=mask).logits, ids, keep)


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def run_gradient_comparison(model, base) -> None:
    seqs = make_sequences(base.config.vocab_size)
    batch = pack(seqs)
    weights_per_seq = [1.0, 0.5, 2.0, -1.0, 0.25]  # distinct weights: a mix-up of sequences shows
    weights = torch.zeros(batch["seq_index"].shape)
    for i, w in enumerate(weights_per_seq):
        weights[batch["seq_index"] == i] = w
    base.set_attn_implementation("sdpa")
    want_loss = padded_objective(model, seqs, weights_per_seq)
    want = grads_of(model, want_loss)
    enable_varlen_attention(model)
    got_loss = packed_objective(model, batch, weights)
    got = grads_of(model, got_loss)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert_grads_close(got, want)


def test_packed_gradients_equal_padded(model):
    run_gradient_comparison(model, model)


def test_packed_gradients_with_gradient_checkpointing(model):
    model.train()  # dropout is 0 in the tiny config; train() makes checkpointing active
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    run_gradient_comparison(model, model)


def test_packed_gradients_with_lora(model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             init_lora_weights=False)  # random B: the adapters change the output
    lora_model = peft.get_peft_model(model, config)
    run_gradient_comparison(lora_model, lora_model.get_base_model())
    assert lora_model.get_base_model().config._attn_implementation == "hpalign_varlen"
    # Only the adapters train, and they did receive gradients.
    assert all("lora_" in n for n, p in lora_model.named_parameters() if p.requires_grad)


def test_packed_sequence_logps_through_backbone_head_and_segments(model):
    """The training path: backbone on packed rows -> hidden_logprobs -> segment_sum per sequence."""
    seqs = make_sequences(model.config.vocab_size)
    batch = pack(seqs)
    ids, seq_index = batch["input_ids"], batch["seq_index"]
    labels = torch.full_like(ids, -100)  # shifted: position t predicts token t + 1 of its own sequence
    same_seq = (seq_index[:, 1:] == seq_index[:, :-1]) & (seq_index[:, :-1] >= 0)
    labels[:, :-1] = torch.where(same_seq, ids[:, 1:], -100)
    enable_varlen_attention(model)
    hidden = model.model(input_ids=ids, use_cache=False, **packed_forward_kwargs(batch)).last_hidden_state
    token_logps = hidden_logprobs(hidden.flatten(0, 1), model.lm_head, labels.flatten(), chunk_rows=8)
    logps_S = segment_sum(token_logps, seq_index.flatten(), len(seqs))
    counts_S = segment_count(seq_index.flatten(), labels.flatten() != -100, len(seqs))
    model.set_attn_implementation("sdpa")
    for i, s in enumerate(seqs):
        want = F.log_softmax(model(input_ids=s[None]).logits[0, :-1].double(), -1).gather(1, s[1:, None]).sum()
        torch.testing.assert_close(logps_S[i].double(), want, atol=1e-4, rtol=1e-5)
        assert counts_S[i] == len(s) - 1


def test_cu_seq_lens_alone_also_isolates(model):
    """Transformers-style kwargs without our precomputed segments (e.g. from another collator)."""
    seqs = make_sequences(model.config.vocab_size)
    batch = pack(seqs)
    kwargs = packed_forward_kwargs(batch)
    kwargs.pop(SEGMENTS_KWARG)
    with torch.no_grad():
        expected = per_sequence_logits(model, seqs)
        enable_varlen_attention(model)
        logits = model(input_ids=batch["input_ids"], **kwargs).logits
    for i, row, start in packed_rows(batch):
        torch.testing.assert_close(logits[row, start : start + LENGTHS[i]], expected[i], atol=1e-5, rtol=1e-5)


def fake_flash_attn(calls: list) -> types.ModuleType:
    """A pure-torch flash_attn_varlen_func with flash-attn's layout: q [T, H, D], k/v [T, Hkv, D]."""

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                               causal=False):
        calls.append((cu_q.clone(), cu_k.clone(), max_q, max_k, causal, q.shape, k.shape))
        assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.numel() == cu_k.numel()
        out = torch.empty_like(q)
        q_bounds, k_bounds = cu_q.tolist(), cu_k.tolist()
        for s, e, ks, ke in zip(q_bounds[:-1], q_bounds[1:], k_bounds[:-1], k_bounds[1:], strict=True):
            # flash-attn >= 2.1: with more keys than queries the causal mask is aligned bottom-right
            mask = torch.ones(e - s, ke - ks, dtype=torch.bool).tril(ke - ks - (e - s)) if causal else None
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[ks:ke].transpose(0, 1),
                                               v[ks:ke].transpose(0, 1), attn_mask=mask, scale=softmax_scale,
                                               enable_gqa=True)
            out[s:e] = o.transpose(0, 1)
        return out

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def test_flash_backend_layout_with_a_reference_kernel(model, monkeypatch):
    """The flash path's reshapes and cu_seqlens, checked with a torch stand-in for flash-attn."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    seqs = make_sequences(model.config.vocab_size)
    batch = pack(seqs)
    with torch.no_grad():
        expected = per_sequence_logits(model, seqs)
        register_varlen_attention()
        model.set_attn_implementation(FLASH_IMPL)
        logits = model(input_ids=batch["input_ids"], **packed_forward_kwargs(batch)).logits
    for i, row, start in packed_rows(batch):
        torch.testing.assert_close(logits[row, start : start + LENGTHS[i]], expected[i], atol=1e-5, rtol=1e-5)
    assert len(calls) == model.config.num_hidden_layers
    cu_q, _, max_q, _, causal, q_shape, k_shape = calls[0]
    assert cu_q.tolist() == [0, 5, 14, 16, 19, 26, 30, 32] and max_q == 9 and causal
    assert q_shape[0] == k_shape[0] == 2 * ROW_LEN and k_shape[1] == model.config.num_key_value_heads


def test_packed_forward_kwargs_segments():
    batch = pack(make_sequences(100))
    kwargs = packed_forward_kwargs(batch)
    # Flat bounds over all 2 x 16 positions: sequences and the padding run at each row end.
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 14, 16, 19, 26, 30, 32]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 9
    assert kwargs["position_ids"] is batch["position_ids"]
    segments = kwargs[SEGMENTS_KWARG]
    assert isinstance(segments, PackedSegments) and segments.row_len == ROW_LEN
    assert segments.bounds == ((0, 0, 5, True), (0, 5, 14, True), (0, 14, 16, False),
                               (1, 0, 3, True), (1, 3, 10, True), (1, 10, 14, True), (1, 14, 16, False))
    assert segments.key_index is None and segments.key_lengths == segments.query_lengths
    full_rows = pack(make_sequences(100), layout=[[0, 1, 4]], row_len=18)  # no padding at all
    assert packed_forward_kwargs(full_rows)["cu_seq_lens_q"].tolist() == [0, 5, 14, 18]


def test_packed_forward_kwargs_rejects_inconsistent_batches():
    batch = pack(make_sequences(100))
    bad_positions = dict(batch, position_ids=torch.arange(ROW_LEN).expand(2, -1).clone())
    with pytest.raises(ValueError, match="restart at 0"):
        packed_forward_kwargs(bad_positions)
    assert packed_forward_kwargs(batch)["max_length_q"] == 9  # the true cu_seqlens [0, 5, 14, 17, 24, 28] passes
    bad_cu = dict(batch, cu_seqlens=torch.tensor([0, 5, 14, 18, 24, 28], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_forward_kwargs(bad_cu)
    split = dict(batch, seq_index=batch["seq_index"].clone())
    split["seq_index"][1, :3] = 0  # sequence 0 now also appears in row 1
    with pytest.raises(ValueError, match="two separate runs"):
        packed_forward_kwargs(split)
    with pytest.raises(ValueError, match="seq_index"):
        packed_forward_kwargs({"position_ids": batch["position_ids"]})


def test_enable_reports_and_logs_backend(model, caplog):
    with caplog.at_level(logging.INFO, logger="hpalign"):
        assert enable_varlen_attention(model) == "sdpa_per_sequence"
    assert "sdpa_per_sequence" in caplog.text
    assert model.config._attn_implementation == "hpalign_varlen"
    with pytest.raises(RuntimeError, match="flash-attn"):
        enable_varlen_attention(model, backend="flash_varlen")
    with pytest.raises(ValueError, match="backend"):
        enable_varlen_attention(model, backend="eager")


def shared_prompt_batch(vocab_size: int):
    """Two pairs with shared prompts (hpalign.data.collate) and the same pairs unshared."""
    from hpalign.data.collate import pack_batch
    from hpalign.data.types import TokenizedExample

    gen = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(0, vocab_size - 4, (n,), generator=gen).tolist()  # noqa: E731
    examples = [TokenizedExample(ids(6), [ids(4), ids(5)], "a"), TokenizedExample(ids(3), [ids(2), ids(7)], "b")]
    return pack_batch(examples, pad_id=0, share_prompt=True), pack_batch(examples, pad_id=0)


def per_sequence_outputs(logits, batch) -> dict[int, torch.Tensor]:
    """sequence id -> the logits of its loss-bearing tokens (those that predict a response token)."""
    flat_logits, flat_ids, flat_labels = logits.flatten(0, 1), batch.seq_index.flatten(), batch.labels.flatten()
    return {s: flat_logits[(flat_ids == s) & (flat_labels != -100)] for s in range(batch.num_sequences)}


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_shared_prompt_branches_see_exactly_their_unshared_context(model, backend, monkeypatch):
    """A branch (rejected answer) attending to the prompt laid out once gives the logits it gets
    with its own copy of the prompt, on the SDPA path and on the flash path (torch stand-in)."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    shared, unshared = shared_prompt_batch(model.config.vocab_size)
    register_varlen_attention()
    with torch.no_grad():
        model.set_attn_implementation(FLASH_IMPL if backend == "flash" else "hpalign_varlen")
        logits_shared = model(input_ids=shared.input_ids, use_cache=False, **packed_forward_kwargs(shared)).logits
        model.set_attn_implementation("hpalign_varlen")
        logits_unshared = model(input_ids=unshared.input_ids, use_cache=False,
                                **packed_forward_kwargs(unshared)).logits
    got, expected = per_sequence_outputs(logits_shared, shared), per_sequence_outputs(logits_unshared, unshared)
    for s in range(shared.num_sequences):
        torch.testing.assert_close(got[s], expected[s], atol=1e-5, rtol=1e-5)
    if backend == "flash":
        cu_q, cu_k, max_q, max_k, *_ = calls[0]
        assert cu_k.tolist() == [0, 10, 10 + 5 + 6, 21 + 5, 26 + 3 + 7]  # keys: own + 5 and + 2 prompt tokens
        assert (max_q, max_k) == (10, 11)


def test_shared_context_must_be_in_the_same_row(model):
    shared, _ = shared_prompt_batch(model.config.vocab_size)
    broken = dict(position_ids=shared.position_ids, seq_index=shared.seq_index.clone(),
                  context_seq=torch.tensor([-1, 0, -1, 7]), context_len=shared.context_len)
    with pytest.raises(ValueError, match="not in the same packed row"):
        packed_forward_kwargs(broken)
    too_long = dict(position_ids=shared.position_ids, seq_index=shared.seq_index,
                    context_seq=shared.context_seq, context_len=torch.tensor([0, 50, 0, 2]))
    with pytest.raises(ValueError, match="context of 50 tokens"):
        packed_forward_kwargs(too_long)
