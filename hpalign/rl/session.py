"""Everything a rollout run (PPO, GRPO, RLOO, REINFORCE++) is built from, once: run directory,
prompts, the models and their engines, the rollout engine, the scoring passes, the rewards and the
algorithm's objective."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from hpalign import distributed
from hpalign.config import Config, save_config, unused_flag_warnings
from hpalign.data import templates
from hpalign.hyperparams import CRITIC_FREE_TYPES
from hpalign.models import RewardModel, directory_source, load_tokenizer, resolve_dtype, resolve_model
from hpalign.ops.attention import enable_varlen_attention, varlen_backend
from hpalign.rl import rewards as rule_rewards
from hpalign.rl.critic_free import CriticFreeObjective, CriticFreeSettings
from hpalign.rl.loop import RolloutObjective, RolloutSettings
from hpalign.rl.models import LoraSettings, PPOModelSet, build_ppo_models
from hpalign.rl.ppo import PPOObjective, PPOSettings
from hpalign.rl.rollout import HFGenerateRollouts, RolloutEngine, SamplingParams
from hpalign.rl.scoring import ScoringPasses
from hpalign.train import engine as engine_lib
from hpalign.train.datasets import PreparedData, prepare_data
from hpalign.train.forward import reward_stats, token_stats, token_values
from hpalign.train.nonfinite import NonFiniteGuard
from hpalign.train.schedule import BatchPlan, total_steps
from hpalign.train.session import (
    check_logprob_impl,
    check_models_on_device,
    decide_checkpointing_by_memory,
    limit_checkpointing,
    make_collate,
    make_run_dir,
    run_deepspeed_config,
    setup_logging,
    zero3_loading_config,
)

logger = logging.getLogger("hpalign")

# The embedded model samples no emoji at all from the built-in prompts (0 of 48 at temperature 0.7),
# so `emoji` gives PPO no signal there; exact answers and concise ones it can learn. The GRPO family
# learns from the exact-answer reward alone: a group's answers differ in it, which is its signal.
BUILTIN_REWARD_FUNCS = {"ppo": ["accuracy", "length"], "critic_free": ["accuracy"]}


@dataclass
class RolloutSession:
    """A plain record of what the run was built from."""

    cfg: Config
    run_dir: Path
    tokenizer: object
    template: templates.ChatTemplate
    data: PreparedData
    policy_engine: object
    value_engine: object | None  # PPO's critic; None for the GRPO family
    rollout_engine: RolloutEngine
    scoring: ScoringPasses
    objective: RolloutObjective
    settings: RolloutSettings
    plan: BatchPlan  # prompts per step: prompts per rank x ranks
    num_steps: int
    collate: object
    guards: dict[str, NonFiniteGuard]  # per trainable engine ("policy", "value"): skipped non-finite updates


# The built-in task (no --dataset, no reward model): the built-in set's arithmetic questions, graded by
# the rule rewards; each setting the user does not give is one measured on SmolLM2, 2 CPU cores, to
# finish under 15 minutes. PPO: 24 steps of 8 prompts (590 s with vLLM rollouts, ~12 minutes with HF
# generate; 14 steps left the held-out task metric flat with vLLM's samples). The GRPO family: 2 prompts x 8
# responses per step, LoRA on every linear layer at 5e-4 (q,k,v at PPO's 3e-4 did not move held-out
# accuracy in 30 steps), responses of up to 96 tokens (SmolLM2 finishes 1 in 5 greedy answers past 53),
# all 38 held-out questions; 40 steps with vLLM rollouts (19 s/step), 20 with HF generate (33 s/step).
BUILTIN_TASK = {
    "ppo": {"max_steps": 24},
    "critic_free": {"batch_size": 16, "response_length": 96, "learning_rate": 5e-4, "lora_target_modules": ["ALL"],
                    "num_eval_generations": 38},
}
BUILTIN_CRITIC_FREE_STEPS = {"vllm": 40, "hf": 20}


def builtin_task_settings(rlhf_type: str, *, engine: str, sft_type: str) -> dict[str, object]:
    """The built-in task's settings by flag name (see BUILTIN_TASK)."""
    settings = dict(BUILTIN_TASK[family(rlhf_type)])
    if family(rlhf_type) == "critic_free":
        settings["max_steps"] = BUILTIN_CRITIC_FREE_STEPS[engine]
        if sft_type == "full":  # the LoRA settings do not apply
            settings.pop("learning_rate")
            settings.pop("lora_target_modules")
    return settings


