"""The GRPO family's part of the rollout loop: which advantages each estimator writes, the KL in the
reward, masked truncated responses, TRL's group metrics, and the on-policy ratio."""

from __future__ import annotations

import pytest
import torch

from hpalign.rl.critic_free import (
    UPDATE_SUMS,
    CriticFreeSettings,
    add_critic_free_advantages,
    critic_free_step_metrics,
    group_sums,
)
from hpalign.rl.scoring import RolloutBatch


def settings(estimator: str, **overrides) -> CriticFreeSettings:
    base = dict(estimator=estimator, num_generations=2, beta=0.0, epsilon=0.2, epsilon_high=None,
                scale_rewards="none", loss_type="grpo", mask_truncated_completions=False, kl_estimator="k1",
                max_completion_length=3, on_policy=True)
    return CriticFreeSettings(**{**base, **overrides})


def batch(scores, *, stopped=(True, True, True, True), policy=None, ref=None) -> RolloutBatch:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    logps = torch.full((4, 3), -1.0) if policy is None else policy
    return RolloutBatch(examples=[], prompts=[], texts=[], mask_BT=mask, sampler_logps_BT=logps, old_logps_BT=None,
                        ref_logps_BT=ref, values_BT=None, scores_B=torch.tensor(scores),
                        stopped_B=torch.tensor(stopped))


def test_grpo_advantage_is_each_responses_group_centred_score_on_its_tokens():
    rollouts = batch([1.0, 0.0, 2.0, 2.0])  # groups (1, 0) and (2, 2)
    add_critic_free_advantages(rollouts, settings("grpo"))
    expected = torch.tensor([[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(rollouts.advantages_BT, expected)
    assert rollouts.kl_BT is None and rollouts.loss_mask_BT is rollouts.mask_BT


def test_rloo_subtracts_beta_times_the_responses_kl_then_the_other_responses_mean():
    policy = torch.tensor([[-1.0, -1.0, 9.0], [-1.0, -1.0, -1.0], [-1.0, 9.0, 9.0], [-1.0, -1.0, 9.0]])
    ref = torch.tensor([[-2.0, -2.0, 0.0], [-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0], [-1.5, -1.5, 0.0]])
    rollouts = batch([1.0, 1.0, 0.0, 0.0], policy=policy, ref=ref)
    add_critic_free_advantages(rollouts, settings("rloo", beta=0.5))
    # k1 KL per response (masked): 2.0, 0.0, 0.0, 1.0 -> rewards 0.0, 1.0, 0.0, -0.5
    assert rollouts.kl_BT.sum(1).tolist() == [2.0, 0.0, 0.0, 1.0]
    # leave-one-out with N = 2: r_i - r_other
    assert rollouts.advantages_BT[:, 0].tolist() == [-1.0, 1.0, 0.5, -0.5]
    assert rollouts.advantages_BT[2, 1:].tolist() == [0.0, 0.0]  # padding stays 0


def test_reinforce_pp_whitens_returns_over_tokens():
    rollouts = batch([1.0, 0.0, 0.0, 1.0])
    add_critic_free_advantages(rollouts, settings("reinforce_pp"))
    values = rollouts.advantages_BT[rollouts.mask_BT]
    assert values.mean().item() == pytest.approx(0.0, abs=1e-6) and values.std().item() == pytest.approx(1.0, abs=1e-3)
    assert rollouts.advantages_BT[0, 0] > 0 > rollouts.advantages_BT[1, 0]


def test_truncated_responses_leave_the_loss_when_asked():
    rollouts = batch([1.0, 0.0, 2.0, 2.0], stopped=(True, False, True, True))
    add_critic_free_advantages(rollouts, settings("grpo", mask_truncated_completions=True))
    assert rollouts.loss_mask_BT[1].tolist() == [False, False, False]
    assert torch.equal(rollouts.loss_mask_BT[0], rollouts.mask_BT[0])


def test_group_metrics_as_trl_logs_them():
    sums = group_sums(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2)
    assert sums["num_groups"].item() == 2 and sums["zero_std_groups"].item() == 1
    assert sums["group_std"].item() == pytest.approx(2**-0.5)
    assert group_sums(torch.tensor([1.0, 0.0]), 1)["num_groups"].item() == 0  # no groups, no std


def test_step_metrics_are_token_means_of_the_updates_and_sequence_means_of_the_rollouts():
    totals = {"num_sequences": 4.0, "num_groups": 2.0, "scores": 2.0, "group_std": 1.0, "zero_std_groups": 1.0,
              "num_tokens": 10.0, "stopped": 3.0, "reward_kl": 5.0}
    # two updates, columns as UPDATE_SUMS; 4 and 6 tokens
    updates = torch.tensor([[0.4, 1.0, 4.0, 8.0, 0.4, -0.5, 4.0],
                            [0.6, 0.0, 6.6, 12.0, 0.6, -0.1, 6.0]], dtype=torch.float64)
    assert updates.shape[1] == len(UPDATE_SUMS)
    metrics = critic_free_step_metrics(totals, updates, kl_in_reward=False)
    assert metrics["reward"] == 0.5 and metrics["reward_std"] == 0.5 and metrics["frac_reward_zero_std"] == 0.5
    assert metrics["kl"] == pytest.approx(0.1) and metrics["entropy"] == pytest.approx(2.0)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(0.1) and metrics["val/ratio"] == pytest.approx(1.06)
    assert metrics["loss"] == pytest.approx(-0.3) and metrics["completions/mean_length"] == 2.5
    assert metrics["completions/clipped_ratio"] == 0.25
    assert critic_free_step_metrics(totals, updates, kl_in_reward=True)["kl"] == 0.5  # the reward's KL per token


def test_on_policy_ratio_is_one_and_its_gradient_is_the_advantage():
    """num_iterations 1: the ratio's denominator is the policy's own detached log-prob, so the loss is
    -A * weight and its gradient w.r.t. log pi is -A * weight (TRL's choice)."""
    from hpalign import losses

    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    weights = losses.token_loss_weights(mask, "dapo", num_sequences=1, num_tokens=2, max_length=2)
    loss_B, metrics = losses.clipped_token_losses(logps, logps.detach(), torch.tensor([0.5]), mask, weights)
    loss_B.sum().backward()
    assert loss_B.item() == pytest.approx(-0.5) and metrics["policy/ratio"].item() == 2.0
    assert logps.grad.tolist() == [[-0.25, -0.25]]
