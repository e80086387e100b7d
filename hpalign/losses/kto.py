"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306).

Data are (x, y, label) with label True for a desirable answer. With r = log pi(y|x) - log ref(y|x)
(per-sequence log-prob SUMS) and the reference point z0 = max(0, KL estimate):
    desirable:    lambda_D (1 - sigmoid(beta (r - z0)))
    undesirable:  lambda_U (1 - sigmoid(beta (z0 - r)))
z0 is estimated on mismatched pairs (x_i, y_j), j != i, averaged over the GLOBAL batch: the loop
sums `kto_kl_estimate`'s pieces over micro-batches and ranks, then passes sum / count here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hpalign.losses.pairwise import check_per_example


def kto_losses(
    policy_logps_B: Tensor,
    ref_logps_B: Tensor,
    kl_ref_point: Tensor | float,
    labels_B: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example KTO losses, shape [B] (unreduced: the loop divides by the global count).

    Args: `policy_logps_B`, `ref_logps_B` [B] sequence log-prob sums; `kl_ref_point` scalar
    z0 (detached and clamped at 0 here); `labels_B` [B] bool, True = desirable.
    Metrics (detached, [B], zero on the other label so no batch gives NaN): rewards/chosen and
    logps/chosen on desirable rows, rewards/rejected and logps/rejected on undesirable rows,
    count/desirable and count/undesirable (1/0) to divide those by, and kl (z0 on every row).
    """
    check_per_example(policy_logps_B=policy_logps_B, ref_logps_B=ref_logps_B, labels_B=labels_B)
    if labels_B.dtype != torch.bool:
        raise ValueError(f"labels_B must be a bool tensor (True = desirable), got {labels_B.dtype}")
    if desirable_weight < 0.0 or undesirable_weight < 0.0:
        raise ValueError("desirable_weight and undesirable_weight must be >= 0")
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps_B.dtype, device=policy_logps_B.device)
    z0 = z0.detach().clamp(min=0.0)
    logratios_B = policy_logps_B - ref_logps_B
    # 1 - sigmoid(a) == sigmoid(-a), which keeps full precision when sigmoid(a) is near 1.
    desirable_B = desirable_weight * torch.sigmoid(-beta * (logratios_B - z0))
    undesirable_B = undesirable_weight * torch.sigmoid(-beta * (z0 - logratios_B))
    losses_B = torch.where(labels_B, desirable_B, undesirable_B)

    rewards_B = beta * logratios_B.detach()
    zero_B = torch.zeros_like(rewards_B)
    metrics = {
        "rewards/chosen": torch.where(labels_B, rewards_B, zero_B),
        "rewards/rejected": torch.where(labels_B, zero_B, rewards_B),
        "logps/chosen": torch.where(labels_B, policy_logps_B.detach(), zero_B),
        "logps/rejected": torch.where(labels_B, zero_B, policy_logps_B.detach()),
        "count/desirable": labels_B.to(rewards_B.dtype),
        "count/undesirable": (~labels_B).to(rewards_B.dtype),
        "kl": z0.expand_as(rewards_B).clone(),
    }
    return losses_B, metrics


def kto_kl_estimate(policy_kl_logps_B: Tensor, ref_kl_logps_B: Tensor) -> tuple[Tensor, Tensor]:
    """Pieces of the KL reference point: (sum_i pi(y'_i|x_i) - ref(y'_i|x_i), count), both
    detached 0-d tensors, from mismatched pairs (x_i, y'_i) [B]. All-reduce both over the step,
    then z0 = max(0, sum / count) (the clamp is in `kto_losses`)."""
    check_per_example(policy_kl_logps_B=policy_kl_logps_B, ref_kl_logps_B=ref_kl_logps_B)
    kl_sum = (policy_kl_logps_B - ref_kl_logps_B).detach().sum()
    return kl_sum, torch.tensor(float(policy_kl_logps_B.numel()), dtype=kl_sum.dtype, device=kl_sum.device)


def mismatched_completion_index(num_examples: int, *, generator: torch.Generator | None = None) -> Tensor:
    """For each example i the index of another example's completion (a derangement), [N] long.

    A random order visited as one cycle: i = order[k] gets order[k + 1 mod N], never itself.
    """
    if num_examples < 2:
        raise ValueError(
            f"KTO's KL estimate needs a mismatched (prompt, completion) pair, so at least 2 examples "
            f"in the global batch; got {num_examples}. Raise the batch size or accumulation steps."
        )
    order_N = torch.randperm(num_examples, generator=generator)
    index_N = torch.empty_like(order_N)
    index_N[order_N] = order_N.roll(-1)
    return index_N


def kto_weight_ratio(
    num_desirable: int, num_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> float:
    """lambda_D n_D / (lambda_U n_U); the authors advise a value in [1, 4/3]. inf if n_U = 0."""
    if min(num_desirable, num_undesirable) < 0 or min(desirable_weight, undesirable_weight) <= 0:
        raise ValueError("example counts must be >= 0 and weights > 0")
    denominator = undesirable_weight * num_undesirable
    return math.inf if denominator == 0 else desirable_weight * num_desirable / denominator


def suggest_kto_weights(
    num_desirable: int,
    num_undesirable: int,
    *,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[float, float]:
    """(lambda_D, lambda_U) with lambda_D n_D / (lambda_U n_U) in [1, 4/3] (arXiv 2402.01306, sec. 4).

    Weights already in range come back unchanged. Otherwise only the under-weighted side's
    weight is raised, to the nearest end of the range, so no example's weight shrinks.
    """
    if num_desirable <= 0 or num_undesirable <= 0:
        raise ValueError(
            f"cannot balance KTO weights with {num_desirable} desirable and {num_undesirable} "
            "undesirable examples; the data set needs both kinds"
        )
    counts = (num_desirable, num_undesirable)
    ratio = kto_weight_ratio(*counts, desirable_weight, undesirable_weight)
    if ratio < 1.0:
        desirable_weight = undesirable_weight * num_undesirable / num_desirable
        while kto_weight_ratio(*counts, desirable_weight, undesirable_weight) < 1.0:
            desirable_weight = math.nextafter(desirable_weight, math.inf)  # undo float rounding
    elif ratio > 4.0 / 3.0:
        undesirable_weight = desirable_weight * num_desirable / (num_undesirable * 4.0 / 3.0)
        while kto_weight_ratio(*counts, desirable_weight, undesirable_weight) > 4.0 / 3.0:
            undesirable_weight = math.nextafter(undesirable_weight, math.inf)
    return desirable_weight, undesirable_weight


__all__ = [
    "kto_kl_estimate",
    "kto_losses",
    "kto_weight_ratio",
    "suggest_kto_weights",
    "mismatched_completion_index",
]
