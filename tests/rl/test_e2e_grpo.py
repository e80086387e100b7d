"""GRPO, RLOO and REINFORCE++ end to end through the real command on tiny-random-llama: the reward
rises, TRL GRPOTrainer's metric names are logged, resume equals the uninterrupted run, and 2 ranks
under ZeRO-3 take the first update of one process (groups never straddle ranks; advantages and
token counts are global)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.rl.test_e2e_ppo import random_reward_flags
from tests.train.conftest import run_cli

pytestmark = pytest.mark.slow

GRPO_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
                "completions/mean_length", "completions/clipped_ratio", "loss", "lr", "episode", "eps",
                "time/generation", "time/scoring", "time/update", "rollout/tokens_per_second")
TINY_RUN = ["--model", "tiny-random-llama", "--max_length", "256", "--logging_steps", "1", "--eval_steps", "0",
            "--save_steps", "1000", "--num_eval_generations", "4"]
TINY = [*TINY_RUN, "--rollout_engine", "hf"]
# The tiny model learns to end its answers: every response without the end-of-turn token loses
# --missing_eos_penalty (length reward: 0 for these short byte strings), so the mean reward climbs.
LEARN_TO_STOP = ["--sft_type", "full", "--learning_rate", "1e-4", "--reward_funcs", "length", "--response_length",
                 "48", "--temperature", "1.0", "--batch_size", "16", "--max_steps", "8", "--num_generations", "4",
                 "--missing_eos_penalty", "1.0"]  # PPO's default; the GRPO family has none by default


def step_records(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "reward" in r]


def mean(values) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("rlhf_type", ["grpo", "rloo", "reinforce_pp"])
def test_reward_rises_and_trl_metric_names_are_logged(tmp_path, rlhf_type):
    run_cli(["--rlhf_type", rlhf_type, *TINY, *LEARN_TO_STOP, "--output_dir", str(tmp_path), "--run_name", rlhf_type],
            timeout=900)
    records = step_records(tmp_path / rlhf_type)
    assert len(records) == 8
    for name in GRPO_METRICS:
        assert all(name in r for r in records), name
    rewards = [r["reward"] for r in records]
    assert mean(rewards[-3:]) > mean(rewards[:3]) + 0.1, rewards
    assert records[-1]["episode"] == 8 * 16  # responses sampled
    assert all(r["completions/mean_length"] <= 48 for r in records)
    if rlhf_type == "grpo":  # beta 0.04: the k3 KL is in the loss and grows from 0 as the policy moves
        assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6) and records[-1]["kl"] > 0


RESUME = [*TINY, "--rlhf_type", "grpo", "--max_steps", "4", "--batch_size", "4", "--num_generations", "2",
          "--response_length", "12", "--stop_token", "none", "--learning_rate", "5e-4", "--num_sample_generations",
          "0", "--eval_before_train", "false", "--num_eval_generations", "0"]


def test_grpo_resume_mid_run_equals_the_uninterrupted_run(tmp_path):
    flags = [*RESUME, *random_reward_flags(tmp_path), "--num_iterations", "2"]  # off-policy: old log-probs too
    run_cli([*flags, "--output_dir", str(tmp_path), "--run_name", "full", "--save_steps", "2"])
    shutil.copytree(tmp_path / "full", tmp_path / "cut", ignore=shutil.ignore_patterns("checkpoint-4"))
    run_cli([*flags, "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(tmp_path / "cut" / "checkpoint-2")])
    expected, resumed = step_records(tmp_path / "full")[2:], step_records(tmp_path / "cut")[2:]
    assert [r["step"] for r in step_records(tmp_path / "cut")] == [1, 2, 3, 4]  # the log rewound to step 2, no duplicates
    for name in ("reward", "kl", "loss", "completions/mean_length", "episode"):
        assert [r[name] for r in resumed] == pytest.approx([r[name] for r in expected], abs=1e-5), name
    assert all(r["policy/approxkl_avg"] > 1e-9 for r in expected)  # the second iteration is off-policy
    assert not (tmp_path / "full" / "checkpoint-4" / "value_model").exists()  # no critic
    a, b = (load_file(tmp_path / run / "checkpoint-4" / "adapter_model.safetensors") for run in ("full", "cut"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.distributed
def test_two_rank_zero3_first_grpo_update_equals_one_process(tmp_path):
    """Each rank samples whole groups (2 prompts x 2 responses per rank); group advantages need no
    other rank, token weights use the global counts: 2 ranks x 4 responses = 1 process x 8."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    flags = [*RESUME, *random_reward_flags(tmp_path), "--max_steps", "1", "--local_rollout_forward_batch_size", "1",
             "--loss_type", "dapo", "--scale_rewards", "batch", "--output_dir", str(tmp_path)]
    run_cli([*flags, "--run_name", "single", "--batch_size", "8"])
    run_cli([*flags, "--run_name", "ranks", "--batch_size", "4", "--deepspeed", "zero3"],
            launcher=["deepspeed", "--num_gpus", "2", "--master_port", "29743"], timeout=900)
    single, ranks = step_records(tmp_path / "single")[0], step_records(tmp_path / "ranks")[0]
    for name in ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "episode", "loss"):
        assert ranks[name] == pytest.approx(single[name], abs=1e-4, rel=1e-4), name
    a, b = (load_file(tmp_path / run / "checkpoint-1" / "adapter_model.safetensors") for run in ("single", "ranks"))
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it moved
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
