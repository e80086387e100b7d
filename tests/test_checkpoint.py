"""Checkpoints (hpalign/checkpoint.py): the state without frozen parameters and its loading (unit), and on
the real command (slow): a LoRA checkpoint holds the adapter and
the trainable state only (no frozen base weight in any file, a size bound), saving it under ZeRO-3
gathers the trainable parameters alone, and resuming from it reproduces the uninterrupted run, in
one process (ZeRO-0) and on 2 ranks (ZeRO-3). The model is tiny-random-llama with tied embeddings,
saved as a directory, as SmolLM2 is: a tied frozen LM head must not slip into the state either."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpalign import checkpoint
from hpalign.models import apply_lora
from hpalign.tiny_model import build_tiny_llama
from tests.train.conftest import TINY_FLAGS, run_cli, train_records

FLAGS = ["--rlhf_type", "dpo", *TINY_FLAGS, "--learning_rate", "1e-3", "--lora_target_modules", "ALL",
         "--eval_before_train", "false", "--num_eval_generations", "0", "--lora_dropout", "0",
         "--max_steps", "4", "--warmup_ratio", "0.25"]


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tied") / "model"
    model, tokenizer = build_tiny_llama(seed=0, tie_word_embeddings=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _tied_lora_model() -> torch.nn.Module:
    model, _ = build_tiny_llama(seed=0, tie_word_embeddings=True)
    return apply_lora(model, targets=["ALL"], rank=2, alpha=4, dropout=0.0)


def test_state_without_frozen_parameters_drops_tied_aliases_too():
    model = _tied_lora_model()
    assert "base_model.model.lm_head.weight" in model.state_dict()  # the alias named_parameters skips
    with checkpoint._frozen_parameters_left_out(model):
        kept = model.state_dict()
    assert kept and all("lora_" in key for key in kept)
    assert any("lm_head" in key for key in model.state_dict())  # the hook is gone afterwards


def test_loading_a_trainable_only_state_restores_the_adapter_and_refuses_a_mismatch():
    source, target = _tied_lora_model(), _tied_lora_model()
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    with checkpoint._frozen_parameters_left_out(source):
        state = source.state_dict()
    checkpoint._load_trainable_state(src=state, dst=target)
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True))
    missing_adapter = {k: v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_A" not in k}
    with pytest.raises(ValueError, match="missing .*q_proj.lora_A"):
        checkpoint._load_trainable_state(src=missing_adapter, dst=target)
    with pytest.raises(ValueError, match="unexpected"):
        checkpoint._load_trainable_state(src={**state, "stray.weight": torch.zeros(1)}, dst=target)


def test_zero3_lora_save_gathers_the_trainable_parameters_alone(monkeypatch):
    """What a ZeRO-3 LoRA save asks DeepSpeed to gather (one collective, recorded here): the adapter's
    parameters, never a frozen base weight, so no rank ever holds the whole model to save it."""
    import contextlib

    import deepspeed

    model = _tied_lora_model()
    gathered: list[list[torch.nn.Parameter]] = []

    @contextlib.contextmanager
    def recording_gather(params, modifier_rank=None):
        gathered.append(list(params))
        yield

    class Zero3Engine:
        module = model

        def zero_optimization_stage(self):
            return 3

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording_gather)
    state = checkpoint._consolidated_state_dict(Zero3Engine())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(gathered) == 1 and {id(p) for p in gathered[0]} == trainable and trainable
    assert state and all("lora_" in name for name in state)
    assert sum(t.numel() for t in state.values()) < sum(p.numel() for p in model.parameters()) / 10


def _steps(run_dir: Path) -> list[float]:
    """Each step's loss and gradient norm, flat."""
    return [value for r in train_records(run_dir) for value in (r["train/loss"], r["train/grad_norm"])]


def _run_and_resume(tmp_path: Path, flags: list[str], launcher: list[str] | None) -> tuple[list, list]:
    """(steps 3-4 of an uninterrupted 4-step run saved every 2 steps, the same steps resumed from checkpoint-2)."""
    run_cli([*flags, "--run_name", "full", "--save_steps", "2"], launcher=launcher, timeout=600)
    shutil.copytree(tmp_path / "full", tmp_path / "cut", ignore=shutil.ignore_patterns("checkpoint-4"))
    (tmp_path / "cut" / "metrics.jsonl").write_text("")
    run_cli([*flags, "--resume_from_checkpoint", str(tmp_path / "cut" / "checkpoint-2")], launcher=launcher,
            timeout=600)
    return _steps(tmp_path / "full")[4:], _steps(tmp_path / "cut")  # 2 values a step


def _assert_trainable_only(checkpoint: Path, base_dir: Path) -> None:
    """Every tensor in the checkpoint is a LoRA adapter's (or its optimizer state), and the tensor
    files together are far smaller than the frozen base model."""
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter), sorted(adapter)[:5]
    for path in (checkpoint / "deepspeed").rglob("*.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        module = state.get("module") or {}
        assert all("lora_" in key for key in module), (path.name, [k for k in module if "lora_" not in k][:5])
        assert not state.get("frozen_param_fragments"), path.name
    tensor_bytes = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.suffix in (".pt", ".safetensors"))
    adapter_bytes = (checkpoint / "adapter_model.safetensors").stat().st_size
    base_bytes = (base_dir / "model.safetensors").stat().st_size
    # adapter + DeepSpeed's copy of it + fp32 Adam moments (x2) + pickling overhead: under 6 adapters,
    # a fraction of the 11 MB base model (which alone made a LoRA checkpoint 2.5x the base before)
    assert tensor_bytes < 6 * adapter_bytes < base_bytes / 2, (tensor_bytes, adapter_bytes, base_bytes)


@pytest.mark.slow
def test_lora_checkpoint_is_trainable_state_only_and_resumes_exactly(tmp_path, tied_model_dir):
    flags = [*FLAGS, "--model", str(tied_model_dir), "--output_dir", str(tmp_path), "--batch_size", "2"]
    uninterrupted, resumed = _run_and_resume(tmp_path, flags, launcher=None)
    assert len(resumed) == 4 and resumed == pytest.approx(uninterrupted, abs=1e-6, rel=1e-6)
    _assert_trainable_only(tmp_path / "full" / "checkpoint-2", tied_model_dir)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_zero3_lora_checkpoint_is_trainable_state_only_and_resumes_exactly(tmp_path, tied_model_dir):
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    flags = [*FLAGS, "--model", str(tied_model_dir), "--output_dir", str(tmp_path), "--batch_size", "1",
             "--deepspeed", "zero3"]
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", "29781"]
    uninterrupted, resumed = _run_and_resume(tmp_path, flags, launcher=launcher)
    assert len(resumed) == 4 and resumed == pytest.approx(uninterrupted, abs=1e-6, rel=1e-6)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    # each rank's partition of the adapter's fp32 weights and Adam moments
    assert sorted(p.name for p in (checkpoint / "deepspeed" / "state").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    _assert_trainable_only(checkpoint, tied_model_dir)


@pytest.mark.slow
def test_full_fine_tune_checkpoint_keeps_every_weight_and_resumes_exactly(tmp_path, tied_model_dir):
    flags = [*FLAGS, "--model", str(tied_model_dir), "--output_dir", str(tmp_path), "--batch_size", "2",
             "--sft_type", "full"]
    uninterrupted, resumed = _run_and_resume(tmp_path, flags, launcher=None)
    assert len(resumed) == 4 and resumed == pytest.approx(uninterrupted, abs=1e-6, rel=1e-6)
    weights = load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")
    assert set(weights) == set(load_file(tied_model_dir / "model.safetensors"))
