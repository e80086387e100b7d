"""The offline training loop shared by DPO, CPO, ORPO, SimPO and SFT (KTO and RM plug in the same way).

Read top to bottom: one optimizer step = this rank's micro-batches of the step's global batch; each
micro-batch is forwarded (policy, and reference without grad), turned into a loss already divided
by the step's global counts, and backpropagated; DeepSpeed applies the update at the accumulation
boundary. Metrics stay tensors until one all-reduce per step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpalign import losses
from hpalign.algorithms import Algorithm, SequenceStats, StepCounts
from hpalign.data.collate import SequenceBatch, example_lengths
from hpalign.data.types import TokenizedExample
from hpalign.train import distributed
from hpalign.train import engine as engine_lib
from hpalign.train.schedule import BatchPlan, all_step_indices, micro_batches_for_step

logger = logging.getLogger("hpalign")


@dataclass
class StepResult:
    """One optimizer step's metrics, not yet reduced over ranks (see `metrics.MetricWindow`)."""

    sums: dict[str, torch.Tensor]  # this rank's shares, on its device
    shared: dict[str, torch.Tensor]  # already global (the gradient norm), on the device
    host: dict[str, float]  # measured by this process: seconds, tokens/s, learning rate
    num_tokens: int  # the step's data tokens (prompt + response per sequence), all ranks
    seconds: float


@dataclass
class TrainState:
    global_step: int = 0
    start_step: int = 0  # where this process began (after a resume)
    history: list[dict[str, float]] = field(default_factory=list)


def step_counts(examples: list[TokenizedExample], indices: list[int]) -> StepCounts:
    """Global counts of a step from the tokenized lengths: no collective needed, every rank has them."""
    chosen = sum(len(examples[i].responses[0]) for i in indices)
    total = sum(len(r) for i in indices for r in examples[i].responses)
    desirable = sum(1 for i in indices if examples[i].label)
    return StepCounts(num_examples=float(len(indices)), num_tokens=float(total),
                      num_chosen_tokens=float(max(chosen, 1)), num_desirable=float(desirable),
                      num_undesirable=float(len(indices) - desirable))


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


class PhaseTimer:
    """Wall seconds of each phase of a step on this rank. On CUDA every boundary synchronises, so the
    split is real (a few syncs per micro-batch, negligible next to its forward and backward)."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase`."""
        self.synchronize()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


def train_step(engine, *, algorithm: Algorithm, params, micro_batches: list[SequenceBatch],
               counts: StepCounts, policy_stats: Callable[[SequenceBatch], SequenceStats],
               reference_stats: Callable[[SequenceBatch], SequenceStats] | None,
               timer: PhaseTimer) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Forward/backward every micro-batch of one optimizer step. Returns this rank's metric sums
    (tensors on the rank's device: nothing is synchronised here) and the global gradient norm
    before clipping (None when DeepSpeed was told not to compute it)."""
    # DeepSpeed divides each backward by the accumulation steps and averages gradients over ranks;
    # our loss is already a share of the global mean, so undo both to get exactly the big-batch gradient.
    scale = engine.gradient_accumulation_steps() * distributed.layout().data_parallel_size
    sums: dict[str, torch.Tensor] = {}
    grad_norm = None
    for batch in micro_batches:
        reference = reference_stats(batch) if reference_stats is not None else None
        timer.lap("reference_forward")
        policy = policy_stats(batch)
        loss, metrics = algorithm.objective(policy, reference, counts, params)
        timer.lap("policy_forward")
        engine.backward(loss * scale)
        timer.lap("backward")
        boundary = engine.is_gradient_accumulation_boundary()
        norm_reading = engine_lib.read_grad_norm_before_step(engine) if boundary else None
        engine.step()
        if boundary:
            grad_norm = engine_lib.grad_norm_after_step(engine, norm_reading)
        timer.lap("optimizer")
        for name, value in {"loss": loss.detach(), **metrics}.items():
            value = value.detach().float()
            sums[name] = sums[name] + value if name in sums else value
    return sums, grad_norm


def with_example_ids(batch: SequenceBatch, indices: list[int]) -> SequenceBatch:
    return dataclasses.replace(batch, example_ids=torch.tensor(indices, dtype=torch.long))


def run_step(engine, *, algorithm: Algorithm, params, plan: BatchPlan, step: int, seed: int, max_length: int,
             examples: list[TokenizedExample], collate: Callable[[list[TokenizedExample]], SequenceBatch],
             policy_stats, reference_stats, table_reference_stats=None) -> StepResult:
    """One optimizer step. `params`: the algorithm's hyper-parameters; `seed` orders the data;
    `reference_stats` is the live reference; `table_reference_stats`, when given, serves the
    training rows from --precompute_ref_log_probs' table instead."""
    start = time.perf_counter()
    timer = PhaseTimer(engine.device)
    global_indices = all_step_indices(plan, step, seed=seed)
    counts = step_counts(examples, global_indices)
    rank = distributed.layout().data_parallel_rank
    index_lists = micro_batches_for_step(plan, step, seed=seed, rank=rank)
    micro_batches = [with_example_ids(collate([examples[i] for i in indices]), indices)
                     for indices in index_lists]
    timer.lap("data")
    if algorithm.estimates_kl:
        mismatched = kl_examples(examples, plan, step, seed=seed, rank=rank,
                                 max_length=max_length)
        size = plan.micro_batch_size
        rows = [[examples[i] for i in indices] for indices in index_lists]
        counts.kl_reference_point, reference_stats, policy_stats = kto_step_stats(
            micro_batches, rows, [mismatched[i:i + size] for i in range(0, len(mismatched), size)], collate,
            policy_stats, reference_stats, timer, table_reference_stats=table_reference_stats)
    elif table_reference_stats is not None:
        reference_stats = table_reference_stats
    sums, grad_norm = train_step(engine, algorithm=algorithm, params=params, micro_batches=micro_batches,
                                 counts=counts, policy_stats=policy_stats, reference_stats=reference_stats,
                                 timer=timer)
    # Throughput counts the data's tokens (prompt + response per sequence, as a padded trainer counts
    # its non-pad tokens); the share actually computed is below 1 when prompts are shared.
    local_examples = [examples[i] for indices in index_lists for i in indices]
    sums["num_tokens"] = torch.tensor(float(sum(example_lengths(local_examples))))
    sums["num_computed_tokens"] = torch.tensor(float(sum(int((b.seq_index >= 0).sum()) for b in micro_batches)))
    num_tokens = sum(example_lengths([examples[i] for i in global_indices]))
    seconds = time.perf_counter() - start
    host = {"train/learning_rate": engine.lr_scheduler.get_last_lr()[0],
            "train/tokens_per_second": num_tokens / max(seconds, 1e-9), "train/step_seconds": seconds,
            **{f"train/time/{phase}": value for phase, value in timer.seconds.items()}}
    if engine.device.type == "cuda":  # the allocator's own counter: no device sync
        host["train/gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    return StepResult(sums={f"train/{name}": value for name, value in sums.items()},
                      shared={} if grad_norm is None else {"train/grad_norm": grad_norm},
                      host=host, num_tokens=num_tokens, seconds=seconds)


def finish_window(metrics: dict[str, float]) -> dict[str, float]:
    """The reduced window's derived metrics: the share of data tokens actually computed."""
    num_tokens = metrics.pop("train/num_tokens", 0.0)
    computed = metrics.pop("train/num_computed_tokens", 0.0)
    metrics["train/computed_token_share"] = computed / max(num_tokens, 1.0)
    return metrics
