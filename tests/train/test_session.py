"""What a session decides from the config and the data before it loads the models."""

import logging

from hpalign.config import Config
from hpalign.data.types import TokenizedExample
from hpalign.train.session import CHECKPOINT_MIN_TOKENS, decide_gradient_checkpointing


def pairs(prompt_len: int, response_len: int, count: int = 4) -> list[TokenizedExample]:
    return [TokenizedExample([1] * prompt_len, [[2] * response_len, [3] * response_len], f"ex{i}")
            for i in range(count)]


def config(batch_size: int, checkpointing=None, share_prompt=True) -> Config:
    cfg = Config()
    cfg.train.batch_size, cfg.train.gradient_checkpointing = batch_size, checkpointing
    cfg.data.share_prompt = share_prompt
    return cfg


def test_auto_checkpointing_follows_the_tokens_per_micro_batch(caplog):
    short = pairs(40, 20)  # 40 + 20 + 1 + 20 = 81 tokens per pair with a shared prompt
    with caplog.at_level(logging.INFO, logger="hpalign"):
        assert not decide_gradient_checkpointing(config(batch_size=1), short)
    assert "gradient checkpointing off (auto: micro-batches average 81 tokens" in caplog.text
    long = pairs(200, 100)  # 401 per pair: batch 2 = 802 tokens
    assert decide_gradient_checkpointing(config(batch_size=2), long)
    assert 401 < CHECKPOINT_MIN_TOKENS <= 802
    # unshared prompts count twice: 500 per pair
    assert not decide_gradient_checkpointing(config(batch_size=1, share_prompt=True), long)
    assert decide_gradient_checkpointing(config(batch_size=1, share_prompt=False), pairs(300, 100))


def test_an_explicit_setting_wins():
    assert decide_gradient_checkpointing(config(batch_size=1, checkpointing=True), pairs(5, 5))
    assert not decide_gradient_checkpointing(config(batch_size=64, checkpointing=False), pairs(500, 500))


def test_a_model_off_the_rank_device_stops_the_run():
    import pytest
    import torch

    from hpalign.train.session import check_models_on_device

    on_cpu = torch.nn.Linear(2, 2)
    check_models_on_device({"policy": on_cpu, "reference": None}, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="reference has parameters on cpu"):
        check_models_on_device({"policy": on_cpu.to("meta"), "reference": torch.nn.Linear(2, 2)},
                               torch.device("meta"))
