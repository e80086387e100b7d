import json

import pytest
import torch

from hpalign.train.engine import ZERO_PRESETS, deepspeed_config, warmup_cosine


def test_warmup_then_cosine_to_zero():
    values = [warmup_cosine(s, num_warmup_steps=2, num_training_steps=10) for s in range(10)]
    assert values[0] == pytest.approx(1 / 3) and values[1] == pytest.approx(2 / 3)
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False))
    assert warmup_cosine(10, num_warmup_steps=2, num_training_steps=10) == pytest.approx(0.0)


@pytest.mark.parametrize("preset", sorted(ZERO_PRESETS))
def test_presets_carry_our_batch_settings(preset):
    config = deepspeed_config(preset, micro_batch_size=3, gradient_accumulation_steps=5, max_grad_norm=0.5,
                              dtype=torch.float32)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == int(preset[4])
    assert not config["bf16"]["enabled"]


def test_user_json_file_is_read_and_batch_keys_overridden(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 999}))
    config = deepspeed_config(str(path), micro_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0,
                              dtype=torch.bfloat16)
    assert config["zero_optimization"]["stage"] == 2 and "train_batch_size" not in config
    assert config["bf16"]["enabled"]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="zero0"):
        deepspeed_config("zero9", micro_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0,
                         dtype=torch.float32)


# --- the logged gradient norm ---------------------------------------------------------------------

GRAD_NORM_DRIVER = """
import copy, json, os, sys
import torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed
from hpalign.train.engine import build_engine, deepspeed_config, grad_norm_after_step, read_grad_norm_before_step

deepspeed.init_distributed(dist_backend="gloo")
results = {}
for preset, dtype in [("zero0", torch.float32), ("zero0", torch.bfloat16), ("zero2", torch.float32),
                      ("zero2", torch.bfloat16), ("zero3", torch.float32)]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)
    by_hand = copy.deepcopy(model).double()
    inputs = [torch.randn(3, 8) for _ in range(2)]
    config = deepspeed_config(preset, micro_batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.1,
                              dtype=dtype)
    engine, _ = build_engine(model, ds_config=config, learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.999),
                                num_training_steps=10, warmup_ratio=0.0)
    for x in inputs:
        engine.backward(engine(x.to(dtype)).float().pow(2).sum())
        reading = read_grad_norm_before_step(engine) if engine.is_gradient_accumulation_boundary() else None
        engine.step()
    logged = float(grad_norm_after_step(engine, reading))
    # DeepSpeed's update is the mean over the accumulated micro-batches; clipping (0.1) comes after.
    loss = sum(by_hand(x.double()).pow(2).sum() for x in inputs) / len(inputs)
    loss.backward()
    hand = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in by_hand.parameters()])).item()
    results[f"{preset}-{str(dtype)[6:]}"] = [logged, hand]
print("RESULTS", json.dumps(results))
"""


def test_logged_grad_norm_is_the_global_norm_before_clipping():
    """ZeRO-0 fp32 (DeepSpeed keeps no norm: computed from the all-reduced grads), ZeRO-0 bf16
    (DeepSpeed's fp16/bf16 wrapper), ZeRO-2 and ZeRO-3: the norm of the accumulated gradient,
    before clipping, against a float64 hand computation."""
    from tests.train.conftest import driver_results

    results = driver_results(GRAD_NORM_DRIVER, "29641")
    assert len(results) == 5
    for name, (logged, hand) in results.items():
        tolerance = 3e-2 if "bfloat16" in name else 1e-5
        assert logged == pytest.approx(hand, rel=tolerance), (name, logged, hand)
        assert hand > 0.1  # clipping was active: a norm read after clipping would be 0.1


class _FakeUnfused:
    """Stands for DeepSpeed's FP16_UnfusedOptimizer under fp16: it keeps the norm of the
    loss-scaled gradient."""

    def __init__(self, scale):
        self._global_grad_norm = 0.0
        self.loss_scale_config = type("Scale", (), {"cur_scale": scale})()


_FakeUnfused.__name__ = "FP16_UnfusedOptimizer"


class _FakeEngine:
    def __init__(self, optimizer, norm):
        self.optimizer, self.norm, self.module = optimizer, norm, torch.nn.Linear(2, 2)

    def get_global_grad_norm(self):
        return self.norm


def test_fp16_loss_scale_is_divided_out_where_deepspeed_keeps_it_in():
    from hpalign.train.engine import grad_norm_after_step, read_grad_norm_before_step

    engine = _FakeEngine(_FakeUnfused(scale=65536.0), norm=65536.0 * 1.5)
    reading = read_grad_norm_before_step(engine)
    assert reading.own_norm is None and reading.loss_scale == 65536.0
    assert float(grad_norm_after_step(engine, reading)) == pytest.approx(1.5)
    # a wrapper that unscales itself (ZeRO, bf16, fused fp16) is taken as it is
    zero = type("DeepSpeedZeroOptimizer", (), {"_global_grad_norm": 0.0})()
    engine = _FakeEngine(zero, norm=torch.tensor(2.5))
    assert float(grad_norm_after_step(engine, read_grad_norm_before_step(engine))) == pytest.approx(2.5)
    # DeepSpeed told not to compute it: nothing is logged rather than a wrong number
    assert grad_norm_after_step(_FakeEngine(zero, None), read_grad_norm_before_step(_FakeEngine(zero, None))) is None


def test_a_frozen_model_goes_to_the_rank_device_without_zero3():
    """A full fine-tune's reference under ZeRO-0/2 is a plain module: it must follow the batches to
    the rank's device (`meta` stands in for a CUDA device here)."""
    from hpalign.train.engine import build_frozen_engine

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
    for preset in ("zero0", "zero2"):
        config = deepspeed_config(preset, micro_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0,
                                  dtype=torch.float32)
        frozen = build_frozen_engine(model, ds_config=config, device=torch.device("meta"))
        assert {p.device.type for p in frozen.parameters()} == {"meta"}
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
