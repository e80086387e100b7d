"""Non-finite updates: skipped on the device under every DeepSpeed optimizer path, counted, and a
run that keeps failing stops with an error that names the step and the last good checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hpalign.train import nonfinite
from hpalign.train.nonfinite import GuardReading, NonFiniteError, check_streak, non_finite_flag
from tests.train.conftest import TINY_FLAGS, driver_results, run_cli

# Steps: 1 finite, 2 NaN loss (so NaN gradients), 3 finite loss with an infinite gradient, 4 finite.
GUARD_DRIVER = """
import json, os, sys
import torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed
from hpalign.train.engine import build_engine, deepspeed_config

class InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")

def flat_weights(engine):
    return torch.cat([getattr(p, "ds_tensor", p).detach().float().flatten() for p in engine.module.parameters()])

deepspeed.init_distributed(dist_backend="gloo")
results = {}
for preset, dtype in [("zero0", torch.float32), ("zero0", torch.bfloat16), ("zero2", torch.float32),
                      ("zero3", torch.float32)]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)
    config = deepspeed_config(preset, micro_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0,
                              dtype=dtype)
    engine, guard = build_engine(model, ds_config=config, learning_rate=1e-2, weight_decay=0.1,
                                 betas=(0.9, 0.999), num_training_steps=10, warmup_ratio=0.0)
    weights, readings = [flat_weights(engine)], []
    for step, kind in enumerate(["finite", "nan_loss", "inf_gradient", "finite"], start=1):
        guard.begin_step(step)
        x = torch.randn(2, 8).to(dtype)
        if kind == "nan_loss":
            x[0, 0] = float("nan")
        out = engine(x).float()
        if kind == "inf_gradient":
            out = InfiniteGradient.apply(out)
        loss = out.pow(2).mean()
        guard.note_loss(loss)
        engine.backward(loss)
        engine.step()
        guard.end_step()
        weights.append(flat_weights(engine))
        readings.append(list(guard.reading(wait=True).__dict__.values()))
    changed = [not torch.equal(weights[i], weights[i + 1]) for i in range(4)]
    finite = bool(torch.isfinite(weights[-1]).all())
    results[f"{preset}-{str(dtype)[6:]}"] = {"changed": changed, "readings": readings, "finite": finite}
print("RESULTS", json.dumps(results))
"""


def test_nonfinite_updates_are_skipped_under_every_optimizer_path():
    """ZeRO-0 fp32 (torch's fused AdamW takes the flag as found_inf), ZeRO-0 bf16 (DeepSpeed's bf16
    wrapper), ZeRO-2 and ZeRO-3 (DeepSpeed's own overflow check skips first): the NaN-loss step and
    the infinite-gradient step leave the weights exactly as they were, the finite steps move them,
    and the counters say which step began the streak and how many of its steps had a bad loss."""
    results = driver_results(GUARD_DRIVER, "29653")
    assert len(results) == 4
    for name, run in results.items():
        assert run["changed"] == [True, False, False, True], name
        assert run["finite"], name
        # [num_skipped, streak, streak_start, streak_bad_loss] after each step
        assert run["readings"] == [[0, 0, 0, 0], [1, 1, 2, 1], [2, 2, 2, 1], [2, 0, 2, 0]], name


def test_non_finite_flag():
    assert float(non_finite_flag([torch.ones(3), torch.tensor([1e30, -1e30])])) == 0.0  # no L2 overflow
    assert float(non_finite_flag([torch.ones(3), torch.tensor([1.0, math.nan])])) == 1.0
    assert float(non_finite_flag([torch.tensor([-math.inf])])) == 1.0


def test_streak_error_names_step_metric_and_last_checkpoint(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    check_streak({"policy": GuardReading(num_skipped=5, streak=2, streak_start=5, streak_bad_loss=2)},
                 max_in_a_row=3, run_dir=tmp_path)  # under the limit: no error
    with pytest.raises(NonFiniteError) as error:
        check_streak({"policy": GuardReading(num_skipped=5, streak=3, streak_start=5, streak_bad_loss=3)},
                     max_in_a_row=3, run_dir=tmp_path)
    message = str(error.value)
    assert "3 updates in a row had a non-finite loss" in message and "from step 5" in message
    assert str(tmp_path / "checkpoint-4") in message and "5 in all" in message
    with pytest.raises(NonFiniteError, match="non-finite gradient .*no checkpoint was written"):
        check_streak({"value": GuardReading(num_skipped=1, streak=1, streak_start=1, streak_bad_loss=0)},
                     max_in_a_row=1, run_dir=tmp_path)


def test_weights_are_finite():
    model = torch.nn.Linear(3, 2)
    assert nonfinite.weights_are_finite(model)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    assert not nonfinite.weights_are_finite(model)
    model.weight.requires_grad_(False)  # frozen weights are never updated: not checked
    assert nonfinite.weights_are_finite(model)


def test_diverging_run_stops_with_an_error_and_writes_no_nan(tmp_path):
    """The issue's reproduction: DPO full fine-tuning at --learning_rate 1e30. The run exits non-zero
    naming the step and the last checkpoint, every checkpoint it wrote is finite, and
    metrics.jsonl is strict JSON (no bare NaN)."""
    result = run_cli([*TINY_FLAGS, "--rlhf_type", "dpo", "--sft_type", "full", "--max_steps", "6", "--batch_size", "2",
                      "--output_dir", str(tmp_path), "--run_name", "run", "--learning_rate", "1e30",
                      "--save_steps", "1", "--max_nonfinite_steps", "2", "--eval_before_train", "false"],
                     expect_failure=True)
    assert "updates in a row had a non-finite" in result.stderr, result.stderr[-3000:]
    assert "checkpoint" in result.stderr.split("updates in a row", 1)[1]
    run_dir = tmp_path / "run"
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))
    from safetensors.torch import load_file

    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    for path in checkpoints:
        for name, tensor in load_file(path / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), (path, name)
