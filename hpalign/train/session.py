"""Everything a run is built from, once: run directory and logging, data, models, the DeepSpeed engine,
and the per-sequence statistics functions of the policy and the reference."""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from hpalign import checkpoint, distributed
from hpalign.algorithms import Algorithm, get_algorithm
from hpalign.config import Config, save_config, unused_flag_warnings
from hpalign.data import collate, templates
from hpalign.hyperparams import make_params
from hpalign.models import (
    RewardModel,
    apply_lora,
    disable_dropout,
    frozen_copy,
    load_policy,
    load_reference,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
    uses_adapter_reference,
)
from hpalign.ops.attention import enable_varlen_attention, varlen_backend
from hpalign.stats import SequenceStats
from hpalign.train import checkpointing
from hpalign.train import engine as engine_lib
from hpalign.train.datasets import PreparedData, prepare_data
from hpalign.train.forward import response_token_counts, reward_stats, sequence_stats
from hpalign.train.loop import with_example_ids
from hpalign.train.nonfinite import NonFiniteGuard
from hpalign.train.schedule import BatchPlan, total_steps

logger = logging.getLogger("hpalign")


@dataclass
class Session:
    """What the loop needs, built once."""

    cfg: Config
    algorithm: Algorithm
    params: object  # the algorithm's hyper-parameters (its dataclass in hpalign.hyperparams)
    run_dir: Path
    tokenizer: object
    template: templates.ChatTemplate
    data: PreparedData
    engine: object
    guard: NonFiniteGuard  # skips and counts the policy's non-finite updates
    reference: torch.nn.Module | None  # None: adapter-disabled policy, or no reference needed
    packed: bool
    plan: BatchPlan
    num_steps: int
    # The reference never changes: its held-out stats are computed at the first evaluation only.
    val_reference_cache: dict = field(default_factory=dict)
    # --precompute_ref_log_probs: the reference's [E, R] log-probs of every training example
    reference_table: torch.Tensor | None = None


def setup_logging(run_dir: Path | None) -> None:
    level = logging.INFO if distributed.is_main() else logging.WARNING
    logger.setLevel(level)
    logger.propagate = False
    if not logger.handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[hpalign %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(console)
    if run_dir is not None and distributed.is_main():
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)


def make_run_dir(cfg: Config) -> Path:
    if cfg.train.resume_from_checkpoint and cfg.train.resume_from_checkpoint != "latest":
        return Path(cfg.train.resume_from_checkpoint).resolve().parent
    name = cfg.train.run_name or f"{cfg.algorithm.rlhf_type}-{datetime.now():%Y%m%d-%H%M%S}"
    if cfg.train.resume_from_checkpoint == "latest" and not cfg.train.run_name:  # not a new time stamp
        name = checkpoint.latest_run_dir(Path(cfg.train.output_dir), cfg.algorithm.rlhf_type).name
    name = distributed.broadcast_object(name)
    run_dir = Path(cfg.train.output_dir) / name
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_shape(cfg: Config) -> checkpointing.ModelShape:
    """Layers and widths of --model, read from its config (no weights loaded)."""
    source = resolve_model(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)
    if source.kind == "tiny":
        from hpalign.tiny_model import build_byte_tokenizer, tiny_llama_config

        return checkpointing.ModelShape.of(tiny_llama_config(len(build_byte_tokenizer())))
    from transformers import AutoConfig

    return checkpointing.ModelShape.of(AutoConfig.from_pretrained(source.path,
                                                                  trust_remote_code=source.trust_remote_code))


def decide_checkpointing_by_memory(cfg: Config, *, tokens: float, dtype: torch.dtype) -> None:
    """--gradient_checkpointing left unset (auto: LoRA on a CPU, after `resolve_defaults`): set it, and
    --gradient_checkpointing_layers, from the memory a micro-batch of `tokens` tokens needs
    (`checkpointing.plan_checkpointing`); given, it stands (with --gradient_checkpointing_layers, or all)."""
    if cfg.train.gradient_checkpointing is not None:
        if not cfg.train.gradient_checkpointing:
            cfg.train.gradient_checkpointing_layers = None
        return
    plan = checkpointing.plan_checkpointing(
        tokens=tokens, shape=model_shape(cfg), dtype_bytes=torch.finfo(dtype).bits // 8,
        available_bytes=checkpointing.available_memory_per_rank(distributed.layout().device))
    cfg.train.gradient_checkpointing = plan.enabled
    cfg.train.gradient_checkpointing_layers = plan.layers if plan.enabled else None
    logger.info("gradient checkpointing: %s (micro-batches of %.0f tokens)", plan.describe(), tokens)


