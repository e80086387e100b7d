"""Bradley-Terry reward-model loss with margins and centring."""

from __future__ import annotations

import math

import pytest
import torch

from hpalign.losses.reward import reward_losses

RC, RR = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 0.0, 1.0])


def test_hand_worked() -> None:
    losses, metrics = reward_losses(RC, RR)
    # r_c - r_r = 1, 0.5, -2 -> log(1 + e^-1) = 0.313261688, log(1 + e^-0.5) = 0.474076984,
    #                            log(1 + e^2) = 2.126928011
    torch.testing.assert_close(losses, torch.tensor([0.313261688, 0.474076984, 2.126928011]))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([1.0, 0.5, -2.0]))
    torch.testing.assert_close(metrics["rewards/chosen"], RC)
    torch.testing.assert_close(metrics["rewards/rejected"], RR)


def test_margin_and_centring_hand_worked() -> None:
    losses, _ = reward_losses(
        RC, RR, margins_B=torch.tensor([0.0, 0.5, 0.0]), center_rewards_coefficient=0.01
    )
    # z = 1, 0.5 - 0.5 = 0, -2 -> 0.313261688, log 2 = 0.693147181, 2.126928011
    # centring 0.01 (r_c + r_r)^2 = 0.01 * 9 = 0.09, 0.01 * 0.25 = 0.0025, 0.01 * 0 = 0
    expected = torch.tensor([0.313261688 + 0.09, math.log(2) + 0.0025, 2.126928011])
    torch.testing.assert_close(losses, expected)


def test_float64_recomputation() -> None:
    g = torch.Generator().manual_seed(0)
    rc, rr, m = (torch.randn(64, generator=g, dtype=torch.float64) * 5 for _ in range(3))
    losses, _ = reward_losses(rc, rr, margins_B=m.abs(), center_rewards_coefficient=0.05)
    expected = -torch.log(torch.sigmoid(rc - rr - m.abs())) + 0.05 * (rc + rr) ** 2
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)


def test_extreme_margins_finite() -> None:
    rc = torch.tensor([1e4, -1e4], requires_grad=True)
    rr = torch.tensor([-1e4, 1e4], requires_grad=True)
    losses, _ = reward_losses(rc, rr)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(rc.grad).all() and torch.isfinite(rr.grad).all()
    torch.testing.assert_close(losses.detach(), torch.tensor([0.0, 2e4]))
    torch.testing.assert_close(rc.grad, torch.tensor([0.0, -1.0]))  # d/dr_c -logsig(z) = -sigmoid(-z)


def test_ties_count_as_wrong_and_errors() -> None:
    _, metrics = reward_losses(torch.zeros(2), torch.zeros(2))
    torch.testing.assert_close(metrics["accuracy"], torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        reward_losses(RC, RR, margins_B=torch.zeros(2))
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        reward_losses(RC, RR, center_rewards_coefficient=-1.0)
