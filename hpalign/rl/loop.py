"""The rollout loop: one step = sync the sampler -> generate -> score -> advantages -> epochs of
clipped updates, for every algorithm that samples its own responses (PPO and the GRPO family).

Read top to bottom (TRL's PPOv2 and GRPO trainers): this rank samples `num_generations` responses
to each of its prompts of the step (`RolloutEngine`), the no-grad scoring passes give what the
algorithm reads (old and reference log-probs, values, scores: `scoring.py`), the algorithm's
`RolloutObjective` turns scores into advantages (`ppo.py`: a critic and GAE; `critic_free.py`:
group baselines), then `num_epochs` times over a fresh order of the rollouts, each of
`num_mini_batches` mini-batches is one optimizer step, accumulated over micro-batches of
`batch_size` sequences. Each micro-batch's loss is already its share of the mini-batch's GLOBAL
mean (the sequence and token counts of the mini-batch over every rank: one all-reduce per epoch),
so micro-batches x ranks give exactly the big-batch loss.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from hpalign import distributed
from hpalign.data.collate import SequenceBatch
from hpalign.data.types import Message, TokenizedExample
from hpalign.rl.rollout import Rollout, RolloutEngine, SamplingParams
from hpalign.rl.scoring import (
    RolloutBatch,
    ScoringPasses,
    global_sum,
    padded_rows,
    response_mask,
    run_scoring_passes,
)
from hpalign.train.loop import PhaseTimer


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (run seed, step, prompt index ...)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class RolloutSettings:
    """What one rollout step reads of the configuration, whatever the algorithm."""

    batch_size: int  # sequences (responses) per micro-batch
    gradient_accumulation_steps: int  # micro-batches per mini-batch
    num_mini_batches: int
    num_epochs: int  # PPO's num_ppo_epochs, the GRPO family's num_iterations
    rollout_chunk: int  # --local_rollout_forward_batch_size
    sampling: SamplingParams
    missing_eos_penalty: float | None
    num_generations: int = 1  # responses per prompt (a group); PPO samples one

    @property
    def rollouts_per_rank(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.num_mini_batches

    @property
    def prompts_per_rank(self) -> int:
        return self.rollouts_per_rank // self.num_generations


@dataclass(frozen=True)
class MiniBatchCounts:
    """Global counts of one mini-batch (every rank): what its losses are normalised by."""

    num_sequences: float
    num_tokens: float  # response tokens the loss reads


class RolloutObjective(Protocol):
    """What differs between the rollout algorithms: advantages, the update and the metrics."""

    policy_engine: object
    update_sums: tuple[str, ...]  # names of micro_batch_update's metric sums, in order

    def engines(self) -> tuple:
        """The trainable engines (toggled to eval for scoring)."""

    def add_advantages(self, rollouts: RolloutBatch) -> None:
        """Fill rollouts.advantages_BT (and what else the update reads) from the scores."""

    def rollout_sums(self, rollouts: RolloutBatch) -> dict[str, torch.Tensor]:
        """This rank's sums of the algorithm's rollout metrics (summed over ranks by the loop)."""

    def micro_batch_update(self, batch: SequenceBatch, rollouts: RolloutBatch, rows: torch.Tensor, *,
                           counts: MiniBatchCounts, scale: float) -> torch.Tensor:
        """Forward and backward one micro-batch (rows of `rollouts`); its metric sums [len(update_sums)]."""

    def step_metrics(self, totals: dict[str, float], update_totals: torch.Tensor) -> dict[str, float]:
        """The logged metrics from the global rollout sums and the per-update sums [updates, K]."""


def sample_rollouts(engine: RolloutEngine, prompt_ids: list[list[int]], positions: list[int], *,
                    sampling: SamplingParams, num_generations: int, seed: int, step: int,
                    decode: Callable[[list[int]], str]) -> tuple[Rollout, list[TokenizedExample], list[str]]:
    """`num_generations` responses to each prompt, consecutive; each seeded by its global index
    (prompt position x num_generations + k): resumable, and independent of the spread over ranks."""
    repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
    indices = [position * num_generations + k for position in positions for k in range(num_generations)]
    rollout = engine.generate(repeated, sampling, [derived_seed(seed, "rollout", step, i) for i in indices])
    examples = [TokenizedExample(prompt_ids=p, responses=[r], source=f"rollout:{step}:{i}")
                for p, r, i in zip(repeated, rollout.response_ids, indices, strict=True)]
    return rollout, examples, [decode(ids) for ids in rollout.response_ids]


def score_rollouts(passes: ScoringPasses, rollout: Rollout, examples, texts, prompts, *, settings: RolloutSettings,
                   collate, device: torch.device) -> RolloutBatch:
    """The scored rollout batch (advantages not yet computed); scores minus --missing_eos_penalty
    for responses cut by --response_length when responses stop at an end-of-turn token."""
    lengths = [len(ids) for ids in rollout.response_ids]
    width = max(lengths)
    scored = run_scoring_passes(passes, examples, prompts, texts, collate=collate,
                                chunk_size=settings.rollout_chunk, width=width, device=device)
    stopped_B = torch.tensor(rollout.stopped, device=device)
    scores_B = scored["scores"]
    if settings.missing_eos_penalty is not None and settings.sampling.stop_ids:
        scores_B = scores_B - settings.missing_eos_penalty * (~stopped_B).float()
    return RolloutBatch(
        examples=examples, prompts=prompts, texts=texts, mask_BT=response_mask(lengths, width).to(device),
        sampler_logps_BT=padded_rows(rollout.sampler_logps, width).to(device), old_logps_BT=scored.get("old_logps"),
        ref_logps_BT=scored.get("ref_logps"), values_BT=scored.get("values"), scores_B=scores_B,
        stopped_B=stopped_B, score_metrics=scored["metrics"])


def mini_batch_orders(num_rollouts: int, *, num_mini_batches: int, num_epochs: int, seed: int,
                      step: int) -> list[list[list[int]]]:
    """Per epoch, per mini-batch: this rank's rollout indices (a fresh permutation each epoch)."""
    size = num_rollouts // num_mini_batches
    orders = []
    for epoch in range(num_epochs):
        generator = torch.Generator().manual_seed(derived_seed(seed, "ppo-epoch", step, epoch))
        order = torch.randperm(num_rollouts, generator=generator).tolist()
        orders.append([order[m * size:(m + 1) * size] for m in range(num_mini_batches)])
    return orders


