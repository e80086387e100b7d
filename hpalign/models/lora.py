"""LoRA targets and injection, and the adapter-off reference that LoRA makes free."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from hpalign.models.access import base_causal_lm, is_peft_model, unwrap_model

if TYPE_CHECKING:
    from peft import PeftModel

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")


def _linear_types() -> tuple[type[nn.Module], ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2 style "linear" layers

    return (nn.Linear, Conv1D)


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers, LM head (output embeddings) excluded, in order."""
    base = base_causal_lm(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    names = [
        name.rsplit(".", 1)[-1]
        for name, module in base.named_modules()
        if isinstance(module, _linear_types()) and module is not head and name
    ]
    return list(dict.fromkeys(names))


def lora_target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Expand `--lora_target_modules` into module names for peft.

    `ALL`: every linear leaf name but the LM head; `DEFAULT`: q_proj, k_proj, v_proj (Llama-like
    attention); anything else: a module name (leaf or dotted suffix) that must exist in the model
    as a linear or embedding layer. Entries may be mixed, e.g. ["DEFAULT", "o_proj"].
    """
    if is_peft_model(model):
        raise ValueError("LoRA is already applied to this model: pass the plain HF model.")
    if not targets:
        raise ValueError("--lora_target_modules is empty: use ALL, DEFAULT or module names such as q_proj.")
    linear = linear_module_names(model)
    names: list[str] = []
    for target in targets:
        key = target.strip()
        if key.upper() == "ALL":
            names += linear
        elif key.upper() == "DEFAULT":
            names += _default_targets(linear)
        else:
            names.append(_checked_target(model, key, linear))
    return list(dict.fromkeys(names))


def _default_targets(linear: list[str]) -> list[str]:
    present = [name for name in DEFAULT_TARGETS if name in linear]
    if not present:
        raise ValueError(
            f"--lora_target_modules DEFAULT means {', '.join(DEFAULT_TARGETS)} (Llama-like attention), "
            f"and this model has none of them: pass ALL or names from {linear}."
        )
    return present


def _checked_target(model: nn.Module, key: str, linear: list[str]) -> str:
    lora_types = (*_linear_types(), nn.Embedding)
    for name, module in base_causal_lm(model).named_modules():
        if (name == key or name.endswith("." + key)) and isinstance(module, lora_types):
            return key
    raise ValueError(
        f"--lora_target_modules {key!r} names no linear or embedding layer of this model. "
        f"Linear layers: {linear} (or use ALL / DEFAULT)."
    )


def apply_lora(model: nn.Module, *, targets: list[str], rank: int, alpha: float, dropout: float) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters (B = 0, so the output is unchanged at first).

    If gradient checkpointing is on, the embedding output is made to require grad: with frozen
    embeddings nothing entering the first checkpointed block would otherwise need a gradient.
    """
    if rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"LoRA needs --lora_rank >= 1, --lora_alpha > 0 and 0 <= --lora_dropout < 1; got "
            f"rank={rank}, alpha={alpha}, dropout={dropout}."
        )
    from peft import LoraConfig, get_peft_model

    # A sequence-classification model (an HF reward model PPO trains as its value model) has no
    # generation methods for peft's causal-LM wrapper: its own task type wraps it.
    from hpalign.models.reward_model import SEQ_CLS_SUFFIX

    task_type = "SEQ_CLS" if type(model).__name__.endswith(SEQ_CLS_SUFFIX) else "CAUSAL_LM"
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, task_type=task_type,
        target_modules=lora_target_names(model, targets),
    )
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def uses_adapter_reference(model: nn.Module) -> bool:
    """True when the reference is the policy itself with its adapter off (a LoRA policy)."""
    return is_peft_model(model)


def reference_forward_context(policy: nn.Module) -> contextlib.AbstractContextManager[None]:
    """A context in which calling the LoRA policy computes the reference: adapter off, no grad.

    The reference is the same base weights, so no second copy is held. A full fine-tune has no
    adapter to switch off: it needs a separate frozen model (`frozen_copy` / `load_reference`).
    """
    inner = unwrap_model(policy)
    if not is_peft_model(inner):
        raise ValueError(
            "The policy has no LoRA adapter, so its reference cannot be the adapter-off policy: "
            "keep a frozen copy (frozen_copy(policy) before training, or load_reference(--model))."
        )
    return _adapter_off(inner)


@contextlib.contextmanager
def _adapter_off(peft_model: PeftModel) -> Iterator[None]:
    with torch.no_grad(), peft_model.disable_adapter():
        yield


def mergeable_lora_layer(module: nn.Module) -> bool:
    """True for a plain LoRA linear layer with active adapters (no DoRA-like variant, no LoRA
    bias): one whose adapter is exactly `W + delta` on the base weight."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or module.disable_adapters or module.merged:
        return False
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    return bool(adapters) and not any(a in module.lora_variant or module.lora_B[a].bias is not None
                                      for a in adapters)


def _mergeable_lora_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if mergeable_lora_layer(module)]


def merged_lora_bytes(model: nn.Module) -> int:
    """Bytes of the merged base-weight copies `lora_merged` would hold."""
    return sum(layer.get_base_layer().weight.nbytes for layer in _mergeable_lora_layers(model))


@contextlib.contextmanager
def lora_merged(model: nn.Module) -> Iterator[int]:
    """Inside: each plain LoRA linear layer computes with `W + scaling * B A` in ONE matmul, its
    adapter branch off; on exit the original weight tensors are back, bit for bit (no in-place
    merge/unmerge, whose rounding would drift the base weights a little every step). Costs a copy
    of the merged weights while inside; yields how many layers it merged. For inference only
    (sampling): gradients never reach the adapter here."""
    layers = _mergeable_lora_layers(model)
    restored: list[tuple[nn.Module, torch.Tensor, list[tuple[torch.Tensor, bool]]]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                # enable_adapters(False) also clears requires_grad of the adapter: remember it
                flags = [(p, p.requires_grad) for name, p in layer.named_parameters() if "lora_" in name]
                restored.append((layer, weight.data, flags))
                weight.data = weight.data + delta.to(weight.dtype)
                layer.enable_adapters(False)
        yield len(layers)
    finally:
        for layer, original, flags in restored:
            layer.get_base_layer().weight.data = original
            layer.enable_adapters(True)
            for param, requires_grad in flags:
                param.requires_grad_(requires_grad)
