"""KTO's step hook: the KL reference point z0 from mismatched (prompt, completion) pairs.

z0 = max(0, mean over the global batch of log pi(y'|x) - log ref(y'|x)), where y' is another
example's completion (KTO, arXiv 2402.01306). The pairs are a derangement within the global batch
(another example of the data set when the global batch is one), the same on every rank, so the
estimate needs one all-reduce per step. Each row and its mismatched completion share the prompt and
are forwarded as one two-response example (see `kto_step_stats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from hpalign import distributed, losses
from hpalign.data.collate import SequenceBatch
from hpalign.data.types import TokenizedExample
from hpalign.stats import SequenceStats
from hpalign.train.schedule import BatchPlan, all_step_indices

if TYPE_CHECKING:
    from hpalign.train.loop import PhaseTimer, StepInputs


def prepare_step(inputs: StepInputs):
    """The loop's step hook: z0 into the step's counts, and the stats functions serving the rows."""
    mismatched = kl_examples(inputs.examples, inputs.plan, inputs.step, seed=inputs.seed, rank=inputs.rank,
                             max_length=inputs.max_length)
    size = inputs.plan.micro_batch_size
    rows = [[inputs.examples[i] for i in indices] for indices in inputs.index_lists]
    z0, reference_stats, policy_stats = kto_step_stats(
        inputs.micro_batches, rows, [mismatched[i:i + size] for i in range(0, len(mismatched), size)],
        inputs.collate, inputs.policy_stats, inputs.reference_stats, inputs.timer,
        table_reference_stats=inputs.table_reference_stats)
    return dataclasses.replace(inputs.counts, kl_reference_point=z0), policy_stats, reference_stats


def kl_partner_indices(plan: BatchPlan, step: int, *, seed: int) -> tuple[list[int], list[int]]:
    """(global batch, partner of each position): whose completion each example is paired with for
    KTO's KL estimate. A derangement within the global batch (the paper's mismatched pairs); with a
    global batch of one, another example of the data set, so any batch size works."""
    global_indices = all_step_indices(plan, step, seed=seed)
    generator = torch.Generator().manual_seed(seed * 7919 + step)
    if len(global_indices) >= 2:
        order = losses.mismatched_completion_index(len(global_indices), generator=generator).tolist()
        return global_indices, [global_indices[j] for j in order]
    if plan.num_examples < 2:
        raise ValueError("KTO's KL estimate needs at least 2 examples in the data set")
    other = int(torch.randint(plan.num_examples - 1, (1,), generator=generator))
    return global_indices, [other + (other >= global_indices[0])]


def mismatched_completion(own: TokenizedExample, other: TokenizedExample, *, max_length: int) -> list[int]:
    """`other`'s completion as a KL pair for `own`'s prompt, cut so prompt + completion fit max_length."""
    return other.responses[0][: max(1, max_length - len(own.prompt_ids))]


def kl_examples(examples: list[TokenizedExample], plan: BatchPlan, step: int, *, seed: int, rank: int,
                max_length: int) -> list[TokenizedExample]:
    """This rank's mismatched (prompt_i, completion_j) examples for the step, in micro-batch order."""
    global_indices, partners = kl_partner_indices(plan, step, seed=seed)
    start = rank * plan.micro_batch_size * plan.accumulation
    mismatched = []
    for position in range(start, start + plan.micro_batch_size * plan.accumulation):
        own, other = examples[global_indices[position]], examples[partners[position]]
        completion = mismatched_completion(own, other, max_length=max_length)
        mismatched.append(TokenizedExample(prompt_ids=own.prompt_ids, responses=[completion],
                                           source=f"kl({own.source}, {other.source})", label=own.label))
    return mismatched


@torch.no_grad()
def kl_reference_point(policy_logps: list[torch.Tensor], reference_logps: list[torch.Tensor]) -> float:
    """KTO's z0 = max(0, mean over the global batch of log pi(y'|x) - log ref(y'|x)), from this rank's
    log-probs of the mismatched completions (one tensor per micro-batch); one all-reduce."""
    parts = [torch.stack(losses.kto_kl_estimate(policy_B, reference_B)).double()
             for policy_B, reference_B in zip(policy_logps, reference_logps, strict=True)]
    kl_sum, count = distributed.sum_over_ranks(torch.stack(parts).sum(0) if parts else torch.zeros(2))
    return max(0.0, kl_sum / max(count, 1.0))


def column(stats: SequenceStats, k: int) -> SequenceStats:
    """Response k of every example, as a one-response SequenceStats."""
    return dataclasses.replace(stats, logps_ER=stats.logps_ER[:, k:k + 1], num_tokens_ER=stats.num_tokens_ER[:, k:k + 1])


def kto_step_stats(micro_batches: list[SequenceBatch], rows: list[list[TokenizedExample]],
                   mismatched: list[list[TokenizedExample]], collate, policy_stats, reference_stats,
                   timer: PhaseTimer, *, table_reference_stats=None) -> tuple[float, Callable, Callable]:
    """KTO's z0 for the step, and stats functions serving each micro-batch's rows.

    Each row and its mismatched completion share the prompt, so they are forwarded as one
    two-response example (laid out once with `share_prompt`): one reference forward per micro-batch
    serves both the rows and the KL estimate. With one micro-batch per rank (no accumulation) the
    policy's training forward serves the KL estimate too: z0 is detached, so the mismatched branch
    gets zero gradient and the result is exact, and the prompt is not run through the policy twice.
    With accumulation, z0 must be known before the first micro-batch's loss, so the policy's KL
    log-probs come from a no-grad pass over every micro-batch first.
    With --precompute_ref_log_probs (`table_reference_stats`), the rows' reference log-probs come
    from the table and only the mismatched pairs, new at every step, run through the reference.
    Returns (z0, reference_stats, policy_stats) for `train_step`."""
    combined = [collate([dataclasses.replace(row, responses=[row.responses[0], kl.responses[0]])
                         for row, kl in zip(own, other, strict=True)])
                for own, other in zip(rows, mismatched, strict=True)]
    row_reference, kl_reference = {}, []
    for batch, both, other in zip(micro_batches, combined, mismatched, strict=True):
        if table_reference_stats is not None:
            row_reference[id(batch)] = table_reference_stats(batch)
            kl_reference.append(reference_stats(collate(other)).logps_ER[:, 0])
            continue
        stats = reference_stats(both)
        row_reference[id(batch)] = column(stats, 0)
        kl_reference.append(stats.logps_ER[:, 1])
    timer.lap("reference_forward")
    if len(micro_batches) == 1:
        stats = policy_stats(combined[0])
        z0 = kl_reference_point([stats.logps_ER[:, 1].detach()], kl_reference)
        timer.lap("policy_forward")
        row_policy = {id(micro_batches[0]): column(stats, 0)}
        return z0, lambda batch: row_reference[id(batch)], lambda batch: row_policy[id(batch)]
    with torch.no_grad():
        kl_policy = [policy_stats(collate(other)).logps_ER[:, 0] for other in mismatched]
    z0 = kl_reference_point(kl_policy, kl_reference)
    timer.lap("kl_estimate")
    return z0, lambda batch: row_reference[id(batch)], policy_stats
