"""Multi-rank paths against one process, on 2 CPU ranks with gloo (`deepspeed --num_gpus 2`).

Each 2-rank run must give the single process's per-step losses and gradient norms (to 1e-4) on the
same global batch: ZeRO-0 and ZeRO-2 across ranks (DeepSpeed's own gradient all-reduce; the norm we
compute ourselves under fp32 ZeRO-0 must be of the all-reduced gradient), full fine-tuning across
ranks (the frozen reference: a plain module on the rank's device under ZeRO-0, a partitioned engine
under ZeRO-3, where the LM head's fused log-prob op runs inside the head's own forward), and
gradient accumulation 2 x 2 ranks (with ZeRO-2). DPO's ZeRO-3 LoRA runs are in test_invariants.py."""

import os
import shutil
from pathlib import Path

import pytest

from tests.train.conftest import TINY_FLAGS, run_cli, train_records

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

FLAGS = ["--rlhf_type", "dpo", *TINY_FLAGS, "--learning_rate", "1e-3", "--lora_target_modules", "ALL",
         "--eval_before_train", "false", "--num_eval_generations", "0", "--max_steps", "3"]


def _steps(run_dir):
    return [(r["train/loss"], r["train/grad_norm"]) for r in train_records(run_dir)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process, micro-batch 4, for LoRA and for full fine-tuning."""
    root = tmp_path_factory.mktemp("single")
    for sft_type in ("lora", "full"):
        run_cli([*FLAGS, "--sft_type", sft_type, "--batch_size", "4", "--output_dir", str(root),
                 "--run_name", sft_type])
    return root


@pytest.mark.parametrize(("preset", "sft_type", "batch_size", "accumulation", "port"), [
    ("zero0", "lora", 2, 1, 29911),
    ("zero2", "lora", 1, 2, 29913),  # ZeRO-2 with accumulation 2 x 2 ranks
    ("zero0", "full", 2, 1, 29915),
    ("zero3", "full", 2, 1, 29917),
])
def test_two_ranks_equal_one_process(tmp_path, single_process, preset, sft_type, batch_size, accumulation, port):
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    run_cli([*FLAGS, "--sft_type", sft_type, "--deepspeed", preset, "--batch_size", str(batch_size),
             "--gradient_accumulation_steps", str(accumulation), "--output_dir", str(tmp_path), "--run_name", "ranks"],
            launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(port)], timeout=600)
    expected, got = _steps(single_process / sft_type), _steps(tmp_path / "ranks")
    assert len(expected) == len(got) == 3
    for (loss_a, norm_a), (loss_b, norm_b) in zip(expected, got, strict=True):
        assert loss_b == pytest.approx(loss_a, abs=1e-4, rel=1e-4), (expected, got)
        assert norm_b == pytest.approx(norm_a, abs=1e-4, rel=1e-4), (expected, got)
    assert got[-1][0] < got[0][0]  # and it trains
    # DeepSpeed's CPU all-reduce segments of the run are not left in /dev/shm (RAM)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
