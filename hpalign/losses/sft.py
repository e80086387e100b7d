"""SFT: next-token negative log-likelihood, and the NLL term the preference losses mix in.

Normalisation: every function here returns per-example NLL SUMS over response tokens. The loop
adds them over all micro-batches and ranks of one optimizer step and divides ONCE by the global
number of (chosen) response tokens, which gives the per-token mean NLL of the whole step however
it was split. Dividing per micro-batch instead would weight short micro-batches' tokens more.
"""

from __future__ import annotations

from torch import Tensor

from hpalign.losses.pairwise import check_per_example


def nll_sum(token_logps_sum_B: Tensor) -> Tensor:
    """Negative log-likelihood of each sequence: -sum_t log pi(y_t | x, y_<t), shape [B].

    `token_logps_sum_B` [B] holds the per-sequence sums of the response tokens' log-probs.
    """
    return -token_logps_sum_B


def sft_losses(logps_B: Tensor, num_tokens_B: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example SFT NLL sums, shape [B]; the loop divides by the GLOBAL response-token count.

    Args: `logps_B` [B] per-sequence log-prob sums; `num_tokens_B` [B] response-token counts.
    Metrics (detached, [B]): "nll" (the sum, same as the loss) and "num_tokens", so the loop
    can log nll / num_tokens summed over the step.
    """
    check_per_example(logps_B=logps_B, num_tokens_B=num_tokens_B)
    losses_B = nll_sum(logps_B)
    return losses_B, {"nll": losses_B.detach(), "num_tokens": num_tokens_B.detach().to(losses_B.dtype)}


def rpo_nll_sum(policy_chosen_logps_B: Tensor) -> Tensor:
    """NLL sum of the chosen answer, shape [B]: -log pi(y_w | x) summed over its tokens.

    The NLL term mixed into the preference losses: DPO's `rpo_alpha` (RPO, Pang et al. 2024,
    arXiv 2404.19733), CPO's and SimPO's `cpo_alpha` (arXiv 2401.08417) and ORPO's SFT term
    (arXiv 2403.07691). The loop computes  alpha * sum(rpo_nll_sum) / global chosen-token count,
    i.e. the per-token mean NLL of the chosen answers over the whole optimizer step (TRL's
    cross-entropy over the chosen tokens).
    """
    return nll_sum(policy_chosen_logps_B)


__all__ = ["nll_sum", "rpo_nll_sum", "sft_losses"]
