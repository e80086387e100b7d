"""Write weights that `from_pretrained` (transformers or peft) loads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpalign.models.access import unwrap_model


def save_pretrained_weights(
    model: nn.Module,
    directory: str | Path,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Save `model` as an HF directory, with the tokenizer beside it when given.

    A peft model writes its adapter only (adapter_model.safetensors + adapter_config.json); a
    full model writes config.json + model.safetensors. `state_dict` replaces the module's own
    tensors, e.g. one consolidated on rank 0 from ZeRO-3 shards (call this on that rank only).
    An in-memory model (tiny-random-llama) thereby becomes a directory usable as `--model`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # PeftModel.save_pretrained and PreTrainedModel.save_pretrained share this call: both write
    # safetensors by default, and peft filters a full `state_dict` down to the adapter tensors.
    unwrap_model(model).save_pretrained(directory, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
