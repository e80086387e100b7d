"""DPO: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290), with its IPO
and hinge (SLiC) variants.

All three are functions of the log-ratio difference
    h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x)).
The log-probs are per-sequence SUMS over response tokens, as the loop computes them.
DPO's `rpo_alpha` NLL term on the chosen answer lives in `hpalign.losses.sft.rpo_nll_sum`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from hpalign.losses.pairwise import check_per_example, pair_metrics, smoothed_sigmoid_losses


def sigmoid_losses(h_B: Tensor, *, beta: float, label_smoothing: float) -> Tensor:
    """DPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (eps: conservative DPO)."""
    return smoothed_sigmoid_losses(beta * h_B, label_smoothing=label_smoothing)


def ipo_losses(h_B: Tensor, *, beta: float, label_smoothing: float) -> Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036): (h - 1/(2 beta))^2.

    Uses h as given: from per-sequence log-prob SUMS (the paper's definition). TRL feeds IPO
    per-token MEAN log-probs instead, so its h is smaller by about the response length and
    the same beta means a different target margin here.
    """
    return (h_B - 1.0 / (2.0 * beta)) ** 2


def hinge_losses(h_B: Tensor, *, beta: float, label_smoothing: float) -> Tensor:
    """SLiC-HF hinge (Zhao et al. 2023, arXiv 2305.10425): relu(1 - beta h)."""
    return (1.0 - beta * h_B).clamp(min=0.0)


DPO_LOSS_TYPES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_losses,
    "ipo": ipo_losses,
    "hinge": hinge_losses,
}


def dpo_losses(
    policy_chosen_logps_B: Tensor,
    policy_rejected_logps_B: Tensor,
    ref_chosen_logps_B: Tensor,
    ref_rejected_logps_B: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair DPO losses, shape [B] (unreduced: the loop divides by the global pair count).

    Args: four [B] per-sequence log-prob sums; `beta` the KL strength (> 0); `loss_type` one of
    DPO_LOSS_TYPES; `label_smoothing` eps in [0, 0.5], only meaningful for "sigmoid".
    Metrics (detached, [B]): rewards/chosen = beta (pi_w - ref_w), rewards/rejected,
    rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (policy sums).
    """
    check_per_example(
        policy_chosen_logps_B=policy_chosen_logps_B,
        policy_rejected_logps_B=policy_rejected_logps_B,
        ref_chosen_logps_B=ref_chosen_logps_B,
        ref_rejected_logps_B=ref_rejected_logps_B,
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(DPO_LOSS_TYPES)}")
    if beta <= 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing applies only to loss_type='sigmoid', not {loss_type!r}; set it to 0"
        )

    chosen_logratios_B = policy_chosen_logps_B - ref_chosen_logps_B
    rejected_logratios_B = policy_rejected_logps_B - ref_rejected_logps_B
    h_B = chosen_logratios_B - rejected_logratios_B
    losses_B = DPO_LOSS_TYPES[loss_type](h_B, beta=beta, label_smoothing=label_smoothing)
    metrics = pair_metrics(
        beta * chosen_logratios_B, beta * rejected_logratios_B, policy_chosen_logps_B, policy_rejected_logps_B
    )
    return losses_B, metrics


__all__ = ["DPO_LOSS_TYPES", "dpo_losses", "hinge_losses", "ipo_losses", "sigmoid_losses"]
