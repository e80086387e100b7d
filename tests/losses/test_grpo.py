"""GRPO family: group / RLOO / REINFORCE++ advantages, token loss weights and the clipped token
loss, hand-worked; two simulated ranks equal one process; TRL GRPOTrainer's loss formulas."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest
import torch

from hpalign.losses.grpo import (
    clipped_token_losses,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    token_loss_weights,
)

SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two groups of N = 3: means 1/3 and 1


def run_as_two_ranks(fn: Callable[[int, Callable], torch.Tensor]) -> list[torch.Tensor]:
    """fn(rank, sum_over_ranks) in two threads whose seam adds both ranks' tensors: an all-reduce."""
    barrier, slots, results = threading.Barrier(2, timeout=10), [None, None], [None, None]

    def worker(rank: int) -> None:
        def seam(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before either writes the next sums
            return total

        results[rank] = fn(rank, seam)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# --- advantages ------------------------------------------------------------------------------------------

def test_group_advantages_hand_worked_each_scale() -> None:
    # r - group mean: [1 - 1/3, -1/3, -1/3] and [0, 0, 0]
    centred = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(SCORES, 3, scale_rewards="none"), centred)
    # group std (unbiased): (4/9 + 1/9 + 1/9) / 2 = 1/3 -> 1/sqrt(3) = 0.577350 ; group 2: 0
    #   2/3 / (0.577350 + 1e-4) = 1.154501 ; -1/3 / 0.577450 = -0.577250 ; group 2: 0 / 1e-4 = 0
    torch.testing.assert_close(group_advantages(SCORES, 3),
                               torch.tensor([1.154501, -0.577250, -0.577250, 0.0, 0.0, 0.0]))
    # eps 0.1: 2/3 / 0.677350 = 0.984225 ; -1/3 / 0.677350 = -0.492113
    torch.testing.assert_close(group_advantages(SCORES, 3, scale_rewards="group", eps=0.1),
                               torch.tensor([0.984225, -0.492113, -0.492113, 0.0, 0.0, 0.0]))
    # batch std over all six: mean 2/3, squared deviations 4 x 1/9 + 2 x 4/9 = 4/3, / 5 = 4/15
    #   -> std 0.516398 ; 2/3 / 0.516498 = 1.290744 ; -1/3 / 0.516498 = -0.645372 (numerator: group-centred)
    torch.testing.assert_close(group_advantages(SCORES, 3, scale_rewards="batch"),
                               torch.tensor([1.290744, -0.645372, -0.645372, 0.0, 0.0, 0.0]))


def test_group_advantages_groups_of_one_and_whole_batch() -> None:
    # N = 1: every response is its own baseline -> 0, not NaN (torch.std of one element)
    torch.testing.assert_close(group_advantages(SCORES, 1), torch.zeros(6))
    # N = 6, one group: mean 2/3, std sqrt(4/15) as "batch" above -> group == batch
    torch.testing.assert_close(group_advantages(SCORES, 6),
                               torch.tensor([0.645372, -1.290744, -1.290744, 0.645372, 0.645372, 0.645372]))
    torch.testing.assert_close(group_advantages(SCORES, 6), group_advantages(SCORES, 6, scale_rewards="batch"))


def test_group_advantages_batch_std_over_two_ranks_equals_one_process() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, generator=g, dtype=torch.float64) * 3 + 10
    whole = group_advantages(scores, 3, scale_rewards="batch")
    halves = run_as_two_ranks(lambda rank, seam: group_advantages(
        scores[6 * rank:6 * rank + 6], 3, scale_rewards="batch", sum_over_ranks=seam))
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-12, atol=1e-12)
    expected = (scores.view(4, 3) - scores.view(4, 3).mean(1, keepdim=True)).reshape(-1) / (scores.std() + 1e-4)
    torch.testing.assert_close(whole, expected, rtol=1e-12, atol=1e-12)
    # Without the seam each rank would use its own std: different numbers.
    assert not torch.allclose(group_advantages(scores[:6], 3, scale_rewards="batch"), whole[:6])


