"""KTO losses, the global KL reference point, the derangement and the weight advice."""

from __future__ import annotations

import random

import pytest
import torch

from hpalign.losses.kto import (
    kto_kl_estimate,
    kto_losses,
    kto_weight_ratio,
    mismatched_completion_index,
    suggest_kto_weights,
)

POLICY = torch.tensor([-1.0, -2.0, -3.0])
REF = torch.tensor([-3.0, -2.0, -1.0])  # r = policy - ref = [2, 0, -2]
LABELS = torch.tensor([True, False, True])


def test_hand_worked() -> None:
    losses, metrics = kto_losses(POLICY, REF, 0.5, LABELS, beta=0.1, undesirable_weight=2.0)
    # ex0 desirable:   1 - sigmoid(0.1 (2 - 0.5)) = sigmoid(-0.15) = 1 / (1 + e^0.15) = 0.462570155
    # ex1 undesirable: 2 (1 - sigmoid(0.1 (0.5 - 0))) = 2 sigmoid(-0.05) = 2 * 0.487502604 = 0.975005207
    # ex2 desirable:   1 - sigmoid(0.1 (-2 - 0.5)) = sigmoid(0.25) = 0.562176501
    torch.testing.assert_close(losses, torch.tensor([0.462570155, 0.975005207, 0.562176501]))
    # rewards = beta r = [0.2, 0, -0.2]; split by label, 0 on the other label.
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([0.2, 0.0, -0.2]))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(metrics["logps/chosen"], torch.tensor([-1.0, 0.0, -3.0]))
    torch.testing.assert_close(metrics["logps/rejected"], torch.tensor([0.0, -2.0, 0.0]))
    torch.testing.assert_close(metrics["count/desirable"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(metrics["count/undesirable"], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(metrics["kl"], torch.full((3,), 0.5))


def test_reference_point_is_clamped_and_detached() -> None:
    z0 = torch.tensor(-1.0, requires_grad=True)
    policy = POLICY.clone().requires_grad_()
    losses, metrics = kto_losses(policy, REF, z0, LABELS, beta=0.1)
    # z0 = max(0, -1) = 0: ex0 sigmoid(-0.2) = 0.450166003, ex1 sigmoid(-0) = 0.5,
    #                      ex2 sigmoid(0.2) = 0.549833997
    torch.testing.assert_close(losses.detach(), torch.tensor([0.450166003, 0.5, 0.549833997]))
    torch.testing.assert_close(metrics["kl"], torch.zeros(3))
    losses.sum().backward()
    assert z0.grad is None  # no gradient flows into the reference point
    assert torch.isfinite(policy.grad).all()


def test_float64_recomputation() -> None:
    g = torch.Generator().manual_seed(0)
    policy, ref = (-40 * torch.rand(50, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.rand(50, generator=g) > 0.4
    z0, beta, lam_d, lam_u = 0.7, 0.25, 1.5, 0.8
    losses, _ = kto_losses(
        policy, ref, z0, labels, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u
    )
    r = policy - ref
    expected = torch.where(
        labels, lam_d * (1 - torch.sigmoid(beta * (r - z0))), lam_u * (1 - torch.sigmoid(beta * (z0 - r)))
    )
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)


def test_only_desirable_batch_has_no_nan() -> None:
    labels = torch.ones(3, dtype=torch.bool)
    policy = POLICY.clone().requires_grad_()
    losses, metrics = kto_losses(policy, REF, 0.0, labels)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()
    for name, value in metrics.items():
        assert torch.isfinite(value).all(), name
    assert metrics["count/undesirable"].sum().item() == 0
    assert metrics["rewards/rejected"].sum().item() == 0  # the loop divides by a zero count only if it tries


def test_extreme_log_ratios_finite_gradients() -> None:
    policy = torch.tensor([1e4, -1e4, 1e4, -1e4], requires_grad=True)
    labels = torch.tensor([True, True, False, False])
    losses, _ = kto_losses(policy, torch.zeros(4), 0.0, labels)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()
    torch.testing.assert_close(losses.detach(), torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_kl_estimate_pieces_average_over_the_global_batch() -> None:
    pol, ref = torch.tensor([-1.0, -2.0, -4.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0, -5.0])
    # differences 1, 0, -3, 2: sum 0, mean 0 over all four.
    total, count = kto_kl_estimate(pol, ref)
    assert (total.item(), count.item()) == (0.0, 4.0)
    # Two "ranks" of 1 and 3 examples: summing the pieces recovers the global mean, not a mean of means.
    s1, c1 = kto_kl_estimate(pol[:1], ref[:1])
    s2, c2 = kto_kl_estimate(pol[1:], ref[1:])
    assert ((s1 + s2) / (c1 + c2)).item() == 0.0
    assert (s1 / c1 + s2 / c2).item() / 2 != 0.0
    assert not kto_kl_estimate(pol.requires_grad_(), ref)[0].requires_grad


def test_derangement_never_maps_to_itself() -> None:
    g = torch.Generator().manual_seed(0)
    for num in list(range(2, 40)) + [97, 256, 1000]:
        for _ in range(20 if num < 40 else 3):
            index = mismatched_completion_index(num, generator=g)
            assert index.dtype == torch.long and index.shape == (num,)
            assert not (index == torch.arange(num)).any()
            assert sorted(index.tolist()) == list(range(num))  # a permutation: each completion used once
    torch.testing.assert_close(mismatched_completion_index(2), torch.tensor([1, 0]))


def test_derangement_needs_two_examples() -> None:
    for num in (0, 1):
        with pytest.raises(ValueError, match="at least 2 examples in the global batch"):
            mismatched_completion_index(num)


def test_weight_ratio_hand_worked() -> None:
    assert kto_weight_ratio(100, 1000, 1.0, 1.0) == pytest.approx(0.1)
    assert kto_weight_ratio(100, 100, 1.2, 1.0) == pytest.approx(1.2)
    assert kto_weight_ratio(5, 0, 1.0, 1.0) == float("inf")
    with pytest.raises(ValueError):
        kto_weight_ratio(5, 5, 0.0, 1.0)


def test_suggested_weights_land_in_range() -> None:
    # 1:10 imbalance (the paper's example): lambda_U = 1, lambda_D raised to 10.
    assert suggest_kto_weights(100, 1000) == pytest.approx((10.0, 1.0))
    # Already in range: unchanged.
    assert suggest_kto_weights(120, 100) == (1.0, 1.0)
    # Too many desirable: lambda_U raised so that the ratio is 4/3: 1000 / (100 * 7.5) = 4/3.
    assert suggest_kto_weights(1000, 100) == pytest.approx((1.0, 7.5))
    rng = random.Random(0)
    for _ in range(2000):
        n_d, n_u = rng.randint(1, 10**6), rng.randint(1, 10**6)
        w_d, w_u = rng.uniform(0.01, 10), rng.uniform(0.01, 10)
        new_d, new_u = suggest_kto_weights(n_d, n_u, desirable_weight=w_d, undesirable_weight=w_u)
        assert 1.0 <= kto_weight_ratio(n_d, n_u, new_d, new_u) <= 4 / 3
        assert new_d >= w_d and new_u >= w_u  # only the under-weighted side is raised
    with pytest.raises(ValueError, match="both kinds"):
        suggest_kto_weights(10, 0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="bool"):
        kto_losses(POLICY, REF, 0.0, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        kto_losses(POLICY, REF[:2], 0.0, LABELS)
