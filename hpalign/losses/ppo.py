"""PPO for RLHF (Schulman et al. 2017, arXiv 1707.06347; InstructGPT, arXiv 2203.02155) with GAE
(Schulman et al. 2015, arXiv 1506.02438), following the formulas of TRL's PPOv2 trainer.

Tensors are [B, T] over response tokens; `mask_BT` is 1 (or True) on real response tokens and 0
on padding. Losses are per-sequence SUMS over masked tokens, shape [B]; the loop divides once by
the global response-token count. Defaults (swift document): kl_coef 0.05, cliprange 0.2,
vf_coef 0.1 (the loop's weight on the value loss), cliprange_value 0.2, gamma 1.0, lam 0.95,
whiten_rewards False (when True the loop calls whiten(rewards, mask, shift_mean=False)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, *,
           sum_over_ranks: Callable[[Tensor], Tensor] = _identity) -> Tensor:
    """(v - mean) / sqrt(var + 1e-8) over the masked entries (unbiased var, TRL's masked_whiten);
    the mean is added back when shift_mean is False. Entries outside the mask come back 0.
    `sum_over_ranks` sums the moments over data-parallel ranks, so N ranks whiten as one process."""
    mask_f = mask.to(values.dtype)
    num, total = sum_over_ranks(torch.stack([mask_f.sum(), (values * mask_f).sum()]))
    mean = total / num.clamp(min=1.0)
    # Bessel's correction; clamps rather than a raise keep tiny or empty masks finite without a sync.
    var = sum_over_ranks(((values - mean) ** 2 * mask_f).sum()) / (num - 1).clamp(min=1.0)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask_f


def kl_estimate(logps_BT: Tensor, ref_logps_BT: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL(pi || ref) estimate at the sampled token (Schulman, "Approximating KL
    divergence", 2020): k1 = log pi - log ref (unbiased; TRL's default), or k3 = (r - 1) - log r
    with r = ref / pi (unbiased and never negative, lower variance)."""
    log_ratio_BT = ref_logps_BT - logps_BT
    if estimator == "k1":
        return -log_ratio_BT
    if estimator == "k3":
        return torch.expm1(log_ratio_BT) - log_ratio_BT
    raise ValueError(f"--kl_estimator {estimator!r}: use k1 or k3")


def kl_penalised_rewards(score_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, *, kl_coef: float = 0.05) -> Tensor:
    """Per-token rewards [B, T]: -kl_coef * kl_t on each response token (`kl_estimate`), plus the
    score [B] on the LAST masked token; 0 on padding.

    Where the score goes: TRL's PPOv2 puts it one position after the last token
    (sequence_lengths_p1) when the response ended before the length limit, and keeps one value
    estimate there, of the token after the end; at the length limit it uses the last token, as
    here. hpalign always uses the last real token (as OpenRLHF does), where the episode ends.
    Call under torch.no_grad().
    """
    mask_f = mask_BT.to(kl_BT.dtype)
    rewards_BT = -kl_coef * kl_BT * mask_f
    positions_T = torch.arange(mask_BT.shape[1], device=mask_BT.device)
    last_B = (positions_T * mask_f).argmax(dim=1)  # last masked position; 0 when the row is empty
    has_tokens_B = mask_f.amax(dim=1)
    return rewards_BT.scatter_add(1, last_B[:, None], (score_B * has_tokens_B)[:, None].to(rewards_BT.dtype))


def gae_advantages(
    rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns, both [B, T] and 0 on padding.

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t
    with V and r zeroed outside the mask, so the episode ends after the last response token.
    A reverse loop over T as in TRL; the loop whitens the advantages afterwards with `whiten`.
    """
    mask_f = mask_BT.to(values_BT.dtype)
    values_BT, rewards_BT = values_BT * mask_f, rewards_BT * mask_f
    num_steps = rewards_BT.shape[1]
    last_gae_B = torch.zeros_like(values_BT[:, 0])
    advantages_reversed = []
    for t in reversed(range(num_steps)):
        next_values_B = values_BT[:, t + 1] if t + 1 < num_steps else torch.zeros_like(last_gae_B)
        delta_B = rewards_BT[:, t] + gamma * next_values_B - values_BT[:, t]
        last_gae_B = delta_B + gamma * lam * last_gae_B
        advantages_reversed.append(last_gae_B)
    advantages_BT = torch.stack(advantages_reversed[::-1], dim=1) * mask_f
    return advantages_BT, (advantages_BT + values_BT) * mask_f


def ppo_policy_losses(
    logps_BT: Tensor, old_logps_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor, *, cliprange: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate, per-sequence sums over masked tokens [B]:
        sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = exp(log pi - log pi_old).
    Metrics (detached per-sequence token sums, [B]; divide by the global token count):
    policy/clipfrac (tokens where the clipped branch is taken), policy/approxkl (0.5 (log rho)^2),
    policy/ratio, and num_tokens.
    """
    mask = mask_BT.bool()
    # Mask before exp: padding may hold placeholder log-probs whose ratio would overflow.
    log_ratio_BT = torch.where(mask, logps_BT - old_logps_BT, torch.zeros_like(logps_BT))
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * ratio_BT.clamp(1.0 - cliprange, 1.0 + cliprange)
    losses_BT = torch.where(mask, torch.maximum(unclipped_BT, clipped_BT), torch.zeros_like(ratio_BT))
    mask_f = mask.to(ratio_BT.dtype)
    metrics = {
        "policy/clipfrac": ((clipped_BT > unclipped_BT).to(mask_f.dtype) * mask_f).sum(1).detach(),
        "policy/approxkl": (0.5 * log_ratio_BT**2).sum(1).detach(),
        "policy/ratio": (ratio_BT * mask_f).sum(1).detach(),
        "num_tokens": mask_f.sum(1),
    }
    return losses_BT.sum(1), metrics


def ppo_value_losses(
    values_BT: Tensor,
    old_values_BT: Tensor,
    returns_BT: Tensor,
    mask_BT: Tensor,
    *,
    cliprange_value: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, per-sequence sums over masked tokens [B]:
        sum_t 0.5 max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)^2).
    Metrics (detached per-sequence token sums, [B]): value/clipfrac, num_tokens.
    """
    mask = mask_BT.bool()
    clipped_values_BT = old_values_BT + (values_BT - old_values_BT).clamp(-cliprange_value, cliprange_value)
    unclipped_BT = (values_BT - returns_BT) ** 2
    clipped_BT = (clipped_values_BT - returns_BT) ** 2
    losses_BT = torch.where(mask, 0.5 * torch.maximum(unclipped_BT, clipped_BT), torch.zeros_like(values_BT))
    mask_f = mask.to(values_BT.dtype)
    metrics = {
        "value/clipfrac": ((clipped_BT > unclipped_BT).to(mask_f.dtype) * mask_f).sum(1).detach(),
        "num_tokens": mask_f.sum(1),
    }
    return losses_BT.sum(1), metrics


__all__ = ["gae_advantages", "kl_estimate", "kl_penalised_rewards", "ppo_policy_losses", "ppo_value_losses", "whiten"]
