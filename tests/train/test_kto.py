"""KTO's step statistics: one reference forward per micro-batch serves both the rows and the
mismatched completions of the KL estimate (they share the prompt); without accumulation the policy's
training forward serves the KL estimate too."""

import torch

from hpalign.data.collate import pack_batch
from hpalign.data.types import TokenizedExample
from hpalign.stats import SequenceStats
from hpalign.train.kto import kto_step_stats
from hpalign.train.loop import PhaseTimer


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


ROWS = [TokenizedExample([1, 2, 3], [[10]], "a", label=True), TokenizedExample([4, 5], [[20]], "b", label=False)]
MISMATCHED = [TokenizedExample([1, 2, 3], [[20]], "kl(a, b)", label=True),
              TokenizedExample([4, 5], [[10]], "kl(b, a)", label=False)]


def test_one_micro_batch_one_policy_and_one_reference_forward_serve_rows_and_kl():
    micro_batches = [collate(ROWS)]
    policy, policy_calls = stats_from_last_token(1.0)
    reference, reference_calls = stats_from_last_token(0.5)
    z0, served_reference, served_policy = kto_step_stats(
        micro_batches, [ROWS], [MISMATCHED], collate, policy, reference, PhaseTimer(torch.device("cpu")))
    for calls in (policy_calls, reference_calls):
        assert len(calls) == 1 and calls[0].num_responses == 2
        assert calls[0].context_seq is not None  # the row and its KL completion share the prompt
    # KL completions 20 and 10: policy - reference = 0.5 * (20 + 10) / 2
    assert z0 == 7.5
    assert served_reference(micro_batches[0]).logps_ER.tolist() == [[5.0], [10.0]]
    row_policy = served_policy(micro_batches[0])
    assert row_policy.logps_ER.tolist() == [[10.0], [20.0]] and row_policy.labels_E.tolist() == [True, False]


def test_accumulation_estimates_kl_before_the_first_loss_without_grad():
    micro_batches = [collate(ROWS[:1]), collate(ROWS[1:])]
    grad_modes = []
    policy, policy_calls = stats_from_last_token(1.0)

    def policy_recording_grad_mode(batch):
        grad_modes.append(torch.is_grad_enabled())
        return policy(batch)

    reference, reference_calls = stats_from_last_token(0.5)
    z0, served_reference, served_policy = kto_step_stats(
        micro_batches, [ROWS[:1], ROWS[1:]], [MISMATCHED[:1], MISMATCHED[1:]], collate,
        policy_recording_grad_mode, reference, PhaseTimer(torch.device("cpu")))
    assert len(reference_calls) == 2 and all(call.num_responses == 2 for call in reference_calls)
    assert len(policy_calls) == 2 and grad_modes == [False, False]  # the KL pass only, no graph kept
    assert z0 == 7.5
    assert served_reference(micro_batches[1]).logps_ER.tolist() == [[10.0]]
    assert served_policy is policy_recording_grad_mode  # the rows' policy forward happens in train_step
