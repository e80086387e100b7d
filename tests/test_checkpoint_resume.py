"""Checkpoint bookkeeping around a resume (hpalign/checkpoint.py): which checkpoint `latest` means,
what happens to the checkpoints and log lines after the one resumed from, refused plan changes, RNG
files without pickle."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from hpalign import checkpoint
from hpalign.train.schedule import BatchPlan


def _fake_checkpoint(run_dir: Path, step: int, *, rlhf_type: str = "dpo", mtime: float | None = None) -> Path:
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    state = path / checkpoint.STATE_FILE
    state.write_text(json.dumps({"global_step": step, "rlhf_type": rlhf_type}))
    if mtime is not None:
        os.utime(state, (mtime, mtime))
    return path


def test_latest_run_dir_is_the_run_of_that_algorithm_that_saved_last(tmp_path):
    _fake_checkpoint(tmp_path / "dpo-20261201-000000", 4, mtime=1_000)
    _fake_checkpoint(tmp_path / "dpo-20261202-000000", 2, mtime=2_000)
    _fake_checkpoint(tmp_path / "kto-20261203-000000", 8, rlhf_type="kto", mtime=3_000)
    (tmp_path / "dpo-20261204-000000").mkdir()  # started, never saved
    (tmp_path / "dpo-20261205-000000" / ".tmp-checkpoint-1").mkdir(parents=True)  # killed mid-save
    assert checkpoint.latest_run_dir(tmp_path, "dpo").name == "dpo-20261202-000000"
    assert checkpoint.latest_run_dir(tmp_path, "kto").name == "kto-20261203-000000"
    with pytest.raises(ValueError, match="no run directory under .* holds a complete orpo checkpoint"):
        checkpoint.latest_run_dir(tmp_path, "orpo")


def test_resume_sets_later_checkpoints_aside_and_rotation_keeps_the_new_ones(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    moved = checkpoint.set_aside_later_checkpoints(tmp_path, 2)
    assert [p.name for p in moved] == ["checkpoint-4", "checkpoint-6"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / "superseded" / "checkpoint-6" / checkpoint.STATE_FILE).exists()
    _fake_checkpoint(tmp_path, 3)  # the resumed run saves step 3; save_total_limit 1 keeps it, not a stale 6
    checkpoint._rotate(tmp_path, 1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert checkpoint.resolve_resume_path("latest", tmp_path).name == "checkpoint-3"


def test_resume_drops_log_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / (s + 1)}) + "\n" for s in (0, 1, 2, 3, 4)))
    assert checkpoint.drop_records_after(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert checkpoint.drop_records_after(tmp_path / "absent.jsonl", 2) == 0


def test_prepare_resume_rewinds_the_run_directory(tmp_path):
    run = tmp_path / "run"
    plan = checkpoint.plan_state(BatchPlan(10, 2, 1, 1), seed=42)
    for step in (2, 4):
        path = _fake_checkpoint(run, step)
        state = json.loads((path / checkpoint.STATE_FILE).read_text())
        (path / checkpoint.STATE_FILE).write_text(json.dumps({**state, "plan": plan}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    (run / "samples.jsonl").write_text(json.dumps({"step": 4, "response": "x"}) + "\n")
    assert checkpoint.prepare_resume(str(run / "checkpoint-2"), run, plan) == run / "checkpoint-2"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "samples.jsonl").read_text() == ""
    assert (run / "superseded" / "checkpoint-4").is_dir()


def test_a_changed_batch_plan_is_refused_naming_what_changed(tmp_path):
    saved = checkpoint.plan_state(BatchPlan(100, 4, 2, 2), seed=42)
    checkpoint.check_same_plan(tmp_path, saved, dict(saved))  # same plan: no error
    checkpoint.check_same_plan(tmp_path, {}, saved)  # a checkpoint from before plans were recorded
    with pytest.raises(ValueError) as error:
        checkpoint.check_same_plan(tmp_path, saved, checkpoint.plan_state(BatchPlan(100, 4, 1, 1), seed=42))
    changes = str(error.value).split("(", 1)[1].split(";")[0]
    assert changes == "accumulation 2 -> 1, world_size 2 -> 1"


def test_rng_state_round_trips_without_pickle(tmp_path):
    path = checkpoint.rng_file(tmp_path, 0)
    random.seed(3)
    torch.manual_seed(3)
    checkpoint.save_rng_state(path)
    expected = (random.random(), torch.rand(3).tolist())
    random.seed(99)
    torch.manual_seed(99)
    checkpoint.load_rng_state(path)
    assert (random.random(), torch.rand(3).tolist()) == expected
    assert path.read_bytes()[8:9] == b"{"  # safetensors: a length, then a JSON header (a pickle starts 0x80)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:  # plain safetensors: readable by any tool
        assert set(handle.keys()) == {"torch"} | ({"cuda"} if torch.cuda.is_available() else set())


def test_a_missing_rng_file_is_an_error(tmp_path):
    path = _fake_checkpoint(tmp_path, 2)
    with pytest.raises(ValueError, match="rng_state_0.safetensors is missing"):
        checkpoint.load_checkpoint(engine=None, path=path)
