"""KTO's step reference: one reference forward per micro-batch serves both the rows and the
mismatched completions of the KL estimate (they share the prompt)."""

import torch

from hpalign.algorithms import SequenceStats
from hpalign.data.collate import pack_batch
from hpalign.data.types import TokenizedExample
from hpalign.train.loop import PhaseTimer, kto_step_reference


def collate(examples):
    return pack_batch(examples, pad_id=0, share_prompt=True)


def stats_from_last_token(weight: float):
    """logp of a response = weight * its last token id (known values, no model)."""
    calls = []

    def stats(batch):
        calls.append(batch)
        flat_ids, flat_seq = batch.input_ids.flatten(), batch.seq_index.flatten()
        last = torch.stack([flat_ids[(flat_seq == s).nonzero().max()] for s in range(batch.num_sequences)])
        logps_ER = weight * last.float().view(batch.num_examples, batch.num_responses)
        return SequenceStats(logps_ER=logps_ER, num_tokens_ER=torch.ones_like(logps_ER), labels_E=batch.kto_labels)
    return stats, calls


def test_one_reference_pass_per_micro_batch_serves_rows_and_kl():
    rows = [[TokenizedExample([1, 2, 3], [[10]], "a", label=True), TokenizedExample([4, 5], [[20]], "b", label=False)]]
    mismatched = [[TokenizedExample([1, 2, 3], [[20]], "kl(a, b)", label=True),
                   TokenizedExample([4, 5], [[10]], "kl(b, a)", label=False)]]
    micro_batches = [collate(rows[0])]
    policy, _ = stats_from_last_token(1.0)
    reference, reference_calls = stats_from_last_token(0.5)
    z0, served = kto_step_reference(micro_batches, rows, mismatched, collate, policy, reference,
                                    PhaseTimer(torch.device("cpu")))
    assert len(reference_calls) == 1 and reference_calls[0].num_responses == 2
    assert reference_calls[0].context_seq is not None  # the row and its KL completion share the prompt
    # KL completions 20 and 10: policy - reference = 0.5 * (20 + 10) / 2
    assert z0 == 7.5
    row_stats = served(micro_batches[0])
    assert row_stats.logps_ER.tolist() == [[5.0], [10.0]] and row_stats.labels_E.tolist() == [True, False]
