"""`run(cfg)`: everything `hpalign rlhf` and `deepspeed launch/train.py` do, in reading order.

set up -> data -> models -> engine -> (resume) -> evaluate before -> train -> evaluate after -> report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hpalign import checkpoint, report
from hpalign.algorithms import Algorithm, SequenceStats, get_algorithm
from hpalign.config import Config, save_config
from hpalign.data import builtin, collate, templates
from hpalign.model import (
    RewardModel,
    apply_lora,
    frozen_copy,
    load_policy,
    load_tokenizer,
    resolve_dtype,
    uses_adapter_reference,
)
from hpalign.ops.attention import enable_varlen_attention
from hpalign.train import distributed
from hpalign.train import engine as engine_lib
from hpalign.train.datasets import PreparedData, prepare_data
from hpalign.train.evaluate import generation_eval, label_eval, preference_eval
from hpalign.train.forward import response_token_counts, reward_stats, sequence_stats
from hpalign.train.loop import TrainState, kl_reference_point, run_step, with_example_ids
from hpalign.train.schedule import BatchPlan, total_steps

logger = logging.getLogger("hpalign")


@dataclass
class Session:
    """What the loop needs, built once."""

    cfg: Config
    algorithm: Algorithm
    run_dir: Path
    tokenizer: object
    template: templates.ChatTemplate
    data: PreparedData
    engine: object
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
    name = distributed.broadcast_object(name)
    run_dir = Path(cfg.train.output_dir) / name
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_models(cfg: Config, algorithm: Algorithm, dtype: torch.dtype):
    """(policy, frozen reference or None). With LoRA the reference is the policy with the adapter
    off, so no second copy exists; full fine-tuning keeps a frozen copy of the starting weights."""
    policy = load_policy(cfg.model.model, dtype=dtype, gradient_checkpointing=cfg.train.gradient_checkpointing)
    reference = None
    if algorithm.needs_reference and (cfg.tuning.sft_type == "full" or cfg.model.ref_model):
        source = load_policy(cfg.model.ref_model, dtype=dtype) if cfg.model.ref_model else policy
        reference = frozen_copy(source)
    if cfg.tuning.sft_type == "lora":
        policy = apply_lora(policy, targets=cfg.tuning.lora_target_modules, rank=cfg.tuning.lora_rank,
                            alpha=cfg.tuning.lora_alpha, dropout=cfg.tuning.lora_dropout)
    if algorithm.forward == "reward":
        policy = RewardModel.with_new_head(policy, seed=cfg.train.seed)
    return policy, reference


def make_collate(*, pad_id: int, packed: bool, max_tokens: int):
    """Examples -> SequenceBatch: packed rows under the token budget, or one padded row per sequence."""
    def collate_examples(examples: list) -> collate.SequenceBatch:
        if packed:
            return collate.pack_batch(examples, pad_id=pad_id, max_tokens_per_row=max_tokens)
        return collate.pad_batch(examples, pad_id=pad_id)
    return collate_examples


def make_batcher(examples: list, *, pad_id: int, packed: bool, max_tokens: int):
    """Example indices -> SequenceBatch."""
    collate_examples = make_collate(pad_id=pad_id, packed=packed, max_tokens=max_tokens)
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
    run_dir = make_run_dir(cfg)
    setup_logging(run_dir)
    if distributed.is_main():
        save_config(cfg, run_dir / "config.yaml")
    logger.info("run directory: %s", run_dir)
    tokenizer = load_tokenizer(cfg.model.model)
    template = templates.resolve_template(tokenizer, cfg.model.template, cfg.model.model_type)
    data = prepare_data(cfg, algorithm.data_kind, template)
    if algorithm.data_kind == "kto":
        report_kto_balance(data.train, cfg)
    dtype = resolve_dtype(cfg.model.torch_dtype)
    policy, reference = build_models(cfg, algorithm, dtype)
    packed = cfg.data.packing
    if packed:
        logger.info("packing on: attention backend %s", enable_varlen_attention(getattr(policy, "lm", policy)))
        if reference is not None:
            enable_varlen_attention(reference)
    plan = BatchPlan(len(data.train), cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
                     distributed.world_size())
    num_steps = total_steps(plan, num_train_epochs=cfg.train.num_train_epochs, max_steps=cfg.train.max_steps)
    if plan.num_wrapped_per_epoch:
        logger.info("data: %d examples do not fill the last global batch of %d; it wraps around and "
                    "repeats %d examples of the epoch", len(data.train), plan.global_batch,
                    plan.num_wrapped_per_epoch)
    ds_config = engine_lib.deepspeed_config(
        cfg.train.deepspeed, micro_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        max_grad_norm=cfg.train.max_grad_norm, dtype=dtype)
    engine, _, _ = engine_lib.build_engine(
        policy, ds_config=ds_config, learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        num_training_steps=num_steps, warmup_ratio=cfg.train.warmup_ratio)
    if reference is not None:
        reference = engine_lib.build_frozen_engine(reference, ds_config=ds_config)
    return Session(cfg, algorithm, run_dir, tokenizer, template, data, engine, reference, packed, plan, num_steps)


def stats_functions(session: Session):
    """(policy_stats, reference_stats or None) closures over the session's models."""
    module = session.engine.module
    forward = reward_stats if session.algorithm.forward == "reward" else sequence_stats

    def policy_stats(batch):
        return forward(module, batch.to(session.engine.device), packed=session.packed)

    if not session.algorithm.needs_reference:
        return policy_stats, None

    @torch.no_grad()
    def reference_stats(batch):
        batch = batch.to(session.engine.device)
        if session.reference_table is not None and batch.example_ids is not None:
            logps_ER = session.reference_table[batch.example_ids.cpu()].to(batch.input_ids.device)
            return SequenceStats(logps_ER=logps_ER, num_tokens_ER=response_token_counts(batch))
        if session.reference is not None:
            return sequence_stats(session.reference, batch, packed=session.packed)
        assert uses_adapter_reference(module)
        with module.disable_adapter():
            return sequence_stats(module, batch, packed=session.packed)

    return policy_stats, reference_stats


