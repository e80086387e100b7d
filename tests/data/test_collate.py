"""Padded and packed batches: shifted labels, sequence ids, positions, cu_seqlens, bin packing."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hpalign.data.collate import (
    example_lengths,
    pack_batch,
    pack_prompt_groups,
    pad_batch,
    plan_micro_batches,
    plan_rows,
    prompt_groups,
    sequence_labels,
)
from hpalign.data.types import TokenizedExample

PAD = 0


def pair(prompt_len: int, chosen_len: int, rejected_len: int, start: int = 10, **kwargs) -> TokenizedExample:
    """Distinct ids: prompt start.., chosen 100+start.., rejected 200+start.."""
    return TokenizedExample(list(range(start, start + prompt_len)),
                            [list(range(100 + start, 100 + start + chosen_len)),
                             list(range(200 + start, 200 + start + rejected_len))], f"ex{start}", **kwargs)


EXAMPLES = [pair(3, 2, 4, start=10), pair(5, 1, 1, start=20), pair(2, 3, 2, start=30), pair(4, 4, 3, start=40)]


def per_sequence(batch) -> dict[int, list[tuple[int, int, int]]]:
    """sequence id -> [(input id, label, position)] in token order."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    for r in range(batch.input_ids.shape[0]):
        for t in range(batch.input_ids.shape[1]):
            s = int(batch.seq_index[r, t])
            if s >= 0:
                out.setdefault(s, []).append((int(batch.input_ids[r, t]), int(batch.labels[r, t]),
                                              int(batch.position_ids[r, t])))
    return out


def test_sequence_labels_hand_worked():
    # prompt [1, 2, 3], response [7, 8]: the last prompt token predicts 7, then 7 predicts 8.
    assert sequence_labels([1, 2, 3, 7, 8], 3) == [-100, -100, 7, 8, -100]


def test_pad_batch_layout_and_labels():
    batch = pad_batch(EXAMPLES[:2], pad_id=PAD)
    assert (batch.num_examples, batch.num_responses, batch.num_sequences) == (2, 2, 4)
    assert batch.input_ids.shape == (4, 7)
    assert batch.input_ids[1].tolist() == [10, 11, 12, 210, 211, 212, 213]
    assert batch.labels[1].tolist() == [-100, -100, 210, 211, 212, 213, -100]
    assert batch.input_ids[0].tolist() == [10, 11, 12, 110, 111, PAD, PAD]
    assert batch.labels[0].tolist() == [-100, -100, 110, 111, -100, -100, -100]
    assert batch.seq_index[0].tolist() == [0, 0, 0, 0, 0, -1, -1]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 0]
    assert batch.cu_seqlens.tolist() == [0, 5, 12, 18, 24] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 7
    assert batch.num_loss_tokens == 2 + 4 + 1 + 1
    assert batch.kto_labels is None and batch.margins is None


def test_pack_matches_pad_per_sequence():
    padded = pad_batch(EXAMPLES, pad_id=PAD)
    packed = pack_batch(EXAMPLES, pad_id=PAD, max_tokens_per_row=20)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    assert per_sequence(packed) == per_sequence(padded)
    assert packed.num_loss_tokens == padded.num_loss_tokens
    assert Counter(packed.labels[packed.labels != -100].tolist()) == Counter(
        padded.labels[padded.labels != -100].tolist())


def test_packed_rows_keep_pairs_together_and_positions_restart():
    packed = pack_batch(EXAMPLES, pad_id=PAD, max_tokens_per_row=20)
    for e in range(len(EXAMPLES)):
        rows = {r for r in range(packed.input_ids.shape[0]) for s in (2 * e, 2 * e + 1)
                if (packed.seq_index[r] == s).any()}
        assert len(rows) == 1  # both responses of an example in one row
    seq, pos, labels = packed.seq_index, packed.position_ids, packed.labels
    for r in range(seq.shape[0]):
        real = (seq[r] >= 0).tolist()
        assert real == sorted(real, reverse=True)  # padding only at the end of a row
        for t in range(sum(real)):
            starts = t == 0 or seq[r, t] != seq[r, t - 1]
            assert pos[r, t] == (0 if starts else pos[r, t - 1] + 1)
            if t + 1 == sum(real) or seq[r, t + 1] != seq[r, t]:
                assert labels[r, t] == -100  # the last token of a sequence predicts nothing


