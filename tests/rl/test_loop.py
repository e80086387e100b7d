"""The rollout loop's pieces: seeds, groups, epoch orders, PPOv2 metric arithmetic, the sampler's log-probs."""

from __future__ import annotations

import pytest
import torch

from hpalign.rl.loop import RolloutSettings, derived_seed, mini_batch_orders, sample_rollouts
from hpalign.rl.ppo import UPDATE_SUMS, PPOSettings, add_gae_advantages, ppo_step_metrics
from hpalign.rl.rollout import Rollout, SamplingParams


def _settings(**overrides) -> RolloutSettings:
    base = dict(batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2, num_epochs=3, rollout_chunk=4,
                sampling=SamplingParams(8, 0.7, (5,)), missing_eos_penalty=1.0)
    return RolloutSettings(**{**base, **overrides})


PPO = PPOSettings(kl_coef=0.05, kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95, cliprange=0.2,
                  cliprange_value=0.2, vf_coef=0.1)


def test_derived_seed_is_a_pure_function_of_its_parts():
    assert derived_seed(42, "rollout", 3, 7) == derived_seed(42, "rollout", 3, 7)
    assert len({derived_seed(42, "rollout", 3, i) for i in range(100)}) == 100
    assert 0 <= derived_seed(1, 2) < 2**63


def test_settings_count_responses_and_prompts():
    settings = _settings(num_generations=4)
    assert settings.rollouts_per_rank == 8 and settings.prompts_per_rank == 2
    assert _settings().prompts_per_rank == 8


def test_mini_batch_orders_partition_every_epoch_afresh():
    orders = mini_batch_orders(8, num_mini_batches=2, num_epochs=3, seed=0, step=5)
    assert len(orders) == 3 and all(len(epoch) == 2 and all(len(m) == 4 for m in epoch) for epoch in orders)
    for epoch in orders:
        assert sorted(i for mini in epoch for i in mini) == list(range(8))
    assert orders[0] != orders[1]
    assert orders == mini_batch_orders(8, num_mini_batches=2, num_epochs=3, seed=0, step=5)  # resumable
    assert orders != mini_batch_orders(8, num_mini_batches=2, num_epochs=3, seed=0, step=6)


class RecordingEngine:
    """A rollout engine that answers each prompt with its seed's parity and records its calls."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, sampling, seeds):
        self.calls.append((prompt_ids, seeds))
        return Rollout([[s % 7] for s in seeds], [[-1.0] for _ in seeds], [False for _ in seeds])


def test_groups_are_consecutive_and_seeded_by_their_global_index():
    """N responses per prompt, one after the other; a response's seed depends only on (seed, step,
    prompt position x N + k), so rank 1's prompt at position 1 samples what one process does."""
    engine = RecordingEngine()
    _, examples, _ = sample_rollouts(engine, [[1, 2], [3]], [0, 1], sampling=SamplingParams(4, 1.0),
                                     num_generations=3, seed=9, step=2, decode=str)
    prompt_ids, seeds = engine.calls[0]
    assert prompt_ids == [[1, 2]] * 3 + [[3]] * 3
    assert seeds == [derived_seed(9, "rollout", 2, i) for i in range(6)] and len(set(seeds)) == 6
    assert [e.prompt_ids for e in examples] == prompt_ids
    sample_rollouts(engine, [[3]], [1], sampling=SamplingParams(4, 1.0), num_generations=3, seed=9, step=2,
                    decode=str)
    assert engine.calls[1][1] == seeds[3:]
    sample_rollouts(engine, [[3]], [1], sampling=SamplingParams(4, 1.0), num_generations=1, seed=9, step=2,
                    decode=str)
    assert engine.calls[2][1] == [derived_seed(9, "rollout", 2, 1)]  # PPO: one per prompt, as before groups


