"""Gradient checkpointing decided by memory (hpalign/train/checkpointing.py): the plan, the decision a
session takes from it, and partial checkpointing that leaves the gradients unchanged."""

import copy
import logging

import pytest
import torch

from hpalign.cli import build_config
from hpalign.tiny_model import build_tiny_llama, tiny_llama_config
from hpalign.train import checkpointing
from hpalign.train.checkpointing import ModelShape, limit_checkpointed_layers, plan_checkpointing
from hpalign.train.session import decide_checkpointing_by_memory, limit_checkpointing

SMOLLM2 = ModelShape(num_layers=30, hidden_size=576, intermediate_size=1536)


def test_activation_estimate_per_token_and_layer():
    # fp32: 10 x 576 + 4 x 1536 values = 47,616 bytes per token per layer, 1.43 MB over 30 layers
    assert SMOLLM2.activation_bytes_per_token_layer(4) == 4 * (10 * 576 + 4 * 1536)
    shape = ModelShape.of(tiny_llama_config(260))
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (4, 256, 688)


def test_plan_recomputes_the_fewest_layers_that_fit():
    per_layer = 1000 * SMOLLM2.activation_bytes_per_token_layer(4)  # a 1000-token micro-batch
    full = 30 * per_layer
    none = plan_checkpointing(tokens=1000, shape=SMOLLM2, dtype_bytes=4, available_bytes=4 * full)
    assert (none.layers, none.enabled, none.activation_bytes) == (0, False, full)
    # budget a third of the activations short: each recomputed layer saves all but its input
    saved = per_layer - 1000 * 576 * 4
    partial = plan_checkpointing(tokens=1000, shape=SMOLLM2, dtype_bytes=4, available_bytes=4 * (full - 5.5 * saved))
    assert partial.layers == 6 and partial.enabled
    assert full - partial.layers * saved <= partial.budget_bytes < full - (partial.layers - 1) * saved
    every = plan_checkpointing(tokens=1000, shape=SMOLLM2, dtype_bytes=4, available_bytes=1.0)
    assert every.layers == 30
    assert "6 of 30 layers recomputed" in partial.describe() and "25%" in partial.describe()


def _cfg(*flags):
    return build_config(["--model", "tiny-random-llama", "--rlhf_type", "dpo", *flags])


def test_the_session_decides_from_the_memory_at_hand(monkeypatch, caplog):
    tokens = 500
    needed = tokens * ModelShape.of(tiny_llama_config(260)).activation_bytes_per_token_layer(4) * 4
    monkeypatch.setattr(checkpointing, "available_memory_per_rank", lambda device: 100 * needed)
    plenty = _cfg()
    assert plenty.train.gradient_checkpointing is None  # LoRA on a CPU: auto
    with caplog.at_level(logging.INFO, logger="hpalign"):
        decide_checkpointing_by_memory(plenty, tokens=tokens, dtype=torch.float32)
    assert plenty.train.gradient_checkpointing is False and plenty.train.gradient_checkpointing_layers is None
    assert "0 of 4 layers recomputed" in caplog.text
    monkeypatch.setattr(checkpointing, "available_memory_per_rank", lambda device: 2.5 * needed)
    tight = _cfg()
    decide_checkpointing_by_memory(tight, tokens=tokens, dtype=torch.float32)
    assert tight.train.gradient_checkpointing and 0 < tight.train.gradient_checkpointing_layers < 4
    given = _cfg("--gradient_checkpointing", "true", "--gradient_checkpointing_layers", "1")
    decide_checkpointing_by_memory(given, tokens=tokens, dtype=torch.float32)
    assert given.train.gradient_checkpointing and given.train.gradient_checkpointing_layers == 1
    off = _cfg("--gradient_checkpointing", "false", "--gradient_checkpointing_layers", "2")
    decide_checkpointing_by_memory(off, tokens=tokens, dtype=torch.float32)
    assert off.train.gradient_checkpointing is False and off.train.gradient_checkpointing_layers is None
    with pytest.raises(ValueError, match="gradient_checkpointing_layers"):
        _cfg("--gradient_checkpointing_layers", "-1")


def test_partial_checkpointing_recomputes_some_layers_and_keeps_the_gradients():
    model, _ = build_tiny_llama(seed=0)
    model.train()
    input_ids = torch.randint(0, 200, (2, 24))
    grads = []
    for layers in (None, 2, 0):
        run = copy.deepcopy(model)
        if layers is not None:
            run.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            cfg = _cfg("--gradient_checkpointing", "true", "--gradient_checkpointing_layers", str(layers))
            limit_checkpointing(cfg, run)
            flags = [layer.gradient_checkpointing for layer in run.model.layers]
            assert flags == [i < layers for i in range(4)]
        run(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append([p.grad for p in run.parameters()])
    for plain, partial in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(partial, plain)
    assert limit_checkpointed_layers(copy.deepcopy(model), 3) == 4


def test_host_memory_is_shared_by_the_processes_on_the_machine(monkeypatch):
    """deepspeed's launcher exports LOCAL_SIZE (torchrun LOCAL_WORLD_SIZE): each rank counts on its share."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 8 * 2**30})())
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert checkpointing.available_memory_per_rank(torch.device("cpu")) == 2 * 2**30
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert checkpointing.available_memory_per_rank(torch.device("cpu")) == 4 * 2**30
