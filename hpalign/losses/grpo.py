"""The GRPO family: critic-free advantages and the clipped token loss, following the formulas of
TRL's GRPOTrainer. GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300), DAPO (Yu et al. 2025,
arXiv 2503.14476), Dr. GRPO (Liu et al. 2025, arXiv 2503.20783), RLOO (Ahmadian et al. 2024,
arXiv 2402.14740), REINFORCE++ (Hu 2025, arXiv 2501.03262).

A rollout batch holds `num_generations` CONSECUTIVE responses to each prompt; a group never
straddles ranks. Token tensors are [B, T] over response tokens, `mask_BT` 1 (or True) on real
tokens. Unlike ppo.py, the token weights of `token_loss_weights` already divide by the GLOBAL
counts, so the loop sums `clipped_token_losses` over micro-batches and ranks and divides by nothing.
The functions' keyword defaults are TRL GRPOConfig's (epsilon 0.2, epsilon_high = epsilon, beta 0.0,
scale_rewards "group"); the command line's defaults are in `hpalign.hyperparams.GRPOParams` (ms-swift's:
beta 0.04, loss_type "grpo").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hpalign.losses.ppo import _identity, kl_penalised_rewards, whiten

SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def _grouped(scores_B: Tensor, num_generations: int) -> Tensor:
    """[B] -> [B / N, N]; one row per prompt."""
    if scores_B.dim() != 1 or num_generations < 1 or scores_B.numel() % num_generations:
        raise ValueError(f"{tuple(scores_B.shape)} scores do not split into groups of num_generations="
                         f"{num_generations}: pass [B] scores, B a multiple of num_generations (consecutive "
                         "responses to one prompt)")
    return scores_B.reshape(-1, num_generations)


def _batch_std(scores_B: Tensor, sum_over_ranks: Callable[[Tensor], Tensor]) -> Tensor:
    """Unbiased std of all ranks' scores (two passes, as `whiten`: no cancellation on large means)."""
    num, total = sum_over_ranks(torch.stack([scores_B.new_tensor(float(scores_B.numel())), scores_B.sum()]))
    mean = total / num.clamp(min=1.0)
    sq_dev_sum = sum_over_ranks(((scores_B - mean) ** 2).sum().reshape(1))[0]
    return (sq_dev_sum / (num - 1).clamp(min=1.0)).sqrt()  # one score in all: std 0, as TRL


