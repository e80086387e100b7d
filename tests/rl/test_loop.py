"""The rollout loop's pieces: seeds, epoch orders, PPOv2 metric arithmetic, the missing-EOS penalty."""

from __future__ import annotations

import pytest
import torch

from hpalign.rl.loop import UPDATE_SUMS, PPOSettings, derived_seed, mini_batch_orders, step_metrics
from hpalign.rl.rollout import SamplingParams


def _settings(**overrides) -> PPOSettings:
    base = dict(batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=3, rollout_chunk=4,
                sampling=SamplingParams(8, 0.7, (5,)), kl_coef=0.05, kl_estimator="k1", whiten_rewards=False,
                gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, missing_eos_penalty=1.0)
    return PPOSettings(**{**base, **overrides})


def test_derived_seed_is_a_pure_function_of_its_parts():
    assert derived_seed(42, "rollout", 3, 7) == derived_seed(42, "rollout", 3, 7)
    assert len({derived_seed(42, "rollout", 3, i) for i in range(100)}) == 100
    assert 0 <= derived_seed(1, 2) < 2**63


def test_mini_batch_orders_partition_every_epoch_afresh():
    settings = _settings()
    assert settings.rollouts_per_rank == 8
    orders = mini_batch_orders(8, settings, seed=0, step=5)
    assert len(orders) == 3 and all(len(epoch) == 2 and all(len(m) == 4 for m in epoch) for epoch in orders)
    for epoch in orders:
        assert sorted(i for mini in epoch for i in mini) == list(range(8))
    assert orders[0] != orders[1]
    assert orders == mini_batch_orders(8, settings, seed=0, step=5)  # resumable
    assert orders != mini_batch_orders(8, settings, seed=0, step=6)


def test_step_metrics_follow_ppov2_definitions():
    rollout = {"num_sequences": 4.0, "kl": 2.0, "entropy": 40.0, "scores": 6.0, "num_eos": 3.0, "num_tokens": 40.0,
               "stopped": 3.0, "sampler_gap": 0.4}
    # two updates (epochs x mini-batches), columns as UPDATE_SUMS; 10 and 30 tokens
    updates = torch.tensor([[1.0, 2.0, 10.0, 50.0, -1.0, 4.0, 1.0, 10.0],
                            [3.0, 3.0, 33.0, 90.0, -2.0, 2.0, 3.0, 30.0]], dtype=torch.float64)
    assert updates.shape[1] == len(UPDATE_SUMS)
    metrics = step_metrics(rollout, updates, kl_coef=0.1)
    assert metrics["objective/kl"] == pytest.approx(0.5)  # per-sequence sum, averaged over sequences
    assert metrics["objective/entropy"] == pytest.approx(10.0)
    assert metrics["objective/non_score_reward"] == pytest.approx(-0.05)
    assert metrics["objective/scores"] == pytest.approx(1.5)
    assert metrics["objective/rlhf_reward"] == pytest.approx(1.45)
    assert metrics["val/num_eos_tokens"] == 3.0 and metrics["rollout/stopped_share"] == 0.75
    assert metrics["policy/approxkl_avg"] == pytest.approx(4 / 40) and metrics["loss/value_avg"] == pytest.approx(6 / 40)
    assert metrics["policy/entropy_avg"] == pytest.approx(140 / 40)
    assert metrics["val/ratio"] == pytest.approx(43 / 40)
    # variance of the two updates' mean ratios 1.0 and 1.1
    assert metrics["val/ratio_var"] == pytest.approx(0.0025)


def test_sampler_log_probs_are_the_old_ones_when_the_policy_pass_is_off():
    from hpalign.rl.loop import sample_rollouts, score_rollouts
    from hpalign.rl.rollout import HFGenerateRollouts
    from hpalign.rl.scoring import ScoringPasses
    from hpalign.stats import TokenStats
    from hpalign.tiny_model import build_tiny_llama
    from hpalign.train.forward import token_stats
    from hpalign.train.session import make_collate

    model = build_tiny_llama(seed=0)[0].eval()
    sampling = SamplingParams(max_new_tokens=6, temperature=0.7)
    settings = _settings(gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1, rollout_chunk=2,
                         sampling=sampling, missing_eos_penalty=None)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    calls = []

    def logps(batch):
        calls.append(batch.num_sequences)
        return token_stats(model, batch, packed=True, temperature=0.7)

    def values(batch):
        stats = token_stats(model, batch, packed=True)
        return TokenStats(stats.seq_ids_M, stats.offsets_M, stats.num_sequences, values_M=stats.logps_M * 0)

    def scores(batch, _prompts, _texts):
        return torch.tensor([1.0, -1.0]), {}  # the advantages' spread (whitened) comes from the scores

    collate = make_collate(pad_id=0, packed=True, max_tokens=None)
    rollout, examples, texts = sample_rollouts(HFGenerateRollouts(model, pad_id=0, batch_size=2), prompts, [0, 1],
                                               sampling=sampling, seed=0, step=0, decode=str)
    batches = {}
    for name, policy in (("sampler", None), ("recompute", logps)):
        passes = ScoringPasses(policy=policy, reference=logps, values=values, scores=scores)
        batches[name] = score_rollouts(passes, rollout, examples, texts, [[], []], settings=settings,
                                       collate=collate, device=torch.device("cpu"))
    assert calls == [2, 2, 2]  # reference twice, the policy only when recomputing
    sampler, recomputed = batches["sampler"], batches["recompute"]
    assert torch.equal(sampler.old_logps_BT, sampler.sampler_logps_BT)
    torch.testing.assert_close(sampler.old_logps_BT, recomputed.old_logps_BT, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampler.advantages_BT, recomputed.advantages_BT, atol=1e-4, rtol=1e-4)
