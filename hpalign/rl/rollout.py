"""Rollouts: prompts in, sampled responses and the sampler's log-probs out, behind one interface.

`RolloutEngine.generate(prompt_ids, sampling, seeds) -> Rollout` (and `sync_weights()` before it,
after every policy update) is all the rollout loop knows of generation; the backends are HF
`generate` (`HFGenerateRollouts`, here) and the colocated vLLM engine (`vllm_engine.VLLMRollouts`). Sampling is seeded per chunk of prompts from the caller's seeds
(a pure function of the run seed, the step and the prompt's global index), so a resumed run samples
what the uninterrupted one did, and with one prompt per chunk the samples do not depend on how
prompts are spread over ranks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from hpalign.models.access import zero3_partitioned

logger = logging.getLogger("hpalign")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float  # 0: greedy (the log-probs are then of softmax(logits))
    stop_ids: tuple[int, ...] = ()  # empty: never stop early (the swift document's runs)


@dataclass
class Rollout:
    """One response per prompt: its tokens (cut after the first stop token, which is kept), the
    log-prob of each under the sampling distribution (softmax(logits / temperature)), and whether
    it ended with a stop token."""

    response_ids: list[list[int]]
    sampler_logps: list[list[float]]
    stopped: list[bool]


class RolloutEngine(Protocol):
    def sync_weights(self) -> dict[str, float]:
        """Make the sampler draw from the policy's current weights (after every update); its metrics."""

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> Rollout:
        """Sample one response per prompt, seeded from `seeds` (the backend says how)."""