def apply_builtin_task(cfg: Config, *, engine: str) -> None:
    """Give the built-in task's settings to every flag the user left unset (logged)."""
    given = []
    for name, value in builtin_task_settings(cfg.algorithm.rlhf_type, engine=engine,
                                              sft_type=cfg.tuning.sft_type).items():
        if name in cfg.user_set or (name == "max_steps" and "num_train_epochs" in cfg.user_set):
            continue
        section = next(sec for sec in (cfg.train, cfg.ppo, cfg.tuning, cfg.data) if hasattr(sec, name))
        setattr(section, name, value)
        given.append(f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    if given:
        logger.info("%s on the built-in prompts (%s rollouts): %s (give a flag to change one)",
                    cfg.algorithm.rlhf_type, engine, ", ".join(given))


def family(rlhf_type: str) -> str:
    return "critic_free" if rlhf_type in CRITIC_FREE_TYPES else "ppo"


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
    logger.info("%d arithmetic questions of the built-in data (%d held-out for evaluation)",
                len(data.train), len(data.val_prompts))


def decide_reward_funcs(cfg: Config, *, builtin: bool) -> list[str]:
    """--reward_funcs as given; unset, the built-in task's rules when there is no reward model."""
    if cfg.ppo.reward_funcs:
        return list(cfg.ppo.reward_funcs)
    if cfg.ppo.reward_model_id_or_path:
        return []
    if builtin:
        return list(BUILTIN_REWARD_FUNCS[family(cfg.algorithm.rlhf_type)])
    raise ValueError(f"--rlhf_type {cfg.algorithm.rlhf_type} needs a reward: --reward_model_id_or_path (an RM "
                     "checkpoint or an HF sequence-classification model) and/or --reward_funcs "
                     f"({', '.join(rule_rewards.REWARD_FUNCS)})")


def update_micro_batch_tokens(cfg: Config, prompts: list) -> float:
    """Positions of an update micro-batch of prompts with full-length responses (each prompt counted
    per response: an upper bound where completions share it)."""
    mean_prompt = sum(len(p.prompt_ids) for p in prompts) / max(len(prompts), 1)
    return cfg.train.batch_size * (mean_prompt + cfg.ppo.response_length)


def rollout_settings(cfg: Config, stop_ids: tuple[int, ...]) -> RolloutSettings:
    ppo, critic_free = cfg.ppo, cfg.algorithm.rlhf_type in CRITIC_FREE_TYPES
    return RolloutSettings(
        batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        num_mini_batches=ppo.num_mini_batches,
        num_epochs=cfg.algorithm.num_iterations if critic_free else ppo.num_ppo_epochs,
        rollout_chunk=ppo.local_rollout_forward_batch_size,
        sampling=SamplingParams(max_new_tokens=ppo.response_length, temperature=ppo.temperature, stop_ids=stop_ids),
        missing_eos_penalty=ppo.missing_eos_penalty,
        num_generations=cfg.algorithm.num_generations if critic_free else 1)


def ppo_settings(cfg: Config) -> PPOSettings:
    ppo = cfg.ppo
    return PPOSettings(kl_coef=ppo.kl_coef, kl_estimator=ppo.kl_estimator, whiten_rewards=ppo.whiten_rewards,
                       gamma=ppo.gamma, lam=ppo.lam, cliprange=ppo.cliprange, cliprange_value=ppo.cliprange_value,
                       vf_coef=ppo.vf_coef)


def critic_free_settings(cfg: Config) -> CriticFreeSettings:
    a = cfg.algorithm
    return CriticFreeSettings(
        estimator=a.rlhf_type, num_generations=a.num_generations, beta=a.beta, epsilon=a.epsilon,
        epsilon_high=a.epsilon_high, scale_rewards=a.scale_rewards, loss_type=a.loss_type,
        mask_truncated_completions=a.mask_truncated_completions, kl_estimator=cfg.ppo.kl_estimator,
        max_completion_length=cfg.ppo.response_length,
        on_policy=a.num_iterations == 1 and cfg.ppo.num_mini_batches == 1)


def check_reward_tokenizer(tokenizer, reward_dir: Path | None, *, trust_remote_code: bool = False) -> None:
    """The reward model reads the policy's token ids as they are: its tokenizer must be the same."""
    if reward_dir is None or not (reward_dir / "tokenizer_config.json").is_file():
        return
    reward_tokenizer = load_tokenizer(directory_source(reward_dir, trust_remote_code=trust_remote_code))
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the reward model in {reward_dir} has another tokenizer than the policy: hpalign scores "
                         "the policy's token ids directly, so train the reward model from the same base model "
                         "(re-tokenising for a foreign reward model is not supported yet)")


