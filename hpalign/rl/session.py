"""Everything a PPO run is built from, once: run directory, prompts, the four models and their
engines, the rollout engine, the scoring and training passes, the rewards."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from hpalign import distributed
from hpalign.config import Config, save_config, unused_flag_warnings
from hpalign.data import templates
from hpalign.models import ModelSource, RewardModel, load_tokenizer, resolve_dtype
from hpalign.ops.attention import enable_varlen_attention, varlen_backend
from hpalign.rl import rewards as rule_rewards
from hpalign.rl.loop import PPOSettings, TrainPasses
from hpalign.rl.models import LoraSettings, PPOModelSet, build_ppo_models
from hpalign.rl.rollout import HFGenerateRollouts, SamplingParams
from hpalign.rl.scoring import ScoringPasses
from hpalign.train import engine as engine_lib
from hpalign.train.datasets import PreparedData, prepare_data
from hpalign.train.forward import reward_stats, token_stats, token_values
from hpalign.train.schedule import BatchPlan, total_steps
from hpalign.train.session import (
    CHECKPOINT_MIN_TOKENS,
    check_logprob_impl,
    check_models_on_device,
    make_collate,
    make_run_dir,
    setup_logging,
)

logger = logging.getLogger("hpalign")

# The embedded model samples no emoji at all from the built-in prompts (0 of 48 at temperature 0.7),
# so `emoji` gives PPO no signal there; exact answers and concise ones it can learn.
BUILTIN_REWARD_FUNCS = ["accuracy", "length"]


@dataclass
class PPOSession:
    cfg: Config
    run_dir: Path
    tokenizer: object
    template: templates.ChatTemplate
    data: PreparedData
    policy_engine: object
    value_engine: object
    rollout_engine: HFGenerateRollouts
    scoring: ScoringPasses
    training: TrainPasses
    settings: PPOSettings
    plan: BatchPlan  # prompts per step: rollouts per rank x ranks
    num_steps: int
    collate: object


# The built-in PPO task: its arithmetic questions, where both default rewards apply; 14 steps of 8
# prompts (112 of the 232) is the length that finishes under 15 minutes on 2 CPU cores with SmolLM2.
BUILTIN_PPO_STEPS = 14


def keep_arithmetic_prompts(data: PreparedData, *, num_eval: int) -> None:
    """Keep the built-in prompts whose question `accuracy` checks: the training ones, and the first
    `num_eval` (--num_eval_generations) held-out ones."""
    from hpalign.data import builtin

    def is_arithmetic(prompt) -> bool:
        return rule_rewards.arithmetic_answer(rule_rewards.last_user_turn(prompt) or "") is not None

    kept = [i for i, prompt in enumerate(data.train_prompts) if is_arithmetic(prompt)]
    data.train = [data.train[i] for i in kept]
    data.train_prompts = [data.train_prompts[i] for i in kept]
    held_out = [example.prompt for example in builtin.builtin_dataset("prompt", "test", seed=0)]
    data.val_prompts = [p for p in held_out if is_arithmetic(p)][:num_eval]
    logger.info("PPO on the built-in data: its %d arithmetic questions (%d held-out for evaluation)",
                len(data.train), len(data.val_prompts))


def decide_reward_funcs(cfg: Config, *, builtin: bool) -> list[str]:
    """--reward_funcs as given; unset, the built-in task's rules when there is no reward model."""
    if cfg.ppo.reward_funcs:
        return list(cfg.ppo.reward_funcs)
    if cfg.ppo.reward_model_id_or_path:
        return []
    if builtin:
        return list(BUILTIN_REWARD_FUNCS)
    raise ValueError("--rlhf_type ppo needs a reward: --reward_model_id_or_path (an RM checkpoint or an HF "
                     "sequence-classification model) and/or --reward_funcs "
                     f"({', '.join(rule_rewards.REWARD_FUNCS)})")


