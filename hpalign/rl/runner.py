"""`run_rollouts(cfg)`: set up -> resume -> evaluate -> rollout steps -> evaluate -> report, in reading
order, for PPO and the GRPO family alike.

The held-out evaluation generates greedily for --num_eval_generations held-out prompts and reports
the mean score (reward model and/or rule rewards, as in training, without the missing-EOS
penalty) and, on the built-in data, its program-checked task metric.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import torch
from tqdm.auto import tqdm

from hpalign import checkpoint, distributed, report
from hpalign.config import Config
from hpalign.data import builtin
from hpalign.data.types import TokenizedExample
from hpalign.rl import rewards as rule_rewards
from hpalign.rl.loop import rollout_step
from hpalign.rl.rollout import SamplingParams
from hpalign.rl.session import RolloutSession, build_rollout_session, steps_between_samples
from hpalign.train import nonfinite
from hpalign.train.evaluate import shard_for_rank
from hpalign.train.metrics import MetricWindow
from hpalign.train.schedule import micro_batches_for_step

logger = logging.getLogger("hpalign")
LATEST = ("lr", "episode", "eps", "gpu_peak_memory_mib")
SAMPLE_PROMPTS = 4  # held-out prompts of each sample table (greedy, scored)


def step_prompts(session: RolloutSession, step: int) -> tuple[list[int], list[int]]:
    """(this rank's prompt indices of `step`, their positions in the step's global order)."""
    rank = distributed.layout().data_parallel_rank
    indices = micro_batches_for_step(session.plan, step, seed=session.cfg.train.seed, rank=rank)[0]
    first = rank * session.settings.prompts_per_rank
    return indices, list(range(first, first + len(indices)))


@torch.no_grad()
def greedy_scored(session: RolloutSession, prompts: list) -> tuple[list[int], list[str], list[float], list[float]]:
    """This rank's share of `prompts` (indices), its greedy responses, their scores, and their
    weights (0 for the repeats that even out the ranks). The rollout engine answers (vLLM or HF
    generate, whichever samples the rollouts), from the policy's current weights."""
    rows, texts, scores, weights = [], [], [], []
    stop_ids = tuple(session.settings.sampling.stop_ids) or tuple(session.template.stop_token_ids)
    greedy = SamplingParams(max_new_tokens=session.cfg.ppo.response_length, temperature=0.0, stop_ids=stop_ids)
    session.rollout_engine.sync_weights()
    pad_id = session.tokenizer.pad_token_id
    for indices, batch_weights in shard_for_rank(len(prompts), batch_size=session.settings.rollout_chunk):
        encoded = [session.template.encode_prompt(prompts[i]) for i in indices]
        responses = session.rollout_engine.generate(encoded, greedy, [0] * len(encoded)).response_ids
        batch_texts = [session.tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
        examples = [TokenizedExample(prompt_ids=p, responses=[r or [pad_id]], source="eval")  # none empty
                    for p, r in zip(encoded, responses, strict=True)]
        batch_scores, _ = session.scoring.scores(session.collate(examples).to(distributed.layout().device),
                                                 [prompts[i] for i in indices], batch_texts)
        rows += indices
        texts += batch_texts
        scores += batch_scores.float().cpu().tolist()
        weights += batch_weights
    return rows, texts, scores, weights


def evaluate(session: RolloutSession) -> dict[str, float]:
    prompts = session.data.val_prompts
    if not prompts:
        return {}
    for engine in session.objective.engines():
        engine.eval()
    indices, texts, scores, weights = greedy_scored(session, prompts)
    sums = [sum(weights), sum(w * s for w, s in zip(weights, scores, strict=True))]
    if session.data.builtin:
        sums += builtin_task_sums([prompts[i] for i in indices], texts, weights)
    totals = distributed.sum_over_ranks(sums)
    metrics = {"eval/reward_mean": totals[1] / max(totals[0], 1.0)}
    if session.data.builtin:
        metrics["eval/task_metric"] = totals[3] / max(totals[2], 1.0)
        metrics["eval/exact_answer_share"] = totals[4] / max(totals[2], 1.0)
        metrics["eval/emoji_share"] = totals[5] / max(totals[0], 1.0)
    for engine in session.objective.engines():
        engine.train()
    return metrics


def builtin_task_sums(prompts: list, texts: list[str], weights: list[float]) -> list[float]:
    """[arithmetic prompts, exact and brief answers, exact answers, answers with emoji] (weighted).
    PPO's built-in task is the one its default rewards grade: answer the arithmetic question exactly
    and briefly; its program-checked metric is the share of answers that hold the exact result AND
    stay within the length budget (the `length` reward's 80 characters). Exact answers alone and
    the emoji share (the DPO task metric) are reported beside it."""
    arithmetic = [rule_rewards.arithmetic_answer(rule_rewards.last_user_turn(p) or "") is not None for p in prompts]
    exact = rule_rewards.accuracy_reward(prompts, texts)
    brief = [penalty == 0.0 for penalty in rule_rewards.length_reward(prompts, texts)]
    rows = zip(weights, arithmetic, exact, brief, texts, strict=True)
    totals = [0.0, 0.0, 0.0, 0.0]
    for weight, is_arithmetic, is_exact, is_brief, text in rows:
        totals[0] += weight * is_arithmetic
        totals[1] += weight * (is_arithmetic and is_exact == 1.0 and is_brief)
        totals[2] += weight * (is_arithmetic and is_exact == 1.0)
        totals[3] += weight * builtin.has_emoji(text)
    return totals


def write_samples(session: RolloutSession, step: int, metrics_logger: report.MetricsLogger) -> None:
    """PPOv2's sample table: greedy responses to the first held-out prompts with their scores, appended
    to samples.jsonl in the run directory (and a W&B table with --report_to wandb)."""
    prompts = session.data.val_prompts[:SAMPLE_PROMPTS]
    if not prompts:
        return
    indices, texts, scores, weights = greedy_scored(session, prompts)
    if not distributed.is_main():  # rank 0 writes its share of the samples
        return
    rows = [{"step": step, "prompt": session.template.render_prompt(prompts[i]), "response": t, "score": s}
            for i, t, s, w in zip(indices, texts, scores, weights, strict=True) if w]
    with (session.run_dir / "samples.jsonl").open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    metrics_logger.log_table("samples", ["step", "prompt", "response", "score"],
                             [[r["step"], r["prompt"], r["response"], r["score"]] for r in rows], step=step)


def save(session: RolloutSession, step: int, episode: int) -> None:
    cfg = session.cfg
    modules = {"policy": session.policy_engine.module}
    if session.value_engine is not None:
        modules["value"] = session.value_engine.module
    nonfinite.check_before_save(session.guards, modules, max_in_a_row=cfg.train.max_nonfinite_steps,
                                run_dir=session.run_dir, step=step)
    state = {"global_step": step, "num_steps": session.num_steps, "episode": episode, "seed": cfg.train.seed,
             "rlhf_type": cfg.algorithm.rlhf_type, "model": cfg.model.model, "sft_type": cfg.tuning.sft_type,
             "template": session.template.name, "plan": checkpoint.plan_state(session.plan, cfg.train.seed)}
    path = checkpoint.save_checkpoint(session.policy_engine, run_dir=session.run_dir, step=step,
                                      tokenizer=session.tokenizer, trainer_state=state,
                                      save_total_limit=cfg.train.save_total_limit,
                                      extra_engines=extra_engines(session))
    logger.info("saved %s%s", path, " (policy; value model in value_model/)" if session.value_engine else "")


def extra_engines(session: RolloutSession) -> dict:
    """The trainable engines checkpointed beside the policy: PPO's value model."""
    return {"value_model": session.value_engine} if session.value_engine is not None else {}


def resume(session: RolloutSession) -> tuple[int, int]:
    """(global step, episodes) to continue from (0, 0 without --resume_from_checkpoint)."""
    spec = session.cfg.train.resume_from_checkpoint
    if not spec:
        return 0, 0
    path = checkpoint.prepare_resume(spec, session.run_dir, checkpoint.plan_state(session.plan, session.cfg.train.seed))
    state = checkpoint.load_checkpoint(session.policy_engine, path, extra_engines=extra_engines(session))
    logger.info("resumed from %s at step %d", path, state["global_step"])
    return int(state["global_step"]), int(state.get("episode", 0))


def train(session: RolloutSession, metrics_logger: report.MetricsLogger, *, start_step: int, episode: int) -> int:
    cfg = session.cfg
    sample_every = steps_between_samples(session.num_steps, cfg.ppo.num_sample_generations)
    decode = lambda ids: session.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    window = MetricWindow()
    bar = tqdm(total=session.num_steps, initial=start_step, desc=cfg.algorithm.rlhf_type, disable=not distributed.is_main(),
               dynamic_ncols=True)
    started, episodes_at_start = time.time(), episode
    for step in range(start_step, session.num_steps):
        indices, positions = step_prompts(session, step)
        for guard in session.guards.values():
            guard.begin_step(step + 1)
        output = rollout_step(objective=session.objective, rollout_engine=session.rollout_engine,
                              scoring=session.scoring, prompt_ids=[session.data.train[i].prompt_ids for i in indices],
                              prompts=[session.data.train_prompts[i] for i in indices], positions=positions,
                              settings=session.settings, collate=session.collate, decode=decode, seed=cfg.train.seed,
                              step=step)
        for guard in session.guards.values():
            guard.end_step()
        readings = nonfinite.stop_if_failing(session.guards, max_in_a_row=cfg.train.max_nonfinite_steps,
                                             run_dir=session.run_dir)
        episode += output.num_episodes
        output.metrics.update({"episode": episode,
                               "eps": (episode - episodes_at_start) / max(time.time() - started, 1e-9)})
        window.add_step(sums={}, shared={}, host=output.metrics)
        done = step + 1
        bar.update(1)
        if done % cfg.train.logging_steps == 0 or done == session.num_steps:
            averaged = window.reduce()
            for name in LATEST:
                if name in output.metrics:
                    averaged[name] = output.metrics[name]
            averaged.update({f"{name}/skipped_updates": float(r.num_skipped) for name, r in readings.items()})
            metrics_logger.log(done, averaged)
            bar.set_postfix({name.split("/")[-1]: f"{averaged[name]:.3f}" for name in session.objective.progress})
        if sample_every and done % sample_every == 0:
            write_samples(session, done, metrics_logger)
        if cfg.train.eval_steps and done % cfg.train.eval_steps == 0 and done < session.num_steps:
            metrics_logger.log(done, evaluate(session))
        if done % cfg.train.save_steps == 0 or done == session.num_steps:
            save(session, done, episode)
    bar.close()
    return session.num_steps


def run_rollouts(cfg: Config) -> int:
    """PPO or a GRPO-family algorithm with a resolved, validated config; returns the exit code."""
    started = time.time()
    session = build_rollout_session(cfg)
    start_step, episode = resume(session)
    metrics_logger = report.MetricsLogger(session.run_dir, report_to=cfg.train.report_to, config=cfg.to_dict(),
                                          enabled=distributed.is_main(), run_name=session.run_dir.name,
                                          resumed_step=start_step)
    before = evaluate(session) if cfg.train.eval_before_train and start_step == 0 else None
    if before is not None:
        metrics_logger.log(0, before)
    train_started = time.time()
    steps = train(session, metrics_logger, start_step=start_step, episode=episode)
    train_seconds = time.time() - train_started
    after = evaluate(session)
    metrics_logger.log(steps, after)
    metrics_logger.close()
    if distributed.is_main():
        steps_run = max(1, steps - start_step)
        summary = {"rlhf_type": cfg.algorithm.rlhf_type, "global_step": steps, "eval_before": before, "eval_after": after,
                   "train_seconds": train_seconds, "seconds_per_step": train_seconds / steps_run,
                   "wall_seconds": time.time() - started,
                   "data": {"num_train": len(session.data.train), "num_val": len(session.data.val),
                            "num_skipped": session.data.report.num_skipped,
                            "num_truncated": session.data.report.num_truncated}}
        report.write_summary(session.run_dir / "summary.json", summary)
        print("\n" + report.format_eval_table(before, after), file=sys.stderr)
        print(f"\nrun directory: {session.run_dir}  ({train_seconds:.0f} s training, "
              f"{summary['seconds_per_step']:.2f} s/step, {summary['wall_seconds']:.0f} s total)", file=sys.stderr)
    return 0