def precompute_reference(session: Session) -> None:
    """--precompute_ref_log_probs: one reference pass over the training data, cached on disk under
    $HPALIGN_CACHE/reference_logps keyed by model, data and template, so later epochs and reruns
    skip the reference forward. KTO's mismatched KL pairs change every step and stay live."""
    from hpalign.model import cache_root
    from hpalign.train import reference_cache

    cfg = session.cfg
    _, reference_stats = stats_functions(session)
    reference_model = session.reference if session.reference is not None else session.engine.module
    key = reference_cache.reference_cache_key(
        model_spec=str(cfg.model.ref_model or cfg.model.model),
        model_fingerprint=reference_cache.model_fingerprint(reference_model),
        template_name=session.template.name, examples=session.data.train, max_length=cfg.data.max_length)
    path = cache_root() / "reference_logps" / f"{key[:32]}.safetensors"
    table = reference_cache.load_reference_cache(path, key)
    if table is None:
        make_batch = make_batcher(session.data.train, pad_id=session.tokenizer.pad_token_id,
                                  packed=session.packed, max_tokens=cfg.data.max_tokens_per_batch)
        table = reference_cache.precompute_reference_logps(
            reference_stats, make_batch, len(session.data.train), batch_size=max(cfg.train.batch_size, 8),
            show_progress=distributed.is_main())
        if distributed.is_main():
            reference_cache.save_reference_cache(path, table, key)
        logger.info("reference log-probs of %d examples computed and cached in %s", len(table), path)
    else:
        logger.info("reference log-probs loaded from %s", path)
    session.reference_table = table