def test_cu_seqlens_consistent_with_seq_index():
    packed = pack_batch(EXAMPLES, pad_id=PAD, max_tokens_per_row=20)
    flat = packed.seq_index[packed.attention_mask.bool()].tolist()  # row-major real tokens
    runs = [1]
    for prev, cur in zip(flat, flat[1:], strict=False):
        runs[-1:] = [runs[-1] + 1] if cur == prev else [runs[-1], 1]
    assert packed.cu_seqlens.tolist() == [sum(runs[:i]) for i in range(len(runs) + 1)]
    assert packed.cu_seqlens[-1] == int(packed.attention_mask.sum())
    assert packed.max_seqlen == max(runs)
    assert sorted(set(flat)) == list(range(packed.num_sequences))


def test_best_fit_decreasing_known_case():
    lengths = [2, 7, 5, 3, 8, 5]  # sum 30, budget 10: a perfect fit exists, first-fit in order needs 4 rows
    rows = plan_rows(lengths, max_tokens_per_row=10)
    assert sorted(rows) == [[0, 4], [1, 3], [2, 5]]
    assert sorted(i for row in rows for i in row) == list(range(6))


def test_oversized_example_gets_own_row_never_split():
    rows = plan_rows([3, 25, 4], max_tokens_per_row=10)
    assert rows == [[1], [0, 2]]
    examples = [pair(2, 2, 2, start=10), pair(10, 8, 8, start=20)]
    packed = pack_batch(examples, pad_id=PAD, max_tokens_per_row=10)
    assert packed.input_ids.shape == (2, 36)
    assert per_sequence(packed) == per_sequence(pad_batch(examples, pad_id=PAD))
    with pytest.raises(ValueError, match="max_tokens_per_row must be positive"):
        plan_rows([1], max_tokens_per_row=0)


def test_example_lengths_count_prompt_per_response():
    assert example_lengths(EXAMPLES[:2]) == [3 + 2 + 3 + 4, 5 + 1 + 5 + 1]


def test_shared_prompt_layout_hand_worked():
    """Prompt [10 11 12] once; the rejected branch repeats 12 (it predicts 210) at position 2 and sees
    10, 11 as context taken from the chosen sequence."""
    batch = pack_batch(EXAMPLES[:1], pad_id=PAD, share_prompt=True)
    assert batch.input_ids.tolist() == [[10, 11, 12, 110, 111, 12, 210, 211, 212, 213]]
    assert batch.labels.tolist() == [[-100, -100, 110, 111, -100, 210, 211, 212, 213, -100]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5, 6]]
    assert batch.seq_index.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]
    assert batch.context_seq.tolist() == [-1, 0] and batch.context_len.tolist() == [0, 2]
    assert batch.cu_seqlens.tolist() == [0, 5, 10]
    assert example_lengths(EXAMPLES[:2], share_prompt=True) == [3 + 2 + 1 + 4, 5 + 1 + 1 + 1]
    unshared = pack_batch(EXAMPLES[:1], pad_id=PAD)
    assert unshared.context_seq is None and batch.num_loss_tokens == unshared.num_loss_tokens


def test_shared_prompt_leaves_single_response_examples_alone():
    kto = [TokenizedExample([1, 2], [[3, 4]], "a", label=True), TokenizedExample([1], [[5]], "b", label=False)]
    shared, plain = pack_batch(kto, pad_id=PAD, share_prompt=True), pack_batch(kto, pad_id=PAD)
    assert shared.context_seq is None and torch.equal(shared.input_ids, plain.input_ids)