def group_advantages(scores_B: Tensor, num_generations: int, *, scale_rewards: str = "group", eps: float = 1e-4,
                     sum_over_ranks: Callable[[Tensor], Tensor] = _identity) -> Tensor:
    """GRPO's advantages [B]: A_i = (r_i - mean_group(r)) / (std + eps), one per response.

    scale_rewards: "group" std of the response's group (unbiased, as torch.std); "batch" std of all
    scores of all ranks (`sum_over_ranks` sums a 1-D tensor of moments over data-parallel ranks);
    "none" no division (Dr. GRPO: dividing by the std over-weights easy and hopeless prompts).
    A group of one has std 0, as TRL. Call under torch.no_grad().
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale_rewards!r}: use one of {', '.join(SCALE_REWARDS)}")
    grouped_GN = _grouped(scores_B, num_generations)
    advantages_B = (grouped_GN - grouped_GN.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return advantages_B
    if scale_rewards == "batch":
        return advantages_B / (_batch_std(scores_B, sum_over_ranks) + eps)
    if num_generations == 1:
        return advantages_B  # all 0; torch.std of one element would be NaN
    std_B = grouped_GN.std(dim=1, keepdim=True).expand_as(grouped_GN).reshape(-1)
    return advantages_B / (std_B + eps)


def rloo_advantages(scores_B: Tensor, num_generations: int) -> Tensor:
    """RLOO's advantages [B]: A_i = r_i - mean_{j != i in the group} r_j = N / (N - 1) (r_i - mean).
    The baseline of each response is the mean score of the other N - 1 answers to its prompt."""
    if num_generations < 2:
        raise ValueError(f"RLOO needs num_generations >= 2 (the baseline is the other answers' mean), "
                         f"got {num_generations}")
    grouped_GN = _grouped(scores_B, num_generations)
    baseline_GN = (grouped_GN.sum(dim=1, keepdim=True) - grouped_GN) / (num_generations - 1)
    return (grouped_GN - baseline_GN).reshape(-1)


def reinforce_pp_advantages(scores_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, *, beta: float,
                            sum_over_ranks: Callable[[Tensor], Tensor] = _identity) -> Tensor:
    """REINFORCE++'s advantages [B, T], 0 on padding.

        r_t = -beta kl_t (+ the score on the last masked token),   G_t = sum_{t' >= t} r_t'   (gamma 1)
    then G whitened over all masked tokens of all ranks (`whiten`). `kl_BT` is a per-token estimate
    (`kl_estimate`); padding is ignored. Call under torch.no_grad().
    """
    kl_BT = torch.where(mask_BT.bool(), kl_BT, torch.zeros_like(kl_BT))  # padding placeholders may be inf
    rewards_BT = kl_penalised_rewards(scores_B, kl_BT, mask_BT, kl_coef=beta)
    returns_BT = rewards_BT.flip(1).cumsum(1).flip(1) * mask_BT.to(rewards_BT.dtype)
    return whiten(returns_BT, mask_BT, sum_over_ranks=sum_over_ranks)


def token_loss_weights(mask_BT: Tensor, loss_type: str, *, num_sequences: float, num_tokens: float,
                       max_length: int) -> Tensor:
    """Per-token weights [B, T]: sum over micro-batches and ranks of sum_t w_t l_t is the mini-batch loss.

    num_sequences, num_tokens: GLOBAL counts of the mini-batch; max_length: the completion limit.
        grpo      w = 1 / (len_i num_sequences)       mean over each sequence, then over sequences (GRPO)
        dapo      w = 1 / num_tokens                  token mean (DAPO; TRL's bnpo; also PPO's)
        dr_grpo   w = 1 / (num_sequences max_length)  a constant: no length bias (Dr. GRPO)
    0 on padding and on rows without tokens. float32 unless the mask is floating.
    """
    mask_f = mask_BT.to(mask_BT.dtype if mask_BT.is_floating_point() else torch.float32)
    if loss_type == "grpo":
        return mask_f / (mask_f.sum(dim=1, keepdim=True).clamp(min=1.0) * max(num_sequences, 1.0))
    if loss_type == "dapo":
        return mask_f / max(num_tokens, 1.0)
    if loss_type == "dr_grpo":
        if max_length < 1:
            raise ValueError(f"dr_grpo divides by max_length, the completion length limit; got {max_length}")
        return mask_f / (max(num_sequences, 1.0) * max_length)
    raise ValueError(f"loss_type {loss_type!r}: use one of {', '.join(GRPO_LOSS_TYPES)}")


def clipped_token_losses(
    logps_BT: Tensor, old_logps_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor, weights_BT: Tensor, *,
    epsilon: float = 0.2, epsilon_high: float | None = None, ref_logps_BT: Tensor | None = None, beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's clipped surrogate with a per-token KL, weighted per-sequence sums [B]: sum_t w_t l_t,
        l_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps_high) A_t) + beta k3_t,
        rho_t = exp(log pi - log pi_old),   k3_t = exp(ref - log pi) - (ref - log pi) - 1.
    `advantages_BT` is [B, T] or [B] (one per sequence); `weights_BT` from `token_loss_weights`;
    epsilon_high None means epsilon (DAPO's clip-higher when larger); k3 only when beta != 0.
    Metrics (detached UNWEIGHTED token sums, [B]): policy/clipfrac (the clipped branch binds: rho
    > 1 + eps_high with A > 0, or rho < 1 - eps with A < 0), policy/approxkl (0.5 (log rho)^2),
    policy/ratio, kl (k3; 0 when beta is 0), num_tokens.
    """
    if beta != 0.0 and ref_logps_BT is None:
        raise ValueError(f"beta={beta} needs ref_logps_BT, the reference model's log-probs; or set beta=0")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask_BT.bool()
    zeros_BT = torch.zeros_like(logps_BT)
    adv_BT = advantages_BT[:, None] if advantages_BT.dim() == 1 else advantages_BT
    # Mask before exp: padding may hold placeholder log-probs whose ratio would overflow.
    log_ratio_BT = torch.where(mask, logps_BT - old_logps_BT, zeros_BT)
    ratio_BT = torch.exp(log_ratio_BT)
    surrogate_BT = torch.minimum(ratio_BT * adv_BT, ratio_BT.clamp(1.0 - epsilon, 1.0 + epsilon_high) * adv_BT)
    kl_BT = zeros_BT
    if beta != 0.0:
        log_ref_ratio_BT = torch.where(mask, ref_logps_BT - logps_BT, zeros_BT)
        kl_BT = torch.expm1(log_ref_ratio_BT) - log_ref_ratio_BT  # kl_estimate(..., "k3")
    token_losses_BT = torch.where(mask, beta * kl_BT - surrogate_BT, zeros_BT)
    mask_f = mask.to(ratio_BT.dtype)
    clipped_BT = ((ratio_BT > 1.0 + epsilon_high) & (adv_BT > 0)) | ((ratio_BT < 1.0 - epsilon) & (adv_BT < 0))
    metrics = {
        "policy/clipfrac": (clipped_BT & mask).to(mask_f.dtype).sum(1).detach(),
        "policy/approxkl": (0.5 * log_ratio_BT**2).sum(1).detach(),
        "policy/ratio": (ratio_BT * mask_f).sum(1).detach(),
        "kl": (kl_BT * mask_f).sum(1).detach(),
        "num_tokens": mask_f.sum(1),
    }
    return (weights_BT * token_losses_BT).sum(1), metrics


__all__ = ["clipped_token_losses", "group_advantages", "reinforce_pp_advantages", "rloo_advantages",
           "token_loss_weights"]
