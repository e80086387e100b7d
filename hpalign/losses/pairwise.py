"""Pieces shared by the pairwise (Bradley-Terry) losses: DPO, CPO, SimPO, ORPO and RM.

Bradley & Terry (1952): P(y_w > y_l) = sigmoid(r_w - r_l), so the negative log-likelihood of a
preference is -log sigmoid(z) for a score difference z. Each algorithm differs only in its z.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def check_per_example(**tensors_B: Tensor) -> None:
    """Raise ValueError unless every tensor is 1-D of one length [B].

    A [B] tensor met with a [B, 1] one would broadcast silently to [B, B]; this catches it.
    """
    shapes = {name: tuple(t.shape) for name, t in tensors_B.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"expected 1-D per-example tensors of one length [B], got shapes {shapes}")


def smoothed_sigmoid_losses(z_B: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Per-pair -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), shape [B].

    eps is the probability that a preference label is flipped (conservative DPO, Mitchell 2023,
    as in TRL). `F.logsigmoid` is finite with finite gradients for any finite z.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] (a label-flip chance), got {label_smoothing}")
    losses_B = -F.logsigmoid(z_B) * (1.0 - label_smoothing)
    if label_smoothing > 0.0:
        losses_B = losses_B - F.logsigmoid(-z_B) * label_smoothing
    return losses_B


def pair_metrics(
    chosen_rewards_B: Tensor, rejected_rewards_B: Tensor, chosen_logps_B: Tensor, rejected_logps_B: Tensor
) -> dict[str, Tensor]:
    """TRL's pairwise metrics, per pair and detached (shape [B]); the loop sums and divides by
    the global number of pairs. Ties count as wrong in `rewards/accuracies`."""
    chosen_B, rejected_B = chosen_rewards_B.detach(), rejected_rewards_B.detach()
    return {
        "rewards/chosen": chosen_B,
        "rewards/rejected": rejected_B,
        "rewards/accuracies": (chosen_B > rejected_B).to(chosen_B.dtype),
        "rewards/margins": chosen_B - rejected_B,
        "logps/chosen": chosen_logps_B.detach(),
        "logps/rejected": rejected_logps_B.detach(),
    }


__all__ = ["check_per_example", "pair_metrics", "smoothed_sigmoid_losses"]
