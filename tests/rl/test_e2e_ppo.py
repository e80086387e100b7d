"""PPO end to end through the real command on tiny-random-llama: a rule reward that rises, every
PPOv2 metric name in metrics.jsonl, the RM -> PPO chain, resume equal to the uninterrupted run, and
2 ranks under ZeRO-3 equal to one process for the first PPO update."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import tiny_policy_and_reward
from tests.train.conftest import run_cli

pytestmark = pytest.mark.slow

PPOV2_METRICS = ("eps", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                 "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                 "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens", "lr",
                 "episode")
TINY_PPO = ["--rlhf_type", "ppo", "--model", "tiny-random-llama", "--max_length", "256", "--logging_steps", "1",
            "--eval_steps", "0", "--save_steps", "1000", "--num_eval_generations", "4", "--rollout_engine", "hf"]


def ppo_records(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "objective/scores" in r]


def test_rule_reward_rises_and_every_ppov2_metric_is_logged(tmp_path):
    """The tiny model learns to end its answers: every response without the end-of-turn token loses
    --missing_eos_penalty, so the mean score climbs from about -0.8 as the policy learns to stop."""
    run_cli([*TINY_PPO, "--sft_type", "full", "--learning_rate", "1e-4", "--reward_funcs", "length",
             "--response_length", "48", "--temperature", "1.0", "--batch_size", "16", "--max_steps", "8",
             "--kl_coef", "0.01", "--num_sample_generations", "2", "--output_dir", str(tmp_path), "--run_name", "rule"],
            timeout=900)
    records = ppo_records(tmp_path / "rule")
    assert len(records) == 8
    for name in PPOV2_METRICS:
        assert all(name in r for r in records), name
    scores = [r["objective/scores"] for r in records]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.1, scores
    assert records[-1]["episode"] == 8 * 16
    samples = [json.loads(line) for line in (tmp_path / "rule" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {4, 8} and all({"prompt", "response", "score"} <= set(s) for s in samples)
    summary = json.loads((tmp_path / "rule" / "summary.json").read_text())
    assert "eval/reward_mean" in summary["eval_before"] and "eval/task_metric" in summary["eval_after"]


def test_reward_model_then_ppo_chain(tmp_path):
    """The document's order on the tiny model: an RM run, then PPO scored by its checkpoint; the value
    model starts from the reward model (same head), and the RM's score of PPO's samples rises."""
    run_cli(["--rlhf_type", "rm", "--model", "tiny-random-llama", "--max_length", "256", "--max_steps", "4",
             "--batch_size", "4", "--eval_steps", "0", "--save_steps", "1000", "--logging_steps", "1",
             "--learning_rate", "1e-3", "--output_dir", str(tmp_path), "--run_name", "rm"])
    run_cli([*TINY_PPO, "--reward_model_id_or_path", str(tmp_path / "rm"), "--max_steps", "6", "--batch_size", "8",
             "--response_length", "16", "--stop_token", "none", "--learning_rate", "5e-4",
             "--num_sample_generations", "0", "--output_dir", str(tmp_path), "--run_name", "ppo"], timeout=900)
    records = ppo_records(tmp_path / "ppo")
    assert all("rewards/reward_model" in r for r in records) and "rewards/length" not in records[0]
    scores = [r["objective/scores"] for r in records]
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2, scores
    config = (tmp_path / "ppo" / "config.yaml").read_text()
    assert "reward_funcs: []" in config  # a reward model and no rule rewards: the decision is recorded
    head = load_file(tmp_path / "ppo" / "checkpoint-6" / "value_model" / "value_head.safetensors")
    rm_head = load_file(tmp_path / "rm" / "checkpoint-4" / "value_head.safetensors")
    assert head.keys() == rm_head.keys() and not torch.equal(head["v_head.summary.weight"],
                                                             rm_head["v_head.summary.weight"])  # trained from it


RESUME = [*TINY_PPO, "--max_steps", "4", "--batch_size", "4", "--response_length", "12", "--stop_token", "none",
          "--learning_rate", "5e-4", "--num_sample_generations", "0", "--eval_before_train", "false",
          "--num_eval_generations", "0"]


def random_reward_flags(tmp_path) -> list[str]:
    """tiny-random-llama scored by a random seq-cls reward model: every response its own score
    (a rule reward gives the tiny model's byte soup one score, which whitens to zero advantages:
    the policy would never move and the test would compare nothing of it)."""
    policy, reward = tiny_policy_and_reward(tmp_path)
    return ["--model", str(policy), "--reward_model_id_or_path", str(reward)]


def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path):
    flags = [*RESUME, *random_reward_flags(tmp_path)]
    run_cli([*flags, "--output_dir", str(tmp_path), "--run_name", "full", "--save_steps", "2"])
    shutil.copytree(tmp_path / "full", tmp_path / "cut", ignore=shutil.ignore_patterns("checkpoint-4"))
    run_cli([*flags, "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(tmp_path / "cut" / "checkpoint-2")])
    expected, resumed = ppo_records(tmp_path / "full")[2:], ppo_records(tmp_path / "cut")[2:]
    assert [r["step"] for r in ppo_records(tmp_path / "cut")] == [1, 2, 3, 4]  # the log rewound to step 2, no duplicates
    for name in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "rollout/response_length",
                 "episode"):
        assert [r[name] for r in resumed] == pytest.approx([r[name] for r in expected], abs=1e-5), name
    assert all(r["policy/approxkl_avg"] > 1e-6 for r in expected)  # the policy moves every step
    for part in ("adapter_model.safetensors", "value_model/adapter_model.safetensors",
                 "value_model/value_head.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoint-4" / part) for run in ("full", "cut"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.distributed
def test_two_rank_zero3_first_update_equals_one_process(tmp_path):
    """Rollouts are seeded per prompt (one per generate call here), advantages whitened over both
    ranks and each mini-batch's loss divided by its global token count: 2 ranks x 2 prompts under
    ZeRO-3 take the first PPO update of 1 process x 4 prompts."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    flags = [*RESUME, *random_reward_flags(tmp_path), "--max_steps", "1", "--local_rollout_forward_batch_size", "1",
             "--output_dir", str(tmp_path)]
    run_cli([*flags, "--run_name", "single", "--batch_size", "4"])
    run_cli([*flags, "--run_name", "ranks", "--batch_size", "2", "--deepspeed", "zero3"],
            launcher=["deepspeed", "--num_gpus", "2", "--master_port", "29741"], timeout=900)
    single, ranks = ppo_records(tmp_path / "single")[0], ppo_records(tmp_path / "ranks")[0]
    for name in ("objective/scores", "objective/kl", "objective/entropy", "rollout/response_length", "episode",
                 "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "val/ratio"):
        assert ranks[name] == pytest.approx(single[name], abs=1e-4, rel=1e-4), name
    assert single["policy/approxkl_avg"] > 1e-6  # the policy moved within the step
    for part in ("adapter_model.safetensors", "value_model/value_head.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoint-1" / part) for run in ("single", "ranks"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
