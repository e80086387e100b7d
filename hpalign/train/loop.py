"""The offline training loop shared by DPO, KTO, CPO, ORPO, SimPO, RM and SFT.

Read top to bottom: one optimizer step = this rank's micro-batches of the step's global batch; each
micro-batch is forwarded (policy, and reference without grad), turned into a loss already divided
by the step's global counts, and backpropagated; DeepSpeed applies the update at the accumulation
boundary. An algorithm that needs more than its micro-batches plugs in a step hook (`STEP_HOOKS`:
KTO's KL estimate, in `train/kto.py`). Metric sums stay on the device (see `train/metrics.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpalign import distributed
from hpalign.algorithms import Algorithm
from hpalign.data.collate import SequenceBatch, example_lengths
from hpalign.data.types import TokenizedExample
from hpalign.stats import SequenceStats, StepCounts
from hpalign.train import engine as engine_lib
from hpalign.train import kto
from hpalign.train.nonfinite import NonFiniteGuard
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
               timer: PhaseTimer, guard: NonFiniteGuard) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Forward/backward every micro-batch of one optimizer step. Returns this rank's metric sums
    (tensors on the rank's device: nothing is synchronised here) and the global gradient norm
    before clipping (None when DeepSpeed was told not to compute it). `guard` sees every loss: the
    update is skipped (on the device) when one of them or a gradient is not finite."""
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
        guard.note_loss(loss)
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


@dataclass
class StepInputs:
    """What a step hook sees of an optimizer step, before the micro-batches' forward and backward."""

    examples: list[TokenizedExample]
    plan: BatchPlan
    step: int
    seed: int
    rank: int  # data-parallel rank
    max_length: int
    index_lists: list[list[int]]  # this rank's example indices, per micro-batch
    micro_batches: list[SequenceBatch]
    collate: Callable[[list[TokenizedExample]], SequenceBatch]
    counts: StepCounts
    policy_stats: Callable
    reference_stats: Callable | None
    table_reference_stats: Callable | None
    timer: PhaseTimer


# A hook returns (counts, policy_stats, reference_stats) for `train_step`: it may add to the step's
# global counts and serve the micro-batches' stats from passes of its own.
StepHook = Callable[[StepInputs], tuple[StepCounts, Callable, Callable | None]]


def with_example_ids(batch: SequenceBatch, indices: list[int]) -> SequenceBatch:
    return dataclasses.replace(batch, example_ids=torch.tensor(indices, dtype=torch.long))


STEP_HOOKS: dict[str, StepHook] = {"kto": kto.prepare_step}


def run_step(engine, *, guard: NonFiniteGuard, algorithm: Algorithm, params, plan: BatchPlan, step: int, seed: int,
             max_length: int, examples: list[TokenizedExample],
             collate: Callable[[list[TokenizedExample]], SequenceBatch],
             policy_stats, reference_stats, table_reference_stats=None) -> StepResult:
    """One optimizer step (0-based `step`). `params`: the algorithm's hyper-parameters; `seed` orders the data;
    `reference_stats` is the live reference; `table_reference_stats`, when given, serves the
    training rows from --precompute_ref_log_probs' table instead."""
    start = time.perf_counter()
    timer = PhaseTimer(engine.device)
    guard.begin_step(step + 1)
    global_indices = all_step_indices(plan, step, seed=seed)
    counts = step_counts(examples, global_indices)
    rank = distributed.layout().data_parallel_rank
    index_lists = micro_batches_for_step(plan, step, seed=seed, rank=rank)
    micro_batches = [with_example_ids(collate([examples[i] for i in indices]), indices)
                     for indices in index_lists]
    timer.lap("data")
    hook = STEP_HOOKS.get(algorithm.name)
    if hook is not None:  # an algorithm that needs more than its micro-batches (KTO's KL estimate)
        counts, policy_stats, reference_stats = hook(StepInputs(
            examples=examples, plan=plan, step=step, seed=seed, rank=rank, max_length=max_length,
            index_lists=index_lists, micro_batches=micro_batches, collate=collate, counts=counts,
            policy_stats=policy_stats, reference_stats=reference_stats,
            table_reference_stats=table_reference_stats, timer=timer))
    elif table_reference_stats is not None:
        reference_stats = table_reference_stats
    sums, grad_norm = train_step(engine, algorithm=algorithm, params=params, micro_batches=micro_batches,
                                 counts=counts, policy_stats=policy_stats, reference_stats=reference_stats,
                                 timer=timer, guard=guard)
    guard.end_step()
    # Throughput counts the data's tokens (prompt + response per sequence, as a padded trainer counts
    # its non-pad tokens); the share actually computed is below 1 when prompts are shared.
    # Every rank knows the global data-token count; the computed tokens are this rank's (summed).
    sums["num_computed_tokens"] = torch.tensor(float(sum(int((b.seq_index >= 0).sum()) for b in micro_batches)))
    # Positions one policy forward computes, row padding included: the work a padded trainer's
    # batch shape costs, compared in benchmarks/bench_train.py.
    sums["computed_positions"] = torch.tensor(float(sum(b.input_ids.numel() for b in micro_batches)))
    num_tokens = sum(example_lengths([examples[i] for i in global_indices]))
    seconds = time.perf_counter() - start
    host = {"train/num_tokens": num_tokens, "train/learning_rate": engine.lr_scheduler.get_last_lr()[0],
            "train/tokens_per_second": num_tokens / max(seconds, 1e-9), "train/step_seconds": seconds,
            **{f"train/time/{phase}": value for phase, value in timer.seconds.items()}}
    if engine.device.type == "cuda":  # the allocator's own counter: no device sync
        host["train/gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    return StepResult(sums={f"train/{name}": value for name, value in sums.items()},
                      shared={} if grad_norm is None else {"train/grad_norm": grad_norm},
                      host=host, num_tokens=num_tokens, seconds=seconds)


def finish_window(metrics: dict[str, float]) -> dict[str, float]:
    """The reduced window's derived metrics: the share of data tokens actually computed (both are
    per-step means over the window, so their ratio is that of the window's totals)."""
    num_tokens = metrics.pop("train/num_tokens", 0.0)
    computed = metrics.pop("train/num_computed_tokens", 0.0)
    metrics["train/computed_token_share"] = computed / max(num_tokens, 1.0)
    return metrics
