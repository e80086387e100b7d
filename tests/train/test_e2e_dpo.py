"""End to end: the real `hpalign rlhf` command on tiny-random-llama and the built-in data."""

import json

import pytest
import yaml
from safetensors.torch import load_file

from tests.train.conftest import TINY_FLAGS, eval_records, run_cli, train_records

pytestmark = pytest.mark.slow


def test_dpo_lora_loss_falls_and_heldout_accuracy_rises(tmp_path):
    run_cli(["--rlhf_type", "dpo", *TINY_FLAGS, "--output_dir", str(tmp_path), "--run_name", "dpo",
             "--max_steps", "30", "--batch_size", "4", "--learning_rate", "2e-3", "--lora_target_modules", "ALL",
             "--rpo_alpha", "0.1", "--report_to", "tensorboard", "--save_steps", "15", "--save_total_limit", "1"])
    run_dir = tmp_path / "dpo"
    losses = [r["train/loss"] for r in train_records(run_dir)]
    assert len(losses) == 30
    # shared prompts: each pair's prompt is computed once, so less than every data token is computed
    assert all(0.3 < r["train/computed_token_share"] < 1.0 for r in train_records(run_dir))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    before, after = eval_records(run_dir)[0], eval_records(run_dir)[-1]
    assert before["eval/rewards/accuracies"] == pytest.approx(0.5)  # policy == reference: every margin is 0
    assert after["eval/rewards/accuracies"] > 0.7, after
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 30 and (run_dir / "training.png").stat().st_size > 1000
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["algorithm"]["rpo_alpha"] == 0.1 and config["train"]["learning_rate"] == 2e-3
    # save_total_limit 1 keeps only the newest checkpoint, which is a loadable peft adapter
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-30"]
    adapter = load_file(run_dir / "checkpoint-30" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and not any(".tmp" in p.name for p in run_dir.iterdir())
    assert list((run_dir / "tensorboard").iterdir())


def test_full_finetuning_with_frozen_reference(tmp_path):
    run_cli(["--rlhf_type", "dpo", *TINY_FLAGS, "--output_dir", str(tmp_path), "--run_name", "full",
             "--sft_type", "full", "--max_steps", "12", "--batch_size", "4", "--learning_rate", "5e-4",
             "--packing", "false"])
    run_dir = tmp_path / "full"
    losses = [r["train/loss"] for r in train_records(run_dir)]
    assert losses[-1] < losses[0]
    # padded rows repeat the prompt: every data token is computed, padding is not counted
    assert all(r["train/computed_token_share"] == pytest.approx(1.0) for r in train_records(run_dir))
    assert eval_records(run_dir)[-1]["eval/rewards/accuracies"] > 0.6
    assert (run_dir / "checkpoint-12" / "model.safetensors").exists()
