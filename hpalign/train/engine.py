"""DeepSpeed engine construction: ZeRO presets, AdamW, warm-up + cosine schedule.

The optimizer is torch's AdamW handed to DeepSpeed as a client optimizer, so no CUDA/C++ op has to be
compiled on a CPU box; with CPU offload DeepSpeed would insist on its own CPUAdam, which
`zero_force_ds_cpu_optimizer: false` turns off.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpalign import distributed
from hpalign.train.nonfinite import NonFiniteGuard

ZERO_PRESETS: dict[str, dict[str, Any]] = {
    "zero0": {"stage": 0},
    "zero2": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "zero3": {"stage": 3, "overlap_comm": False, "stage3_gather_16bit_weights_on_model_save": True},
    "zero3_offload": {
        "stage": 3,
        "overlap_comm": False,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "offload_param": {"device": "cpu", "pin_memory": False},
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def deepspeed_config(
    preset_or_file: str, *, micro_batch_size: int, gradient_accumulation_steps: int,
    max_grad_norm: float, dtype: torch.dtype,
) -> dict[str, Any]:
    """The DeepSpeed config dict for a preset name or a user JSON file (whose batch and clipping
    keys are overwritten by hpalign's flags, so there is one source of truth)."""
    if preset_or_file in ZERO_PRESETS:
        config: dict[str, Any] = {"zero_optimization": dict(ZERO_PRESETS[preset_or_file])}
    else:
        path = Path(preset_or_file)
        if not path.is_file():
            raise ValueError(f"--deepspeed {preset_or_file!r}: not a preset ({', '.join(ZERO_PRESETS)}) "
                             "and not an existing JSON file")
        config = json.loads(path.read_text())
    config.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_clipping=max_grad_norm,
        zero_force_ds_cpu_optimizer=False,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    config.pop("train_batch_size", None)
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config["fp16"] = {"enabled": dtype == torch.float16}
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def warmup_cosine(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    """LR multiplier: linear warm-up from 0, then cosine decay to 0 at the last step."""
    if step < num_warmup_steps:
        return (step + 1) / (num_warmup_steps + 1)
    progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_engine(model: torch.nn.Module, *, ds_config: dict[str, Any], learning_rate: float,
                 weight_decay: float, betas: tuple[float, float], num_training_steps: int,
                 warmup_ratio: float) -> tuple[Any, NonFiniteGuard]:
    """Wrap the trainable model in a DeepSpeed engine with AdamW and the warm-up/cosine schedule;
    its optimizer skips updates whose loss or gradient is not finite (the returned guard counts them)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters (CPU and CUDA) instead of a Python loop of small ops
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=betas,
                                  fused=_fused_adamw_supported(params))
    num_warmup = math.ceil(warmup_ratio * num_training_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, num_warmup_steps=num_warmup,
                                              num_training_steps=num_training_steps))
    # DeepSpeed wraps the optimizer (ZeRO, bf16) and calls its `step` with the fp32 gradients: the guard sits there.
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if zero_stage(ds_config) == 0 and distributed.world_size() == 1:
        # Nothing to all-reduce, but DeepSpeed's fallback would still flatten every gradient into a
        # bucket: a second copy of all gradients at the peak (540 MB for full SmolLM2-135M).
        engine.enable_backward_allreduce = False
    # fp16's dynamic loss scale skips overflowing steps by design: those are not counted as failures.
    guard = NonFiniteGuard(engine, optimizer, count_deepspeed_skips=not ds_config["fp16"]["enabled"])
    return engine, guard


def _fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and
                                p.device.type in ("cpu", "cuda") for p in params)


def build_frozen_engine(model: torch.nn.Module, *, ds_config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """A frozen model (a full fine-tune's reference; soon PPO's reward model): partitioned by
    DeepSpeed under ZeRO-3 (so it costs 1/N memory per rank, as TRL and OpenRLHF do; DeepSpeed
    places it), else a plain module moved to the rank's `device`, where the batches go."""
    model.eval().requires_grad_(False)
    if zero_stage(ds_config) != 3:
        return model.to(device)
    import deepspeed

    frozen_config = {k: v for k, v in ds_config.items() if k not in ("gradient_clipping",)}
    frozen_config["zero_optimization"] = {
        k: v for k, v in ds_config["zero_optimization"].items() if k != "offload_optimizer"}
    engine, *_ = deepspeed.initialize(model=model, config=frozen_config)
    engine.eval()
    return engine.module


# --- the global gradient norm before clipping ---------------------------------------------------------

@dataclass(frozen=True)
class GradNormReading:
    """What must be read at the accumulation boundary before `engine.step()`: our own norm where
    DeepSpeed keeps none, and the loss scale its fp16 optimizer had when the gradients were made."""

    own_norm: torch.Tensor | None
    loss_scale: float


def deepspeed_keeps_grad_norm(optimizer) -> bool:
    """DeepSpeed's ZeRO, bf16 and fp16 optimizer wrappers compute the global norm (of the
    accumulated, all-reduced gradient) while clipping; a plain fp32 ZeRO-0 run hands our torch
    optimizer over unwrapped and clips without keeping the norm."""
    return hasattr(optimizer, "_global_grad_norm")


def _unscaled_by_deepspeed(optimizer) -> bool:
    # FP16_UnfusedOptimizer (DeepSpeed's ZeRO-0 fp16/bf16 wrapper around a torch optimizer) keeps
    # the norm of the loss-scaled gradient; every other wrapper divides by the scale itself.
    return type(optimizer).__name__ != "FP16_UnfusedOptimizer"


def read_grad_norm_before_step(engine) -> GradNormReading:
    optimizer = engine.optimizer
    scale_config = getattr(optimizer, "loss_scale_config", None)
    loss_scale = 1.0 if _unscaled_by_deepspeed(optimizer) else float(getattr(scale_config, "cur_scale", 1.0))
    own = None if deepspeed_keeps_grad_norm(optimizer) else fp32_grad_norm(engine.module)
    return GradNormReading(own_norm=own, loss_scale=loss_scale)


def fp32_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of every gradient of `module` (at the boundary DeepSpeed has all-reduced them), on
    the gradients' device: no host sync."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def grad_norm_after_step(engine, reading: GradNormReading) -> torch.Tensor | None:
    """The global gradient norm before clipping of the step just taken (None: DeepSpeed was
    configured not to compute it)."""
    if reading.own_norm is not None:
        return reading.own_norm
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return torch.as_tensor(norm).detach().double() / reading.loss_scale
