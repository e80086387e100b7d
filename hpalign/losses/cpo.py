"""CPO: Contrastive Preference Optimization (Xu et al. 2024, arXiv 2401.08417).

DPO without a reference model: the implicit reward is beta * log pi(y|x) (per-sequence log-prob
SUM), and the preference term is -log sigmoid(beta (log pi(y_w|x) - log pi(y_l|x))). CPO's second
term, cpo_alpha * NLL of the chosen answer, is the loop's: `hpalign.losses.sft.rpo_nll_sum`
divided by the global chosen-token count (the same term DPO calls rpo_alpha).
"""

from __future__ import annotations

from torch import Tensor

from hpalign.losses.pairwise import check_per_example, pair_metrics, smoothed_sigmoid_losses


def cpo_losses(
    policy_chosen_logps_B: Tensor,
    policy_rejected_logps_B: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair CPO preference losses, shape [B] (unreduced: the loop divides by the global
    pair count): -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d), d = pi_w - pi_l.

    Args: two [B] per-sequence log-prob sums; `beta` > 0; `label_smoothing` eps in [0, 0.5].
    Metrics (detached, [B]): rewards/chosen = beta pi_w, rewards/rejected = beta pi_l,
    rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
    """
    check_per_example(
        policy_chosen_logps_B=policy_chosen_logps_B, policy_rejected_logps_B=policy_rejected_logps_B
    )
    if beta <= 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_rewards_B = beta * policy_chosen_logps_B
    rejected_rewards_B = beta * policy_rejected_logps_B
    losses_B = smoothed_sigmoid_losses(chosen_rewards_B - rejected_rewards_B, label_smoothing=label_smoothing)
    metrics = pair_metrics(
        chosen_rewards_B, rejected_rewards_B, policy_chosen_logps_B, policy_rejected_logps_B
    )
    return losses_B, metrics


__all__ = ["cpo_losses"]
