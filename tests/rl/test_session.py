"""What a rollout session (PPO, the GRPO family) decides before it builds anything."""

from __future__ import annotations

import pytest

from hpalign.cli import build_config
from hpalign.data.types import TokenizedExample
from hpalign.rl.session import (
    BUILTIN_REWARD_FUNCS,
    critic_free_settings,
    decide_reward_funcs,
    needs_old_logprobs,
    old_logprobs_source,
    ppo_settings,
    rollout_settings,
    steps_between_samples,
    update_micro_batch_tokens,
)


def _cfg(*flags):
    return build_config(["--rlhf_type", "ppo", *flags])


def test_reward_funcs_default_to_the_builtin_rules_without_a_reward_model():
    assert decide_reward_funcs(_cfg(), builtin=True) == BUILTIN_REWARD_FUNCS["ppo"] == ["accuracy", "length"]
    grpo = build_config(["--rlhf_type", "grpo"])
    assert decide_reward_funcs(grpo, builtin=True) == BUILTIN_REWARD_FUNCS["critic_free"] == ["accuracy"]
    assert decide_reward_funcs(_cfg("--reward_model_id_or_path", "rm"), builtin=True) == []
    assert decide_reward_funcs(_cfg("--reward_funcs", "emoji"), builtin=False) == ["emoji"]
    with pytest.raises(ValueError, match="needs a reward"):
        decide_reward_funcs(_cfg("--dataset", "x.jsonl"), builtin=False)


def test_ppo_batch_defaults_to_eight_prompts_unless_given():
    assert _cfg().train.batch_size == 8
    assert _cfg("--batch_size", "2").train.batch_size == 2
    assert build_config(["--rlhf_type", "dpo"]).train.batch_size == 1


def test_update_micro_batches_count_prompt_plus_full_length_responses():
    prompts = [TokenizedExample([1] * 40, [], "a"), TokenizedExample([1] * 60, [], "b")]
    assert update_micro_batch_tokens(_cfg("--batch_size", "8", "--response_length", "53"), prompts) == 8 * (50 + 53)


def test_settings_carry_every_ppo_flag():
    cfg = _cfg("--batch_size", "2", "--gradient_accumulation_steps", "3", "--num_mini_batches", "2",
               "--num_ppo_epochs", "5", "--local_rollout_forward_batch_size", "7", "--response_length", "9",
               "--temperature", "0.9", "--kl_coef", "0.2", "--kl_estimator", "k3", "--whiten_rewards", "true",
               "--gamma", "0.9", "--lam", "0.5", "--cliprange", "0.3", "--cliprange_value", "0.4", "--vf_coef", "0.6",
               "--missing_eos_penalty", "2")
    settings, ppo = rollout_settings(cfg, stop_ids=(3,)), ppo_settings(cfg)
    assert settings.rollouts_per_rank == 12 and settings.rollout_chunk == 7 and settings.num_epochs == 5
    assert settings.num_generations == 1 and settings.prompts_per_rank == 12
    assert settings.sampling == type(settings.sampling)(max_new_tokens=9, temperature=0.9, stop_ids=(3,))
    assert (ppo.kl_coef, ppo.kl_estimator, ppo.whiten_rewards, ppo.gamma, ppo.lam) == (0.2, "k3", True, 0.9, 0.5)
    assert (ppo.cliprange, ppo.cliprange_value, ppo.vf_coef, settings.missing_eos_penalty) == (0.3, 0.4, 0.6, 2.0)


def test_settings_carry_every_grpo_flag():
    cfg = build_config(["--rlhf_type", "grpo", "--batch_size", "6", "--num_generations", "3", "--num_iterations", "2",
                        "--num_mini_batches", "2", "--beta", "0.1", "--epsilon", "0.1", "--epsilon_high", "0.3",
                        "--scale_rewards", "batch", "--loss_type", "dr_grpo", "--mask_truncated_completions", "true",
                        "--response_length", "20"])
    settings, grpo = rollout_settings(cfg, stop_ids=()), critic_free_settings(cfg)
    assert (settings.num_generations, settings.num_epochs, settings.rollouts_per_rank, settings.prompts_per_rank) == (
        3, 2, 12, 4)
    assert (grpo.estimator, grpo.num_generations, grpo.beta, grpo.epsilon, grpo.epsilon_high, grpo.scale_rewards,
            grpo.loss_type, grpo.mask_truncated_completions, grpo.max_completion_length, grpo.on_policy) == (
        "grpo", 3, 0.1, 0.1, 0.3, "batch", "dr_grpo", True, 20, False)
    assert grpo.kl_in_loss and not grpo.kl_in_reward and grpo.needs_reference


def test_grpo_family_defaults_and_groups():
    grpo, rloo, rpp = (critic_free_settings(build_config(["--rlhf_type", t])) for t in ("grpo", "rloo",
                                                                                     "reinforce_pp"))
    assert (grpo.beta, grpo.num_generations, grpo.epsilon, grpo.epsilon_high, grpo.loss_type, grpo.scale_rewards) == (
        0.04, 8, 0.2, None, "grpo", "group")
    assert (rloo.beta, rloo.num_generations, rpp.beta, rpp.num_generations) == (0.05, 4, 0.01, 4)
    assert grpo.on_policy and rloo.kl_in_reward and rpp.kl_in_reward and not grpo.kl_in_reward
    assert build_config(["--rlhf_type", "grpo"]).ppo.missing_eos_penalty is None  # TRL's GRPOTrainer has none
    assert build_config(["--rlhf_type", "grpo", "--missing_eos_penalty", "0.5"]).ppo.missing_eos_penalty == 0.5
    assert _cfg().ppo.missing_eos_penalty == 1.0
    assert not critic_free_settings(build_config(["--rlhf_type", "grpo", "--beta", "0"])).needs_reference
    with pytest.raises(ValueError, match="do not split into groups of --num_generations 3"):
        build_config(["--rlhf_type", "grpo", "--batch_size", "8", "--num_generations", "3"])
    with pytest.raises(ValueError, match="--num_generations is 1"):
        build_config(["--rlhf_type", "rloo", "--num_generations", "1"])
    with pytest.raises(ValueError, match="--loss_type 'sigmoid'"):
        build_config(["--rlhf_type", "grpo", "--loss_type", "sigmoid"])