def epoch_counts(rollouts: RolloutBatch, mini_batches: list[list[int]]) -> list[MiniBatchCounts]:
    """The global sequence and token counts of each mini-batch of one epoch (one all-reduce)."""
    tokens_B = rollouts.loss_mask_BT.sum(1).double()
    local = torch.stack([torch.stack([tokens_B.new_tensor(float(len(m))),
                                      tokens_B[torch.tensor(m, device=tokens_B.device)].sum()])
                         for m in mini_batches])
    return [MiniBatchCounts(num_sequences=float(s), num_tokens=float(t)) for s, t in global_sum(local).tolist()]


def run_updates(objective: RolloutObjective, rollouts: RolloutBatch, *, settings: RolloutSettings, collate, device,
                seed: int, step: int) -> torch.Tensor:
    """Every epoch x mini-batch update of one step: metric sums [updates, K] (this rank's)."""
    # DeepSpeed divides each backward by its accumulation steps and averages over ranks; the losses
    # are already shares of the mini-batch's global mean: undo both.
    scale = objective.policy_engine.gradient_accumulation_steps() * distributed.layout().data_parallel_size
    sums = []
    orders = mini_batch_orders(len(rollouts.examples), num_mini_batches=settings.num_mini_batches,
                               num_epochs=settings.num_epochs, seed=seed, step=step)
    for mini_batches in orders:
        for indices, counts in zip(mini_batches, epoch_counts(rollouts, mini_batches), strict=True):
            total = torch.zeros(len(objective.update_sums), dtype=torch.float64, device=device)
            # A mini-batch's gradient is a sum over its rollouts, whatever their order: in rollout order,
            # completions of one prompt sit together in micro-batches and share its layout (collate).
            indices = sorted(indices)
            for start in range(0, len(indices), settings.batch_size):
                rows = indices[start:start + settings.batch_size]
                batch = collate([rollouts.examples[i] for i in rows]).to(device)
                total += objective.micro_batch_update(batch, rollouts, torch.tensor(rows, device=device),
                                                      counts=counts, scale=scale)
            sums.append(total)
    return torch.stack(sums)


