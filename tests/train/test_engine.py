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