# PPO's micro-batches are short rows of prompt + response (8 x ~100 tokens on the built-in data: under
# 1 GB of activations per model for SmolLM2), where recomputation would cost ~25 % of the update phase.
PPO_CHECKPOINT_MIN_TOKENS = 4 * CHECKPOINT_MIN_TOKENS


def decide_ppo_gradient_checkpointing(cfg: Config, prompts: list) -> bool:
    """--gradient_checkpointing as given; unset (LoRA on a CPU), on when a micro-batch of prompts plus
    full-length responses averages PPO_CHECKPOINT_MIN_TOKENS tokens."""
    if cfg.train.gradient_checkpointing is not None:
        return cfg.train.gradient_checkpointing
    mean_prompt = sum(len(p.prompt_ids) for p in prompts) / max(len(prompts), 1)
    tokens = cfg.train.batch_size * (mean_prompt + cfg.ppo.response_length)
    enabled = tokens >= PPO_CHECKPOINT_MIN_TOKENS
    logger.info("gradient checkpointing %s (auto: PPO micro-batches average %.0f tokens; on from %d)",
                "on" if enabled else "off", tokens, PPO_CHECKPOINT_MIN_TOKENS)
    return enabled


def ppo_settings(cfg: Config, stop_ids: tuple[int, ...]) -> PPOSettings:
    ppo = cfg.ppo
    return PPOSettings(
        batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        num_mini_batches=ppo.num_mini_batches, num_ppo_epochs=ppo.num_ppo_epochs,
        rollout_chunk=ppo.local_rollout_forward_batch_size,
        sampling=SamplingParams(max_new_tokens=ppo.response_length, temperature=ppo.temperature,
                                stop_ids=stop_ids),
        kl_coef=ppo.kl_coef, kl_estimator=ppo.kl_estimator, whiten_rewards=ppo.whiten_rewards, gamma=ppo.gamma,
        lam=ppo.lam, cliprange=ppo.cliprange, cliprange_value=ppo.cliprange_value, vf_coef=ppo.vf_coef,
        missing_eos_penalty=ppo.missing_eos_penalty)


def check_reward_tokenizer(tokenizer, reward_dir: Path | None) -> None:
    """The reward model reads the policy's token ids as they are: its tokenizer must be the same."""
    if reward_dir is None or not (reward_dir / "tokenizer_config.json").is_file():
        return
    reward_tokenizer = load_tokenizer(ModelSource(kind="directory", name=str(reward_dir), path=reward_dir))
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the reward model in {reward_dir} has another tokenizer than the policy: hpalign scores "
                         "the policy's token ids directly, so train the reward model from the same base model "
                         "(re-tokenising for a foreign reward model is not supported yet)")


def recompute_old_logprobs(choice: str, dtype: torch.dtype) -> bool:
    """--old_logprobs: whether a no-grad policy forward recomputes the sampled tokens' log-probs
    (auto: only in 16-bit, where the sampler's KV-cached forward rounds unlike the packed one; in
    float32 the two agree to ~1e-6 and the forward is 1/4 of the scoring phase)."""
    if choice == "auto":
        recompute = dtype != torch.float32
        logger.info("old log-probs: %s (auto: %s)", "recomputed" if recompute else "the sampler's", dtype)
        return recompute
    return choice == "recompute"


