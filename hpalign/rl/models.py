"""PPO's four models (arXiv 2203.02155), with no more copies of base weights than the method needs.

- policy: `--model`, LoRA or full, trained;
- reference: the policy's starting weights. With LoRA the policy with its adapter off (no copy);
  with full fine-tuning a frozen copy; `--ref_model` loads another model;
- reward model (`--reward_model_id_or_path`): an hpalign RM checkpoint (base or adapter +
  `value_head.safetensors`; a run directory means its latest checkpoint) or an HF
  `AutoModelForSequenceClassification` checkpoint with one label; frozen;
- value model: starts as the reward model (backbone and head) and is trained. With LoRA it is the
  reward model's backbone (an RM adapter merged in) with a new adapter, and the reward model is that
  same backbone with the adapter off plus the frozen reward head: one copy serves both. With full
  fine-tuning it is a second, trainable copy. With rule rewards only, it starts from the policy's
  weights with a fresh head.

Base-weight copies held: LoRA 2 (policy = reference, reward = value), or 1 with rule rewards only
plus the value model's own copy (2); full fine-tuning 4 (3 with rule rewards only).

The GRPO family has no value model: LoRA 1 copy (2 with a reward model), full fine-tuning 2 (the
reference; 1 with --beta 0, which needs none; one more with a reward model).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hpalign.models import (
    ModelSource,
    RewardModel,
    apply_lora,
    disable_dropout,
    frozen_copy,
    is_peft_model,
    load_policy,
    load_reference,
    resolve_model,
)
from hpalign.models.reward_model import is_seq_cls_checkpoint
from hpalign.models.value_head import VALUE_HEAD_BIN, VALUE_HEAD_SAFETENSORS

logger = logging.getLogger("hpalign")


@dataclass
class PPOModelSet:
    """The models before DeepSpeed wraps the trainable ones."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None: the adapter-off policy
    value: RewardModel | None  # PPO's critic; None for the GRPO family
    reward: RewardModel | None  # frozen; None: no reward model, or it is the adapter-off value model
    reward_head: torch.nn.Module | None  # the frozen head of a reward model shared with the value model
    reward_tokenizer_dir: Path | None  # where the reward model's tokenizer lives


@dataclass(frozen=True)
class LoraSettings:
    targets: list[str]
    rank: int
    alpha: float
    dropout: float