def test_rloo_hand_worked_and_leave_one_out_identity() -> None:
    # group 1: 1 - mean(0, 0) = 1 ; 0 - mean(1, 0) = -0.5 (twice) ; group 2: 1 - 1 = 0
    torch.testing.assert_close(rloo_advantages(SCORES, 3), torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0]))
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(12, generator=g, dtype=torch.float64)
    grouped = scores.view(3, 4)
    expected = (4 / 3) * (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    torch.testing.assert_close(rloo_advantages(scores, 4), expected, rtol=1e-12, atol=1e-12)
    # N = 2: the other answer is the baseline
    torch.testing.assert_close(rloo_advantages(torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))


def test_reinforce_pp_hand_worked() -> None:
    kl = torch.tensor([[0.2, 0.0, -0.4], [0.5, 1.0, float("inf")]])  # row 1, t2: padding placeholder
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = reinforce_pp_advantages(torch.tensor([1.0, -1.0]), kl, mask, beta=0.1)
    # rewards -0.1 kl + score on the last token: row 0 [-0.02, 0, 0.04 + 1] ; row 1 [-0.05, -0.1 - 1, pad]
    # returns-to-go: row 0 [1.02, 1.04, 1.04] ; row 1 [-1.15, -1.1, pad]
    # five tokens: mean 0.85 / 5 = 0.17 ; deviations 0.85, 0.87, 0.87, -1.32, -1.27
    #   squares 0.7225 + 0.7569 + 0.7569 + 1.7424 + 1.6129 = 5.5916 ; unbiased var 1.3979
    std = math.sqrt(5.5916 / 4 + 1e-8)
    expected = torch.tensor([[0.85, 0.87, 0.87], [-1.32, -1.27, 0.0]]) / std
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(expected[0], torch.tensor([0.718912, 0.735828, 0.735828]))
    # beta 0: the score alone, every token of a row gets its return: [1, 1, 1, -1, -1], mean 0.2,
    #   deviations 0.8 x 3, -1.2 x 2: var (3 x 0.64 + 2 x 1.44) / 4 = 1.2
    advantages_0 = reinforce_pp_advantages(torch.tensor([1.0, -1.0]), kl, mask, beta=0.0)
    expected_0 = torch.tensor([[0.8, 0.8, 0.8], [-1.2, -1.2, 0.0]]) / math.sqrt(1.2 + 1e-8)
    torch.testing.assert_close(advantages_0, expected_0)


def test_reinforce_pp_whitening_over_two_ranks_equals_one_process() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    kl = torch.randn(6, 5, generator=g, dtype=torch.float64).abs()
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 0, 3, 4, 1])[:, None]
    whole = reinforce_pp_advantages(scores, kl, mask, beta=0.05)
    halves = run_as_two_ranks(lambda rank, seam: reinforce_pp_advantages(
        scores[3 * rank:3 * rank + 3], kl[3 * rank:3 * rank + 3], mask[3 * rank:3 * rank + 3], beta=0.05,
        sum_over_ranks=seam))
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-12, atol=1e-12)
    assert whole[~mask].abs().max() == 0 and abs(whole[mask].mean().item()) < 1e-12
    torch.testing.assert_close(whole[mask].std(), torch.tensor(1.0, dtype=torch.float64))


# --- token weights ---------------------------------------------------------------------------------------

LENGTHS_MASK = torch.arange(4)[None, :] < torch.tensor([4, 2, 1, 0])[:, None]  # lengths 4, 2, 1, 0


