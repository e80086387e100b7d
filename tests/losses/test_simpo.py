"""SimPO against hand-worked values, TRL's gamma_beta_ratio, float64 and extreme margins."""

from __future__ import annotations

import pytest
import torch

from hpalign.losses.simpo import simpo_losses

MC, MR = torch.tensor([-0.5, -1.0]), torch.tensor([-1.5, -0.5])


def test_hand_worked_with_document_defaults() -> None:
    losses, metrics = simpo_losses(MC, MR)  # beta 2.0, gamma 1.0
    # z = 2 (-0.5 + 1.5) - 1 = 1  -> log(1 + e^-1) = 0.313261688
    # z = 2 (-1.0 + 0.5) - 1 = -2 -> log(1 + e^2)  = 2.126928011
    torch.testing.assert_close(losses, torch.tensor([0.313261688, 2.126928011]))
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([-1.0, -2.0]))  # beta m_c
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([-3.0, -1.0]))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(metrics["logps/chosen"], MC)


def test_gamma_is_the_margin_not_trls_ratio() -> None:
    # TRL SimPOTrainer: -logsig(beta ((m_c - m_r) - gamma_beta_ratio)); gamma = beta * ratio.
    beta, ratio = 2.5, 0.4
    ours, _ = simpo_losses(MC, MR, beta=beta, gamma=beta * ratio)
    trl = -torch.nn.functional.logsigmoid(beta * ((MC - MR) - ratio))
    torch.testing.assert_close(ours, trl)
    # gamma = 0 with no smoothing is CPO on mean log-probs.
    zero, _ = simpo_losses(MC, MR, beta=2.0, gamma=0.0)
    torch.testing.assert_close(zero, -torch.nn.functional.logsigmoid(2.0 * (MC - MR)))


def test_float64_recomputation() -> None:
    g = torch.Generator().manual_seed(0)
    mc, mr = (-5 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(2))
    losses, _ = simpo_losses(mc, mr, beta=2.0, gamma=1.0, label_smoothing=0.1)
    z = 2.0 * (mc - mr) - 1.0
    expected = -0.9 * torch.log(torch.sigmoid(z)) - 0.1 * torch.log(torch.sigmoid(-z))
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)


def test_extreme_margins_finite() -> None:
    mc = torch.tensor([1e4, -1e4], requires_grad=True)
    mr = torch.tensor([-1e4, 1e4], requires_grad=True)
    losses, _ = simpo_losses(mc, mr)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(mc.grad).all() and torch.isfinite(mr.grad).all()
    torch.testing.assert_close(losses.detach(), torch.tensor([0.0, 40001.0]))  # z = 2 * -2e4 - 1


def test_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        simpo_losses(MC[:, None], MR)
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_losses(MC, MR, label_smoothing=-0.1)