def resolve_reward_checkpoint(spec: str) -> Path:
    """The checkpoint directory of --reward_model_id_or_path: the directory itself, or the latest
    checkpoint-<step> of an RM run directory."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(f"--reward_model_id_or_path {spec!r}: no such directory (pass an RM run's checkpoint, "
                         "or an HF sequence-classification model directory)")
    if is_seq_cls_checkpoint(path) or any((path / name).is_file() for name in (VALUE_HEAD_SAFETENSORS, VALUE_HEAD_BIN)):
        return path
    checkpoints = sorted(path.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1])
                         if p.name.rsplit("-", 1)[-1].isdigit() else -1)
    if checkpoints:
        logger.info("reward model: %s is a run directory; using its latest checkpoint %s", path, checkpoints[-1].name)
        return checkpoints[-1]
    raise ValueError(f"--reward_model_id_or_path {spec!r} holds neither value_head.safetensors (an hpalign RM "
                     "checkpoint), checkpoint-* folders (an RM run), nor a sequence-classification config.json")


def load_frozen_reward_model(spec: str, *, dtype: torch.dtype,
                              trust_remote_code: bool = False) -> tuple[RewardModel, Path]:
    """(frozen reward model, its directory) from an hpalign RM checkpoint or an HF seq-cls model."""
    path = resolve_reward_checkpoint(spec)
    if is_seq_cls_checkpoint(path):
        from hpalign.models.reward_model import load_seq_cls_reward_model

        return load_seq_cls_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code), path
    from hpalign.score import load_reward_model

    reward, _, _ = load_reward_model(path, dtype=str(dtype).removeprefix("torch."),
                                     trust_remote_code=trust_remote_code)
    return reward, path


def _merged(lm: torch.nn.Module) -> torch.nn.Module:
    """A plain model with a LoRA adapter's weights merged in (a copy's worth of memory, no more)."""
    return lm.merge_and_unload() if is_peft_model(lm) else lm


def _trainable(module: torch.nn.Module) -> torch.nn.Module:
    return module.train().requires_grad_(True)


def freeze_unused_lm_head(value: RewardModel) -> None:
    """A value model reads hidden states, never logits: an untied LM head gets no gradient, so it is
    frozen (an optimizer must not hold state for it; ZeRO would wait for its gradient)."""
    from hpalign.models import base_causal_lm

    base = base_causal_lm(value.lm)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    inputs = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if head is not None and (inputs is None or head.weight is not inputs.weight):
        head.requires_grad_(False)


def value_from_reward(reward: RewardModel, lora: LoraSettings | None) -> tuple[RewardModel, RewardModel | None,
                                                                               torch.nn.Module | None]:
    """(value model, separate frozen reward model or None, frozen reward head when shared)."""
    if lora is None:
        value = copy.deepcopy(reward)
        _trainable(value)
        return value, reward, None
    backbone = _merged(reward.lm)
    reward_head = reward.value_head
    value_lm = apply_lora(_trainable(backbone), targets=lora.targets, rank=lora.rank, alpha=lora.alpha,
                          dropout=lora.dropout)
    value_head = _trainable(copy.deepcopy(reward_head))
    return RewardModel(value_lm, value_head), None, reward_head.eval().requires_grad_(False)


def build_ppo_models(*, model: str | ModelSource | None, ref_model: str | ModelSource | None, reward_model: str | None, dtype: torch.dtype,
                     attn_impl: str, gradient_checkpointing: bool, lora: LoraSettings | None, seed: int,
                     no_dropout: bool, with_value: bool = True, with_reference: bool = True,
                     zero3_config: dict | None = None, trust_remote_code: bool = False) -> PPOModelSet:
    """The models of a rollout run (module docstring), every one on the CPU, frozen ones in eval mode.
    `with_value` False (the GRPO family): no value model, the reward model on its own;
    `with_reference` False (no KL to the reference): no reference copy is made or loaded.
    Under ZeRO-3 (`zero3_config`) the policy, the reference (a second load, not a copy) and a fresh
    value model are loaded partitioned; a reward model is loaded whole and partitioned by DeepSpeed
    afterwards (its adapter is merged and the value model copied from it, which needs whole weights).
    `trust_remote_code` (`--trust_remote_code`) applies to every model loaded here."""
    model = resolve_model(model, trust_remote_code=trust_remote_code)
    ref_model = ref_model and resolve_model(ref_model, trust_remote_code=trust_remote_code)
    policy = load_policy(model, dtype=dtype, attn_impl=attn_impl, gradient_checkpointing=gradient_checkpointing,
                         zero3_config=zero3_config)
    reference = None
    if with_reference and (ref_model or (lora is None and zero3_config is not None)):
        reference = load_reference(ref_model or model, dtype=dtype, attn_impl=attn_impl, zero3_config=zero3_config)
    elif with_reference and lora is None:
        reference = frozen_copy(policy)
    if lora is not None:
        policy = apply_lora(policy, targets=lora.targets, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout)
    reward = reward_head = reward_dir = value = None
    if reward_model:
        loaded, reward_dir = load_frozen_reward_model(reward_model, dtype=dtype, trust_remote_code=trust_remote_code)
        if with_value:
            value, reward, reward_head = value_from_reward(loaded, lora)
        else:
            reward = loaded.eval().requires_grad_(False)
    elif with_value:
        value = fresh_value_model(model, dtype=dtype, attn_impl=attn_impl,
                                  gradient_checkpointing=gradient_checkpointing, lora=lora, seed=seed,
                                  zero3_config=zero3_config)
    if value is not None:
        freeze_unused_lm_head(value)
        if gradient_checkpointing and not getattr(value.lm, "is_gradient_checkpointing", True):
            value.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if no_dropout:
        changed = sum(disable_dropout(m) for m in (policy, reference, value, reward) if m is not None)
        logger.info("dropout off in %d places of the models (--disable_dropout true)", changed)
    return PPOModelSet(policy=policy, reference=reference, value=value, reward=reward, reward_head=reward_head,
                       reward_tokenizer_dir=reward_dir)


def fresh_value_model(model: str | ModelSource | None, *, dtype: torch.dtype, attn_impl: str, gradient_checkpointing: bool,
                      lora: LoraSettings | None, seed: int, zero3_config: dict | None = None) -> RewardModel:
    """With rule rewards only: the value model starts from the policy's weights with a ZERO head, so
    V = 0 until the value loss has taught it something and the first advantages are the (whitened)
    discounted rewards themselves, not noise of a random projection of the hidden states (measured
    on SmolLM2: a random head's values pushed the policy's KL to 2.6 in 7 steps with no gain in reward)."""
    value_lm = load_policy(model, dtype=dtype, attn_impl=attn_impl, gradient_checkpointing=gradient_checkpointing,
                           zero3_config=zero3_config)
    if lora is not None:
        value_lm = apply_lora(value_lm, targets=lora.targets, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout)
    value = RewardModel.with_new_head(value_lm, seed=seed)
    torch.nn.init.zeros_(value.value_head.summary.weight)
    return value