def test_token_loss_weights_hand_worked() -> None:
    counts = {"num_sequences": 4.0, "num_tokens": 7.0, "max_length": 4}
    # grpo: 1 / (len * 4): row 0 1/16, row 1 1/8, row 2 1/4, row 3 (no tokens) 0
    grpo = token_loss_weights(LENGTHS_MASK, "grpo", **counts)
    torch.testing.assert_close(grpo, torch.tensor([[1 / 16] * 4, [1 / 8] * 2 + [0.0] * 2,
                                                   [1 / 4] + [0.0] * 3, [0.0] * 4]))
    # dapo: 1/7 on each of the 7 tokens ; dr_grpo: 1 / (4 * 4) on each token
    torch.testing.assert_close(token_loss_weights(LENGTHS_MASK, "dapo", **counts), LENGTHS_MASK / 7.0)
    torch.testing.assert_close(token_loss_weights(LENGTHS_MASK, "dr_grpo", **counts), LENGTHS_MASK / 16.0)
    # the grpo rows of real sequences sum to 1 / num_sequences
    torch.testing.assert_close(grpo.sum(1), torch.tensor([0.25, 0.25, 0.25, 0.0]))
    assert grpo.dtype == torch.float32
    assert token_loss_weights(LENGTHS_MASK.double(), "dapo", **counts).dtype == torch.float64


def _trl_reduce(per_token_loss, mask, loss_type, max_length):
    """TRL GRPOTrainer.compute_loss's reductions (one process, no accumulation), verbatim."""
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":  # TRL's "bnpo" and, with one process, "dapo"
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_length)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_token_weights_micro_batches_sum_to_the_whole_and_to_trl(loss_type: str) -> None:
    g = torch.Generator().manual_seed(3)
    losses_BT = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 1, 3, 0, 2, 4])[:, None]
    counts = {"num_sequences": 6.0, "num_tokens": float(mask.sum()), "max_length": 5}
    whole = (token_loss_weights(mask.double(), loss_type, **counts) * losses_BT).sum()
    parts = sum((token_loss_weights(mask[rows].double(), loss_type, **counts) * losses_BT[rows]).sum()
                for rows in (slice(0, 1), slice(1, 4), slice(4, 6)))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole, _trl_reduce(losses_BT, mask.double(), loss_type, 5), rtol=1e-12, atol=1e-12)


def test_token_weights_empty_mini_batch_is_zero_not_nan() -> None:
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        weights = token_loss_weights(empty, loss_type, num_sequences=0.0, num_tokens=0.0, max_length=3)
        torch.testing.assert_close(weights, torch.zeros(2, 3))


# --- clipped token loss ----------------------------------------------------------------------------------

def test_ratio_one_gives_minus_advantage_times_weight() -> None:
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 1e4]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1e4]])  # row 1, t2: padding placeholders
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    weights = token_loss_weights(mask, "dapo", num_sequences=2.0, num_tokens=5.0, max_length=3)
    losses, metrics = clipped_token_losses(logps, old, torch.tensor([2.0, -1.0]), mask, weights)  # A per sequence
    # row 0: 3 tokens x -2 x 1/5 = -1.2 ; row 1: 2 tokens x +1 x 1/5 = 0.4
    torch.testing.assert_close(losses, torch.tensor([-1.2, 0.4]))
    losses.sum().backward()
    # d(-rho A w)/d logp = -rho A w: -0.4 on row 0, +0.2 on row 1, 0 on padding
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]]))
    torch.testing.assert_close(metrics["policy/ratio"], torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(metrics["policy/clipfrac"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(metrics["kl"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(metrics["num_tokens"], torch.tensor([3.0, 2.0]))


def _clip_case() -> tuple[torch.Tensor, ...]:
    ratios = torch.tensor([[1.5, 1.25, 0.5], [0.5, 1.5, 1.0]])
    logps = torch.log(ratios).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 7.0]])
    return logps, torch.zeros(2, 3), advantages, torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.ones(2, 3)


def test_clip_low_and_high_asymmetric_hand_worked() -> None:
    logps, old, advantages, mask, weights = _clip_case()
    losses, metrics = clipped_token_losses(logps, old, advantages, mask, weights, epsilon=0.2, epsilon_high=0.28)
    # clip range [0.8, 1.28]; l = -min(rho A, clip(rho) A)
    # row 0: rho 1.5, A 1: -min(1.5, 1.28) = -1.28 (clipped high)
    #        rho 1.25, A 1: -min(1.25, 1.25) = -1.25 (inside)
    #        rho 0.5, A -1: -min(-0.5, -0.8) = 0.8 (clipped low)        -> -1.73, clipfrac 2
    # row 1: rho 0.5, A 1: -min(0.5, 0.8) = -0.5 (below, but A > 0: the unclipped branch binds)
    #        rho 1.5, A -1: -min(-1.5, -1.28) = 1.5 (above, A < 0: unclipped) ; t2 padding -> 1.0, clipfrac 0
    torch.testing.assert_close(losses, torch.tensor([-1.73, 1.0]))
    torch.testing.assert_close(metrics["policy/clipfrac"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(metrics["policy/ratio"], torch.tensor([3.25, 2.0]))
    # 0.5 (ln^2 1.5 + ln^2 1.25 + ln^2 0.5) = 0.5 (0.164402 + 0.049793 + 0.480453) ; row 1 without 1.25
    torch.testing.assert_close(metrics["policy/approxkl"], torch.tensor([0.347324, 0.322427]))
    losses.sum().backward()
    # unclipped tokens: d(-rho A)/d logp = -rho A ; clipped tokens and padding 0
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -1.25, 0.0], [-0.5, 1.5, 0.0]]))


