"""Load tokenizers, policies and frozen reference models from a resolved `--model` (partitioned under ZeRO-3)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hpalign.models.source import ModelSource, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ATTN_IMPLS = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` (bf16 on a CUDA device that supports it, else fp32), `bfloat16`, `float16`, `float32`."""
    key = name.strip().lower()
    if key == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    if key not in _DTYPES:
        raise ValueError(f"--torch_dtype {name!r} is not supported: use auto, {', '.join(_DTYPES)}.")
    return _DTYPES[key]


def resolve_attn_impl(name: str, *, dtype: torch.dtype) -> str:
    """`auto` -> flash_attention_2 when CUDA, the flash-attn package and a 16-bit dtype are all
    there, else sdpa; an explicit choice is checked and kept."""
    key = name.strip().lower()
    if key not in _ATTN_IMPLS:
        raise ValueError(f"--attn_impl {name!r} is not supported: use one of {', '.join(_ATTN_IMPLS)}.")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if key == "auto":
        use_flash = has_flash and torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16)
        key = "flash_attention_2" if use_flash else "sdpa"
        logger.info("attention implementation: %s", key)
    elif key == "flash_attention_2" and not has_flash:
        raise ValueError("--attn_impl flash_attention_2 needs `pip install flash-attn`; or use sdpa.")
    return key


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token by reusing eos (else unk); never adds a token to the vocab."""
    if tokenizer.pad_token is not None:
        return tokenizer
    for fallback in ("eos_token", "unk_token"):
        token = getattr(tokenizer, fallback)
        if token is not None:
            tokenizer.pad_token = token
            logger.info("tokenizer has no pad token; padding with its %s %r", fallback, token)
            return tokenizer
    raise ValueError(
        "The tokenizer has no pad, eos or unk token, and hpalign does not grow the vocabulary "
        "silently: set `pad_token` in the model directory's tokenizer_config.json."
    )


def load_tokenizer(spec: str | ModelSource | None) -> PreTrainedTokenizerBase:
    """The tokenizer of `--model`, with a pad token set (see `ensure_pad_token`)."""
    source = resolve_model(spec)
    if source.kind == "tiny":
        from hpalign.tiny_model import build_byte_tokenizer

        return ensure_pad_token(build_byte_tokenizer())
    from transformers import AutoTokenizer

    return ensure_pad_token(AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.trust_remote_code))


def load_policy(
    spec: str | ModelSource | None,
    *,
    dtype: torch.dtype | str,
    attn_impl: str = "sdpa",
    gradient_checkpointing: bool = False,
    zero3_config: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """The causal LM of `--model` in `dtype`, on CPU, in eval mode (the trainer calls `.train()`).

    `gradient_checkpointing` turns on non-reentrant HF checkpointing (which works with frozen
    inputs, LoRA and ZeRO-3) and switches the KV cache off, which checkpointing cannot use.
    `zero3_config` (a ZeRO-3 DeepSpeed config; a collective then: every rank calls it): the model
    is loaded partitioned, see `partitioned_loading`.
    """
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    source = resolve_model(spec)  # outside the partitioned context: a GGUF conversion is never partitioned
    model = _load_causal_lm(source, dtype=dtype, attn_impl=resolve_attn_impl(attn_impl, dtype=dtype),
                            zero3_config=zero3_config)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_reference(
    spec: str | ModelSource | None, *, dtype: torch.dtype | str, attn_impl: str = "sdpa",
    zero3_config: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A separately loaded frozen model (eval, no grads): `--ref_model`, or the reference of a
    full fine-tune under ZeRO-3, loaded partitioned (`zero3_config`) where a `frozen_copy` of the
    policy would hold a whole second model on every rank."""
    model = load_policy(spec, dtype=dtype, attn_impl=attn_impl, zero3_config=zero3_config)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_causal_lm(source: ModelSource, *, dtype: torch.dtype, attn_impl: str,
                    zero3_config: dict[str, Any] | None) -> nn.Module:
    if source.kind == "tiny":
        from hpalign.tiny_model import build_tiny_llama

        model, _ = build_tiny_llama(seed=0, attn_implementation=attn_impl)
        model = model.to(dtype).eval()
        # Built in memory, so there is nothing to read partitioned; a few MB. Partitioned now, as
        # deepspeed.initialize would later, so every ZeRO-3 model leaves here in one state.
        return _partition_built_model(model, zero3_config) if zero3_config else model
    from transformers import AutoModelForCausalLM

    with partitioned_loading(zero3_config):
        return AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, attn_implementation=attn_impl,
                                                    trust_remote_code=source.trust_remote_code)


@contextlib.contextmanager
def partitioned_loading(zero3_config: dict[str, Any] | None) -> Iterator[None]:
    """Inside, transformers builds models in `deepspeed.zero.Init` (None: an ordinary load).

    While an `HfDeepSpeedConfig` is alive, `from_pretrained` creates every parameter already
    partitioned over the ranks (`ds_numel` elements, `numel() == 0` locally) and copies the
    checkpoint in one module at a time: every rank memory-maps the safetensors file, rank 0 alone
    copies from it into the module's gathered parameters, which are then re-partitioned. No rank
    holds the whole model, as in TRL and OpenRLHF. The config lives only for the load (transformers
    reads it through a weak reference): generation and embedding resizing behave as before later.
    """
    if zero3_config is None:
        yield
        return
    if int(zero3_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        raise ValueError("partitioned loading needs a ZeRO stage-3 DeepSpeed config")
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(zero3_config)  # noqa: F841 - alive while transformers reads it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        _return_freed_heap()


def _return_freed_heap() -> None:
    """Give the heap pages the load freed back to the OS (glibc's `malloc_trim`; elsewhere nothing).

    Each module's weights are gathered whole, filled and broadcast while loading; glibc keeps those
    freed buffers in its arenas (measured with SmolLM2 on 2 CPU ranks: up to 0.9 GB on rank 0), so
    they would stay in the rank's RSS through the engine build (its peak: 2.3 -> 2.0 GB per rank)."""
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _partition_built_model(model: nn.Module, zero3_config: dict[str, Any]) -> nn.Module:
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=zero3_config)
    return model
