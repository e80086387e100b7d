"""The GRPO family's part of the rollout loop: critic-free advantages from groups of responses to one
prompt, one trainable engine, TRL GRPOTrainer's flag and metric names. Maths in `hpalign.losses.grpo`.

- grpo (arXiv 2402.03300): A = (r - mean of its group) / (std + eps), --scale_rewards group | batch
  | none (Dr. GRPO); the KL to the reference is k3, in the loss, weighted by --beta.
- rloo (arXiv 2402.14740): the score minus --beta x the response's summed KL (--kl_estimator), then
  A = r - the mean of the other N - 1 responses to the prompt.
- reinforce_pp (arXiv 2501.03262): -beta x KL on every token, the score on the last, returns
  whitened over every rank's tokens; no group needed.
The update is the clipped surrogate (--epsilon, --epsilon_high: DAPO's clip-higher) with token
weights of --loss_type grpo | dapo | dr_grpo, normalised by the mini-batch's GLOBAL counts. With one
epoch and one mini-batch (the default) the update is on-policy: the ratio's denominator is the
policy's own detached log-prob (ratio 1, TRL's choice), so no old log-prob pass runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpalign import losses
from hpalign.data.collate import SequenceBatch
from hpalign.rl.loop import MiniBatchCounts
from hpalign.rl.scoring import RolloutBatch, TokenPass, global_sum

ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


@dataclass(frozen=True)
class CriticFreeSettings:
    """The GRPO family's own hyper-parameters (TRL GRPOConfig's names)."""

    estimator: str  # grpo | rloo | reinforce_pp (--rlhf_type)
    num_generations: int
    beta: float
    epsilon: float
    epsilon_high: float | None
    scale_rewards: str
    loss_type: str
    mask_truncated_completions: bool
    kl_estimator: str  # rloo / reinforce_pp: the KL estimate in the reward
    max_completion_length: int  # --response_length: dr_grpo's constant normaliser
    on_policy: bool  # one epoch, one mini-batch: no old log-probs needed

    @property
    def kl_in_loss(self) -> bool:
        return self.estimator == "grpo" and self.beta != 0.0

    @property
    def kl_in_reward(self) -> bool:
        return self.estimator != "grpo" and self.beta != 0.0

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0


def add_critic_free_advantages(rollouts: RolloutBatch, settings: CriticFreeSettings) -> None:
    """advantages_BT (0 on padding), kl_BT when the KL is in the reward, and loss_mask_BT without the
    truncated responses when --mask_truncated_completions."""
    mask = rollouts.mask_BT
    if settings.mask_truncated_completions:
        rollouts.loss_mask_BT = mask & rollouts.stopped_B[:, None]
    kl_BT = torch.zeros_like(rollouts.sampler_logps_BT)
    if settings.kl_in_reward:
        kl_BT = losses.kl_estimate(rollouts.policy_logps_BT, rollouts.ref_logps_BT, settings.kl_estimator) * mask
        rollouts.kl_BT = kl_BT
    scores_B, num_generations = rollouts.scores_B.float(), settings.num_generations
    if settings.estimator == "grpo":
        advantages_B = losses.group_advantages(scores_B, num_generations, scale_rewards=settings.scale_rewards,
                                               sum_over_ranks=global_sum)
    elif settings.estimator == "rloo":
        advantages_B = losses.rloo_advantages(scores_B - settings.beta * kl_BT.sum(1), num_generations)
    else:
        rollouts.advantages_BT = losses.reinforce_pp_advantages(scores_B, kl_BT, mask, beta=settings.beta,
                                                                sum_over_ranks=global_sum)
        return
    rollouts.advantages_BT = advantages_B[:, None] * mask


def group_sums(scores_B: torch.Tensor, num_generations: int) -> dict[str, torch.Tensor]:
    """Sums of TRL's group metrics: the groups' score stds and how many have none (no signal)."""
    if num_generations < 2:
        zero = torch.zeros((), dtype=torch.float64)
        return {"group_std": zero, "zero_std_groups": zero, "num_groups": zero}
    std_G = scores_B.double().reshape(-1, num_generations).std(dim=1)
    return {"group_std": std_G.sum(), "zero_std_groups": (std_G < 1e-6).sum().double(),
            "num_groups": torch.tensor(float(std_G.numel()), dtype=torch.float64)}


UPDATE_SUMS = ("policy/approxkl", "policy/clipfrac", "policy/ratio", "entropy", "kl", "loss", "num_tokens")


def critic_free_step_metrics(totals: dict[str, float], update_totals: torch.Tensor, *,
                             kl_in_reward: bool) -> dict[str, float]:
    """TRL GRPOTrainer's names (reward, reward_std, frac_reward_zero_std, kl, entropy, clip_ratio,
    completions/*, loss) from the global sums of one step (`update_totals`: [updates, UPDATE_SUMS])."""
    num_seqs, groups = max(totals["num_sequences"], 1.0), max(totals["num_groups"], 1.0)
    overall = update_totals.sum(0) / max(float(update_totals[:, -1].sum()), 1.0)  # token means
    kl = totals["reward_kl"] / max(totals["num_tokens"], 1.0) if kl_in_reward else float(overall[4])
    return {
        "reward": totals["scores"] / num_seqs, "reward_std": totals["group_std"] / groups,
        "frac_reward_zero_std": totals["zero_std_groups"] / groups, "kl": kl, "entropy": float(overall[3]),
        "clip_ratio/region_mean": float(overall[1]), "policy/approxkl_avg": float(overall[0]),
        "val/ratio": float(overall[2]), "loss": float(update_totals[:, 5].mean()),
        "completions/mean_length": totals["num_tokens"] / num_seqs,
        "completions/clipped_ratio": 1.0 - totals["stopped"] / num_seqs,
    }


class CriticFreeObjective:
    """The RolloutObjective of GRPO, RLOO and REINFORCE++: the policy engine alone."""

    update_sums = UPDATE_SUMS
    progress = ("reward", "kl")  # shown on the progress bar

    def __init__(self, settings: CriticFreeSettings, *, policy_engine, policy_forward: TokenPass) -> None:
        self.settings, self.policy_engine, self.policy_forward = settings, policy_engine, policy_forward

    def engines(self) -> tuple:
        return (self.policy_engine,)

    def add_advantages(self, rollouts: RolloutBatch) -> None:
        add_critic_free_advantages(rollouts, self.settings)

    def rollout_sums(self, rollouts: RolloutBatch) -> dict[str, torch.Tensor]:
        sums = group_sums(rollouts.scores_B, self.settings.num_generations)
        sums["reward_kl"] = torch.zeros((), dtype=torch.float64)
        if rollouts.kl_BT is not None:  # the KL in the reward (rloo, reinforce_pp)
            sums["reward_kl"] = (rollouts.kl_BT * rollouts.mask_BT).sum().double()
        return sums

    def micro_batch_update(self, batch: SequenceBatch, rollouts: RolloutBatch, rows: torch.Tensor, *,
                           counts: MiniBatchCounts, scale: float) -> torch.Tensor:
        s = self.settings
        mask_BT = rollouts.loss_mask_BT[rows]
        policy = self.policy_forward(batch)
        logps_BT = policy.as_matrix(policy.logps_M, rollouts.width)
        old_BT = logps_BT.detach() if s.on_policy else rollouts.policy_logps_BT[rows]
        weights_BT = losses.token_loss_weights(mask_BT, s.loss_type, num_sequences=counts.num_sequences,
                                               num_tokens=counts.num_tokens, max_length=s.max_completion_length)
        ref_BT = rollouts.ref_logps_BT[rows] if s.kl_in_loss else None
        losses_B, metrics = losses.clipped_token_losses(
            logps_BT, old_BT, rollouts.advantages_BT[rows], mask_BT, weights_BT, epsilon=s.epsilon,
            epsilon_high=s.epsilon_high, ref_logps_BT=ref_BT, beta=s.beta if s.kl_in_loss else 0.0)
        loss = losses_B.sum()
        self.policy_engine.backward(loss * scale)
        self.policy_engine.step()
        entropy = torch.zeros((), device=logps_BT.device)
        if policy.entropy_M is not None:
            entropy = (policy.as_matrix(policy.entropy_M, rollouts.width) * mask_BT).sum()
        return torch.stack([metrics["policy/approxkl"].sum(), metrics["policy/clipfrac"].sum(),
                            metrics["policy/ratio"].sum(), entropy.float(), metrics["kl"].sum(), loss.detach(),
                            metrics["num_tokens"].sum()]).double()

    def step_metrics(self, totals: dict[str, float], update_totals: torch.Tensor) -> dict[str, float]:
        return critic_free_step_metrics(totals, update_totals, kl_in_reward=self.settings.kl_in_reward)