def micro_batch_tokens(cfg: Config, examples: list) -> float:
    """Positions a micro-batch computes on average (shared prompts counted once)."""
    lengths = collate.example_lengths(examples, share_prompt=cfg.data.packing and cfg.data.share_prompt)
    return cfg.train.batch_size * sum(lengths) / max(len(lengths), 1)


def limit_checkpointing(cfg: Config, *models) -> None:
    """--gradient_checkpointing_layers on the trainable models (checkpointing on: every layer unless set)."""
    if cfg.train.gradient_checkpointing and cfg.train.gradient_checkpointing_layers is not None:
        for model in models:
            if model is not None:
                checkpointing.limit_checkpointed_layers(model, cfg.train.gradient_checkpointing_layers)


def build_models(cfg: Config, algorithm: Algorithm, dtype: torch.dtype, *, zero3_config: dict | None = None):
    """(policy, frozen reference or None). With LoRA the reference is the policy with the adapter
    off, so no second copy exists; full fine-tuning keeps a frozen copy of the starting weights.
    Under ZeRO-3 (`zero3_config`) both are loaded partitioned, the reference by a second load of
    `--model`: no rank ever holds a whole model."""
    attn_impl, trusted = cfg.model.attn_impl, cfg.model.trust_remote_code
    policy = load_policy(resolve_model(cfg.model.model, trust_remote_code=trusted), dtype=dtype, attn_impl=attn_impl,
                         gradient_checkpointing=cfg.train.gradient_checkpointing, zero3_config=zero3_config)
    reference = None
    if algorithm.needs_reference and (cfg.tuning.sft_type == "full" or cfg.model.ref_model):
        if cfg.model.ref_model or zero3_config is not None:
            reference = load_reference(resolve_model(cfg.model.ref_model or cfg.model.model, trust_remote_code=trusted),
                                       dtype=dtype, attn_impl=attn_impl, zero3_config=zero3_config)
        else:
            reference = frozen_copy(policy)
    limit_checkpointing(cfg, policy)
    if cfg.tuning.sft_type == "lora":
        policy = apply_lora(policy, targets=cfg.tuning.lora_target_modules, rank=cfg.tuning.lora_rank,
                            alpha=cfg.tuning.lora_alpha, dropout=cfg.tuning.lora_dropout)
    if algorithm.forward == "reward":
        policy = RewardModel.with_new_head(policy, seed=cfg.train.seed)
    if cfg.train.disable_dropout:
        switch_dropout_off(policy, reference, cfg)
    return policy, reference


def run_deepspeed_config(cfg: Config, dtype: torch.dtype) -> dict:
    """The DeepSpeed config of this run's flags: what the engines are built with and models loaded with."""
    return engine_lib.deepspeed_config(
        cfg.train.deepspeed, micro_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        max_grad_norm=cfg.train.max_grad_norm, dtype=dtype)


def zero3_loading_config(ds_config: dict) -> dict | None:
    """`ds_config` under ZeRO-3, where models are loaded partitioned (`models.partitioned_loading`), else None."""
    return ds_config if engine_lib.zero_stage(ds_config) == 3 else None


def decide_disable_dropout(cfg: Config, algorithm: Algorithm) -> bool:
    """--disable_dropout as given; unset, on exactly for the algorithms with a reference model."""
    return algorithm.needs_reference if cfg.train.disable_dropout is None else cfg.train.disable_dropout


def switch_dropout_off(policy: torch.nn.Module, reference: torch.nn.Module | None, cfg: Config) -> None:
    num_changed = disable_dropout(policy) + (disable_dropout(reference) if reference is not None else 0)
    logger.info("dropout off in %d places of the policy and reference (--disable_dropout true)", num_changed)
    if "lora_dropout" in cfg.user_set and cfg.tuning.sft_type == "lora" and cfg.tuning.lora_dropout > 0:
        logger.warning("--lora_dropout %g has no effect: --disable_dropout is on (the default with a "
                       "reference model); pass --disable_dropout false to keep dropout", cfg.tuning.lora_dropout)


