"""Under 2-rank ZeRO-3 the weight sync gathers one bucket at a time and every rank's vLLM engine
then samples what HF generate samples from the gathered policy (see zero3_parity_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[3]


def test_two_rank_zero3_lora_sync_gives_hf_greedy_continuations(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29763",
               str(Path(__file__).with_name("zero3_parity_worker.py")), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    for rank in ranks:
        assert rank["world"] == 2
        assert rank["vllm"] == rank["hf"]
        assert rank["sync"]["weight_sync/buckets"] > 1  # 256 KiB buckets: gathered piecewise
    assert ranks[0]["vllm"] == ranks[1]["vllm"]  # both ranks hold the same updated policy