def old_logprobs_source(choice: str, *, needed: bool, dtype: torch.dtype, engine: str) -> str:
    """--old_logprobs resolved: "none" (the update is on-policy and no KL reads them), "sampler"
    (the sampler's own) or "recompute" (a no-grad packed policy forward). auto: the sampler's only
    for HF generate in float32, where its KV-cached forward agrees with the packed one to ~1e-6
    (that forward is 1/4 of PPO's scoring phase); recomputed in 16-bit and for vLLM, whose kernels
    round otherwise (its log-probs are then logged beside them: rollout/sampler_logp_gap)."""
    if not needed:
        return "none"
    if choice != "auto":
        return choice
    source = "sampler" if dtype == torch.float32 and engine == "hf" else "recompute"
    logger.info("old log-probs: %s (auto: %s, %s rollouts)", "the sampler's" if source == "sampler" else "recomputed",
                dtype, engine)
    return source


def needs_old_logprobs(cfg: Config) -> bool:
    """PPO always (ratio and KL); the GRPO family when the update is off-policy or the KL is in the reward."""
    if cfg.algorithm.rlhf_type not in CRITIC_FREE_TYPES:
        return True
    settings = critic_free_settings(cfg)
    return not settings.on_policy or settings.kl_in_reward


def make_scoring(models: PPOModelSet, policy_engine, value_engine, reference, rules, *, packed: bool, impl: str,
                 temperature: float, old_logprobs: str, with_reference: bool) -> tuple[ScoringPasses, object]:
    """The closures over the models: the no-grad scoring passes (each only where the algorithm reads
    it) and the grad-tracking policy forward of the updates (log-probs and entropies)."""
    policy = policy_engine.module

    def policy_logps(batch):
        return token_stats(policy, batch, packed=packed, logprob_impl=impl, temperature=temperature)

    def reference_logps(batch):
        if reference is not None:
            return token_stats(reference, batch, packed=packed, logprob_impl=impl, temperature=temperature)
        with policy.disable_adapter():
            return token_stats(policy, batch, packed=packed, logprob_impl=impl, temperature=temperature)

    def values(batch):
        return token_values(value_engine.module, batch, packed=packed)

    def train_policy(batch):
        return token_stats(policy, batch, packed=packed, logprob_impl=impl, temperature=temperature, with_entropy=True)

    passes = ScoringPasses(policy=policy_logps if old_logprobs == "recompute" else None,
                           reference=reference_logps if with_reference else None,
                           values=values if value_engine is not None else None,
                           scores=make_scores(models, value_engine, rules, packed=packed))
    return passes, train_policy


def make_scores(models: PPOModelSet, value_engine, rules, *, packed: bool):
    """(batch, prompts, texts) -> (scores [S], metrics): the reward model's score plus the rule rewards."""
    has_reward_model = models.reward is not None or models.reward_head is not None

    def reward_model_scores(batch):
        if models.reward is not None:
            return reward_stats(models.reward, batch, packed=packed).rewards_ER[:, 0]
        value = value_engine.module
        with value.lm.disable_adapter():  # the reward model is the value model's backbone, adapter off
            return reward_stats(RewardModel(value.lm, models.reward_head), batch, packed=packed).rewards_ER[:, 0]

    def scores(batch, prompts, texts):
        device = batch.input_ids.device
        total = reward_model_scores(batch).float() if has_reward_model else torch.zeros(batch.num_sequences,
                                                                                         device=device)
        metrics = {}
        if has_reward_model:
            metrics["rewards/reward_model"] = float(total.mean())
        if rules:
            rule_scores, rule_metrics = rule_rewards.score_rule_rewards(rules, prompts, texts)
            total = total + torch.tensor(rule_scores, device=device)
            metrics.update(rule_metrics)
        return total, metrics

    return scores


def decide_rollout_engine(choice: str) -> str:
    """--rollout_engine resolved: vllm (a supported vLLM must be installed: a clear error otherwise),
    hf, or auto: vllm when a supported one is installed, else hf."""
    from hpalign.rl.vllm_engine import check_vllm, installed_vllm, vllm_usable

    if choice == "vllm":
        check_vllm()
        return "vllm"
    if choice == "auto":
        engine = "vllm" if vllm_usable() else "hf"
        found = installed_vllm()
        logger.info("rollout engine: %s (auto; %s)", engine,
                    f"{found[0]} {found[1]} installed" if found else "no vLLM installed")
        return engine
    return choice


