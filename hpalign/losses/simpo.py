"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al. 2024,
arXiv 2405.14734).

The implicit reward is the length-normalised log-prob, beta * (1/|y|) log pi(y|x), and a pair's
loss is -log sigmoid(beta (m_w - m_l) - gamma) with m the MEAN per-token log-prob (sum / tokens).
gamma is the target reward margin itself, as the swift document's `simpo_gamma` and TRL's
CPOTrainer(loss_type="simpo", simpo_gamma=...) use it; TRL's SimPOTrainer takes
gamma_beta_ratio = gamma / beta instead. `cpo_alpha` > 0 mixes in CPO's NLL on the chosen answer
(`hpalign.losses.sft.rpo_nll_sum`, added by the loop); cpo_alpha = 0 is the original SimPO.
"""

from __future__ import annotations

from torch import Tensor

from hpalign.losses.pairwise import check_per_example, pair_metrics, smoothed_sigmoid_losses


def simpo_losses(
    chosen_mean_logps_B: Tensor,
    rejected_mean_logps_B: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair SimPO losses, shape [B] (unreduced: the loop divides by the global pair count):
    -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), z = beta (m_w - m_l) - gamma.

    Args: two [B] mean per-token log-probs; `beta` > 0; `gamma` the margin; `label_smoothing`.
    Metrics (detached, [B]): rewards/chosen = beta m_w, rewards/rejected = beta m_l,
    rewards/accuracies, rewards/margins, logps/chosen = m_w, logps/rejected = m_l.
    """
    check_per_example(chosen_mean_logps_B=chosen_mean_logps_B, rejected_mean_logps_B=rejected_mean_logps_B)
    if beta <= 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_rewards_B = beta * chosen_mean_logps_B
    rejected_rewards_B = beta * rejected_mean_logps_B
    z_B = chosen_rewards_B - rejected_rewards_B - gamma
    losses_B = smoothed_sigmoid_losses(z_B, label_smoothing=label_smoothing)
    metrics = pair_metrics(chosen_rewards_B, rejected_rewards_B, chosen_mean_logps_B, rejected_mean_logps_B)
    return losses_B, metrics


__all__ = ["simpo_losses"]