def rollout_sums(rollouts: RolloutBatch) -> dict[str, torch.Tensor]:
    """This rank's sums of the metrics every rollout algorithm logs."""
    mask = rollouts.mask_BT
    sums = {"num_sequences": torch.tensor(float(len(rollouts.examples))), "scores": rollouts.scores_B.sum(),
            "num_tokens": mask.sum().double(), "stopped": rollouts.stopped_B.sum().double()}
    if rollouts.old_logps_BT is not None:  # recomputed: how far the sampler's log-probs are from the trainer's
        sums["sampler_gap"] = ((rollouts.sampler_logps_BT - rollouts.old_logps_BT).abs() * mask).sum()
    for name, value in (rollouts.score_metrics or {}).items():  # batch means (rule rewards): weight by size
        sums[f"mean:{name}"] = torch.tensor(value * len(rollouts.examples), dtype=torch.float64)
    return sums


def common_metrics(totals: dict[str, float]) -> dict[str, float]:
    num_seqs, num_tokens = max(totals["num_sequences"], 1.0), max(totals["num_tokens"], 1.0)
    metrics = {"rollout/response_length": totals["num_tokens"] / num_seqs,
               "rollout/stopped_share": totals["stopped"] / num_seqs}
    if "sampler_gap" in totals:
        metrics["rollout/sampler_logp_gap"] = totals["sampler_gap"] / num_tokens
    for name, value in totals.items():
        if name.startswith("mean:"):
            metrics[name.removeprefix("mean:")] = value / num_seqs
    return metrics


@dataclass
class StepOutput:
    metrics: dict[str, float]
    rollouts: RolloutBatch
    num_episodes: int  # responses sampled in the step, all ranks


def rollout_step(*, objective: RolloutObjective, rollout_engine: RolloutEngine, scoring: ScoringPasses,
                 prompt_ids: list[list[int]], prompts: list[list[Message]], positions: list[int],
                 settings: RolloutSettings, collate, decode, seed: int, step: int) -> StepOutput:
    """One step on this rank's prompts (`positions`: their places in the step's global order, which
    seed the sampling)."""
    device = distributed.layout().device
    timer = PhaseTimer(device)
    started = time.perf_counter()
    learning_rate = objective.policy_engine.lr_scheduler.get_last_lr()[0]  # the rate this step's updates use
    sync_metrics = rollout_engine.sync_weights()
    timer.lap("weight_sync")
    rollout, examples, texts = sample_rollouts(rollout_engine, prompt_ids, positions, sampling=settings.sampling,
                                               num_generations=settings.num_generations, seed=seed, step=step,
                                               decode=decode)
    timer.lap("generation")
    for engine in objective.engines():
        engine.eval()
    repeated = [p for p in prompts for _ in range(settings.num_generations)]
    rollouts = score_rollouts(scoring, rollout, examples, texts, repeated, settings=settings, collate=collate,
                              device=device)
    objective.add_advantages(rollouts)
    timer.lap("scoring")
    for engine in objective.engines():
        engine.train()
    updates = run_updates(objective, rollouts, settings=settings, collate=collate, device=device, seed=seed, step=step)
    timer.lap("update")
    sums = {**rollout_sums(rollouts), **objective.rollout_sums(rollouts)}
    names = sorted(sums)
    flat = torch.cat([torch.stack([sums[n].double().to(device) for n in names]), updates.reshape(-1)])
    reduced = global_sum(flat)
    totals = {n: float(v) for n, v in zip(names, reduced[:len(names)], strict=True)}
    metrics = {**common_metrics(totals),
               **objective.step_metrics(totals, reduced[len(names):].reshape(updates.shape).cpu())}
    metrics.update({f"time/{phase}": value for phase, value in timer.seconds.items()})
    metrics.update(sync_metrics)
    metrics["time/step"] = time.perf_counter() - started
    metrics["rollout/tokens_per_second"] = totals["num_tokens"] / max(timer.seconds["generation"], 1e-9)
    metrics["lr"] = learning_rate
    if device.type == "cuda":  # the allocator's own counter: no device sync
        metrics["gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return StepOutput(metrics=metrics, rollouts=rollouts, num_episodes=int(totals["num_sequences"]))
