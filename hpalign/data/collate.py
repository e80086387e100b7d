"""Batches of tokenized examples: padded (one sequence per row) or packed (token-budget rows).

Both give the same `SequenceBatch` fields, so a loss never knows which it got. A sequence is
prompt + one response; sequence `e * num_responses + k` is response k (0 chosen, 1 rejected) of
example e, so per-sequence sums reshape to [E, num_responses]. Labels are shifted already:
`labels[r, t]` is the token at t + 1 when that token is a response token of the same sequence,
else -100; prompt tokens, the last token of each sequence and padding carry no loss, and no
token predicts across a sequence boundary.

Shared prompts (`pack_batch(..., share_prompt=True)`): an example with several responses lays its
prompt out once. Sequence 0 is prompt + response 0 as usual; every further response k is a
*branch* [last prompt token, response k] whose positions continue from the prompt (P - 1, P, ...)
and whose attention also covers the first P - 1 prompt tokens of sequence 0 (`context_seq`,
`context_len`, read by `hpalign.ops.attention.packed_forward_kwargs`). Every token then sees exactly
the tokens and positions it would see unshared, so log-probs are unchanged, while the prompt's
P - 1 tokens are computed once instead of once per response (a pair with a 200-token prompt and two
100-token answers: 401 tokens instead of 600).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hpalign.data.types import TokenizedExample

IGNORE_INDEX = -100


@dataclass
class SequenceBatch:
    """R rows of length L holding S sequences of E examples (S = E * num_responses)."""

    input_ids: torch.Tensor  # [R, L] long, pad_id where padded
    position_ids: torch.Tensor  # [R, L] long, restarts at 0 for every sequence; 0 on padding
    labels: torch.Tensor  # [R, L] long, next response token or -100 (see the module docstring)
    seq_index: torch.Tensor  # [R, L] long, sequence id 0..S-1, -1 on padding
    attention_mask: torch.Tensor  # [R, L] long, 1 real token, 0 padding
    cu_seqlens: torch.Tensor  # [S + 1] int32, cumulative lengths in row-major order of the real tokens
    max_seqlen: int
    num_sequences: int
    num_examples: int
    num_responses: int
    kto_labels: torch.Tensor | None  # [E] bool, KTO only
    margins: torch.Tensor | None  # [E] float, when the data has margins (RM)
    num_loss_tokens: int  # (labels != -100).sum()
    example_ids: torch.Tensor | None = None  # [E] long, indices into the data set, when the caller knows them
    # Shared prompts only (else None): sequence s also attends to the first context_len[s] tokens of
    # sequence context_seq[s] (-1 / 0 when it has no such context); see the module docstring.
    context_seq: torch.Tensor | None = None  # [S] long
    context_len: torch.Tensor | None = None  # [S] long

    def to(self, device: torch.device | str) -> SequenceBatch:
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return SequenceBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def sequence_labels(ids: list[int], prompt_len: int) -> list[int]:
    """Shifted labels of one sequence: ids[t + 1] where t + 1 >= prompt_len, else -100 (last: -100)."""
    return [ids[t + 1] if t + 1 >= prompt_len else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def _num_responses(examples: list[TokenizedExample]) -> int:
    if not examples:
        raise ValueError("cannot collate an empty batch")
    counts = {len(ex.responses) for ex in examples}
    if len(counts) != 1:
        raise ValueError(f"examples in one batch must have the same number of responses, got {sorted(counts)}")
    return counts.pop()


def _example_tensors(examples: list[TokenizedExample]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    labels = [ex.label for ex in examples]
    if any(label is not None for label in labels) and any(label is None for label in labels):
        raise ValueError("a batch mixes KTO examples (with a label) and examples without one")
    kto_labels = torch.tensor(labels, dtype=torch.bool) if labels[0] is not None else None
    has_margin = any(ex.margin is not None for ex in examples)
    # A missing margin is 0, the value that leaves the reward-model loss unchanged.
    margins = (torch.tensor([ex.margin or 0.0 for ex in examples], dtype=torch.float32)
               if has_margin else None)
    return kto_labels, margins


@dataclass(frozen=True)
class _Sequence:
    """One sequence as laid out in a row."""

    ids: list[int]
    loss_start: int  # index of the first id that is a response token (the first with a loss)
    first_position: int = 0  # position id of ids[0]
    context_seq: int = -1  # the sequence whose first `context_len` tokens this one also attends to
    context_len: int = 0


def _responses_to_one_prompt(prompt: list[int], responses: list[list[int]], first: int, *,
                             share_prompt: bool) -> list[_Sequence]:
    """The sequences of `responses` to `prompt`, the first of them sequence id `first`: each prompt +
    response, or with `share_prompt` the later ones branches on the first's prompt (module docstring)."""
    prompt_len = len(prompt)
    return [_Sequence(prompt + response, prompt_len) if k == 0 or not share_prompt or prompt_len == 0
            # the last prompt token is repeated: its output predicts this response's first token
            else _Sequence([prompt[-1], *response], 1, prompt_len - 1, first, prompt_len - 1)
            for k, response in enumerate(responses)]