def make_scoring(models: PPOModelSet, policy_engine, value_engine, reference, rules, *, packed: bool,
                 impl: str, temperature: float, recompute_old: bool = True) -> tuple[ScoringPasses, TrainPasses]:
    """The closures over the models: no-grad scoring passes and grad-tracking training passes
    (`recompute_old` False: the sampler's log-probs are the old ones, no policy scoring pass)."""
    policy, value = policy_engine.module, value_engine.module

    def policy_logps(batch):
        return token_stats(policy, batch, packed=packed, logprob_impl=impl, temperature=temperature)

    def reference_logps(batch):
        if reference is not None:
            return token_stats(reference, batch, packed=packed, logprob_impl=impl, temperature=temperature)
        with policy.disable_adapter():
            return token_stats(policy, batch, packed=packed, logprob_impl=impl, temperature=temperature)

    def values(batch):
        return token_values(value, batch, packed=packed)

    def reward_model_scores(batch):
        if models.reward is not None:
            return reward_stats(models.reward, batch, packed=packed).rewards_ER[:, 0]
        with value.lm.disable_adapter():  # the reward model is the value model's backbone, adapter off
            return reward_stats(RewardModel(value.lm, models.reward_head), batch, packed=packed).rewards_ER[:, 0]

    has_reward_model = models.reward is not None or models.reward_head is not None

    def scores(batch, prompts, texts):
        total = reward_model_scores(batch).float() if has_reward_model else torch.zeros(batch.num_sequences)
        metrics = {}
        if has_reward_model:
            metrics["rewards/reward_model"] = float(total.mean())
        if rules:
            rule_scores, rule_metrics = rule_rewards.score_rule_rewards(rules, prompts, texts)
            total = total.to(batch.input_ids.device) + torch.tensor(rule_scores, device=batch.input_ids.device)
            metrics.update(rule_metrics)
        return total, metrics

    def train_policy(batch):
        return token_stats(policy, batch, packed=packed, logprob_impl=impl, temperature=temperature, with_entropy=True)

    return (ScoringPasses(policy=policy_logps if recompute_old else None, reference=reference_logps, values=values,
                          scores=scores),
            TrainPasses(policy=train_policy, values=values))


def build_ppo_session(cfg: Config) -> PPOSession:
    check_logprob_impl(cfg.algorithm.logprob_impl)
    run_dir = make_run_dir(cfg)
    setup_logging(run_dir)
    logger.info("run directory: %s", run_dir)
    for warning in unused_flag_warnings(cfg, needs_reference=True):
        logger.warning(warning)
    if cfg.ppo.reward_model_type:
        logger.warning("--reward_model_type %s has no effect: hpalign reads the reward model's architecture from "
                       "its own config.json", cfg.ppo.reward_model_type)
    tokenizer = load_tokenizer(cfg.model.model)
    template = templates.resolve_template(tokenizer, cfg.model.template, cfg.model.model_type)
    data = prepare_data(cfg, "prompt", template)
    if not data.train:
        raise ValueError("PPO has no training prompts: check --dataset")
    cfg.ppo.reward_funcs = decide_reward_funcs(cfg, builtin=data.builtin)
    if data.builtin and not cfg.ppo.reward_model_id_or_path:
        keep_arithmetic_prompts(data, num_eval=cfg.data.num_eval_generations)
        if "max_steps" not in cfg.user_set and "num_train_epochs" not in cfg.user_set:
            cfg.train.max_steps = BUILTIN_PPO_STEPS
            logger.info("PPO on the built-in prompts: %d steps by default (--max_steps / --num_train_epochs "
                        "set the length)", BUILTIN_PPO_STEPS)
    rules = rule_rewards.parse_reward_funcs(cfg.ppo.reward_funcs, cfg.ppo.reward_weights)
    dtype = resolve_dtype(cfg.model.torch_dtype)
    cfg.train.gradient_checkpointing = decide_ppo_gradient_checkpointing(cfg, data.train)
    cfg.train.disable_dropout = True if cfg.train.disable_dropout is None else cfg.train.disable_dropout
    if distributed.is_main():  # the resolved config, every decision above included
        save_config(cfg, run_dir / "config.yaml")
    lora = None if cfg.tuning.sft_type == "full" else LoraSettings(
        targets=cfg.tuning.lora_target_modules, rank=cfg.tuning.lora_rank, alpha=cfg.tuning.lora_alpha,
        dropout=cfg.tuning.lora_dropout)
    models = build_ppo_models(model=cfg.model.model, ref_model=cfg.model.ref_model,
                              reward_model=cfg.ppo.reward_model_id_or_path, dtype=dtype, attn_impl=cfg.model.attn_impl,
                              gradient_checkpointing=cfg.train.gradient_checkpointing, lora=lora, seed=cfg.train.seed,
                              no_dropout=cfg.train.disable_dropout)
    check_reward_tokenizer(tokenizer, models.reward_tokenizer_dir)
    if cfg.data.packing:
        backend = varlen_backend(cfg.model.attn_impl)
        for model in (models.policy, models.reference, models.value.lm, models.reward and models.reward.lm):
            if model is not None:
                enable_varlen_attention(model, backend=backend)
    stop_ids = tuple(template.stop_token_ids) if cfg.ppo.stop_token == "eos" else ()
    settings = ppo_settings(cfg, stop_ids)
    world = distributed.layout().data_parallel_size
    plan = BatchPlan(len(data.train), settings.rollouts_per_rank, 1, world)
    num_steps = total_steps(plan, num_train_epochs=cfg.train.num_train_epochs, max_steps=cfg.train.max_steps)
    policy_engine, value_engine, reference, reward = build_engines(cfg, models, dtype=dtype, num_steps=num_steps)
    models.reward = reward
    device = distributed.layout().device
    check_models_on_device({"policy": policy_engine.module, "value": value_engine.module, "reference": reference,
                            "reward": reward}, device)
    scoring, training = make_scoring(models, policy_engine, value_engine, reference, rules, packed=cfg.data.packing,
                                     impl=cfg.algorithm.logprob_impl, temperature=settings.sampling.temperature,
                                     recompute_old=recompute_old_logprobs(cfg.ppo.old_logprobs, dtype))
    rollout_engine = HFGenerateRollouts(policy_engine, pad_id=tokenizer.pad_token_id,
                                        batch_size=cfg.ppo.local_rollout_forward_batch_size)
    collate = make_collate(pad_id=tokenizer.pad_token_id, packed=cfg.data.packing,
                           max_tokens=cfg.data.max_tokens_per_batch)
    logger.info("PPO: %d prompts per step (%d per rank), %d steps, %d optimizer steps per PPO step; rewards: %s",
                plan.global_batch, settings.rollouts_per_rank, num_steps,
                settings.num_ppo_epochs * settings.num_mini_batches,
                ", ".join(([cfg.ppo.reward_model_id_or_path] if cfg.ppo.reward_model_id_or_path else [])
                          + [f"{r.name} x{r.weight:g}" for r in rules]))
    return PPOSession(cfg=cfg, run_dir=run_dir, tokenizer=tokenizer, template=template, data=data,
                      policy_engine=policy_engine, value_engine=value_engine, rollout_engine=rollout_engine,
                      scoring=scoring, training=training, settings=settings, plan=plan, num_steps=num_steps,
                      collate=collate)