def make_rollout_engine(name: str, cfg: Config, policy_engine, *, pad_id: int, max_prompt_tokens: int) -> RolloutEngine:
    """The sampler of the rollouts: HF generate on the policy, or a colocated vLLM engine fed the
    policy's weights before every rollout phase."""
    if name == "hf":
        return HFGenerateRollouts(policy_engine, pad_id=pad_id, batch_size=cfg.ppo.local_rollout_forward_batch_size)
    from hpalign.rl.vllm_engine import VLLMRollouts, VLLMSettings

    ppo, layout = cfg.ppo, distributed.layout()
    settings = VLLMSettings(
        gpu_memory_utilization=ppo.vllm_gpu_memory_utilization, tensor_parallel_size=ppo.vllm_tensor_parallel_size,
        max_model_len=ppo.vllm_max_model_len or max_prompt_tokens + ppo.response_length,
        max_num_seqs=ppo.local_rollout_forward_batch_size, sleep_mode=ppo.vllm_enable_sleep_mode,
        bucket_bytes=ppo.vllm_sync_bucket_mb << 20, seed=cfg.train.seed, trust_remote_code=cfg.model.trust_remote_code)
    return VLLMRollouts(policy_engine, settings, layout.device, world_size=layout.data_parallel_size)


def build_rollout_session(cfg: Config) -> RolloutSession:
    rlhf_type = cfg.algorithm.rlhf_type
    critic_free = rlhf_type in CRITIC_FREE_TYPES
    check_logprob_impl(cfg.algorithm.logprob_impl)
    run_dir = make_run_dir(cfg)
    setup_logging(run_dir)
    logger.info("run directory: %s", run_dir)
    engine_name = decide_rollout_engine(cfg.ppo.rollout_engine)
    if not cfg.data.dataset and not cfg.ppo.reward_model_id_or_path:
        apply_builtin_task(cfg, engine=engine_name)
    cf_settings = critic_free_settings(cfg) if critic_free else None
    with_reference = cf_settings.needs_reference if critic_free else True
    for warning in unused_flag_warnings(cfg, needs_reference=with_reference):
        logger.warning(warning)
    if cfg.ppo.reward_model_type:
        logger.warning("--reward_model_type %s has no effect: hpalign reads the reward model's architecture from "
                       "its own config.json", cfg.ppo.reward_model_type)
    trusted = cfg.model.trust_remote_code
    tokenizer = load_tokenizer(resolve_model(cfg.model.model, trust_remote_code=trusted))
    template = templates.resolve_template(tokenizer, cfg.model.template, cfg.model.model_type)
    data = prepare_data(cfg, "prompt", template)
    if not data.train:
        raise ValueError(f"--rlhf_type {rlhf_type} has no training prompts: check --dataset")
    cfg.ppo.reward_funcs = decide_reward_funcs(cfg, builtin=data.builtin)
    if data.builtin and not cfg.ppo.reward_model_id_or_path:
        keep_arithmetic_prompts(data, num_eval=cfg.data.num_eval_generations)
    rules = rule_rewards.parse_reward_funcs(cfg.ppo.reward_funcs, cfg.ppo.reward_weights)
    dtype = resolve_dtype(cfg.model.torch_dtype)
    decide_checkpointing_by_memory(cfg, tokens=update_micro_batch_tokens(cfg, data.train), dtype=dtype)
    cfg.train.disable_dropout = True if cfg.train.disable_dropout is None else cfg.train.disable_dropout
    old_logprobs = old_logprobs_source(cfg.ppo.old_logprobs, needed=needs_old_logprobs(cfg), dtype=dtype,
                                       engine=engine_name)
    cfg.ppo.rollout_engine = engine_name
    if old_logprobs != "none":  # recorded as decided (nothing reads the flag when none are needed)
        cfg.ppo.old_logprobs = old_logprobs
    if distributed.is_main():  # the resolved config, every decision above included
        save_config(cfg, run_dir / "config.yaml")
    lora = None if cfg.tuning.sft_type == "full" else LoraSettings(
        targets=cfg.tuning.lora_target_modules, rank=cfg.tuning.lora_rank, alpha=cfg.tuning.lora_alpha,
        dropout=cfg.tuning.lora_dropout)
    models = build_ppo_models(model=cfg.model.model, ref_model=cfg.model.ref_model,
                              reward_model=cfg.ppo.reward_model_id_or_path, dtype=dtype, attn_impl=cfg.model.attn_impl,
                              gradient_checkpointing=cfg.train.gradient_checkpointing, lora=lora, seed=cfg.train.seed,
                              no_dropout=cfg.train.disable_dropout, with_value=not critic_free,
                              with_reference=with_reference, trust_remote_code=trusted,
                              zero3_config=zero3_loading_config(run_deepspeed_config(cfg, dtype)))
    check_reward_tokenizer(tokenizer, models.reward_tokenizer_dir, trust_remote_code=trusted)
    limit_checkpointing(cfg, models.policy, models.value and models.value.lm)
    if cfg.data.packing:
        backend = varlen_backend(cfg.model.attn_impl)
        for model in (models.policy, models.reference, models.value and models.value.lm,
                      models.reward and models.reward.lm):
            if model is not None:
                enable_varlen_attention(model, backend=backend)
    stop_ids = tuple(template.stop_token_ids) if cfg.ppo.stop_token == "eos" else ()
    settings = rollout_settings(cfg, stop_ids)
    world = distributed.layout().data_parallel_size
    plan = BatchPlan(len(data.train), settings.prompts_per_rank, 1, world)
    num_steps = total_steps(plan, num_train_epochs=cfg.train.num_train_epochs, max_steps=cfg.train.max_steps)
    optimizer_steps = num_steps * settings.num_epochs * settings.num_mini_batches
    (policy_engine, value_engine, reference, reward), guards = build_engines(cfg, models, dtype=dtype,
                                                                             optimizer_steps=optimizer_steps)
    models.reward = reward
    check_models_on_device({"policy": policy_engine.module, "value": value_engine and value_engine.module,
                            "reference": reference, "reward": reward}, distributed.layout().device)
    scoring, train_policy = make_scoring(models, policy_engine, value_engine, reference, rules,
                                         packed=cfg.data.packing, impl=cfg.algorithm.logprob_impl,
                                         temperature=settings.sampling.temperature, old_logprobs=old_logprobs,
                                         with_reference=with_reference)
    if critic_free:
        objective = CriticFreeObjective(cf_settings, policy_engine=policy_engine, policy_forward=train_policy)
    else:
        objective = PPOObjective(ppo_settings(cfg), policy_engine=policy_engine, value_engine=value_engine,
                                 policy_forward=train_policy, value_forward=scoring.values,
                                 eos_ids=tuple(template.stop_token_ids))
    rollout_engine = make_rollout_engine(engine_name, cfg, policy_engine, pad_id=tokenizer.pad_token_id,
                                         max_prompt_tokens=max(len(p.prompt_ids) for p in data.train))
    collate = make_collate(pad_id=tokenizer.pad_token_id, packed=cfg.data.packing,
                           max_tokens=cfg.data.max_tokens_per_batch,
                           group_prompts=cfg.data.share_prompt and settings.num_generations > 1)
    logger.info("%s: %d prompts per step (%d per rank) x %d responses, %d steps, %d optimizer steps per step; "
                "rollouts on %s; rewards: %s", rlhf_type, plan.global_batch, settings.prompts_per_rank,
                settings.num_generations, num_steps, settings.num_epochs * settings.num_mini_batches, engine_name,
                ", ".join(([cfg.ppo.reward_model_id_or_path] if cfg.ppo.reward_model_id_or_path else [])
                          + [f"{r.name} x{r.weight:g}" for r in rules]))
    return RolloutSession(cfg=cfg, run_dir=run_dir, tokenizer=tokenizer, template=template, data=data,
                          policy_engine=policy_engine, value_engine=value_engine, rollout_engine=rollout_engine,
                          scoring=scoring, objective=objective, settings=settings, plan=plan, num_steps=num_steps,
                          collate=collate, guards=guards)


def build_engines(cfg: Config, models: PPOModelSet, *, dtype: torch.dtype, optimizer_steps: int):
    """((policy engine, value engine or None, frozen reference or None, frozen reward model or None),
    the trainable engines' non-finite guards by name)."""
    ds_config = run_deepspeed_config(cfg, dtype)
    engines, guards = [], {}
    for name, model in (("policy", models.policy), ("value", models.value)):
        if model is None:
            engines.append(None)
            continue
        engine, guards[name] = engine_lib.build_engine(
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
    return (engines[0], engines[1], reference, reward), guards


def steps_between_samples(num_steps: int, num_sample_generations: int) -> int:
    """PPOv2's sample cadence: num_sample_generations tables spread evenly over the run (0: never)."""
    if num_sample_generations <= 0:
        return 0
    return max(1, math.floor(num_steps / num_sample_generations))
