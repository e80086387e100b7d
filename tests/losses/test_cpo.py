"""CPO preference term against hand-worked values, float64 and extreme margins."""

from __future__ import annotations

import pytest
import torch

from hpalign.losses.cpo import cpo_losses

PC, PR = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0])


def test_hand_worked() -> None:
    losses, metrics = cpo_losses(PC, PR, beta=0.1)
    # beta (pi_c - pi_r) = 0.1 * 2 = 0.2 -> log(1 + e^-0.2) = 0.598138869
    #                      0.1 * -1 = -0.1 -> log(1 + e^0.1) = 0.744396660
    torch.testing.assert_close(losses, torch.tensor([0.598138869, 0.744396660]))
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([-0.1, -0.5]))  # beta pi_c
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([-0.3, -0.4]))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([0.2, -0.1]))
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(metrics["logps/chosen"], PC)


def test_label_smoothing_hand_worked() -> None:
    # sp(z) + eps z with eps = 0.1: 0.598138869 + 0.02 = 0.618138869 ; 0.744396660 - 0.01 = 0.734396660
    losses, _ = cpo_losses(PC, PR, beta=0.1, label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.618138869, 0.734396660]))


def test_float64_recomputation() -> None:
    g = torch.Generator().manual_seed(0)
    pc, pr = (-200 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(2))
    losses, _ = cpo_losses(pc, pr, beta=0.1, label_smoothing=0.2)
    z = 0.1 * (pc - pr)
    expected = -0.8 * torch.log(torch.sigmoid(z)) - 0.2 * torch.log(torch.sigmoid(-z))
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)


def test_extreme_margins_finite() -> None:
    pc = torch.tensor([1e4, -1e4], requires_grad=True)
    pr = torch.tensor([-1e4, 1e4], requires_grad=True)
    losses, _ = cpo_losses(pc, pr, beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    torch.testing.assert_close(losses.detach(), torch.tensor([0.0, 2000.0]))  # z = +-2000


def test_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        cpo_losses(PC, PR[:1])
    with pytest.raises(ValueError, match="beta"):
        cpo_losses(PC, PR, beta=-1.0)