def evaluate(session: Session, *, generate: bool = True) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Held-out metrics (dropout off); the generation task metric only when `generate`."""
    module = session.engine.module
    was_training = module.training
    module.eval()
    metrics = preference_metrics(session)
    samples: list[dict[str, str]] = []
    if generate and session.algorithm.generates:
        generated, samples = generation_metrics(session)
        metrics.update(generated)
    module.train(was_training)
    return metrics, samples


def preference_metrics(session: Session) -> dict[str, float]:
    cfg, data = session.cfg, session.data
    policy_stats, reference_stats = stats_functions(session)
    if reference_stats is not None:
        reference_stats = _cached(reference_stats, session.val_reference_cache)
    pad_id, budget = session.tokenizer.pad_token_id, cfg.data.max_tokens_per_batch
    batch_size, beta = max(cfg.train.batch_size, 8), cfg.algorithm.beta or 1.0
    metrics: dict[str, float] = {}
    if data.val_pairs:
        make_batch = make_batcher(data.val_pairs, pad_id=pad_id, packed=session.packed, max_tokens=budget)
        metrics.update(preference_eval(
            policy_stats, reference_stats, make_batch, len(data.val_pairs), batch_size=batch_size, beta=beta,
            length_normalised=cfg.algorithm.rlhf_type in ("simpo", "orpo")))
    if session.algorithm.data_kind == "kto" and len(data.val) >= 2:
        make_batch = make_batcher(data.val, pad_id=pad_id, packed=session.packed, max_tokens=budget)
        mismatched = mismatched_heldout(data.val, max_length=cfg.data.max_length)
        collate_examples = make_collate(pad_id=pad_id, packed=session.packed, max_tokens=budget)
        kl_batches = [collate_examples(mismatched[i:i + batch_size]) for i in range(0, len(mismatched), batch_size)]
        z0 = kl_reference_point(kl_batches, policy_stats, reference_stats)
        metrics.update(label_eval(policy_stats, reference_stats, make_batch, len(data.val),
                                  batch_size=batch_size, beta=beta, kl_reference_point=z0))
        metrics["eval/kto/kl"] = z0
    return metrics


def mismatched_heldout(examples: list, *, max_length: int) -> list:
    """Held-out (prompt_i, completion_{i+1}) pairs for the held-out KL reference point."""
    shifted = examples[1:] + examples[:1]
    return [dataclasses.replace(own, responses=[other.responses[0][: max(1, max_length - len(own.prompt_ids))]])
            for own, other in zip(examples, shifted, strict=True)]


def generation_metrics(session: Session) -> tuple[dict[str, float], list[dict[str, str]]]:
    """The built-in data's program-checked metric on greedy generations (user data has no checker)."""
    cfg = session.cfg
    if not (session.data.builtin and session.data.val_prompts and cfg.data.num_eval_generations > 0):
        return {}, []
    synced = session.engine.zero_optimization_stage() == 3 and distributed.world_size() > 1
    return generation_eval(
        session.engine.module, session.tokenizer, session.data.val_prompts, session.template.encode_prompt,
        builtin.task_metric, pad_id=session.tokenizer.pad_token_id, stop_ids=session.template.stop_token_ids,
        max_new_tokens=cfg.data.max_new_tokens, batch_size=16, synced=synced)


def _cached(stats_fn, cache: dict):
    """Memoise reference stats by batch content (the held-out batches repeat at every evaluation)."""
    def cached(batch):
        key = (batch.input_ids.shape, hash(batch.input_ids.numpy().tobytes()))
        if key not in cache:
            cache[key] = stats_fn(batch)
        return cache[key]
    return cached


def log_samples(samples: list[dict[str, str]], title: str) -> None:
    for sample in samples[:2]:
        logger.info("%s sample | prompt: %r -> %r", title, sample["prompt"][:80], sample["generation"][:120])


def train(session: Session, state: TrainState, metrics_logger: report.MetricsLogger) -> None:
    cfg = session.cfg
    policy_stats, reference_stats = stats_functions(session)
    collate_examples = make_collate(pad_id=session.tokenizer.pad_token_id, packed=session.packed,
                                    max_tokens=cfg.data.max_tokens_per_batch)
    session.engine.train()
    bar = tqdm(total=session.num_steps, initial=state.global_step, desc=cfg.algorithm.rlhf_type,
               disable=not distributed.is_main(), dynamic_ncols=True)
    window: list[dict[str, float]] = []  # metrics of the steps since the last log line
    while state.global_step < session.num_steps:
        result = run_step(session.engine, algorithm=session.algorithm, cfg=cfg, plan=session.plan,
                          step=state.global_step, examples=session.data.train, collate=collate_examples,
                          policy_stats=policy_stats, reference_stats=reference_stats)
        state.global_step += 1
        step = state.global_step
        result.metrics["train/epoch"] = step / session.plan.steps_per_epoch
        bar.update(1)
        bar.set_postfix(loss=f"{result.metrics['train/loss']:.4f}", tok_s=f"{result.metrics['train/tokens_per_second']:.0f}")
        window.append(result.metrics)
        if step % cfg.train.logging_steps == 0 or step == session.num_steps:
            averaged = average_metrics(window)
            window.clear()
            metrics_logger.log(step, averaged)
            state.history.append({"step": step, **averaged})
        if cfg.train.eval_steps and step % cfg.train.eval_steps == 0 and step < session.num_steps:
            eval_metrics, _ = evaluate(session, generate=False)  # generation only before and after
            metrics_logger.log(step, eval_metrics)
            session.engine.train()
        if step % cfg.train.save_steps == 0 or step == session.num_steps:
            save(session, state)
    bar.close()


