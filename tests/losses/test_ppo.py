"""PPO pieces: whitening, KL-penalised rewards, GAE (hand-worked and a naive double loop),
clipped policy and value losses."""

from __future__ import annotations

import math

import pytest
import torch

from hpalign.losses.ppo import (
    gae_advantages,
    kl_penalised_rewards,
    ppo_policy_losses,
    ppo_value_losses,
    whiten,
)


def test_whiten_hand_worked() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # masked entries 1, 2, 3: mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> (v - 2) / 1 ; padding -> 0
    torch.testing.assert_close(whiten(values, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(whiten(values, mask, shift_mean=False), torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    assert torch.isfinite(whiten(values, torch.zeros(2, 2))).all()  # empty mask: no NaN


def test_kl_penalised_rewards_hand_worked() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0], [-1.0, -3.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    score = torch.tensor([2.0, -1.0, 5.0, 7.0])
    rewards = kl_penalised_rewards(score, logps - ref, mask, kl_coef=0.1)
    # row 0: kl = [0.5, 0, -1] -> -0.1 kl = [-0.05, 0, 0.1]; score 2 on t = 2 -> [-0.05, 0, 2.1]
    # row 1 (right-padded): kl = [1, 0, pad] -> [-0.1, 0, 0]; score -1 on t = 1 -> [-0.1, -1, 0]
    # row 2 (left-padded): kl = [pad, 2, 0] -> [0, -0.2, 0]; score 5 on t = 2 -> [0, -0.2, 5]
    # row 3 (no tokens): all 0, the score goes nowhere
    expected = torch.tensor([[-0.05, 0.0, 2.1], [-0.1, -1.0, 0.0], [0.0, -0.2, 5.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_gae_hand_worked_three_steps() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.4, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: t2 delta = 1 + 0 - 0.7 = 0.3 ; A2 = 0.3
    #        t1 delta = 0 + 0.7 - 0.6 = 0.1 ; A1 = 0.1 + 0.95 * 0.3 = 0.385
    #        t0 delta = 0 + 0.6 - 0.5 = 0.1 ; A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # row 1: t2 is padding (the 9s are ignored) ; t1 delta = 1 + 0 - 0.3 = 0.7 ; A1 = 0.7
    #        t0 delta = 0.2 + 0.3 - 0.4 = 0.1 ; A0 = 0.1 + 0.95 * 0.7 = 0.765
    torch.testing.assert_close(advantages, torch.tensor([[0.46575, 0.385, 0.3], [0.765, 0.7, 0.0]]))
    # returns = A + V: 0.96575, 0.985, 1.0 ; 1.165, 1.0, 0 (padding)
    torch.testing.assert_close(returns, torch.tensor([[0.96575, 0.985, 1.0], [1.165, 1.0, 0.0]]))
    # gamma 0.9, lam 0.5 on row 0: A2 = 0.3
    #   t1 delta = 0.9 * 0.7 - 0.6 = 0.03, A1 = 0.03 + 0.45 * 0.3 = 0.165
    #   t0 delta = 0.9 * 0.6 - 0.5 = 0.04, A0 = 0.04 + 0.45 * 0.165 = 0.11425
    adv_discounted, _ = gae_advantages(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv_discounted, torch.tensor([[0.11425, 0.165, 0.3]]))


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """A_t = sum_{k >= t} (gamma lam)^(k - t) delta_k, V past the end = 0: a plain double loop."""
    n = len(rewards)
    deltas = [rewards[k] + gamma * (values[k + 1] if k + 1 < n else 0.0) - values[k] for k in range(n)]
    return [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]


def test_gae_matches_naive_double_loop() -> None:
    g = torch.Generator().manual_seed(0)
    num_seqs, num_steps, gamma, lam = 6, 9, 0.97, 0.9
    rewards = torch.randn(num_seqs, num_steps, generator=g, dtype=torch.float64)
    values = torch.randn(num_seqs, num_steps, generator=g, dtype=torch.float64)
    lengths = [9, 1, 5, 8, 3, 0]
    mask = torch.tensor([[t < n for t in range(num_steps)] for n in lengths])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    for i, n in enumerate(lengths):
        expected = naive_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam) + [0.0] * (
            num_steps - n
        )
        torch.testing.assert_close(
            advantages[i], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12
        )
    torch.testing.assert_close(returns, (advantages + values) * mask)


def test_policy_loss_hand_worked() -> None:
    logps = torch.tensor([[0.0, math.log(2), math.log(0.5)], [math.log(0.5), 0.0, 1e4]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1e4]])  # row 1, t2: padding with a placeholder
    advantages = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    losses, metrics = ppo_policy_losses(logps, old, advantages, mask, cliprange=0.2)
    # row 0: rho = 1, 2, 0.5
    #   t0: max(-1 * 1, -1 * 1) = -1
    #   t1: max(-1 * 2, -1 * clip(2) = -1.2) = -1.2            (clipped)
    #   t2: max(1 * 0.5, 1 * clip(0.5) = 0.8) = 0.8            (clipped)   -> sum -1.4
    # row 1: t0 rho 0.5, A -1 -> max(0.5, 0.8) = 0.8 (clipped); t1 rho 1, A 2 -> -2 ; t2 masked -> -1.2
    torch.testing.assert_close(losses, torch.tensor([-1.4, -1.2]))
    torch.testing.assert_close(metrics["policy/clipfrac"], torch.tensor([2.0, 1.0]))
    # approxkl: 0.5 (log rho)^2 summed: row 0 0.5 (0 + ln2^2 + ln2^2) = 0.480453014 ; row 1 0.240226507
    torch.testing.assert_close(metrics["policy/approxkl"], torch.tensor([0.480453014, 0.240226507]))
    torch.testing.assert_close(metrics["policy/ratio"], torch.tensor([3.5, 1.5]))
    torch.testing.assert_close(metrics["num_tokens"], torch.tensor([3.0, 2.0]))
    losses.sum().backward()
    # Unclipped t0 of row 0: d(-A rho)/d logp = -A rho = -1 ; clipped tokens and padding: 0.
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, 0.0, 0.0], [0.0, -2.0, 0.0]]))


