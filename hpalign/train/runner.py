"""`run(cfg)`: everything `hpalign rlhf` and `deepspeed launch/train.py` do, in reading order.

set up -> data -> models -> engine -> (resume) -> evaluate before -> train -> evaluate after -> report.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hpalign import checkpoint, distributed, report
from hpalign.config import Config
from hpalign.data import builtin
from hpalign.hyperparams import ROLLOUT_TYPES
from hpalign.train import nonfinite
from hpalign.train.evaluate import generation_eval, label_eval, preference_eval
from hpalign.train.kto import mismatched_completion
from hpalign.train.loop import TrainState, finish_window, run_step
from hpalign.train.metrics import MetricWindow
from hpalign.train.session import (
    Session,
    build_session,
    configure_threads,
    make_batcher,
    seed_everything,
    session_collate,
    stats_functions,
    training_reference_stats,
)

logger = logging.getLogger("hpalign")


def precompute_reference(session: Session) -> None:
    """--precompute_ref_log_probs: one reference pass over the training data, cached on disk under
    $HPALIGN_CACHE/reference_logps keyed by model, data and template, so later epochs and reruns
    skip the reference forward. KTO's mismatched KL pairs change every step and stay live."""
    from hpalign.models import cache_root
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
        make_batch = make_batcher(session.data.train, session_collate(session))
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
    # No autograd here: a metric accumulated from a grad-tracking tensor keeps every batch's graph
    # alive until the end of the evaluation (measured: 16 GB instead of 1 GB for KTO on SmolLM2).
    with torch.no_grad():
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
    collate_examples = session_collate(session)
    batch_size, beta = max(cfg.train.batch_size, 8), getattr(session.params, "beta", None) or 1.0
    metrics: dict[str, float] = {}
    if data.val_pairs:
        make_batch = make_batcher(data.val_pairs, collate_examples)
        metrics.update(preference_eval(
            policy_stats, reference_stats, make_batch, len(data.val_pairs), batch_size=batch_size, beta=beta,
            length_normalised=cfg.algorithm.rlhf_type in ("simpo", "orpo")))
    if session.algorithm.data_kind == "kto" and len(data.val) >= 2:
        with_kl = with_mismatched_heldout(data.val, max_length=cfg.data.max_length)
        metrics.update(label_eval(policy_stats, reference_stats, make_batcher(with_kl, collate_examples),
                                  len(with_kl), batch_size=batch_size))
    return metrics


def with_mismatched_heldout(examples: list, *, max_length: int) -> list:
    """Held-out KTO rows with a second response: the next row's completion, the mismatched pair
    (prompt_i, completion_{i+1}) of the held-out KL reference point (it shares row i's prompt)."""
    shifted = examples[1:] + examples[:1]
    return [dataclasses.replace(own, responses=[own.responses[0], mismatched_completion(own, other, max_length=max_length)])
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
    table_stats = training_reference_stats(session) if session.reference_table is not None else None
    collate_examples = session_collate(session)
    session.engine.train()
    bar = tqdm(total=session.num_steps, initial=state.global_step, desc=cfg.algorithm.rlhf_type,
               disable=not distributed.is_main(), dynamic_ncols=True)
    window = MetricWindow()  # the steps since the last log line, reduced over ranks once per line
    while state.global_step < session.num_steps:
        result = run_step(session.engine, guard=session.guard, algorithm=session.algorithm, params=session.params, plan=session.plan,
                          step=state.global_step, seed=cfg.train.seed, max_length=cfg.data.max_length,
                          examples=session.data.train, collate=collate_examples,
                          policy_stats=policy_stats, reference_stats=reference_stats,
                          table_reference_stats=table_stats)
        state.global_step += 1
        step = state.global_step
        window.add_step(sums=result.sums, shared=result.shared,
                        host={**result.host, "train/epoch": step / session.plan.steps_per_epoch})
        bar.update(1)
        readings = nonfinite.stop_if_failing({"policy": session.guard}, max_in_a_row=cfg.train.max_nonfinite_steps,
                                             run_dir=session.run_dir)
        if step % cfg.train.logging_steps == 0 or step == session.num_steps:
            averaged = finish_window(window.reduce())
            averaged["train/skipped_updates"] = float(readings["policy"].num_skipped)
            metrics_logger.log(step, averaged)
            state.history.append({"step": step, **averaged})
            bar.set_postfix(loss=f"{averaged['train/loss']:.4f}", tok_s=f"{averaged['train/tokens_per_second']:.0f}")
        if cfg.train.eval_steps and step % cfg.train.eval_steps == 0 and step < session.num_steps:
            eval_metrics, _ = evaluate(session, generate=False)  # generation only before and after
            metrics_logger.log(step, eval_metrics)
            session.engine.train()
        if step % cfg.train.save_steps == 0 or step == session.num_steps:
            save(session, state)
    bar.close()


def save(session: Session, state: TrainState) -> Path:
    nonfinite.check_before_save({"policy": session.guard}, {"policy": session.engine.module},
                                max_in_a_row=session.cfg.train.max_nonfinite_steps, run_dir=session.run_dir,
                                step=state.global_step)
    trainer_state = {"global_step": state.global_step, "num_steps": session.num_steps,
                     "epoch": state.global_step / session.plan.steps_per_epoch,
                     "steps_per_epoch": session.plan.steps_per_epoch, "seed": session.cfg.train.seed,
                     "rlhf_type": session.cfg.algorithm.rlhf_type, "model": session.cfg.model.model,
                     "sft_type": session.cfg.tuning.sft_type, "template": session.template.name,
                     "plan": checkpoint.plan_state(session.plan, session.cfg.train.seed)}
    path = checkpoint.save_checkpoint(
        session.engine, run_dir=session.run_dir, step=state.global_step, tokenizer=session.tokenizer,
        trainer_state=trainer_state, save_total_limit=session.cfg.train.save_total_limit)
    logger.info("saved %s", path)
    return path


def resume(session: Session, state: TrainState) -> None:
    spec = session.cfg.train.resume_from_checkpoint
    if not spec:
        return
    path = checkpoint.prepare_resume(spec, session.run_dir, checkpoint.plan_state(session.plan, session.cfg.train.seed))
    trainer_state = checkpoint.load_checkpoint(session.engine, path)
    state.global_step = state.start_step = int(trainer_state["global_step"])
    logger.info("resumed from %s at step %d", path, state.global_step)


def run(cfg: Config) -> int:
    """Train with a resolved, validated config; returns the process exit code."""
    started = time.time()
    distributed.init_distributed(timeout_seconds=cfg.train.ddp_timeout)
    configure_threads(cfg)
    seed_everything(cfg.train.seed)
    if cfg.algorithm.rlhf_type in ROLLOUT_TYPES:  # the rollout loop (hpalign/rl/) has its own runner
        from hpalign.rl.runner import run_rollouts

        return run_rollouts(cfg)
    session = build_session(cfg)
    state = TrainState()
    resume(session, state)
    if cfg.algorithm.precompute_ref_log_probs and session.algorithm.needs_reference:
        precompute_reference(session)
    metrics_logger = report.MetricsLogger(session.run_dir, report_to=cfg.train.report_to,
                                          config=cfg.to_dict(), enabled=distributed.is_main(),
                                          run_name=session.run_dir.name,
                                          resumed_step=state.global_step)
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

