"""ORPO odds-ratio loss: hand-worked odds, float64, and stability as p -> 1."""

from __future__ import annotations

import math

import pytest
import torch

from hpalign.losses.orpo import log1mexp, log_odds, orpo_losses


def test_hand_worked() -> None:
    # Pair 0: m_c = -ln 2 -> p = 1/2, odds 1, log odds 0 ; m_r = -ln 4 -> p = 1/4, odds 1/3, log odds -ln 3
    #   log odds ratio = ln 3 ; -logsig(ln 3) = -ln(3/4) = ln(4/3) ; x beta 0.1 = 0.028768207
    # Pair 1: swapped: ratio -ln 3 ; -logsig(-ln 3) = -ln(1/4) = ln 4 ; x 0.1 = 0.138629436
    mc = torch.tensor([-math.log(2), -math.log(4)])
    mr = torch.tensor([-math.log(4), -math.log(2)])
    losses, metrics = orpo_losses(mc, mr, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.028768207, 0.138629436]))
    torch.testing.assert_close(metrics["log_odds_chosen"], torch.tensor([math.log(3), -math.log(3)]))
    torch.testing.assert_close(metrics["log_odds_ratio"], torch.tensor([math.log(3 / 4), math.log(1 / 4)]))
    torch.testing.assert_close(metrics["rewards/chosen"], 0.1 * mc)
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(metrics["logps/rejected"], mr)
    # p = 3/4: odds 3.
    torch.testing.assert_close(log_odds(torch.tensor([math.log(0.75)])), torch.tensor([math.log(3)]))


def test_log1mexp_hand_worked_and_precise() -> None:
    # log(1 - e^-ln2) = ln(1/2) ; log(1 - e^-ln4) = ln(3/4) ; x = -1e-10: 1 - e^x ~ 1e-10 -> -23.02585093
    x = torch.tensor([-math.log(2), -math.log(4), -1e-10, -100.0])
    expected = torch.tensor([math.log(0.5), math.log(0.75), math.log(1e-10), -math.exp(-100.0)])
    torch.testing.assert_close(log1mexp(x), expected)
    assert torch.isinf(torch.log1p(-torch.exp(torch.tensor(-1e-10)))), "the naive formula fails here"
    xd = -torch.logspace(-15, 2, 500, dtype=torch.float64)
    naive = torch.log(1 - torch.exp(xd.to(torch.float64)))
    ok = torch.isfinite(naive) & (xd < -1e-4)  # where the naive formula is itself accurate
    torch.testing.assert_close(log1mexp(xd)[ok], naive[ok], rtol=1e-9, atol=1e-12)


def test_log1mexp_gradient_finite_on_both_branches() -> None:
    x = torch.tensor([-1e-6, -math.log(2) + 1e-4, -math.log(2) - 1e-4, -50.0], requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / (e^-x - 1)
    torch.testing.assert_close(x.grad, -1 / torch.expm1(-x.detach()))


def test_float64_recomputation() -> None:
    g = torch.Generator().manual_seed(0)
    mc, mr = (-0.01 - 5 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(2))
    losses, _ = orpo_losses(mc, mr, beta=0.25)
    pc, pr = torch.exp(mc), torch.exp(mr)
    ratio = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    expected = -0.25 * torch.log(torch.sigmoid(ratio))
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_stable_as_p_goes_to_one(dtype: torch.dtype) -> None:
    # Mean log-probs at 0, tiny, and slightly positive (numerical noise) give no inf / nan.
    mc = torch.tensor([0.0, -1e-12, -1e-7, 1e-6, 0.0], dtype=dtype, requires_grad=True)
    mr = torch.tensor([-1.0, -1.0, 0.0, -1e-9, -20.0], dtype=dtype, requires_grad=True)
    losses, metrics = orpo_losses(mc, mr, beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(mc.grad).all() and torch.isfinite(mr.grad).all()
    assert all(torch.isfinite(m).all() for m in metrics.values())
    # p_c -> 1 is strongly preferred over p_r = e^-1: loss near 0 but not negative.
    assert 0.0 <= losses[0].item() < 1e-3


def test_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        orpo_losses(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="beta"):
        orpo_losses(torch.zeros(2) - 1, torch.zeros(2) - 1, beta=0.0)
