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
from hpalign.ops.logprobs import hidden_logprobs
from hpalign.ops.segments import segment_count, segment_sum


def backbone_kwargs(batch: SequenceBatch, *, packed: bool) -> dict:
    if packed:
        return packed_forward_kwargs(batch)
    return {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}


def sequence_stats(model: torch.nn.Module, batch: SequenceBatch, *, packed: bool) -> SequenceStats:
    """Summed response log-probs and token counts per sequence, shaped [E, R]."""
    decoder, head = decoder_and_head(model)
    outputs = decoder(input_ids=batch.input_ids, use_cache=False, **backbone_kwargs(batch, packed=packed))
    hidden_NH = outputs.last_hidden_state.flatten(0, 1)
    labels_N = batch.labels.flatten()
    token_logps_N = hidden_logprobs(hidden_NH, head, labels_N)
    seq_ids_N = batch.seq_index.flatten()
    logps_S = segment_sum(token_logps_N, seq_ids_N, batch.num_sequences)
    counts_S = segment_count(seq_ids_N, labels_N != -100, batch.num_sequences).to(logps_S.dtype)
    shape = (batch.num_examples, batch.num_responses)
    return SequenceStats(logps_ER=logps_S.float().view(shape), num_tokens_ER=counts_S.float().view(shape))