def test_clip_symmetric_when_epsilon_high_is_none() -> None:
    logps, old, advantages, mask, weights = _clip_case()
    losses, metrics = clipped_token_losses(logps, old, advantages, mask, weights, epsilon=0.2)
    # range [0.8, 1.2]: row 0 t1 now clipped: -1.2 - 1.2 + 0.8 = -1.6, clipfrac 3 ; row 1 unchanged 1.0
    torch.testing.assert_close(losses, torch.tensor([-1.6, 1.0]))
    torch.testing.assert_close(metrics["policy/clipfrac"], torch.tensor([3.0, 0.0]))


def test_k3_penalty_hand_worked() -> None:
    logps = torch.tensor([[-1.0, -1.0, -1.0, 5.0]], requires_grad=True)
    ref = torch.tensor([[-1.0 + math.log(2), -1.0 - math.log(2), -1.0, -1e4]])  # t3: padding placeholder
    mask = torch.tensor([[1, 1, 1, 0]])
    # ratio 1 and A 0: only the KL term. d = ref - logp = ln 2, -ln 2, 0 ; k3 = e^d - d - 1:
    #   2 - 0.693147 - 1 = 0.306853 ; 0.5 + 0.693147 - 1 = 0.193147 ; 0       -> sum 0.5
    losses, metrics = clipped_token_losses(logps, logps.detach(), torch.zeros(1), mask, torch.ones(1, 4),
                                           ref_logps_BT=ref, beta=0.1)
    torch.testing.assert_close(metrics["kl"], torch.tensor([0.5]))
    torch.testing.assert_close(losses, torch.tensor([0.05]))  # beta 0.1 x 0.5
    losses.sum().backward()
    # d k3 / d logp = 1 - e^d: -1, 0.5, 0 ; times beta 0.1
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.1, 0.05, 0.0, 0.0]]))
    # beta 0: the reference is ignored, kl metric 0
    losses_0, metrics_0 = clipped_token_losses(logps, logps.detach(), torch.zeros(1), mask, torch.ones(1, 4),
                                               ref_logps_BT=ref, beta=0.0)
    torch.testing.assert_close(losses_0, torch.tensor([0.0]))
    torch.testing.assert_close(metrics_0["kl"], torch.tensor([0.0]))


