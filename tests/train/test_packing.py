"""Packed rows give the same per-sequence log-probs, DPO loss and gradients as one padded sequence per row.

Both batches go through the trainer's own path, `hpalign.train.forward.sequence_stats`: packed=True
uses varlen attention (sequences in a row never attend to each other), packed=False the padding
mask. Examples are the built-in preference pairs, tokenized with the model's chat template.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from hpalign.algorithms import dpo_objective
from hpalign.data.builtin import builtin_dataset
from hpalign.data.collate import example_lengths, pack_batch, pad_batch
from hpalign.data.templates import resolve_template, tokenize_examples
from hpalign.data.types import LoadReport, TokenizedExample
from hpalign.hyperparams import DPOParams
from hpalign.ops.attention import enable_varlen_attention
from hpalign.stats import SequenceStats, StepCounts
from hpalign.tiny_model import build_tiny_llama
from hpalign.train.forward import sequence_stats

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; summed log-probs are O(100), so rtol carries the bound


def tokenized_pairs(tokenizer, num_pairs: int, *, max_length: int, seed: int = 0) -> list[TokenizedExample]:
    """`num_pairs` built-in pairs of varied length (drawn at random, so prompts differ in history)."""
    pairs = builtin_dataset("pair")
    chosen = random.Random(seed).sample(range(len(pairs)), num_pairs)
    template = resolve_template(tokenizer)
    return tokenize_examples([pairs[i] for i in chosen], template, max_length=max_length, report=LoadReport())


def rows_budget(examples: list[TokenizedExample], *, share_prompt: bool = False) -> int:
    """A row budget that fits the longest example but forces several rows."""
    return max(example_lengths(examples, share_prompt=share_prompt))


def step_counts(stats: SequenceStats) -> StepCounts:
    tokens_ER = stats.num_tokens_ER
    return StepCounts(num_examples=float(tokens_ER.shape[0]), num_tokens=float(tokens_ER.sum()),
                      num_chosen_tokens=float(tokens_ER[:, 0].sum()))


def dpo_loss_and_grads(policy, reference, batch, *, packed: bool) -> tuple[SequenceStats, torch.Tensor, dict]:
    """(policy stats, DPO loss (rpo_alpha 1), gradients of every trainable parameter)."""
    with torch.no_grad():
        ref_stats = sequence_stats(reference, batch, packed=packed)
    stats = sequence_stats(policy, batch, packed=packed)
    cfg = DPOParams(beta=0.1, rpo_alpha=1.0)
    loss, _ = dpo_objective(stats, ref_stats, step_counts(stats), cfg)
    params = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return stats, loss.detach(), dict(zip(params, grads, strict=True))


def assert_packed_equals_padded(policy, reference, examples: list[TokenizedExample], pad_id: int, *,
                                share_prompt: bool = False) -> None:
    enable_varlen_attention(policy)
    enable_varlen_attention(reference)
    padded = pad_batch(examples, pad_id=pad_id)
    packed = pack_batch(examples, pad_id=pad_id, max_tokens_per_row=rows_budget(examples, share_prompt=share_prompt),
                        share_prompt=share_prompt)
    assert 1 < packed.input_ids.shape[0] < padded.input_ids.shape[0], "the test needs several packed rows"
    assert packed.num_loss_tokens == padded.num_loss_tokens
    if share_prompt:  # each prompt but its last token is laid out once per pair, not twice
        saved = sum(len(ex.prompt_ids) - 1 for ex in examples)
        assert int(packed.attention_mask.sum()) == int(padded.attention_mask.sum()) - saved

    stats_pad, loss_pad, grads_pad = dpo_loss_and_grads(policy, reference, padded, packed=False)
    stats_pack, loss_pack, grads_pack = dpo_loss_and_grads(policy, reference, packed, packed=True)
    assert torch.equal(stats_pack.num_tokens_ER, stats_pad.num_tokens_ER)
    torch.testing.assert_close(stats_pack.logps_ER.detach(), stats_pad.logps_ER.detach(), **TOL)
    torch.testing.assert_close(loss_pack, loss_pad, **TOL)
    assert grads_pad and any(g.abs().max() > 0 for g in grads_pad.values()), "no gradient reached the parameters"
    for name, grad in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def lora_policy(model, *, targets: list[str], seed: int = 0):
    """The model with LoRA adapters whose B is random (not 0), so every adapter gets a gradient.
    The reference is the same model with the adapter off, as in training."""
    from hpalign.models import apply_lora

    policy = apply_lora(model, targets=targets, rank=4, alpha=8, dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return policy


def adapter_off_reference(policy, batch, *, packed: bool) -> SequenceStats:
    from hpalign.models import reference_forward_context

    with reference_forward_context(policy):
        return sequence_stats(policy, batch, packed=packed)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(seed=0)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_tiny_full_model_packed_equals_padded(tiny, share_prompt):
    model, tokenizer = tiny
    policy = copy.deepcopy(model).float()
    reference = copy.deepcopy(model).float()
    with torch.no_grad():  # a reference that differs from the policy, as after some training
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    examples = tokenized_pairs(tokenizer, 6, max_length=256)
    assert_packed_equals_padded(policy, reference, examples, tokenizer.pad_token_id, share_prompt=share_prompt)


def lora_case(model, tokenizer, examples: list[TokenizedExample], *, targets: list[str],
              share_prompt: bool = False) -> None:
    """LoRA policy, adapter-off reference: packed == padded for stats, loss and LoRA gradients."""
    policy = lora_policy(model, targets=targets)
    enable_varlen_attention(policy)
    pad_id = tokenizer.pad_token_id
    padded = pad_batch(examples, pad_id=pad_id)
    packed = pack_batch(examples, pad_id=pad_id, max_tokens_per_row=rows_budget(examples, share_prompt=share_prompt),
                        share_prompt=share_prompt)
    assert 1 < packed.input_ids.shape[0] < padded.input_ids.shape[0]
    results = {}
    for name, batch, is_packed in (("padded", padded, False), ("packed", packed, True)):
        ref_stats = adapter_off_reference(policy, batch, packed=is_packed)
        stats = sequence_stats(policy, batch, packed=is_packed)
        cfg = DPOParams(beta=0.1, rpo_alpha=1.0)
        loss, _ = dpo_objective(stats, ref_stats, step_counts(stats), cfg)
        params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        assert params and all("lora_" in n for n in params)
        grads = torch.autograd.grad(loss, list(params.values()))
        results[name] = (stats.logps_ER.detach(), ref_stats.logps_ER, loss.detach(), dict(zip(params, grads,
                                                                                             strict=True)))
    (logps_pad, ref_pad, loss_pad, grads_pad), (logps_pack, ref_pack, loss_pack, grads_pack) = (
        results["padded"], results["packed"])
    torch.testing.assert_close(logps_pack, logps_pad, **TOL)
    torch.testing.assert_close(ref_pack, ref_pad, **TOL)
    assert not torch.allclose(logps_pad, ref_pad), "the adapter changed nothing: the test would prove little"
    torch.testing.assert_close(loss_pack, loss_pad, **TOL)
    assert any(g.abs().max() > 0 for g in grads_pad.values())
    for name, grad in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("share_prompt", [False, True])
def test_tiny_lora_packed_equals_padded(tiny, share_prompt):
    model, tokenizer = tiny
    examples = tokenized_pairs(tokenizer, 6, max_length=256, seed=1)
    lora_case(copy.deepcopy(model).float(), tokenizer, examples, targets=["ALL"], share_prompt=share_prompt)


@pytest.mark.slow
def test_smollm2_lora_packed_equals_padded():
    from hpalign.models import load_policy, load_tokenizer

    model = load_policy(None, dtype=torch.float32)
    tokenizer = load_tokenizer(None)
    examples = tokenized_pairs(tokenizer, 3, max_length=80, seed=2)
    assert max(example_lengths(examples)) <= 2 * 80
    lora_case(model, tokenizer, examples, targets=["DEFAULT"], share_prompt=True)


# ----------------------------------------------------------------------------- pairs stay whole


def example_rows(batch) -> dict[int, list[int]]:
    """sequence id -> the rows holding its tokens."""
    rows: dict[int, list[int]] = {}
    for r in range(batch.seq_index.shape[0]):
        for s in batch.seq_index[r].unique().tolist():
            if s >= 0:
                rows.setdefault(s, []).append(r)
    return rows


def synthetic_pairs(lengths: list[tuple[int, int, int]]) -> list[TokenizedExample]:
    """Pairs of the given (prompt, chosen, rejected) lengths; token ids encode (example, part)."""
    return [TokenizedExample([3] * p, [[4 + e] * c, [5 + e] * r], f"synthetic:{e}")
            for e, (p, c, r) in enumerate(lengths)]


@pytest.mark.parametrize("seed", range(5))
def test_pack_batch_never_splits_a_pair(seed):
    rng = random.Random(seed)
    lengths = [(rng.randint(1, 40), rng.randint(1, 30), rng.randint(1, 30)) for _ in range(12)]
    examples = synthetic_pairs(lengths)
    budget = max(example_lengths(examples)) + rng.randint(0, 20)
    batch = pack_batch(examples, pad_id=0, max_tokens_per_row=budget)
    assert batch.input_ids.shape[0] >= 3, "the budget should force several rows"
    rows = example_rows(batch)
    assert sorted(rows) == list(range(2 * len(examples)))
    for e, (p, c, r) in enumerate(lengths):
        chosen, rejected = 2 * e, 2 * e + 1
        assert len(rows[chosen]) == 1 and rows[chosen] == rows[rejected], f"pair {e} split over rows"
        # chosen then rejected, back to back, each its full prompt + response length
        row = rows[chosen][0]
        positions = {s: (batch.seq_index[row] == s).nonzero().squeeze(1) for s in (chosen, rejected)}
        assert positions[chosen].numel() == p + c and positions[rejected].numel() == p + r
        assert positions[rejected][0] == positions[chosen][-1] + 1
    assert (batch.attention_mask.sum(1) <= budget).all()


def test_pack_batch_gives_an_over_budget_pair_its_own_row():
    examples = synthetic_pairs([(30, 20, 20), (5, 3, 3), (4, 2, 2)])
    batch = pack_batch(examples, pad_id=0, max_tokens_per_row=40)  # pair 0 needs 100 tokens
    rows = example_rows(batch)
    assert rows[0] == rows[1] and len(rows[0]) == 1
    assert set(batch.seq_index[rows[0][0]].unique().tolist()) == {0, 1}


def test_rollout_prompt_groups_give_the_unshared_per_token_logprobs(tiny):
    """GRPO's completions of one prompt laid out on a shared prompt (`pack_prompt_groups`) score every
    response token as the unshared packed layout does, gradients included, with fewer positions."""
    from hpalign.data.collate import pack_prompt_groups
    from hpalign.train.forward import token_stats

    model, tokenizer = tiny
    policy = lora_policy(copy.deepcopy(model).float(), targets=["ALL"])
    enable_varlen_attention(policy)
    prompts = [list(range(5, 5 + n)) for n in (9, 4)]
    rollouts = [TokenizedExample(prompt, [list(range(40 + k, 43 + 2 * k))], f"r{i}{k}")
                for i, prompt in enumerate(prompts) for k in range(3)]
    results = []
    for batch in (pack_batch(rollouts, pad_id=tokenizer.pad_token_id),
                  pack_prompt_groups(rollouts, pad_id=tokenizer.pad_token_id)):
        policy.zero_grad()
        stats = token_stats(policy, batch, packed=True)
        (stats.logps_M * torch.linspace(0.5, 1.5, stats.logps_M.numel())).sum().backward()
        grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
        results.append((stats, grads, batch.input_ids.numel()))
    (plain, plain_grads, plain_positions), (shared, shared_grads, shared_positions) = results
    assert torch.equal(plain.seq_ids_M, shared.seq_ids_M) and torch.equal(plain.offsets_M, shared.offsets_M)
    torch.testing.assert_close(shared.logps_M, plain.logps_M, atol=1e-5, rtol=1e-5)
    for a, b in zip(plain_grads, shared_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert shared_positions == plain_positions - 2 * (9 - 1) - 2 * (4 - 1)  # two later completions per prompt
