"""ORPO: Monolithic Preference Optimization without a reference model (Hong et al. 2024,
arXiv 2403.07691).

With m the MEAN per-token log-prob of an answer (sum / tokens) and p = exp(m), the odds are
p / (1 - p), so  log odds(y) = m - log(1 - exp(m)).  The odds-ratio loss of a pair is
-log sigmoid(log odds(y_w) - log odds(y_l)), weighted by ORPO's lambda, which the swift document
passes as `--beta`. ORPO's SFT term (NLL of the chosen answer) is added by the loop
(`hpalign.losses.sft.rpo_nll_sum` over the global chosen-token count).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hpalign.losses.pairwise import check_per_example, pair_metrics


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) otherwise.

    Each branch only ever sees inputs where it is finite, so torch.where's unused branch cannot
    leak a NaN gradient. x = 0 gives -inf (p = 1 has zero probability of failure).
    """
    near_zero = x > -math.log(2.0)
    x_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    x_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def log_odds(mean_logps_B: Tensor) -> Tensor:
    """log(p / (1 - p)) with p = exp(m), shape [B], for m clamped to <= -eps (machine epsilon).

    The clamp keeps p < 1 strictly, so the log-odds stay finite (at most -log(eps), about 15.9
    in float32) and so do their gradients; a clamped answer gets no gradient from this term.
    """
    eps = torch.finfo(mean_logps_B.dtype).eps
    m_B = mean_logps_B.clamp(max=-eps)
    return m_B - log1mexp(m_B)


def orpo_losses(
    chosen_mean_logps_B: Tensor,
    rejected_mean_logps_B: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair ORPO odds-ratio losses, shape [B] (unreduced: the loop divides by the global
    pair count): beta * -log sigmoid(log odds(y_w) - log odds(y_l)); beta is ORPO's lambda.

    Args: two [B] mean per-token log-probs (<= 0). Computed in at least float32.
    Metrics (detached, [B], TRL's names): rewards/chosen = beta m_w, rewards/rejected = beta m_l,
    rewards/accuracies, rewards/margins, logps/chosen = m_w, logps/rejected = m_l,
    log_odds_ratio = log sigmoid(log odds ratio), log_odds_chosen = the log odds ratio itself.
    """
    check_per_example(chosen_mean_logps_B=chosen_mean_logps_B, rejected_mean_logps_B=rejected_mean_logps_B)
    if beta <= 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    dtype = torch.promote_types(chosen_mean_logps_B.dtype, torch.float32)
    chosen_B, rejected_B = chosen_mean_logps_B.to(dtype), rejected_mean_logps_B.to(dtype)
    log_odds_ratio_B = log_odds(chosen_B) - log_odds(rejected_B)
    log_sigmoid_B = F.logsigmoid(log_odds_ratio_B)
    losses_B = -beta * log_sigmoid_B
    metrics = pair_metrics(beta * chosen_B, beta * rejected_B, chosen_B, rejected_B)
    metrics["log_odds_ratio"] = log_sigmoid_B.detach()
    metrics["log_odds_chosen"] = log_odds_ratio_B.detach()
    return losses_B, metrics


__all__ = ["log1mexp", "log_odds", "orpo_losses"]