def test_step_metrics_follow_ppov2_definitions():
    totals = {"num_sequences": 4.0, "kl": 2.0, "entropy": 40.0, "scores": 6.0, "num_eos": 3.0, "num_tokens": 40.0,
              "stopped": 3.0}
    # two updates (epochs x mini-batches), columns as UPDATE_SUMS; 10 and 30 tokens
    updates = torch.tensor([[1.0, 2.0, 10.0, 50.0, -1.0, 4.0, 1.0, 10.0],
                            [3.0, 3.0, 33.0, 90.0, -2.0, 2.0, 3.0, 30.0]], dtype=torch.float64)
    assert updates.shape[1] == len(UPDATE_SUMS)
    metrics = ppo_step_metrics(totals, updates, kl_coef=0.1)
    assert metrics["objective/kl"] == pytest.approx(0.5)  # per-sequence sum, averaged over sequences
    assert metrics["objective/entropy"] == pytest.approx(10.0)
    assert metrics["objective/non_score_reward"] == pytest.approx(-0.05)
    assert metrics["objective/scores"] == pytest.approx(1.5)
    assert metrics["objective/rlhf_reward"] == pytest.approx(1.45)
    assert metrics["val/num_eos_tokens"] == 3.0
    assert metrics["policy/approxkl_avg"] == pytest.approx(4 / 40) and metrics["loss/value_avg"] == pytest.approx(6 / 40)
    assert metrics["policy/entropy_avg"] == pytest.approx(140 / 40)
    assert metrics["val/ratio"] == pytest.approx(43 / 40)
    # variance of the two updates' mean ratios 1.0 and 1.1
    assert metrics["val/ratio_var"] == pytest.approx(0.0025)


def test_common_metrics_share_of_stopped_responses_and_sampler_gap():
    from hpalign.rl.loop import common_metrics

    metrics = common_metrics({"num_sequences": 4.0, "num_tokens": 40.0, "stopped": 3.0, "sampler_gap": 0.4,
                              "scores": 1.0, "mean:rewards/length": -2.0})
    assert metrics["rollout/stopped_share"] == 0.75 and metrics["rollout/response_length"] == 10.0
    assert metrics["rollout/sampler_logp_gap"] == pytest.approx(0.01) and metrics["rewards/length"] == -0.5
    assert "rollout/sampler_logp_gap" not in common_metrics({"num_sequences": 1.0, "num_tokens": 1.0, "stopped": 0.0})


def test_sampler_log_probs_are_the_old_ones_when_the_policy_pass_is_off():
    from hpalign.rl.loop import score_rollouts
    from hpalign.rl.rollout import HFGenerateRollouts
    from hpalign.rl.scoring import ScoringPasses
    from hpalign.stats import TokenStats
    from hpalign.tiny_model import build_tiny_llama
    from hpalign.train.forward import token_stats
    from hpalign.train.session import make_collate

    model = build_tiny_llama(seed=0)[0].eval()
    sampling = SamplingParams(max_new_tokens=6, temperature=0.7)
    settings = _settings(gradient_accumulation_steps=1, num_mini_batches=1, num_epochs=1, rollout_chunk=2,
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
                                               sampling=sampling, num_generations=1, seed=0, step=0, decode=str)
    batches = {}
    for name, policy in (("sampler", None), ("recompute", logps)):
        passes = ScoringPasses(policy=policy, reference=logps, values=values, scores=scores)
        batches[name] = score_rollouts(passes, rollout, examples, texts, [[], []], settings=settings,
                                       collate=collate, device=torch.device("cpu"))
        add_gae_advantages(batches[name], PPO)
    assert calls == [2, 2, 2]  # reference twice, the policy only when recomputing
    sampler, recomputed = batches["sampler"], batches["recompute"]
    assert sampler.old_logps_BT is None and torch.equal(sampler.policy_logps_BT, sampler.sampler_logps_BT)
    torch.testing.assert_close(sampler.policy_logps_BT, recomputed.old_logps_BT, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampler.advantages_BT, recomputed.advantages_BT, atol=1e-4, rtol=1e-4)


def test_passes_the_algorithm_does_not_read_do_not_run():
    """GRPO with beta 0 on-policy: no policy, reference or value pass, only the scores."""
    from hpalign.data.types import TokenizedExample
    from hpalign.rl.scoring import ScoringPasses, run_scoring_passes
    from hpalign.train.session import make_collate

    def scores(batch, _prompts, _texts):
        return torch.arange(float(batch.num_sequences)), {"rewards/x": 1.0}

    examples = [TokenizedExample([1, 2], [[3, 4]], "a"), TokenizedExample([5], [[6]], "b")]
    out = run_scoring_passes(ScoringPasses(policy=None, reference=None, values=None, scores=scores), examples,
                             [[], []], ["", ""], collate=make_collate(pad_id=0, packed=True, max_tokens=None),
                             chunk_size=1, width=2, device=torch.device("cpu"))
    assert set(out) == {"scores", "metrics"} and out["scores"].tolist() == [0.0, 0.0]
    assert out["metrics"] == {"rewards/x": 1.0}
