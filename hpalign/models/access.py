"""Reach inside wrapped models: DeepSpeed engine / DDP (`.module`) -> peft -> the HF causal LM."""

from __future__ import annotations

import copy

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DeepSpeed-engine and DDP wrappers (both keep the real model in `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft-wrapped model (after unwrapping DeepSpeed / DDP)."""
    from peft import PeftModel

    return isinstance(unwrap_model(model), PeftModel)


def zero3_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the module's parameters (each carries a ds_id)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM under any wrappers. For a peft model its LoRA layers stay injected in it."""
    inner = unwrap_model(model)
    if is_peft_model(inner):
        inner = inner.get_base_model()
    return inner


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(transformer backbone, LM head): e.g. (LlamaModel, lm_head Linear).

    Works for a plain HF causal LM, a peft-wrapped one and either inside a DeepSpeed engine.
    peft replaces target layers in place, so calling the backbone of a peft model runs LoRA.
    """
    base = base_causal_lm(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is base:
        raise ValueError(
            f"{type(base).__name__} does not expose a decoder backbone and an LM head "
            "(get_decoder / get_output_embeddings): pass a causal LM (AutoModelForCausalLM)."
        )
    return decoder, head


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer backbone alone, for models that need no LM head (reward and value models):
    a causal LM's decoder, or the backbone of an HF sequence-classification model."""
    base = base_causal_lm(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is base:
        raise ValueError(f"{type(base).__name__} does not expose a decoder backbone (get_decoder): pass a "
                         "causal LM (AutoModelForCausalLM) or a sequence-classification model")
    return decoder


def hidden_size(model: nn.Module) -> int:
    """The width of the backbone's hidden states (what a value head reads)."""
    config = base_causal_lm(model).config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.hidden_size)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no parameter requiring grad: the reference for full tuning.

    Not for ZeRO-3 partitioned models (a copy of a shard is not the model): there, load the
    reference from its directory with `load_reference` and let DeepSpeed shard it.
    """
    frozen = copy.deepcopy(unwrap_model(model))
    frozen.eval()
    frozen.requires_grad_(False)
    return frozen
