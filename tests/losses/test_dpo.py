"""DPO / IPO / hinge against hand-worked values, a float64 re-computation and extreme margins."""

from __future__ import annotations

import math

import pytest
import torch

from hpalign.losses.dpo import DPO_LOSS_TYPES, dpo_losses


def softplus_neg(z: float) -> float:
    """-log sigmoid(z) = log(1 + e^-z), in plain Python for the hand-worked values."""
    return math.log1p(math.exp(-z))


# Two pairs. Pair 0: h = (-1 - -3) - (-2 - -2) = 2.  Pair 1: h = (-5 - -4) - (-5 - -5) = -1.
PC, PR = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0])
RC, RR = torch.tensor([-2.0, -5.0]), torch.tensor([-2.0, -5.0])


def test_sigmoid_hand_worked() -> None:
    losses, metrics = dpo_losses(PC, PR, RC, RR, beta=0.1)
    # beta h = 0.2 -> log(1 + e^-0.2) = log(1.818730753) = 0.598138869
    # beta h = -0.1 -> log(1 + e^0.1) = log(2.105170918) = 0.744396660
    torch.testing.assert_close(losses, torch.tensor([0.598138869, 0.744396660]))
    # rewards/chosen = 0.1 * (pi_c - ref_c): 0.1 * 1 = 0.1, 0.1 * 0 = 0
    # rewards/rejected = 0.1 * (pi_r - ref_r): 0.1 * -1 = -0.1, 0.1 * 1 = 0.1
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([-0.1, 0.1]))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([0.2, -0.1]))
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(metrics["logps/chosen"], PC)
    torch.testing.assert_close(metrics["logps/rejected"], PR)
    assert losses.shape == (2,), "per-pair losses, not a mean"


def test_label_smoothing_hand_worked() -> None:
    # -(1-e) logsig(z) - e logsig(-z) = sp(z) + e (sp(-z) - sp(z)) = sp(z) + e z, since sp(-z) - sp(z) = z.
    # e = 0.25: 0.598138869 + 0.25 * 0.2 = 0.648138869 ; 0.744396660 + 0.25 * -0.1 = 0.719396660
    losses, _ = dpo_losses(PC, PR, RC, RR, beta=0.1, label_smoothing=0.25)
    torch.testing.assert_close(losses, torch.tensor([0.648138869, 0.719396660]))
    # e = 0.5 makes the loss symmetric in z: sp(z) + z/2 = log(2 cosh(z/2)), even in z.
    half, _ = dpo_losses(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
    torch.testing.assert_close(half, torch.log(2 * torch.cosh(torch.tensor([0.1, -0.05]))))


def test_ipo_and_hinge_hand_worked() -> None:
    ipo, _ = dpo_losses(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    # 1 / (2 beta) = 5: (2 - 5)^2 = 9, (-1 - 5)^2 = 36
    torch.testing.assert_close(ipo, torch.tensor([9.0, 36.0]))
    hinge, _ = dpo_losses(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    # relu(1 - 0.2) = 0.8, relu(1 + 0.1) = 1.1
    torch.testing.assert_close(hinge, torch.tensor([0.8, 1.1]))
    hinge_zero, _ = dpo_losses(PC, PR, RC, RR, beta=1.0, loss_type="hinge")
    torch.testing.assert_close(hinge_zero, torch.tensor([0.0, 2.0]))  # relu(1 - 2) = 0, relu(1 + 1) = 2


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSS_TYPES))
def test_float64_recomputation(loss_type: str) -> None:
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-30 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    beta, eps = 0.3, (0.1 if loss_type == "sigmoid" else 0.0)
    losses, _ = dpo_losses(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    h = (pc - rc) - (pr - rr)
    expected = {
        "sigmoid": -(1 - eps) * torch.log(torch.sigmoid(beta * h))
        - eps * torch.log(torch.sigmoid(-beta * h)),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": torch.clamp(1 - beta * h, min=0),
    }[loss_type]
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSS_TYPES))
def test_extreme_margins_finite(loss_type: str) -> None:
    pc = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    pr = torch.tensor([-1e4, 1e4, 0.0], requires_grad=True)
    zeros = torch.zeros(3)
    losses, metrics = dpo_losses(pc, pr, zeros, zeros, beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert all(not m.requires_grad for m in metrics.values())
    if loss_type == "sigmoid":
        # h = 2e4: loss ~ 0; h = -2e4: loss = -logsig(-2000) = 2000; h = 0: log 2
        torch.testing.assert_close(losses.detach(), torch.tensor([0.0, 2000.0, math.log(2)]))


def test_does_not_mutate_inputs_and_grad_flows_only_to_policy() -> None:
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    rc, rr = RC.clone(), RR.clone()
    losses, _ = dpo_losses(pc, pr, rc, rr)
    losses.sum().backward()
    torch.testing.assert_close(pc.detach(), PC)
    torch.testing.assert_close(rc, RC)
    # d/d pi_c of -logsig(beta h) = -beta sigmoid(-beta h): pair 0 -> -0.1 * sigmoid(-0.2) = -0.0450166
    assert pc.grad[0].item() == pytest.approx(-0.1 / (1 + math.exp(0.2)), rel=1e-6)
    torch.testing.assert_close(pr.grad, -pc.grad)


def test_micro_batches_sum_to_one_big_batch() -> None:
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-10 * torch.rand(12, generator=g) for _ in range(4))
    full, _ = dpo_losses(pc, pr, rc, rr)
    # 3 micro-batches of unequal size, normalised once by the global pair count.
    parts = [
        dpo_losses(pc[s], pr[s], rc[s], rr[s])[0].sum() for s in (slice(0, 2), slice(2, 7), slice(7, 12))
    ]
    torch.testing.assert_close(sum(parts) / 12, full.mean())


def test_errors() -> None:
    with pytest.raises(ValueError, match="hinge.*ipo.*sigmoid"):
        dpo_losses(PC, PR, RC, RR, loss_type="kto_pair")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_losses(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_losses(PC, PR, RC, RR, label_smoothing=0.7)
    with pytest.raises(ValueError, match="shape"):
        dpo_losses(PC, PR, RC[:, None], RR)
    with pytest.raises(ValueError, match="beta"):
        dpo_losses(PC, PR, RC, RR, beta=0.0)
