"""PPO pieces: whitening, KL-penalised rewards, GAE (hand-worked and a naive double loop),
clipped policy and value losses."""

from __future__ import annotations

import math

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
    rewards = kl_penalised_rewards(score, logps, ref, mask, kl_coef=0.1)
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