def test_policy_loss_float64_and_global_token_normalisation() -> None:
    g = torch.Generator().manual_seed(0)
    logps, old, adv = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    mask = torch.rand(5, 7, generator=g) > 0.3
    losses, _ = ppo_policy_losses(logps, old, adv, mask, cliprange=0.2)
    ratio = torch.exp(logps - old)
    per_token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    torch.testing.assert_close(losses, (per_token * mask).sum(1), rtol=1e-12, atol=1e-12)
    # Micro-batches [0:2] and [2:5], divided once by global tokens == TRL's masked mean over all.
    parts = ppo_policy_losses(logps[:2], old[:2], adv[:2], mask[:2])[0].sum()
    parts = parts + ppo_policy_losses(logps[2:], old[2:], adv[2:], mask[2:])[0].sum()
    torch.testing.assert_close(parts / mask.sum(), per_token[mask].mean())


def test_policy_loss_extreme_ratios_finite() -> None:
    logps = torch.tensor([[50.0, -50.0, 0.0]], requires_grad=True)
    losses, metrics = ppo_policy_losses(
        logps, torch.zeros(1, 3), torch.tensor([[-1.0, 1.0, 3.0]]), torch.ones(1, 3)
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(logps.grad).all()
    assert all(torch.isfinite(m).all() for m in metrics.values())


def test_value_loss_hand_worked() -> None:
    values = torch.tensor([[1.0, 0.0], [0.6, 0.4]])
    old = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    returns = torch.tensor([[2.0, -1.0], [1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    losses, metrics = ppo_value_losses(values, old, returns, mask, cliprange_value=0.2)
    # row 0: t0 clip(V) = 0.5 + 0.2 = 0.7: max((1 - 2)^2, (0.7 - 2)^2) = 1.69 -> 0.845 (clipped)
    #        t1 clip(V) = 0.5 - 0.2 = 0.3: max((0 + 1)^2, (0.3 + 1)^2) = 1.69 -> 0.845 (clipped) -> 1.69
    # row 1: t0 within range: 0.5 (0.6 - 1)^2 = 0.08 ; t1 masked -> 0.08
    torch.testing.assert_close(losses, torch.tensor([1.69, 0.08]))
    torch.testing.assert_close(metrics["value/clipfrac"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(metrics["num_tokens"], torch.tensor([2.0, 1.0]))


def test_value_loss_float64() -> None:
    g = torch.Generator().manual_seed(1)
    values, old, returns = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(4, 6, generator=g) > 0.2
    losses, _ = ppo_value_losses(values, old, returns, mask, cliprange_value=0.2)
    clipped = torch.clamp(values, old - 0.2, old + 0.2)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    torch.testing.assert_close(losses, (per_token * mask).sum(1), rtol=1e-12, atol=1e-12)


# --- TRL PPOv2's own formulas (trl/trainer/ppo_trainer.py, trl/trainer/utils.py: masked_whiten), verbatim
# in torch, on fixed tensors; INVALID_LOGPROB = 1.0 on padding as TRL fills it ---------------------------

def _trl_masked_whiten(values, mask, shift_mean=True):
    mask = mask.to(values.dtype)
    mean = (values * mask).sum() / mask.sum()
    variance = (((values - mean) ** 2) * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened + mean if not shift_mean else whitened


def _trl_rewards_and_advantages(logprobs, ref_logprobs, values, scores, sequence_lengths, *, kl_coef, gamma, lam,
                                whiten_rewards, estimator="k1"):
    num_rows, gen_length = logprobs.shape
    response_idxs = torch.arange(gen_length).repeat(num_rows, 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > sequence_lengths_p1.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, 1.0)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, 1.0)
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr
    rewards = (-kl_coef * kl).clone()
    actual_end = torch.where(sequence_lengths_p1 < gen_length, sequence_lengths_p1, sequence_lengths)
    rewards[(torch.arange(num_rows), actual_end)] += scores  # TRL indexes with a list
    if whiten_rewards:
        rewards = torch.masked_fill(_trl_masked_whiten(rewards, ~padding_mask_p1, shift_mean=False), padding_mask_p1, 0)
    lastgaelam, advantages_reversed = 0, []
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = torch.masked_fill(_trl_masked_whiten(advantages, ~padding_mask), padding_mask, 0)
    return rewards, advantages, returns, padding_mask, padding_mask_p1


def _trl_losses(new_logprobs, logprobs, advantages, vpred, values, returns, padding_mask, padding_mask_p1, *,
                cliprange, cliprange_value):
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, 1.0)
    logprobs = torch.masked_fill(logprobs, padding_mask, 1.0)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1, vf_losses2 = torch.square(vpred - returns), torch.square(vpredclipped - returns)
    keep_p1 = (~padding_mask_p1).float()
    vf_loss = 0.5 * (torch.max(vf_losses1, vf_losses2) * keep_p1).sum() / keep_p1.sum()
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses, pg_losses2 = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    keep = (~padding_mask).float()
    pg_loss = (torch.max(pg_losses, pg_losses2) * keep).sum() / keep.sum()
    pg_clipfrac = ((pg_losses2 > pg_losses).float() * keep).sum() / keep.sum()
    vf_clipfrac = ((vf_losses2 > vf_losses1).float() * keep_p1).sum() / keep_p1.sum()
    return pg_loss, vf_loss, pg_clipfrac, vf_clipfrac


def _fixed_rollouts(seed=0, rows=4, width=6):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(rows, width, generator=generator) * 3
    ref = logprobs + 0.3 * torch.randn(rows, width, generator=generator)
    values = torch.randn(rows, width, generator=generator)
    scores = torch.randn(rows, generator=generator)
    return logprobs, ref, values, scores


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_rewards_gae_whitening_and_losses_equal_trl_ppov2(estimator, whiten_rewards):
    """With TRL's masks (the value and the score one position past a response that ended early,
    `sequence_lengths_p1`) hpalign's functions give TRL's numbers exactly; hpalign's loop passes
    the response mask itself (the score on the last real token), which is TRL's at the length limit."""
    from hpalign.losses.ppo import kl_estimate

    logprobs, ref, values, scores = _fixed_rollouts()
    sequence_lengths = torch.tensor([5, 2, 0, 3])  # index of each row's last response token; row 0 fills all 6
    trl_rewards, trl_adv, trl_returns, padding_mask, padding_mask_p1 = _trl_rewards_and_advantages(
        logprobs, ref, values, scores, sequence_lengths, kl_coef=0.05, gamma=1.0, lam=0.95,
        whiten_rewards=whiten_rewards, estimator=estimator)
    mask, mask_p1 = ~padding_mask, ~padding_mask_p1
    kl = kl_estimate(logprobs, ref, estimator) * mask
    rewards = kl_penalised_rewards(scores, kl, mask_p1, kl_coef=0.05)  # TRL scores one past the end
    if whiten_rewards:
        rewards = whiten(rewards, mask_p1, shift_mean=False)
    torch.testing.assert_close(rewards, trl_rewards)
    advantages, returns = gae_advantages(rewards, values, mask_p1, gamma=1.0, lam=0.95)
    torch.testing.assert_close(returns * mask_p1, trl_returns * mask_p1)
    torch.testing.assert_close(whiten(advantages, mask), trl_adv)

    new_logprobs, vpred = logprobs + 0.2 * torch.randn(logprobs.shape), values + 0.3 * torch.randn(values.shape)
    trl_pg, trl_vf, trl_pg_clip, trl_vf_clip = _trl_losses(new_logprobs, logprobs, trl_adv, vpred, values, trl_returns,
                                                            padding_mask, padding_mask_p1, cliprange=0.2,
                                                            cliprange_value=0.2)
    pg_B, pg_metrics = ppo_policy_losses(new_logprobs, logprobs, trl_adv, mask, cliprange=0.2)
    vf_B, vf_metrics = ppo_value_losses(vpred, values, trl_returns, mask_p1, cliprange_value=0.2)
    torch.testing.assert_close(pg_B.sum() / mask.sum(), trl_pg)
    torch.testing.assert_close(vf_B.sum() / mask_p1.sum(), trl_vf)
    torch.testing.assert_close(pg_metrics["policy/clipfrac"].sum() / mask.sum(), trl_pg_clip)
    torch.testing.assert_close(vf_metrics["value/clipfrac"].sum() / mask_p1.sum(), trl_vf_clip)


def test_the_score_position_at_the_length_limit_is_trls_and_earlier_the_last_token():
    logprobs, ref, _, scores = _fixed_rollouts()
    kl = torch.zeros_like(logprobs)  # isolate the score
    full = torch.ones_like(logprobs, dtype=torch.bool)
    trl_rewards, *_ = _trl_rewards_and_advantages(logprobs, logprobs, torch.zeros_like(logprobs), scores,
                                                  torch.full((4,), 5), kl_coef=0.0, gamma=1.0, lam=1.0,
                                                  whiten_rewards=False)
    torch.testing.assert_close(kl_penalised_rewards(scores, kl, full, kl_coef=0.0), trl_rewards)
    short = torch.arange(6)[None, :] < torch.tensor([3, 6, 1, 2])[:, None]
    placed = kl_penalised_rewards(scores, kl, short, kl_coef=0.0)
    assert placed.nonzero().tolist() == [[0, 2], [1, 5], [2, 0], [3, 1]]  # each row's last response token


def test_k3_is_nonnegative_and_matches_its_formula():
    from hpalign.losses.ppo import kl_estimate

    logps, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    k3 = kl_estimate(logps, ref, "k3")
    r = torch.exp(ref - logps)
    torch.testing.assert_close(k3, (r - 1) - torch.log(r))
    assert (k3 >= 0).all() and k3[2] == 0
    torch.testing.assert_close(kl_estimate(logps, ref, "k1"), logps - ref)
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_estimate(logps, ref, "k2")
