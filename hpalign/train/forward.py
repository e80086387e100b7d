"""From a `SequenceBatch` to response log-probs, entropies and values, never building N x V logits.

The backbone runs on the (packed or padded) rows; only hidden states at positions that carry a
label go through the LM head and the fused log-prob op (`response_logprobs`). The offline
algorithms take per-sequence sums (`sequence_stats`: a segment sum over those tokens); PPO takes the
same tokens one by one (`token_stats`, `token_values`: flat [M] tensors with their sequence ids and
offsets, `TokenStats.as_matrix` lays them out as [S, T] response matrices). One representation,
flat labelled tokens + sequence ids, serves both; the same functions serve policy and reference.
"""

from __future__ import annotations

import torch

from hpalign.data.collate import SequenceBatch
from hpalign.models import decoder_and_head, decoder_of
from hpalign.models.access import zero3_partitioned
from hpalign.ops.attention import packed_forward_kwargs
from hpalign.ops.linear_logprobs import hidden_logprobs
from hpalign.ops.segments import segment_count, segment_offsets, segment_sum
from hpalign.stats import SequenceStats, TokenStats


def backbone_kwargs(batch: SequenceBatch, *, packed: bool) -> dict:
    if packed:
        return packed_forward_kwargs(batch)
    return {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}


def response_logprobs(hidden_NH: torch.Tensor, head: torch.nn.Module, labels_N: torch.Tensor, *,
                      impl: str = "auto", with_entropy: bool = False):
    """log p(label) [N] (0 where label == -100), computing logits only for labelled tokens, with the
    fused log-prob op (`impl`: auto | cuda | torch) at every size and ZeRO stage: a linear head's
    logits are kept while they take at most 512 MiB as fp32, else chunks are recomputed in the
    backward, so no [tokens, vocab] tensor exists; under ZeRO-3 the op runs as the head's own
    forward, so the weight is gathered once per forward (and once for the backward), never per
    chunk. Any other head (LoRA on the LM head) goes chunk by chunk through the module.
    `with_entropy`: (log-probs, entropies [N]), the entropies read off the same logits (a metric)."""
    return hidden_logprobs(hidden_NH, head, labels_N, impl=impl, chunk_rows=None, keep_logits=None,
                           through_module=zero3_partitioned(head), with_entropy=with_entropy)


def sequence_stats(model: torch.nn.Module, batch: SequenceBatch, *, packed: bool,
                   logprob_impl: str = "auto") -> SequenceStats:
    """Summed response log-probs and token counts per sequence, shaped [E, R]; `logprob_impl` is
    --logprob_impl (auto | cuda | torch)."""
    decoder, head = decoder_and_head(model)
    outputs = decoder(input_ids=batch.input_ids, use_cache=False, **backbone_kwargs(batch, packed=packed))
    hidden_NH = outputs.last_hidden_state.flatten(0, 1)
    labels_N = batch.labels.flatten()
    token_logps_N = response_logprobs(hidden_NH, head, labels_N, impl=logprob_impl)
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
    decoder = decoder_of(model.lm)
    outputs = decoder(input_ids=batch.input_ids, use_cache=False, **backbone_kwargs(batch, packed=packed))
    hidden_NH = outputs.last_hidden_state.flatten(0, 1)
    last_S = last_token_positions(batch.seq_index.flatten(), batch.num_sequences)
    rewards_S = model.value_head(hidden_NH[last_S]).float()
    shape = (batch.num_examples, batch.num_responses)
    ones = torch.ones(shape, device=rewards_S.device)
    return SequenceStats(logps_ER=torch.zeros(shape, device=rewards_S.device), num_tokens_ER=ones,
                         margins_E=batch.margins, rewards_ER=rewards_S.view(shape))


def _labelled(batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask [N] of the tokens that carry a label, their labels [M], their sequence ids [M])."""
    labels_N = batch.labels.flatten()
    keep_N = labels_N != -100
    return keep_N, labels_N[keep_N], batch.seq_index.flatten()[keep_N]


def token_stats(model: torch.nn.Module, batch: SequenceBatch, *, packed: bool, logprob_impl: str = "auto",
                temperature: float = 1.0, with_entropy: bool = False) -> TokenStats:
    """Per-token log-probs (and entropies) of every response token under softmax(logits / temperature).

    Dividing the logits by T is dividing the hidden states by T before a bias-free head
    (logits / T = (h / T) W^T), so the fused op computes the tempered log-probs as they are.
    """
    decoder, head = decoder_and_head(model)
    if temperature != 1.0 and getattr(head, "bias", None) is not None:
        raise ValueError("a sampling temperature needs a bias-free LM head (logits / T = (h / T) W^T)")
    outputs = decoder(input_ids=batch.input_ids, use_cache=False, **backbone_kwargs(batch, packed=packed))
    keep_N, labels_M, seq_ids_M = _labelled(batch)
    hidden_MH = outputs.last_hidden_state.flatten(0, 1)[keep_N]
    if temperature != 1.0:
        hidden_MH = hidden_MH / temperature
    result = response_logprobs(hidden_MH, head, labels_M, impl=logprob_impl, with_entropy=with_entropy)
    logps_M, entropy_M = result if with_entropy else (result, None)
    return TokenStats(seq_ids_M=seq_ids_M, offsets_M=segment_offsets(seq_ids_M, batch.num_sequences),
                      num_sequences=batch.num_sequences, logps_M=logps_M, entropy_M=entropy_M)


def token_values(model: torch.nn.Module, batch: SequenceBatch, *, packed: bool) -> TokenStats:
    """A value model's estimate V(s_t) [M] at every response token: the value head on the hidden
    state that predicts the token (the state before it, as the log-prob of the token is read)."""
    decoder = decoder_of(model.lm)
    outputs = decoder(input_ids=batch.input_ids, use_cache=False, **backbone_kwargs(batch, packed=packed))
    keep_N, _, seq_ids_M = _labelled(batch)
    values_M = model.value_head(outputs.last_hidden_state.flatten(0, 1)[keep_N]).float()
    return TokenStats(seq_ids_M=seq_ids_M, offsets_M=segment_offsets(seq_ids_M, batch.num_sequences),
                      num_sequences=batch.num_sequences, values_M=values_M)