def _trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, *,
                   epsilon_low, epsilon_high, beta, loss_type, max_completion_length):
    """TRL GRPOTrainer._compute_loss (token-level importance sampling), verbatim in torch."""
    per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps)
                    - 1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    per_token_loss = per_token_loss + beta * per_token_kl
    loss = _trl_reduce(per_token_loss, completion_mask, loss_type, max_completion_length)
    is_low = (coef_1 < 1 - epsilon_low) & (advantages.unsqueeze(1) < 0)
    is_high = (coef_1 > 1 + epsilon_high) & (advantages.unsqueeze(1) > 0)
    clip_ratio = ((is_low | is_high).float() * completion_mask).sum() / completion_mask.sum()
    return loss, clip_ratio


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_equals_trl_grpo_loss_and_its_gradient(loss_type: str) -> None:
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(6, 7, generator=g, dtype=torch.float64) * 3
    logps = (old + 0.3 * torch.randn(6, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = old + 0.2 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    advantages = group_advantages(torch.randn(6, generator=g, dtype=torch.float64), 3)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 5, 1, 6, 4])[:, None]
    trl_loss, trl_clip = _trl_grpo_loss(logps, old, ref, advantages, mask.double(), epsilon_low=0.2,
                                        epsilon_high=0.28, beta=0.04, loss_type=loss_type, max_completion_length=7)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    weights = token_loss_weights(mask.double(), loss_type, num_sequences=6.0, num_tokens=float(mask.sum()),
                                 max_length=7)
    losses, metrics = clipped_token_losses(logps, old, advantages, mask, weights, epsilon=0.2, epsilon_high=0.28,
                                           ref_logps_BT=ref, beta=0.04)
    torch.testing.assert_close(losses.sum(), trl_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["policy/clipfrac"].sum() / mask.sum(), trl_clip.double())
    assert metrics["policy/clipfrac"].sum() > 0  # the case exercises clipping
    (grad,) = torch.autograd.grad(losses.sum(), logps)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-12, atol=1e-12)


def test_extreme_ratios_and_padding_stay_finite() -> None:
    logps = torch.tensor([[50.0, -50.0, 0.0, 1e4]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    losses, metrics = clipped_token_losses(logps, torch.tensor([[0.0, 0.0, 0.0, -1e4]]),
                                           torch.tensor([[-1.0, 1.0, 3.0, float("inf")]]), mask, torch.ones(1, 4),
                                           ref_logps_BT=torch.tensor([[0.0, 0.0, 0.0, -1e4]]), beta=0.01)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(logps.grad).all()
    assert all(torch.isfinite(m).all() for m in metrics.values())
    assert logps.grad[0, 3] == 0
    # t0: rho e^50 above the range but A < 0, t1: rho e^-50 below but A > 0: the unclipped branch binds
    assert metrics["policy/clipfrac"].item() == 0.0
    # policy e^50 - e^-50 - 3 ; k3 with d = ref - logp = -50, 50, 0: (e^-50 + 49) + (e^50 - 51) + 0
    kl = math.exp(-50.0) + 49.0 + math.exp(50.0) - 51.0
    torch.testing.assert_close(losses, torch.tensor([math.exp(50.0) - math.exp(-50.0) - 3.0 + 0.01 * kl]))


# --- errors ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(torch.zeros(5), 3)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(torch.zeros(6), 0)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(SCORES, 3, scale_rewards="prompt")
    with pytest.raises(ValueError, match="num_generations >= 2"):
        rloo_advantages(SCORES, 1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        rloo_advantages(torch.zeros(7), 2)
    with pytest.raises(ValueError, match="grpo, dapo, dr_grpo"):
        token_loss_weights(LENGTHS_MASK, "bnpo", num_sequences=4.0, num_tokens=7.0, max_length=4)
    with pytest.raises(ValueError, match="max_length"):
        token_loss_weights(LENGTHS_MASK, "dr_grpo", num_sequences=4.0, num_tokens=7.0, max_length=0)
    logps, old, advantages, mask, weights = _clip_case()
    with pytest.raises(ValueError, match="needs ref_logps_BT"):
        clipped_token_losses(logps, old, advantages, mask, weights, beta=0.04)
