"""The rollout loop: one PPO step = generate -> score -> advantages -> PPO epochs of clipped updates.

Read top to bottom (TRL's PPOv2 trainer, arXiv 2203.02155): this rank samples one response per
prompt of its share of the step's prompts (`RolloutEngine`), the no-grad scoring passes give old
and reference log-probs, values and scores (`scoring.py`), then `num_ppo_epochs` times over a fresh
order of the rollouts, each of `num_mini_batches` mini-batches is one optimizer step of the policy
engine and of the value engine, accumulated over micro-batches of `batch_size` sequences. Each
micro-batch's losses are per-token sums divided by the mini-batch's GLOBAL response-token count,
so micro-batches x ranks give the token mean of the whole mini-batch (one all-reduce per epoch
counts them). Policy and value are separate engines (own optimizer, own clipping, own schedule).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpalign import distributed, losses
from hpalign.data.collate import SequenceBatch
from hpalign.data.types import Message, TokenizedExample
from hpalign.rl.rollout import RolloutEngine, SamplingParams
from hpalign.rl.scoring import (
    RolloutBatch,
    ScoringPasses,
    add_advantages,
    global_sum,
    padded_rows,
    response_mask,
    run_scoring_passes,
)
from hpalign.stats import TokenStats
from hpalign.train.loop import PhaseTimer


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (run seed, step, prompt index ...)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class PPOSettings:
    """What one PPO step reads of the configuration."""

    batch_size: int  # sequences per micro-batch
    gradient_accumulation_steps: int  # micro-batches per mini-batch
    num_mini_batches: int
    num_ppo_epochs: int
    rollout_chunk: int  # --local_rollout_forward_batch_size
    sampling: SamplingParams
    kl_coef: float
    kl_estimator: str
    whiten_rewards: bool
    gamma: float
    lam: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    missing_eos_penalty: float | None

    @property
    def rollouts_per_rank(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.num_mini_batches


@dataclass
class TrainPasses:
    """The grad-tracking forwards of the update phase."""

    policy: Callable[[SequenceBatch], TokenStats]  # tempered log-probs and entropies
    values: Callable[[SequenceBatch], TokenStats]


def sample_rollouts(engine: RolloutEngine, prompt_ids: list[list[int]], indices: list[int], *,
                    sampling: SamplingParams, seed: int, step: int, decode: Callable[[list[int]], str]):
    """Sample one response per prompt (seeded per prompt's global index: resumable, layout-free)."""
    seeds = [derived_seed(seed, "rollout", step, index) for index in indices]
    rollout = engine.generate(prompt_ids, sampling, seeds)
    examples = [TokenizedExample(prompt_ids=p, responses=[r], source=f"rollout:{step}:{i}")
                for p, r, i in zip(prompt_ids, rollout.response_ids, indices, strict=True)]
    texts = [decode(ids) for ids in rollout.response_ids]
    return rollout, examples, texts


def score_rollouts(passes: ScoringPasses, rollout, examples, texts, prompts, *, settings: PPOSettings,
                   collate, device: torch.device) -> RolloutBatch:
    lengths = [len(ids) for ids in rollout.response_ids]
    width = max(lengths)
    scored = run_scoring_passes(passes, examples, prompts, texts, collate=collate,
                                chunk_size=settings.rollout_chunk, width=width, device=device)
    stopped_B = torch.tensor(rollout.stopped, device=device)
    sampler_logps_BT = padded_rows(rollout.sampler_logps, width).to(device)
    scores_B = scored["scores"]
    if settings.missing_eos_penalty is not None and settings.sampling.stop_ids:
        scores_B = scores_B - settings.missing_eos_penalty * (~stopped_B).float()
    batch = RolloutBatch(
        examples=examples, prompts=prompts, texts=texts, mask_BT=response_mask(lengths, width).to(device),
        sampler_logps_BT=sampler_logps_BT, old_logps_BT=scored.get("old_logps", sampler_logps_BT),
        ref_logps_BT=scored["ref_logps"], values_BT=scored["values"],
        scores_B=scores_B, stopped_B=stopped_B, score_metrics=scored["metrics"])
    add_advantages(batch, kl_coef=settings.kl_coef, kl_estimator=settings.kl_estimator,
                   whiten_rewards=settings.whiten_rewards, gamma=settings.gamma, lam=settings.lam)
    return batch


def mini_batch_orders(num_rollouts: int, settings: PPOSettings, *, seed: int, step: int) -> list[list[list[int]]]:
    """Per epoch, per mini-batch: this rank's rollout indices (a fresh permutation each epoch)."""
    size = num_rollouts // settings.num_mini_batches
    orders = []
    for epoch in range(settings.num_ppo_epochs):
        generator = torch.Generator().manual_seed(derived_seed(seed, "ppo-epoch", step, epoch))
        order = torch.randperm(num_rollouts, generator=generator).tolist()
        orders.append([order[m * size:(m + 1) * size] for m in range(settings.num_mini_batches)])
    return orders


UPDATE_SUMS = ("policy/approxkl", "policy/clipfrac", "policy/ratio", "policy/entropy", "loss/policy", "loss/value",
               "val/clipfrac", "num_tokens")


def micro_batch_update(policy_engine, value_engine, passes: TrainPasses, rollouts: RolloutBatch, indices: list[int],
                       *, collate, device, settings: PPOSettings, num_tokens_global: float,
                       scale: float) -> torch.Tensor:
    """Forward and backward one micro-batch through both engines; its metric sums [len(UPDATE_SUMS)]."""
    batch = collate([rollouts.examples[i] for i in indices]).to(device)
    rows = torch.tensor(indices, device=device)
    mask_BT, width = rollouts.mask_BT[rows], rollouts.width
    policy = passes.policy(batch)
    logps_BT = policy.as_matrix(policy.logps_M, width)
    pg_losses_B, pg_metrics = losses.ppo_policy_losses(logps_BT, rollouts.old_logps_BT[rows],
                                                       rollouts.advantages_BT[rows], mask_BT,
                                                       cliprange=settings.cliprange)
    policy_loss = pg_losses_B.sum() / num_tokens_global
    policy_engine.backward(policy_loss * scale)
    values = passes.values(batch)
    values_BT = values.as_matrix(values.values_M, width)
    vf_losses_B, vf_metrics = losses.ppo_value_losses(values_BT, rollouts.values_BT[rows], rollouts.returns_BT[rows],
                                                      mask_BT, cliprange_value=settings.cliprange_value)
    value_loss = vf_losses_B.sum() / num_tokens_global
    value_engine.backward(settings.vf_coef * value_loss * scale)
    policy_engine.step()
    value_engine.step()
    entropy = policy.entropy_M.sum() if policy.entropy_M is not None else torch.zeros((), device=device)
    return torch.stack([pg_metrics["policy/approxkl"].sum(), pg_metrics["policy/clipfrac"].sum(),
                        pg_metrics["policy/ratio"].sum(), entropy.float(),
                        policy_loss.detach() * num_tokens_global, value_loss.detach() * num_tokens_global,
                        vf_metrics["value/clipfrac"].sum(), pg_metrics["num_tokens"].sum()]).double()


def ppo_updates(policy_engine, value_engine, passes: TrainPasses, rollouts: RolloutBatch, *, settings: PPOSettings,
                collate, device, seed: int, step: int) -> torch.Tensor:
    """Every epoch x mini-batch update of one PPO step: metric sums [epochs * mini-batches, K] (this rank's)."""
    # DeepSpeed divides each backward by its accumulation steps and averages over ranks; the losses
    # are already shares of the mini-batch's global token mean: undo both.
    scale = policy_engine.gradient_accumulation_steps() * distributed.layout().data_parallel_size
    sums = []
    tokens_B = rollouts.mask_BT.sum(1).double()
    for mini_batches in mini_batch_orders(len(rollouts.examples), settings, seed=seed, step=step):
        counts = global_sum(torch.stack([tokens_B[torch.tensor(m, device=tokens_B.device)].sum()
                                         for m in mini_batches])).tolist()
        for indices, num_tokens in zip(mini_batches, counts, strict=True):
            total = torch.zeros(len(UPDATE_SUMS), dtype=torch.float64, device=device)
            for start in range(0, len(indices), settings.batch_size):
                total += micro_batch_update(policy_engine, value_engine, passes, rollouts,
                                            indices[start:start + settings.batch_size], collate=collate,
                                            device=device, settings=settings, num_tokens_global=max(num_tokens, 1.0),
                                            scale=scale)
            sums.append(total)
    return torch.stack(sums)


def rollout_sums(rollouts: RolloutBatch, eos_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """This rank's per-sequence sums of the rollout metrics (PPOv2's objective/* over sequences)."""
    mask = rollouts.mask_BT
    kl_B = (rollouts.kl_BT * mask).sum(1)
    entropy_B = (-rollouts.old_logps_BT * mask).sum(1)  # PPOv2's Monte-Carlo estimate: -sum log pi
    tokens = torch.cat([torch.tensor(e.responses[0]) for e in rollouts.examples])
    num_eos = torch.isin(tokens, torch.tensor(eos_ids, dtype=tokens.dtype)).sum() if eos_ids else torch.zeros(())
    gap_B = ((rollouts.sampler_logps_BT - rollouts.old_logps_BT).abs() * mask).sum(1)
    return {"num_sequences": torch.tensor(float(len(rollouts.examples))), "kl": kl_B.sum(),
            "entropy": entropy_B.sum(), "scores": rollouts.scores_B.sum(), "num_eos": num_eos.double(),
            "num_tokens": mask.sum().double(), "stopped": rollouts.stopped_B.sum().double(),
            "sampler_gap": gap_B.sum()}


def step_metrics(rollout_totals: dict[str, float], update_totals: torch.Tensor, *, kl_coef: float) -> dict[str, float]:
    """PPOv2's metric names from the global sums of one step."""
    num_seqs = max(rollout_totals["num_sequences"], 1.0)
    mean_kl = rollout_totals["kl"] / num_seqs
    scores = rollout_totals["scores"] / num_seqs
    non_score = -kl_coef * mean_kl
    per_update = update_totals / update_totals[:, -1:].clamp(min=1.0)  # token means per mini-batch update
    overall = update_totals.sum(0) / max(float(update_totals[:, -1].sum()), 1.0)
    metrics = {
        "objective/kl": mean_kl, "objective/entropy": rollout_totals["entropy"] / num_seqs,
        "objective/non_score_reward": non_score, "objective/rlhf_reward": non_score + scores,
        "objective/scores": scores, "val/num_eos_tokens": rollout_totals["num_eos"],
        "rollout/response_length": rollout_totals["num_tokens"] / num_seqs,
        "rollout/stopped_share": rollout_totals["stopped"] / num_seqs,
        "rollout/sampler_logp_gap": rollout_totals["sampler_gap"] / max(rollout_totals["num_tokens"], 1.0),
    }
    for name, column in (("policy/approxkl_avg", 0), ("policy/clipfrac_avg", 1), ("policy/entropy_avg", 3),
                         ("loss/policy_avg", 4), ("loss/value_avg", 5), ("val/clipfrac_avg", 6)):
        metrics[name] = float(overall[column])
    metrics["val/ratio"] = float(overall[2])
    metrics["val/ratio_var"] = float(per_update[:, 2].var(unbiased=False)) if len(per_update) > 1 else 0.0
    return metrics


@dataclass
class StepOutput:
    metrics: dict[str, float]
    rollouts: RolloutBatch
    num_episodes: int  # prompts of the step, all ranks


def ppo_step(*, policy_engine, value_engine, rollout_engine: RolloutEngine, scoring: ScoringPasses,
             training: TrainPasses, prompt_ids: list[list[int]], prompts: list[list[Message]], indices: list[int],
             settings: PPOSettings, collate, decode, eos_ids: tuple[int, ...], seed: int, step: int) -> StepOutput:
    """One PPO step on this rank's prompts (`indices`: their global indices, which seed the sampling)."""
    device = distributed.layout().device
    timer = PhaseTimer(device)
    started = time.perf_counter()
    learning_rate = policy_engine.lr_scheduler.get_last_lr()[0]  # the rate this step's updates start with
    rollout, examples, texts = sample_rollouts(rollout_engine, prompt_ids, indices, sampling=settings.sampling,
                                               seed=seed, step=step, decode=decode)
    timer.lap("generation")
    policy_engine.eval()
    value_engine.eval()
    rollouts = score_rollouts(scoring, rollout, examples, texts, prompts, settings=settings, collate=collate,
                              device=device)
    timer.lap("scoring")
    policy_engine.train()
    value_engine.train()
    updates = ppo_updates(policy_engine, value_engine, training, rollouts, settings=settings, collate=collate,
                          device=device, seed=seed, step=step)
    timer.lap("update")
    sums = rollout_sums(rollouts, eos_ids)
    num_local = float(len(rollouts.examples))
    for name, value in (rollouts.score_metrics or {}).items():  # batch means (rule rewards): weight by size
        sums[f"mean:{name}"] = torch.tensor(value * num_local, dtype=torch.float64)
    names = sorted(sums)
    flat = torch.cat([torch.stack([sums[n].double().to(device) for n in names]), updates.reshape(-1)])
    totals = global_sum(flat)
    rollout_totals = {n: float(v) for n, v in zip(names, totals[:len(names)], strict=True)}
    metrics = step_metrics(rollout_totals, totals[len(names):].reshape(updates.shape).cpu(), kl_coef=settings.kl_coef)
    for name in names:
        if name.startswith("mean:"):
            metrics[name.removeprefix("mean:")] = rollout_totals[name] / max(rollout_totals["num_sequences"], 1.0)
    seconds = time.perf_counter() - started
    metrics.update({f"time/{phase}": value for phase, value in timer.seconds.items()})
    metrics["time/step"] = seconds
    metrics["rollout/tokens_per_second"] = rollout_totals["num_tokens"] / max(timer.seconds["generation"], 1e-9)
    metrics["lr"] = learning_rate
    if device.type == "cuda":  # the allocator's own counter: no device sync
        metrics["gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return StepOutput(metrics=metrics, rollouts=rollouts, num_episodes=int(rollout_totals["num_sequences"]))