def cut_at_stop(row: list[int], stop_ids: tuple[int, ...]) -> tuple[int, bool]:
    """(length of the response, stop token included; whether a stop token ended it)."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return i + 1, True
    return len(row), False


def never_stop_id(model) -> int:
    """An id past the vocabulary: as generate's end id, no sampled token matches it, so every
    response gets max_new_tokens tokens (None would fall back to the model's own eos)."""
    from hpalign.models import base_causal_lm

    return int(base_causal_lm(model).config.vocab_size)


def left_padded(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, width] of left-padded prompts, as generate expects."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def _zero3_hooks_owner(engine):
    """The object holding a ZeRO-3 engine's parameter hooks (DeepSpeed's parameter offload)."""
    optimizer = getattr(engine, "optimizer", None)
    return getattr(optimizer, "parameter_offload", optimizer)


@contextlib.contextmanager
def gathered_for_generation(engine) -> Iterator[torch.nn.Module]:
    """The engine's module with every ZeRO-3 parameter gathered once for the whole rollout batch
    and DeepSpeed's per-module fetch/release hooks off meanwhile (else each layer of each decoded
    token would gather its weights again: once per token, not once per batch). Without ZeRO-3
    partitions it is the module as it is. Every rank must enter it (the gather is a collective)."""
    module = getattr(engine, "module", engine)
    if not zero3_partitioned(module):
        yield module
        return
    import deepspeed

    owner = _zero3_hooks_owner(engine)
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        for param in module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in owner.forward_hooks + owner.backward_hooks:
            hook.remove()
        owner.forward_hooks, owner.backward_hooks = [], []
        try:
            yield module
        finally:
            coordinator = getattr(owner, "param_coordinator", None)
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # the recorded fetch order no longer holds
            owner._register_deepspeed_module(owner.module)


@contextlib.contextmanager
def plain_generation_config(model) -> Iterator[None]:
    """The model's own generation_config.json set aside while sampling: generate fills every setting
    the call leaves unset from it, and a repetition_penalty, no_repeat_ngram_size, min_new_tokens or
    suppressed token there would sample from another distribution than softmax(logits / T), the
    one PPO's ratio and KL are of."""
    from transformers import GenerationConfig

    from hpalign.models import base_causal_lm

    base = base_causal_lm(model)
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


MERGE_HEADROOM_BYTES = 1 << 30  # free accelerator memory kept beside the merged weight copies


def merge_lora_decision(model: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """(whether to sample with the LoRA deltas merged into copies of the base weights, why).

    Merged, each adapted linear layer is one matmul instead of three (17 % off SmolLM2's sampling
    with LoRA on every linear layer, 2 CPU cores); the copies cost their bytes while sampling. Not
    under ZeRO-3 (the gathered weights are DeepSpeed's buffers), nor on an accelerator without the
    free memory for the copies."""
    from hpalign.models.lora import merged_lora_bytes

    if zero3_partitioned(model):
        return False, "ZeRO-3 partitions the weights"
    needed = merged_lora_bytes(model)
    if needed == 0:
        return False, "no LoRA layer to merge"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if free < needed + MERGE_HEADROOM_BYTES:
            return False, f"{needed / 2**20:.0f} MiB of merged weights do not fit beside {free / 2**20:.0f} MiB free"
    return True, f"{needed / 2**20:.0f} MiB of merged weight copies while sampling"


class HFGenerateRollouts:
    """Rollouts with HF `generate` (KV cache, multinomial sampling, no top-k / top-p), in chunks of
    `batch_size` prompts (--local_rollout_forward_batch_size), parameters gathered once per call,
    LoRA deltas merged into weight copies while sampling where `merge_lora_decision` allows."""

    def __init__(self, engine, *, pad_id: int, batch_size: int) -> None:
        self.engine, self.pad_id, self.batch_size = engine, pad_id, batch_size
        self._merge_reason: str | None = None

    def sync_weights(self) -> dict[str, float]:
        return {}  # generate runs on the policy itself

    def _merged(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        from hpalign.models.lora import lora_merged

        merge, reason = merge_lora_decision(model, next(model.parameters()).device)
        if reason != self._merge_reason:
            logger.info("rollouts: LoRA %s (%s)", "merged" if merge else "not merged", reason)
            self._merge_reason = reason
        return lora_merged(model) if merge else contextlib.nullcontext()

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> Rollout:
        rollout = Rollout([], [], [])
        with gathered_for_generation(self.engine) as model, self._merged(model):
            was_training = model.training
            model.eval()
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk = prompt_ids[start:start + self.batch_size]
                self._sample_chunk(model, chunk, sampling, seeds[start], rollout)
            model.train(was_training)
        return rollout

    @torch.no_grad()
    def _sample_chunk(self, model, chunk: list[list[int]], sampling: SamplingParams, seed: int,
                      rollout: Rollout) -> None:
        device = next(model.parameters()).device
        input_ids, attention_mask = left_padded(chunk, self.pad_id)
        devices = [device] if device.type == "cuda" else []
        drawing = ({"do_sample": True, "temperature": sampling.temperature, "top_k": 0, "top_p": 1.0}
                   if sampling.temperature > 0 else {"do_sample": False})
        with torch.random.fork_rng(devices=devices), plain_generation_config(model):  # run's RNG untouched
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=sampling.max_new_tokens, **drawing, eos_token_id=list(sampling.stop_ids) or [never_stop_id(model)], pad_token_id=self.pad_id,
                use_cache=True, output_scores=True, return_dict_in_generate=True)
        new_BT = out.sequences[:, input_ids.shape[1]:]
        # scores: the processed logits of each step (here logits / temperature), [B, V] per step
        logps_BT = torch.stack([torch.log_softmax(step.float(), -1) for step in out.scores], 1)
        token_logps_BT = logps_BT.gather(2, new_BT[:, :, None]).squeeze(2)
        for row, logps in zip(new_BT.tolist(), token_logps_BT.tolist(), strict=True):
            length, stopped = cut_at_stop(row, sampling.stop_ids)
            rollout.response_ids.append(row[:length])
            rollout.sampler_logps.append(logps[:length])
            rollout.stopped.append(stopped)