def test_sample_cadence():
    assert steps_between_samples(100, 10) == 10
    assert steps_between_samples(3, 10) == 1
    assert steps_between_samples(100, 0) == 0


def test_config_errors_for_ppo_choices():
    with pytest.raises(ValueError, match="--stop_token 'never'"):
        _cfg("--stop_token", "never")
    with pytest.raises(ValueError, match="--old_logprobs 'cached'"):
        _cfg("--old_logprobs", "cached")
    with pytest.raises(ValueError, match="--reward_weights has 1 values for 2"):
        _cfg("--reward_funcs", "emoji", "length", "--reward_weights", "1")


def test_builtin_ppo_keeps_the_arithmetic_questions():
    from hpalign.data import builtin
    from hpalign.data.types import LoadReport
    from hpalign.rl.session import keep_arithmetic_prompts
    from hpalign.train.datasets import PreparedData

    prompts = [example.prompt for example in builtin.builtin_dataset("prompt", "train")]
    train = [TokenizedExample([i], [], "x") for i in range(len(prompts))]
    data = PreparedData(train=train, val=[], val_prompts=prompts[:40], report=LoadReport(), builtin=True,
                        train_prompts=prompts)
    keep_arithmetic_prompts(data, num_eval=32)
    assert len(data.train) == len(data.train_prompts) == 232  # the built-in set's arithmetic questions
    assert all(prompts[example.prompt_ids[0]] is p for example, p in zip(data.train, data.train_prompts, strict=True))
    from hpalign.rl.rewards import arithmetic_answer

    assert all(arithmetic_answer(p[-1]["content"]) is not None for p in data.val_prompts)
    assert len(data.val_prompts) == 32  # of the held-out split's 38 arithmetic questions


def test_learning_rate_default_for_ppo_with_lora():
    assert _cfg().train.learning_rate == 3e-4
    assert _cfg("--sft_type", "full").train.learning_rate == 1e-5
    assert _cfg("--learning_rate", "1e-5").train.learning_rate == 1e-5


def test_old_logprobs_come_from_the_sampler_in_float32_with_hf_unless_asked():
    import torch

    assert _cfg().ppo.old_logprobs == "auto"
    assert old_logprobs_source("auto", needed=True, dtype=torch.float32, engine="hf") == "sampler"
    assert old_logprobs_source("auto", needed=True, dtype=torch.float32, engine="vllm") == "recompute"
    for dtype in (torch.bfloat16, torch.float16):
        assert old_logprobs_source("auto", needed=True, dtype=dtype, engine="hf") == "recompute"
    assert old_logprobs_source("recompute", needed=True, dtype=torch.float32, engine="hf") == "recompute"
    assert old_logprobs_source("sampler", needed=True, dtype=torch.bfloat16, engine="vllm") == "sampler"
    assert old_logprobs_source("recompute", needed=False, dtype=torch.float32, engine="hf") == "none"


def test_old_logprobs_are_needed_by_ppo_and_by_off_policy_or_kl_in_reward_critic_free_runs():
    assert needs_old_logprobs(_cfg())
    assert not needs_old_logprobs(build_config(["--rlhf_type", "grpo"]))  # on-policy, KL in the loss
    assert needs_old_logprobs(build_config(["--rlhf_type", "grpo", "--num_iterations", "2"]))
    assert needs_old_logprobs(build_config(["--rlhf_type", "rloo"]))  # KL in the reward
    assert not needs_old_logprobs(build_config(["--rlhf_type", "rloo", "--beta", "0"]))


def test_builtin_task_settings_fill_only_what_the_user_left_unset():
    from hpalign.rl.session import apply_builtin_task

    grpo = build_config(["--rlhf_type", "grpo"])
    apply_builtin_task(grpo, engine="hf")
    assert (grpo.train.max_steps, grpo.train.batch_size, grpo.ppo.response_length, grpo.train.learning_rate,
            grpo.tuning.lora_target_modules, grpo.data.num_eval_generations) == (20, 16, 96, 5e-4, ["ALL"], 38)
    vllm = build_config(["--rlhf_type", "grpo"])
    apply_builtin_task(vllm, engine="vllm")
    assert vllm.train.max_steps == 40
    given = build_config(["--rlhf_type", "rloo", "--learning_rate", "1e-4", "--num_train_epochs", "2",
                          "--response_length", "40"])
    apply_builtin_task(given, engine="hf")
    assert (given.train.learning_rate, given.train.max_steps, given.ppo.response_length) == (1e-4, -1, 40)
    full = build_config(["--rlhf_type", "grpo", "--sft_type", "full"])
    apply_builtin_task(full, engine="hf")
    assert full.train.learning_rate == 1e-5 and full.tuning.lora_target_modules == ["DEFAULT"]
    ppo = _cfg()
    apply_builtin_task(ppo, engine="hf")
    assert (ppo.train.max_steps, ppo.train.batch_size, ppo.ppo.response_length) == (24, 8, 53)
