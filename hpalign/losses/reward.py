"""Reward modelling: the Bradley-Terry pairwise loss of InstructGPT (Ouyang et al. 2022,
arXiv 2203.02155), with TRL's optional margin and reward centring (Eisenstein et al. 2023,
arXiv 2312.09244).

Per pair:  -log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2,  r the value head's scalar reward.
The centring term pulls the rewards' mean towards 0 so that scores are comparable across runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hpalign.losses.pairwise import check_per_example


def reward_losses(
    chosen_rewards_B: Tensor,
    rejected_rewards_B: Tensor,
    *,
    margins_B: Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair reward-model losses, shape [B] (unreduced: the loop divides by the global pair count).

    Args: `chosen_rewards_B`, `rejected_rewards_B` [B] scalar rewards; `margins_B` [B] optional
    required reward gap m per pair (0 when None); `center_rewards_coefficient` c >= 0.
    Metrics (detached, [B]): accuracy (1 when r_w > r_l; ties count as wrong), rewards/chosen,
    rewards/rejected, rewards/margins = r_w - r_l.
    """
    check_per_example(chosen_rewards_B=chosen_rewards_B, rejected_rewards_B=rejected_rewards_B)
    if center_rewards_coefficient < 0.0:
        raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
    z_B = chosen_rewards_B - rejected_rewards_B
    if margins_B is not None:
        check_per_example(chosen_rewards_B=chosen_rewards_B, margins_B=margins_B)
        z_B = z_B - margins_B
    losses_B = -F.logsigmoid(z_B)
    if center_rewards_coefficient > 0.0:
        losses_B = losses_B + center_rewards_coefficient * (chosen_rewards_B + rejected_rewards_B) ** 2
    chosen_B, rejected_B = chosen_rewards_B.detach(), rejected_rewards_B.detach()
    metrics = {
        "accuracy": (chosen_B > rejected_B).to(chosen_B.dtype),
        "rewards/chosen": chosen_B,
        "rewards/rejected": rejected_B,
        "rewards/margins": chosen_B - rejected_B,
    }
    return losses_B, metrics


__all__ = ["reward_losses"]
