"""What a session decides from the config and the data before it loads the models."""

import logging

import pytest

from hpalign.config import Config
from hpalign.data.types import TokenizedExample
from hpalign.train.session import micro_batch_tokens


def pairs(prompt_len: int, response_len: int, count: int = 4) -> list[TokenizedExample]:
    return [TokenizedExample([1] * prompt_len, [[2] * response_len, [3] * response_len], f"ex{i}")
            for i in range(count)]


def config(batch_size: int, checkpointing=None, share_prompt=True) -> Config:
    cfg = Config()
    cfg.train.batch_size, cfg.train.gradient_checkpointing = batch_size, checkpointing
    cfg.data.share_prompt = share_prompt
    return cfg


def test_micro_batch_tokens_count_a_shared_prompt_once():
    # 40 + 20 + 1 + 20 = 81 positions per pair with a shared prompt, 2 x 60 = 120 without
    assert micro_batch_tokens(config(batch_size=2), pairs(40, 20)) == 162
    assert micro_batch_tokens(config(batch_size=2, share_prompt=False), pairs(40, 20)) == 240


def test_a_model_off_the_rank_device_stops_the_run():
    import pytest
    import torch

    from hpalign.train.session import check_models_on_device

    on_cpu = torch.nn.Linear(2, 2)
    check_models_on_device({"policy": on_cpu, "reference": None}, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="reference has parameters on cpu"):
        check_models_on_device({"policy": on_cpu.to("meta"), "reference": torch.nn.Linear(2, 2)},
                               torch.device("meta"))


# --- flags that reach the models: --attn_impl, --disable_dropout, --logprob_impl -------------------

def _resolved(*argv):
    from hpalign.cli import build_config

    return build_config(["--model", "tiny-random-llama", *argv])


def _models(cfg):
    import torch

    from hpalign.algorithms import get_algorithm
    from hpalign.train.session import build_models, decide_disable_dropout

    algorithm = get_algorithm(cfg.algorithm.rlhf_type)
    cfg.train.disable_dropout = decide_disable_dropout(cfg, algorithm)
    return build_models(cfg, algorithm, torch.float32)


def test_attn_impl_reaches_the_loaded_model():
    import pytest

    from hpalign.ops.attention import varlen_backend

    for impl in ("eager", "sdpa"):
        policy, _ = _models(_resolved("--attn_impl", impl, "--packing", "false", "--sft_type", "full"))
        assert policy.config._attn_implementation == impl
    with pytest.raises(ValueError, match="pip install flash-attn"):
        _models(_resolved("--attn_impl", "flash_attention_2"))
    # with packing the flag picks the per-sequence backend
    assert varlen_backend("sdpa") == "sdpa_per_sequence" and varlen_backend("flash_attention_2") == "flash_varlen"
    with pytest.raises(ValueError, match="--packing false"):
        _resolved("--attn_impl", "eager")  # packing is on by default


def test_disable_dropout_defaults_on_with_a_reference_model_and_says_what_it_overrides(caplog):

    from torch import nn

    def dropout_rates(model):
        return {m.p for m in model.modules() if isinstance(m, nn.Dropout)}

    policy, _ = _models(_resolved("--rlhf_type", "dpo"))
    assert dropout_rates(policy) == {0.0}  # LoRA's 0.05 too, as TRL does
    policy, _ = _models(_resolved("--rlhf_type", "cpo"))  # no reference: dropout stays
    assert dropout_rates(policy) == {0.05}
    policy, _ = _models(_resolved("--rlhf_type", "cpo", "--disable_dropout", "true"))
    assert dropout_rates(policy) == {0.0}
    with caplog.at_level(logging.WARNING, logger="hpalign"):
        _models(_resolved("--rlhf_type", "dpo", "--lora_dropout", "0.1"))
    assert "--lora_dropout 0.1 has no effect" in caplog.text


def test_disable_dropout_makes_train_mode_forwards_repeat_exactly():
    import torch

    from hpalign.models import disable_dropout
    from hpalign.tiny_model import build_tiny_llama

    model, _ = build_tiny_llama(seed=0)
    model.config.attention_dropout = 0.3
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    model.train()
    ids = torch.randint(0, 200, (1, 12))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is live
    assert disable_dropout(model) == len(model.model.layers)
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_logprob_impl_cuda_fails_before_loading_anything_on_a_machine_without_the_extension():
    import pytest
    import torch

    from hpalign.train.session import check_logprob_impl

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have the extension")
    check_logprob_impl("auto")
    check_logprob_impl("torch")
    with pytest.raises(ValueError, match=r"--logprob_impl cuda: the hpalign CUDA token log-prob op is not available"):
        check_logprob_impl("cuda")


def test_thread_count_flag_then_omp_num_threads_then_the_cores(monkeypatch):
    import os

    import torch

    from hpalign.train.session import configure_threads

    if torch.cuda.is_available():
        pytest.skip("threads are left alone on a GPU machine")
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        configure_threads(Config())
        assert torch.get_num_threads() == 1
        cfg = Config()
        cfg.train.num_threads = 2
        configure_threads(cfg)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("LOCAL_SIZE", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        configure_threads(Config())
        assert torch.get_num_threads() == max(1, os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
