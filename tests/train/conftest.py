"""Helpers to run the real training command on tiny-random-llama in a subprocess.

Each run is its own process (as users run it), so DeepSpeed's process group and global state never
leak between tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_FLAGS = ["--model", "tiny-random-llama", "--num_eval_generations", "4", "--max_new_tokens", "8",
              "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "1000", "--max_length", "256"]


def run_cli(args: list[str], *, launcher: list[str] | None = None, timeout: int = 300,
            expect_failure: bool = False) -> subprocess.CompletedProcess:
    """Run the training command; fail the test when it fails (or, with `expect_failure`, when it succeeds)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    # hpalign takes OMP_NUM_THREADS as its thread count: one per rank under a launcher, else its default.
    if launcher:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("OMP_NUM_THREADS", None)
    command = launcher + [str(REPO / "launch" / "train.py")] if launcher else [sys.executable, "-m", "hpalign", "rlhf"]
    result = subprocess.run(command + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_failure:
        if result.returncode == 0:
            pytest.fail(f"command succeeded, a failure was expected: {' '.join(command + args)}")
        return result
    if result.returncode != 0:
        pytest.fail(f"command failed ({result.returncode}): {' '.join(command + args)}\n"
                    f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}")
    return result


def train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "train/loss" in r]


def eval_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if any(k.startswith("eval/") for k in r)]


def driver_results(source: str, *args: str) -> dict:
    """Run a one-process driver script (`python -c source args`, DeepSpeed on CPU) and return the
    JSON it prints after `RESULTS`; fail the test with its stderr when it fails."""
    result = subprocess.run([sys.executable, "-c", source, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
                                              "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("RESULTS", 1)[1])


def two_rank_worker_reports(worker: Path, out_dir: Path, *, port: int, timeout: int = 600) -> list[dict]:
    """Run `worker out_dir` on 2 CPU ranks under the deepspeed launcher; return the `rank<k>.json`
    each rank wrote into `out_dir`. Fails the test with the launcher's stderr when it fails."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
               str(worker), str(out_dir)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-6000:]
    return [json.loads((out_dir / f"rank{k}.json").read_text()) for k in range(2)]
