"""PPO's part of the rollout loop (arXiv 2203.02155, TRL's PPOv2 trainer): a critic, GAE advantages,
clipped policy and value updates of two engines, and PPOv2's metric names. Maths in
`hpalign.losses.ppo`; the loop that drives it in `loop.py`.

Per step: per-token rewards (the score on the last response token, -kl_coef * KL on every token,
--kl_estimator), GAE over the value model's estimates, advantages whitened over every rank's tokens.
Each micro-batch's losses are per-token sums divided by the mini-batch's GLOBAL token count. Policy
and value are separate engines (own optimizer, own clipping, own schedule; TRL clips their joint
norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpalign import losses
from hpalign.data.collate import SequenceBatch
from hpalign.rl.loop import MiniBatchCounts
from hpalign.rl.scoring import RolloutBatch, TokenPass, global_sum


@dataclass(frozen=True)
class PPOSettings:
    """PPO's own hyper-parameters (the `ppo` section's flags of the critic and GAE)."""

    kl_coef: float
    kl_estimator: str
    whiten_rewards: bool
    gamma: float
    lam: float
    cliprange: float
    cliprange_value: float
    vf_coef: float


def add_gae_advantages(rollouts: RolloutBatch, settings: PPOSettings) -> None:
    """Per-token rewards, GAE advantages (whitened over all ranks' tokens) and returns, as PPOv2."""
    mask = rollouts.mask_BT
    kl_BT = losses.kl_estimate(rollouts.policy_logps_BT, rollouts.ref_logps_BT, settings.kl_estimator) * mask
    rewards_BT = losses.kl_penalised_rewards(rollouts.scores_B, kl_BT, mask, kl_coef=settings.kl_coef)
    if settings.whiten_rewards:
        rewards_BT = losses.whiten(rewards_BT, mask, shift_mean=False, sum_over_ranks=global_sum)
    advantages_BT, returns_BT = losses.gae_advantages(rewards_BT, rollouts.values_BT, mask, gamma=settings.gamma,
                                                      lam=settings.lam)
    rollouts.kl_BT, rollouts.rewards_BT, rollouts.returns_BT = kl_BT, rewards_BT, returns_BT
    rollouts.advantages_BT = losses.whiten(advantages_BT, mask, sum_over_ranks=global_sum)


UPDATE_SUMS = ("policy/approxkl", "policy/clipfrac", "policy/ratio", "policy/entropy", "loss/policy", "loss/value",
               "val/clipfrac", "num_tokens")


def ppo_step_metrics(totals: dict[str, float], update_totals: torch.Tensor, *, kl_coef: float) -> dict[str, float]:
    """PPOv2's metric names from the global sums of one step (`update_totals`: [updates, UPDATE_SUMS])."""
    num_seqs = max(totals["num_sequences"], 1.0)
    mean_kl = totals["kl"] / num_seqs
    scores = totals["scores"] / num_seqs
    non_score = -kl_coef * mean_kl
    per_update = update_totals / update_totals[:, -1:].clamp(min=1.0)  # token means per mini-batch update
    overall = update_totals.sum(0) / max(float(update_totals[:, -1].sum()), 1.0)
    metrics = {
        "objective/kl": mean_kl, "objective/entropy": totals["entropy"] / num_seqs,
        "objective/non_score_reward": non_score, "objective/rlhf_reward": non_score + scores,
        "objective/scores": scores, "val/num_eos_tokens": totals["num_eos"],
    }
    for name, column in (("policy/approxkl_avg", 0), ("policy/clipfrac_avg", 1), ("policy/entropy_avg", 3),
                         ("loss/policy_avg", 4), ("loss/value_avg", 5), ("val/clipfrac_avg", 6)):
        metrics[name] = float(overall[column])
    metrics["val/ratio"] = float(overall[2])
    metrics["val/ratio_var"] = float(per_update[:, 2].var(unbiased=False)) if len(per_update) > 1 else 0.0
    return metrics


class PPOObjective:
    """The RolloutObjective of PPO: policy and value engines, GAE, PPOv2's metrics."""

    update_sums = UPDATE_SUMS
    progress = ("objective/scores", "objective/kl")  # shown on the progress bar

    def __init__(self, settings: PPOSettings, *, policy_engine, value_engine, policy_forward: TokenPass,
                 value_forward: TokenPass, eos_ids: tuple[int, ...]) -> None:
        self.settings, self.policy_engine, self.value_engine = settings, policy_engine, value_engine
        self.policy_forward, self.value_forward, self.eos_ids = policy_forward, value_forward, eos_ids

    def engines(self) -> tuple:
        return self.policy_engine, self.value_engine

    def add_advantages(self, rollouts: RolloutBatch) -> None:
        add_gae_advantages(rollouts, self.settings)

    def rollout_sums(self, rollouts: RolloutBatch) -> dict[str, torch.Tensor]:
        mask = rollouts.mask_BT
        tokens = torch.cat([torch.tensor(e.responses[0]) for e in rollouts.examples])
        eos = torch.tensor(self.eos_ids, dtype=tokens.dtype)
        num_eos = torch.isin(tokens, eos).sum() if self.eos_ids else torch.zeros(())
        return {"kl": (rollouts.kl_BT * mask).sum(),
                "entropy": (-rollouts.policy_logps_BT * mask).sum(),  # PPOv2's Monte-Carlo estimate: -sum log pi
                "num_eos": num_eos.double()}

    def micro_batch_update(self, batch: SequenceBatch, rollouts: RolloutBatch, rows: torch.Tensor, *,
                           counts: MiniBatchCounts, scale: float) -> torch.Tensor:
        mask_BT, width, num_tokens = rollouts.mask_BT[rows], rollouts.width, max(counts.num_tokens, 1.0)
        policy = self.policy_forward(batch)
        logps_BT = policy.as_matrix(policy.logps_M, width)
        pg_losses_B, pg_metrics = losses.ppo_policy_losses(logps_BT, rollouts.policy_logps_BT[rows],
                                                           rollouts.advantages_BT[rows], mask_BT,
                                                           cliprange=self.settings.cliprange)
        policy_loss = pg_losses_B.sum() / num_tokens
        self.policy_engine.backward(policy_loss * scale)
        values = self.value_forward(batch)
        values_BT = values.as_matrix(values.values_M, width)
        vf_losses_B, vf_metrics = losses.ppo_value_losses(values_BT, rollouts.values_BT[rows],
                                                          rollouts.returns_BT[rows], mask_BT,
                                                          cliprange_value=self.settings.cliprange_value)
        value_loss = vf_losses_B.sum() / num_tokens
        self.value_engine.backward(self.settings.vf_coef * value_loss * scale)
        self.policy_engine.step()
        self.value_engine.step()
        entropy = policy.entropy_M.sum() if policy.entropy_M is not None else torch.zeros((), device=logps_BT.device)
        return torch.stack([pg_metrics["policy/approxkl"].sum(), pg_metrics["policy/clipfrac"].sum(),
                            pg_metrics["policy/ratio"].sum(), entropy.float(),
                            policy_loss.detach() * num_tokens, value_loss.detach() * num_tokens,
                            vf_metrics["value/clipfrac"].sum(), pg_metrics["num_tokens"].sum()]).double()

    def step_metrics(self, totals: dict[str, float], update_totals: torch.Tensor) -> dict[str, float]:
        return ppo_step_metrics(totals, update_totals, kl_coef=self.settings.kl_coef)