def test_pack_batch_without_a_budget_is_one_row_without_padding():
    batch = pack_batch(EXAMPLES, pad_id=PAD)
    assert batch.input_ids.shape == (1, sum(example_lengths(EXAMPLES)))
    assert bool(batch.attention_mask.all())


def test_kto_labels_margins_and_device_move():
    kto = [TokenizedExample([1, 2], [[3, 4]], "a", label=True), TokenizedExample([1], [[5]], "b", label=False)]
    batch = pack_batch(kto, pad_id=PAD, max_tokens_per_row=8)
    assert batch.num_responses == 1 and batch.kto_labels.tolist() == [True, False]
    assert batch.kto_labels.dtype == torch.bool
    rm = [pair(2, 1, 1, margin=1.5), pair(2, 1, 1, start=30)]
    assert pad_batch(rm, pad_id=PAD).margins.tolist() == [1.5, 0.0]
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.num_examples == 2


def test_inconsistent_batches_rejected():
    with pytest.raises(ValueError, match="same number of responses"):
        pad_batch([EXAMPLES[0], TokenizedExample([1], [[2]], "x")], pad_id=PAD)
    with pytest.raises(ValueError, match="mixes KTO"):
        pad_batch([TokenizedExample([1], [[2]], "a", label=True), TokenizedExample([1], [[2]], "b")], pad_id=PAD)
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], pad_id=PAD)


def test_plan_micro_batches():
    assert plan_micro_batches([5, 5, 5, 5, 5], batch_size=2) == [[0, 1], [2, 3], [4]]
    assert plan_micro_batches([4, 4, 9, 1, 1], batch_size=4, max_tokens=8) == [[0, 1], [2], [3, 4]]
    assert plan_micro_batches([12, 1], batch_size=4, max_tokens=8) == [[0], [1]]


def completion(prompt: list[int], response: list[int], name: str) -> TokenizedExample:
    return TokenizedExample(prompt, [response], name)


def test_prompt_groups_share_the_layout_and_keep_the_order():
    """Completions [a, b] and [c] of prompt [10 11 12], then [d] of prompt [20]: the first completion
    carries the prompt, the second branches on it (repeats 12, positions from 2, context 2 tokens of
    sequence 0); sequence ids stay the examples' order, the other prompt is a group of its own."""
    rollouts = [completion([10, 11, 12], [110, 111], "a"), completion([10, 11, 12], [120], "b"),
                completion([20], [210, 211], "c")]
    assert prompt_groups(rollouts) == [[0, 1], [2]]
    batch = pack_prompt_groups(rollouts, pad_id=PAD)
    assert batch.input_ids.tolist() == [[10, 11, 12, 110, 111, 12, 120, 20, 210, 211]]
    assert batch.labels.tolist() == [[-100, -100, 110, 111, -100, 120, -100, 210, 211, -100]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2]]
    assert batch.seq_index.tolist() == [[0, 0, 0, 0, 0, 1, 1, 2, 2, 2]]
    assert batch.context_seq.tolist() == [-1, 0, -1] and batch.context_len.tolist() == [0, 2, 0]
    assert batch.num_sequences == 3 and batch.num_loss_tokens == pack_batch(rollouts, pad_id=PAD).num_loss_tokens
    # a token budget puts each group in one row, whole; a prompt seen again later starts a new group
    budgeted = pack_prompt_groups(rollouts, pad_id=PAD, max_tokens_per_row=7)
    assert budgeted.seq_index.tolist() == [[0, 0, 0, 0, 0, 1, 1], [2, 2, 2, -1, -1, -1, -1]]
    assert prompt_groups([*rollouts, rollouts[0]]) == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="single-response"):
        pack_prompt_groups(EXAMPLES[:1], pad_id=PAD)