def _sequences(examples: list[TokenizedExample], *, share_prompt: bool = False) -> list[_Sequence]:
    """Every sequence in example-major order (see the module docstring for shared prompts)."""
    return [seq for e, ex in enumerate(examples)
            for seq in _responses_to_one_prompt(ex.prompt_ids, ex.responses, e * len(ex.responses),
                                                share_prompt=share_prompt)]


def _grouped_sequences(examples: list[TokenizedExample], groups: list[list[int]]) -> list[_Sequence]:
    """One sequence per (single-response) example, in example order (`groups` are consecutive runs):
    within a group of examples with the same prompt, the later ones are branches on the first's."""
    return [seq for group in groups
            for seq in _responses_to_one_prompt(examples[group[0]].prompt_ids,
                                                [examples[e].responses[0] for e in group], group[0], share_prompt=True)]


def _assemble(examples: list[TokenizedExample], rows: list[list[int]], *, pad_id: int,
              share_prompt: bool = False, sequences: list[_Sequence] | None = None) -> SequenceBatch:
    """Lay the sequences listed per row (sequence ids, in row order) into right-padded tensors
    (`sequences`: laid out by the caller; default `_sequences(examples, share_prompt)`)."""
    num_responses = _num_responses(examples)
    if sequences is None:
        sequences = _sequences(examples, share_prompt=share_prompt)
    width = max(sum(len(sequences[s].ids) for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    seq_index = torch.full((len(rows), width), -1, dtype=torch.long)
    lengths_in_order = []
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            seq = sequences[s]
            end = start + len(seq.ids)
            input_ids[r, start:end] = torch.tensor(seq.ids)
            position_ids[r, start:end] = torch.arange(seq.first_position, seq.first_position + len(seq.ids))
            labels[r, start:end] = torch.tensor(sequence_labels(seq.ids, seq.loss_start))
            seq_index[r, start:end] = s
            lengths_in_order.append(len(seq.ids))
            start = end
    cu_seqlens = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths_in_order), 0)
    kto_labels, margins = _example_tensors(examples)
    context_seq = context_len = None
    if any(seq.context_len for seq in sequences):
        context_seq = torch.tensor([seq.context_seq for seq in sequences], dtype=torch.long)
        context_len = torch.tensor([seq.context_len for seq in sequences], dtype=torch.long)
    return SequenceBatch(
        input_ids=input_ids, position_ids=position_ids, labels=labels, seq_index=seq_index,
        attention_mask=(seq_index >= 0).long(), cu_seqlens=cu_seqlens, max_seqlen=max(lengths_in_order),
        num_sequences=len(sequences), num_examples=len(examples), num_responses=num_responses,
        kto_labels=kto_labels, margins=margins, num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
        context_seq=context_seq, context_len=context_len,
    )


def pad_batch(examples: list[TokenizedExample], *, pad_id: int) -> SequenceBatch:
    """One sequence (prompt + response k) per row, right-padded: R = S rows of the longest length."""
    num_responses = _num_responses(examples)
    return _assemble(examples, [[s] for s in range(len(examples) * num_responses)], pad_id=pad_id)