def build_engines(cfg: Config, models: PPOModelSet, *, dtype: torch.dtype, num_steps: int):
    """(policy engine, value engine, frozen reference or None, frozen reward model or None)."""
    ds_config = engine_lib.deepspeed_config(
        cfg.train.deepspeed, micro_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        max_grad_norm=cfg.train.max_grad_norm, dtype=dtype)
    optimizer_steps = num_steps * cfg.ppo.num_ppo_epochs * cfg.ppo.num_mini_batches
    engines = []
    for model in (models.policy, models.value):
        engine, _, _ = engine_lib.build_engine(
            model, ds_config=ds_config, learning_rate=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), num_training_steps=optimizer_steps,
            warmup_ratio=cfg.train.warmup_ratio)
        engines.append(engine)
    device = distributed.layout().device
    reference = reward = None
    if models.reference is not None:
        reference = engine_lib.build_frozen_engine(models.reference, ds_config=ds_config, device=device)
    if models.reward is not None:
        reward = engine_lib.build_frozen_engine(models.reward, ds_config=ds_config, device=device)
    if models.reward_head is not None:
        models.reward_head.to(device)
    return engines[0], engines[1], reference, reward


def steps_between_samples(num_steps: int, num_sample_generations: int) -> int:
    """PPOv2's sample cadence: num_sample_generations tables spread evenly over the run (0: never)."""
    if num_sample_generations <= 0:
        return 0
    return max(1, math.floor(num_steps / num_sample_generations))
