"""SFT NLL sums and the RPO / CPO NLL term, normalised by the global token count."""

from __future__ import annotations

import pytest
import torch

from hpalign.losses.dpo import dpo_losses
from hpalign.losses.sft import nll_sum, rpo_nll_sum, sft_losses


def test_nll_sum_hand_worked() -> None:
    # Sequence 0: tokens with log-probs (-0.5, -1.5) -> sum -2 -> NLL 2. Sequence 1: (-3,) -> NLL 3.
    torch.testing.assert_close(nll_sum(torch.tensor([-2.0, -3.0])), torch.tensor([2.0, 3.0]))


def test_sft_losses_are_sums_divided_once_by_global_tokens() -> None:
    logps = torch.tensor([-2.0, -3.0, -1.0])
    num_tokens = torch.tensor([2, 1, 4])
    losses, metrics = sft_losses(logps, num_tokens)
    torch.testing.assert_close(losses, torch.tensor([2.0, 3.0, 1.0]))
    torch.testing.assert_close(metrics["num_tokens"], torch.tensor([2.0, 1.0, 4.0]))
    # Global per-token NLL: (2 + 3 + 1) / (2 + 1 + 4) = 6 / 7, whatever the micro-batch split:
    # [seq0] + [seq1, seq2] -> (2 + 4) / 7. Averaging per micro-batch would give (1 + 4/5) / 2 = 0.9.
    part_a, _ = sft_losses(logps[:1], num_tokens[:1])
    part_b, _ = sft_losses(logps[1:], num_tokens[1:])
    assert ((part_a.sum() + part_b.sum()) / num_tokens.sum()).item() == pytest.approx(6 / 7)
    assert not metrics["nll"].requires_grad


def test_rpo_term_in_dpo_loss_hand_worked() -> None:
    # DPO with rpo_alpha = 0.1: loss = mean_pairs(dpo) + 0.1 * sum(-logp_c) / global chosen tokens.
    pc, pr = torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.0])
    ref = torch.tensor([-5.0, -5.0])
    chosen_tokens = torch.tensor([2, 4])
    dpo, _ = dpo_losses(pc, pr, ref, ref, beta=0.1)
    rpo = rpo_nll_sum(pc)
    torch.testing.assert_close(rpo, torch.tensor([4.0, 6.0]))
    total = dpo.sum() / 2 + 0.1 * rpo.sum() / chosen_tokens.sum()
    # dpo: h = 1 -> log(1 + e^-0.1) = 0.644396660 ; h = -1 -> 0.744396660 ; mean 0.694396660
    # rpo: 0.1 * (4 + 6) / 6 = 0.166666667 ; total 0.861063327
    assert total.item() == pytest.approx(0.861063327, abs=1e-6)


def test_rpo_gradient_is_per_token() -> None:
    pc = torch.tensor([-4.0, -6.0], requires_grad=True)
    (1.0 * rpo_nll_sum(pc).sum() / 6).backward()
    torch.testing.assert_close(pc.grad, torch.full((2,), -1 / 6))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        sft_losses(torch.zeros(3), torch.ones(2))