def example_lengths(examples: list[TokenizedExample], *, share_prompt: bool = False) -> list[int]:
    """Tokens an example takes in a packed row: sum over responses of len(prompt) + len(response),
    or with a shared prompt len(prompt) + len(response 0) + sum over the others of 1 + len(response)."""
    sequences = _sequences(examples, share_prompt=share_prompt)
    per_example = len(sequences) // len(examples) if examples else 0
    return [sum(len(seq.ids) for seq in sequences[e * per_example:(e + 1) * per_example])
            for e in range(len(examples))]


def plan_rows(lengths: list[int], *, max_tokens_per_row: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of item lengths into rows of at most `max_tokens_per_row`.

    Items go longest first (ties by index) into the row with the least room that still fits
    them, else into a new row; an item longer than the budget gets a row of its own, never split.
    Returns the item indices of each row, ascending within a row.
    """
    if max_tokens_per_row <= 0:
        raise ValueError(f"max_tokens_per_row must be positive, got {max_tokens_per_row}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: (room[r], r))
            rows[best].append(i)
            room[best] -= lengths[i]
        else:
            rows.append([i])
            room.append(max_tokens_per_row - lengths[i])
    return [sorted(row) for row in rows]


def pack_batch(examples: list[TokenizedExample], *, pad_id: int, max_tokens_per_row: int | None = None,
               share_prompt: bool = False) -> SequenceBatch:
    """Pack whole examples into rows of at most `max_tokens_per_row` tokens (`plan_rows`; None: all
    in one row, no padding at all), padding rows at the end to the longest row. All responses of an
    example stay together, in order, in one row; an example over the budget gets a row of its own.
    `share_prompt` lays each multi-response example's prompt out once (module docstring). Sequence
    ids keep example-major order as given (packing moves tokens, not ids), so `cu_seqlens`, which
    follows the row-major order of real tokens, need not list sequences in id order: use
    `seq_index` to map tokens."""
    num_responses = _num_responses(examples)
    lengths = example_lengths(examples, share_prompt=share_prompt)
    plan = plan_rows(lengths, max_tokens_per_row=max_tokens_per_row or sum(lengths))
    rows = [[e * num_responses + k for e in row for k in range(num_responses)] for row in plan]
    return _assemble(examples, rows, pad_id=pad_id, share_prompt=share_prompt)


def prompt_groups(examples: list[TokenizedExample]) -> list[list[int]]:
    """Runs of consecutive examples with the same prompt ids (GRPO's completions of one prompt)."""
    groups: list[list[int]] = []
    for e, example in enumerate(examples):
        if groups and examples[groups[-1][0]].prompt_ids == example.prompt_ids:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def pack_prompt_groups(examples: list[TokenizedExample], *, pad_id: int,
                       max_tokens_per_row: int | None = None) -> SequenceBatch:
    """`pack_batch` for single-response examples where consecutive ones share a prompt (a rollout
    batch: `num_generations` completions per prompt): each run of equal prompts (`prompt_groups`)
    lays the prompt out once, the later completions as branches on it (module docstring), and goes
    into one row whole. Sequence s is example s, as in `pack_batch`: per-sequence results keep the
    examples' order. With G completions of a P-token prompt, G - 1 prompts' P - 1 tokens are not
    computed."""
    if _num_responses(examples) != 1:
        raise ValueError("pack_prompt_groups takes single-response examples (one completion each)")
    groups = prompt_groups(examples)
    sequences = _grouped_sequences(examples, groups)
    lengths = [sum(len(sequences[e].ids) for e in group) for group in groups]
    plan = plan_rows(lengths, max_tokens_per_row=max_tokens_per_row or sum(lengths))
    rows = [[e for g in row for e in groups[g]] for row in plan]
    return _assemble(examples, rows, pad_id=pad_id, sequences=sequences)


def plan_micro_batches(lengths: list[int], *, batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Split examples, in the given order, into consecutive micro-batches of at most `batch_size`
    examples and, when `max_tokens` is set, at most `max_tokens` tokens (an example over the
    budget is a micro-batch of its own). Returns the example indices of each micro-batch."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i, length in enumerate(lengths):
        over_budget = max_tokens is not None and current and tokens + length > max_tokens
        if len(current) == batch_size or over_budget:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += length
    if current:
        batches.append(current)
    return batches
