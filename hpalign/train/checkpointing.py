"""Gradient checkpointing decided by memory: recompute only as many decoder layers as a micro-batch's
activations need to fit the memory at hand.

Recomputing a layer costs its forward again in the backward (measured on SmolLM2 LoRA DPO, 2 CPU
cores: +33 % step time with every layer recomputed), and saves that layer's activations, about
`10 H + 4 I` values per token (norm inputs, q/k/v/o and attention outputs, the MLP's gate, up and
SiLU products, the down projection's input; SmolLM2: 1.4 MB per token over its 30 layers in fp32,
measured 1.4-2.0 MB with the allocator's slack). So `--gradient_checkpointing` left unset on a CPU
recomputes nothing while the estimate fits ACTIVATION_SHARE of the memory available to the rank,
and otherwise the fewest layers that make it fit (`plan_checkpointing`); every layer when even that
cannot. Speed is what such a run is short of while memory is plentiful (a laptop with little free
memory gets checkpointing; a 24 GB machine training SmolLM2 on 512-token pairs does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Activations may take this share of the memory available to a rank (the rest: weights, optimizer
# state, the allocator's slack, the reference forward's temporaries, other processes).
ACTIVATION_SHARE = 0.25
# Per token per layer: this many hidden-size and intermediate-size values are kept for the backward.
HIDDEN_VALUES, INTERMEDIATE_VALUES = 10, 4


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int

    @classmethod
    def of(cls, config) -> ModelShape:
        """From an HF config (a text config inside a multimodal one is read)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = config.hidden_size
        return cls(config.num_hidden_layers, hidden, getattr(config, "intermediate_size", None) or 4 * hidden)

    def activation_bytes_per_token_layer(self, dtype_bytes: int) -> int:
        return dtype_bytes * (HIDDEN_VALUES * self.hidden_size + INTERMEDIATE_VALUES * self.intermediate_size)


@dataclass(frozen=True)
class CheckpointPlan:
    """How many of `num_layers` decoder layers recompute their forward in the backward, and why."""

    layers: int
    num_layers: int
    activation_bytes: float  # the micro-batch's activations without any recompute (estimate)
    budget_bytes: float

    @property
    def enabled(self) -> bool:
        return self.layers > 0

    def describe(self) -> str:
        gib = 2**30
        return (f"{self.layers} of {self.num_layers} layers recomputed (auto: a micro-batch keeps about "
                f"{self.activation_bytes / gib:.2f} GiB of activations without it; budget {self.budget_bytes / gib:.2f} "
                f"GiB, {ACTIVATION_SHARE:.0%} of the memory available to this rank)")


def plan_checkpointing(*, tokens: float, shape: ModelShape, dtype_bytes: int, available_bytes: float) -> CheckpointPlan:
    """The fewest recomputed layers that bring the micro-batch's activations within ACTIVATION_SHARE
    of `available_bytes`: a recomputed layer keeps only its input (H values per token) of its
    activations."""
    per_layer = tokens * shape.activation_bytes_per_token_layer(dtype_bytes)
    full = per_layer * shape.num_layers
    budget = ACTIVATION_SHARE * available_bytes
    saved_per_layer = per_layer - tokens * shape.hidden_size * dtype_bytes
    if full <= budget:
        layers = 0
    elif saved_per_layer <= 0:
        layers = shape.num_layers
    else:
        layers = min(shape.num_layers, math.ceil((full - budget) / saved_per_layer))
    return CheckpointPlan(layers=layers, num_layers=shape.num_layers, activation_bytes=full, budget_bytes=budget)


def available_memory_per_rank(device: torch.device) -> float:
    """Bytes this rank may count on: the host's available memory shared by the node's ranks (CPU),
    or the device's free memory (CUDA)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    import psutil

    from hpalign.distributed import processes_on_this_machine

    return psutil.virtual_memory().available / processes_on_this_machine()


def limit_checkpointed_layers(model: torch.nn.Module, layers: int) -> int:
    """With HF gradient checkpointing on, keep it on the first `layers` decoder layers only (the
    others keep their activations); returns how many layers the model has."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(decoder_layers):
        layer.gradient_checkpointing = index < layers
    return len(decoder_layers)