def check_logprob_impl(impl: str) -> None:
    """Fail before any model loads when --logprob_impl cuda cannot run here."""
    if impl != "cuda":
        return
    from hpalign.ops.logprobs import CUDA_BUILD_HINT, cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is not None:
        raise ValueError(f"--logprob_impl cuda: {reason}. {CUDA_BUILD_HINT} (as a flag: --logprob_impl auto or torch)")


def make_collate(*, pad_id: int, packed: bool, max_tokens: int | None, share_prompt: bool = False,
                 group_prompts: bool = False):
    """Examples -> SequenceBatch: packed rows under the token budget (None: one row), optionally with
    shared prompts, or one padded row per sequence. `group_prompts` (rollouts: single-response
    examples): consecutive examples with the same prompt share it (`collate.pack_prompt_groups`)."""
    def collate_examples(examples: list) -> collate.SequenceBatch:
        if packed and group_prompts:
            return collate.pack_prompt_groups(examples, pad_id=pad_id, max_tokens_per_row=max_tokens)
        if packed:
            return collate.pack_batch(examples, pad_id=pad_id, max_tokens_per_row=max_tokens,
                                      share_prompt=share_prompt)
        return collate.pad_batch(examples, pad_id=pad_id)
    return collate_examples


def session_collate(session: Session):
    """The collate function of this run's data settings."""
    data = session.cfg.data
    return make_collate(pad_id=session.tokenizer.pad_token_id, packed=session.packed,
                        max_tokens=data.max_tokens_per_batch, share_prompt=data.share_prompt)


def make_batcher(examples: list, collate_examples):
    """Example indices -> SequenceBatch (with the example ids, for the reference log-prob table)."""
    return lambda indices: with_example_ids(collate_examples([examples[i] for i in indices]), indices)


def report_kto_balance(examples: list, cfg: Config) -> None:
    """Print n_D, n_U and lambda_D*n_D / (lambda_U*n_U); warn outside the authors' advised [1, 4/3]."""
    from hpalign.losses import kto_weight_ratio, suggest_kto_weights

    num_desirable = sum(1 for example in examples if example.label)
    num_undesirable = len(examples) - num_desirable
    algo = cfg.algorithm
    if not num_desirable or not num_undesirable:
        logger.warning("KTO data has %d desirable and %d undesirable examples: both kinds are needed for "
                       "KTO to contrast them", num_desirable, num_undesirable)
        return
    ratio = kto_weight_ratio(num_desirable, num_undesirable, algo.desirable_weight, algo.undesirable_weight)
    logger.info("KTO: n_D=%d, n_U=%d, lambda_D*n_D/(lambda_U*n_U)=%.3f", num_desirable, num_undesirable, ratio)
    if not 1.0 <= ratio <= 4 / 3 + 1e-9:
        suggested = suggest_kto_weights(num_desirable, num_undesirable, desirable_weight=algo.desirable_weight,
                                        undesirable_weight=algo.undesirable_weight)
        logger.warning("KTO: the ratio %.3f is outside [1, 4/3] advised by the authors; try "
                       "--desirable_weight %.3g --undesirable_weight %.3g", ratio, *suggested)


