"""From a `SequenceBatch` to per-sequence response log-probs, without ever building N x V logits.

The backbone runs on the (packed or padded) rows; only hidden states at positions that carry a
label go through the LM head, chunk by chunk (`hidden_logprobs`), and a segment sum folds token
log-probs into per-sequence sums. The same function serves policy and reference.
"""

from __future__ import annotations

import torch

from hpalign.algorithms import SequenceStats
from hpalign.data.collate import SequenceBatch
from hpalign.model import decoder_and_head
from hpalign.ops.attention import packed_forward_kwargs
from hpalign.ops.logprobs import hidden_logprobs, token_logprobs
from hpalign.ops.segments import segment_count, segment_sum


def backbone_kwargs(batch: SequenceBatch, *, packed: bool) -> dict:
    if packed:
        return packed_forward_kwargs(batch)
    return {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}


# Above this many bytes of fp32 logits for the labelled tokens, log-probs come chunk by chunk from the
# hidden states (the N x V logits never exist); below it one LM-head matmul on the labelled rows and the
# fused chunked log-softmax are faster (measured 1.4-1.8x on CPU, benchmarks/results/logprobs_*).
DIRECT_LOGITS_BYTES = 512 * 2**20


def _zero3_partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _vocab_size(head: torch.nn.Module) -> int:
    return int(getattr(head, "out_features", 0) or head.weight.shape[0])


def response_logprobs(hidden_NH: torch.Tensor, head: torch.nn.Module, labels_N: torch.Tensor) -> torch.Tensor:
    """log p(label) [N] (0 where label == -100), from hidden states, computing logits only for the
    tokens that carry a label. Long responses go through `hidden_logprobs` (bounded memory). ZeRO-3
    always takes the direct path: the LM head's weight exists only inside its own forward hooks, so
    the chunk-wise activation checkpoint (which re-runs the head in backward) cannot be used there."""
    keep_N = labels_N != -100
    logits_bytes = int(keep_N.sum()) * _vocab_size(head) * 4
    if logits_bytes > DIRECT_LOGITS_BYTES and not _zero3_partitioned(head):
        return hidden_logprobs(hidden_NH, head, labels_N)
    logps_K = token_logprobs(head(hidden_NH[keep_N]), labels_N[keep_N])
    return torch.zeros(labels_N.shape, dtype=logps_K.dtype, device=logps_K.device).masked_scatter(keep_N, logps_K)


def sequence_stats(model: torch.nn.Module, batch: SequenceBatch, *, packed: bool) -> SequenceStats:
    """Summed response log-probs and token counts per sequence, shaped [E, R]."""
    decoder, head = decoder_and_head(model)
    outputs = decoder(input_ids=batch.input_ids, use_cache=False, **backbone_kwargs(batch, packed=packed))
    hidden_NH = outputs.last_hidden_state.flatten(0, 1)
    labels_N = batch.labels.flatten()
    token_logps_N = response_logprobs(hidden_NH, head, labels_N)
    seq_ids_N = batch.seq_index.flatten()
    logps_S = segment_sum(token_logps_N, seq_ids_N, batch.num_sequences)
    counts_S = segment_count(seq_ids_N, labels_N != -100, batch.num_sequences).to(logps_S.dtype)
    shape = (batch.num_examples, batch.num_responses)
    return SequenceStats(logps_ER=logps_S.float().view(shape), num_tokens_ER=counts_S.float().view(shape),
                         labels_E=batch.kto_labels, margins_E=batch.margins)


def response_token_counts(batch: SequenceBatch) -> torch.Tensor:
    """[E, R] number of loss-bearing tokens of each response."""
    seq_ids_N = batch.seq_index.flatten()
    counts_S = segment_count(seq_ids_N, batch.labels.flatten() != -100, batch.num_sequences)
    return counts_S.float().view(batch.num_examples, batch.num_responses)


def last_token_positions(seq_ids_N: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """[S] flat index of each sequence's last token (its final end-of-turn token)."""
    positions_N = torch.arange(seq_ids_N.numel(), device=seq_ids_N.device)
    valid = seq_ids_N >= 0
    last_S = torch.full((num_sequences,), -1, dtype=torch.long, device=seq_ids_N.device)
    return last_S.scatter_reduce(0, seq_ids_N[valid], positions_N[valid], reduce="amax")


def reward_stats(model: torch.nn.Module, batch: SequenceBatch, *, packed: bool) -> SequenceStats:
    """Scalar rewards r(x, y) [E, R]: the value head on the hidden state of each sequence's last token."""
    decoder, _ = decoder_and_head(model.lm)
    outputs = decoder(input_ids=batch.input_ids, use_cache=False, **backbone_kwargs(batch, packed=packed))
    hidden_NH = outputs.last_hidden_state.flatten(0, 1)
    last_S = last_token_positions(batch.seq_index.flatten(), batch.num_sequences)
    rewards_S = model.value_head(hidden_NH[last_S]).float()
    shape = (batch.num_examples, batch.num_responses)
    ones = torch.ones(shape, device=rewards_S.device)
    return SequenceStats(logps_ER=torch.zeros(shape, device=rewards_S.device), num_tokens_ER=ones,
                         margins_E=batch.margins, rewards_ER=rewards_S.view(shape))