def average_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the logging window; the learning rate and epoch are the latest."""
    averaged = {}
    for name in window[-1]:
        values = [m[name] for m in window if name in m]
        averaged[name] = sum(values) / len(values)
    for name in ("train/learning_rate", "train/epoch"):
        averaged[name] = window[-1][name]
    return averaged


def save(session: Session, state: TrainState) -> Path:
    trainer_state = {"global_step": state.global_step, "num_steps": session.num_steps,
                     "epoch": state.global_step / session.plan.steps_per_epoch,
                     "steps_per_epoch": session.plan.steps_per_epoch, "seed": session.cfg.train.seed,
                     "rlhf_type": session.cfg.algorithm.rlhf_type, "model": session.cfg.model.model,
                     "sft_type": session.cfg.tuning.sft_type, "template": session.template.name}
    path = checkpoint.save_checkpoint(
        session.engine, run_dir=session.run_dir, step=state.global_step, tokenizer=session.tokenizer,
        trainer_state=trainer_state, save_total_limit=session.cfg.train.save_total_limit)
    logger.info("saved %s", path)
    return path


def resume(session: Session, state: TrainState) -> None:
    spec = session.cfg.train.resume_from_checkpoint
    if not spec:
        return
    path = checkpoint.resolve_resume_path(spec, session.run_dir)
    trainer_state = checkpoint.load_checkpoint(session.engine, path)
    state.global_step = state.start_step = int(trainer_state["global_step"])
    logger.info("resumed from %s at step %d", path, state.global_step)


def configure_threads(cfg: Config) -> None:
    if torch.cuda.is_available():
        return
    threads = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // distributed.world_size())
    torch.set_num_threads(threads)


def run(cfg: Config) -> int:
    """Train with a resolved, validated config; returns the process exit code."""
    started = time.time()
    distributed.init_distributed()
    configure_threads(cfg)
    seed_everything(cfg.train.seed)
    session = build_session(cfg)
    state = TrainState()
    resume(session, state)
    if cfg.algorithm.precompute_ref_log_probs and session.algorithm.needs_reference:
        precompute_reference(session)
    metrics_logger = report.MetricsLogger(session.run_dir, report_to=cfg.train.report_to,
                                          config=cfg.to_dict(), enabled=distributed.is_main(),
                                          run_name=session.run_dir.name)
    before = None
    if cfg.train.eval_before_train and state.global_step == 0:
        before, samples = evaluate(session)
        metrics_logger.log(0, before)
        log_samples(samples, "before")
    train_started = time.time()
    train(session, state, metrics_logger)
    train_seconds = time.time() - train_started
    after, samples = evaluate(session)
    metrics_logger.log(state.global_step, after)
    log_samples(samples, "after")
    metrics_logger.close()
    finish(session, state, before, after, train_seconds, time.time() - started)
    return 0


def finish(session: Session, state: TrainState, before, after, train_seconds: float, wall: float) -> None:
    if not distributed.is_main():
        return
    run_dir = session.run_dir
    plot = report.plot_training(run_dir / "metrics.jsonl", run_dir / "training.png")
    steps_run = max(1, state.global_step - state.start_step)
    summary = {"rlhf_type": session.cfg.algorithm.rlhf_type, "global_step": state.global_step,
               "eval_before": before, "eval_after": after, "train_seconds": train_seconds,
               "seconds_per_step": train_seconds / steps_run, "wall_seconds": wall,
               "plot": str(plot) if plot else None,
               "data": {"num_train": len(session.data.train), "num_val": len(session.data.val),
                        "num_skipped": session.data.report.num_skipped,
                        "num_truncated": session.data.report.num_truncated,
                        "num_truncated_response": session.data.report.num_truncated_response}}
    report.write_summary(run_dir / "summary.json", summary)
    print("\n" + report.format_eval_table(before, after), file=sys.stderr)
    print(f"\nrun directory: {run_dir}  ({train_seconds:.0f} s training, "
          f"{summary['seconds_per_step']:.2f} s/step, {wall:.0f} s total)", file=sys.stderr)