def build_session(cfg: Config) -> Session:
    algorithm = get_algorithm(cfg.algorithm.rlhf_type)
    check_logprob_impl(cfg.algorithm.logprob_impl)
    run_dir = make_run_dir(cfg)
    setup_logging(run_dir)
    logger.info("run directory: %s", run_dir)
    for warning in unused_flag_warnings(cfg, needs_reference=algorithm.needs_reference):
        logger.warning(warning)
    tokenizer = load_tokenizer(resolve_model(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code))
    template = templates.resolve_template(tokenizer, cfg.model.template, cfg.model.model_type)
    data = prepare_data(cfg, algorithm.data_kind, template)
    if algorithm.data_kind == "kto":
        report_kto_balance(data.train, cfg)
    dtype = resolve_dtype(cfg.model.torch_dtype)
    decide_checkpointing_by_memory(cfg, tokens=micro_batch_tokens(cfg, data.train), dtype=dtype)
    cfg.train.disable_dropout = decide_disable_dropout(cfg, algorithm)
    if distributed.is_main():  # the resolved config, every decision above included
        save_config(cfg, run_dir / "config.yaml")
    ds_config = run_deepspeed_config(cfg, dtype)
    policy, reference = build_models(cfg, algorithm, dtype, zero3_config=zero3_loading_config(ds_config))
    packed = cfg.data.packing
    if packed:
        backend = varlen_backend(cfg.model.attn_impl)
        logger.info("packing on: attention backend %s",
                    enable_varlen_attention(getattr(policy, "lm", policy), backend=backend))
        if reference is not None:
            enable_varlen_attention(reference, backend=backend)
    plan = BatchPlan(len(data.train), cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
                     distributed.layout().data_parallel_size)
    num_steps = total_steps(plan, num_train_epochs=cfg.train.num_train_epochs, max_steps=cfg.train.max_steps)
    if plan.num_wrapped_per_epoch:
        logger.info("data: %d examples do not fill the last global batch of %d; it wraps around and "
                    "repeats %d examples of the epoch", len(data.train), plan.global_batch,
                    plan.num_wrapped_per_epoch)
    engine, guard = engine_lib.build_engine(
        policy, ds_config=ds_config, learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        num_training_steps=num_steps, warmup_ratio=cfg.train.warmup_ratio)
    device = distributed.layout().device
    if reference is not None:
        reference = engine_lib.build_frozen_engine(reference, ds_config=ds_config, device=device)
    check_models_on_device({"policy": engine.module, "reference": reference}, device)
    return Session(cfg, algorithm, make_params(algorithm.name, cfg.algorithm), run_dir, tokenizer, template, data,
                   engine, guard, reference, packed, plan, num_steps)


def check_models_on_device(models: dict[str, torch.nn.Module | None], device: torch.device) -> None:
    """RuntimeError naming every model with a parameter off the rank's `device` (ZeRO-3 partitions
    are DeepSpeed's to place, on the device or, offloaded, on the CPU: not checked)."""
    misplaced = []
    for name, model in models.items():
        if model is None:
            continue
        devices = {str(p.device) for p in model.parameters() if not hasattr(p, "ds_id") and p.device != device}
        if devices:
            misplaced.append(f"{name} has parameters on {', '.join(sorted(devices))}")
    if misplaced:
        raise RuntimeError(f"every model must be on this rank's device {device}: {'; '.join(misplaced)}")


def stats_functions(session: Session):
    """(policy_stats, reference_stats or None) closures over the session's models. The reference
    here is always the live model; training batches may read the precomputed table instead
    (`training_reference_stats`)."""
    module = session.engine.module
    impl = session.cfg.algorithm.logprob_impl
    device = distributed.layout().device

    def policy_stats(batch):
        if session.algorithm.forward == "reward":
            return reward_stats(module, batch.to(device), packed=session.packed)
        return sequence_stats(module, batch.to(device), packed=session.packed, logprob_impl=impl)

    if not session.algorithm.needs_reference:
        return policy_stats, None

    @torch.no_grad()
    def reference_stats(batch):
        batch = batch.to(device)
        if session.reference is not None:
            return sequence_stats(session.reference, batch, packed=session.packed, logprob_impl=impl)
        assert uses_adapter_reference(module)
        with module.disable_adapter():
            return sequence_stats(module, batch, packed=session.packed, logprob_impl=impl)

    return policy_stats, reference_stats


def training_reference_stats(session: Session):
    """The reference of training batches: --precompute_ref_log_probs' table, looked up by the
    batch's example ids (which index the TRAINING set: held-out batches never come here)."""
    table = session.reference_table
    device = distributed.layout().device

    def from_table(batch):
        if batch.example_ids is None:
            raise ValueError("a training batch without example ids cannot read the reference table")
        logps_ER = table[batch.example_ids.cpu()].to(device)
        return SequenceStats(logps_ER=logps_ER, num_tokens_ER=response_token_counts(batch.to(device)))

    return from_table


def configure_threads(cfg: Config) -> None:
    if torch.cuda.is_available():
        return
    local_processes = distributed.processes_on_this_machine()  # the cores are shared by these only
    # --num_threads, else OMP_NUM_THREADS when the caller set it, else this process's share of the cores.
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    threads = cfg.train.num_threads or (int(from_env) if from_env.isdigit() and int(from_env) > 0 else
                                        max(1, (os.cpu_count() or 1) // local_processes))
    torch.set_num_threads(threads)


