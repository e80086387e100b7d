"""One configuration schema for every hpalign command.

The schema is a set of nested dataclasses. On the command line every field is a flat flag with
the field's name (`--beta`, `--rpo_alpha`, `--sft_type` ...), exactly as the `swift rlhf` document
names them, so users' scripts keep working; `FLAG_ALIASES` adds the old spellings beside the new
ones. A config file (`--config run.toml|run.yaml|run.json`, flat or nested by section) supplies
values that flags then override. `parse_config` (in `hpalign.cli_args`) builds the parser from
these dataclasses, so a new field is a new flag with no other edit.

Defaults: `None` means "the algorithm's or mode's own default", resolved by `resolve_defaults`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hpalign.hyperparams import (
    CRITIC_FREE_TYPES,
    HYPERPARAMS,
    ROLLOUT_TYPES,
    all_param_names,
    default_params,
    param_names,
)


@dataclass
class ModelConfig:
    model: str | None = field(
        default=None,
        metadata={"help": "Local HF model directory, `tiny-random-llama`, or `smollm2-135m-instruct` "
                  "(default: the embedded SmolLM2-135M-Instruct). Alias: --model_id_or_path."})
    model_type: str | None = field(
        default=None, metadata={"help": "Model family hint from the swift document (e.g. llama3-8b-instruct); "
                                "only used to pick a chat template when --template is not given."})
    template: str = field(
        default="auto", metadata={"help": "Chat template: auto (the tokenizer's own, else chatml), chatml, "
                                  "or tokenizer (fail if the tokenizer has none)."})
    torch_dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPUs that support it, else fp32), bfloat16, float16, float32."})
    attn_impl: str = field(
        default="auto", metadata={"help": "Attention backend: auto (flash_attention_2 on CUDA with flash-attn "
                                  "and 16-bit weights, else sdpa), sdpa, flash_attention_2, or eager (needs "
                                  "--packing false: packed rows attend per sequence through sdpa or flash-attn)."})
    ref_model: str | None = field(
        default=None, metadata={"help": "Reference model directory (default: the policy's starting weights)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the Python code a model directory ships for its own architecture or "
                                 "tokenizer (`auto_map` in config.json / tokenizer_config.json): for the policy, "
                                 "reference, reward and value models. Off: such a directory is refused with the "
                                 "reason. Turn it on only for directories whose code you trust."})


@dataclass
class TuningConfig:
    sft_type: str = field(default="lora", metadata={"help": "lora or full."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["DEFAULT"],
        metadata={"help": "ALL (every linear layer but the LM head), DEFAULT (attention q,k,v), "
                  "or a list of module names."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})


@dataclass
class DataConfig:
    dataset: list[str] = field(
        default_factory=list,
        metadata={"help": "Training data: jsonl/json/parquet/csv files or datasets.save_to_disk folders "
                  "(default: the built-in emoji preference set)."})
    val_dataset: list[str] = field(default_factory=list, metadata={"help": "Held-out data files."})
    split_dataset_ratio: float = field(
        default=0.01, metadata={"help": "Fraction of --dataset held out when no --val_dataset is given."})
    max_length: int = field(default=1024, metadata={"help": "Max tokens of prompt + response; longer "
                                                    "examples lose prompt tokens from the left (counted)."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip malformed rows (counted and listed) "
                                                         "instead of stopping with an error."})
    packing: bool = field(default=True, metadata={"help": "Pack sequences back to back into rows: no padding is "
                                                  "computed, attention stays within each sequence."})
    max_tokens_per_batch: int | None = field(
        default=None, metadata={"help": "Token budget per packed row (default: none, each micro-batch is one row "
                                "with no padding; a budget splits it into padded rows)."})
    share_prompt: bool = field(
        default=True, metadata={"help": "With packing, lay each pair's prompt out once: the rejected answer "
                                "attends to the prompt before the chosen one instead of repeating it. Exact "
                                "(same log-probs); saves the prompt's compute once per pair. Rollouts (GRPO, "
                                "RLOO, REINFORCE++): the --num_generations completions of a prompt share it."})
    num_eval_generations: int = field(
        default=32, metadata={"help": "Held-out prompts generated greedily for the task metric."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per held-out prompt."})


@dataclass
class AlgorithmConfig:
    """The flags of every offline algorithm, flat as the seed document has them. The algorithm-
    specific ones default to None: `resolve_defaults` fills what the chosen algorithm reads from its
    dataclass in `hpalign.hyperparams` (the one source of defaults), and leaves the others unset."""

    rlhf_type: str = field(default="dpo", metadata={"help": "dpo, kto, cpo, orpo, simpo, rm, ppo, grpo, rloo, "
                                                   "reinforce_pp or sft."})
    beta: float | None = field(
        default=None, metadata={"help": "KL strength (default: DPO, KTO, CPO 0.1; SimPO 2.0); ORPO's lambda (0.1); "
                                "GRPO: weight of the k3 KL to the reference in the loss (0.04; 0 skips the "
                                "reference); RLOO (0.05) / REINFORCE++ (0.01): weight of the KL in the reward."})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "DPO: weight of the NLL loss on the chosen answer (default 1.0)."})
    loss_type: str | None = field(default=None, metadata={"help": "DPO loss: sigmoid (default), ipo or hinge. "
                                  "GRPO family, how token losses are aggregated: grpo (default; mean per "
                                  "response, then over responses), dapo (mean over all tokens), dr_grpo (sum / "
                                  "(responses x --response_length))."})
    label_smoothing: float | None = field(
        default=None, metadata={"help": "DPO, CPO, SimPO: conservative label smoothing (default 0)."})
    cpo_alpha: float | None = field(default=None, metadata={"help": "CPO / SimPO: NLL weight (default 1.0)."})
    simpo_gamma: float | None = field(default=None, metadata={"help": "SimPO reward margin (default 1.0)."})
    desirable_weight: float | None = field(default=None, metadata={"help": "KTO lambda_D (default 1.0)."})
    undesirable_weight: float | None = field(default=None, metadata={"help": "KTO lambda_U (default 1.0)."})
    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "RM: weight of the reward-centring term (r_c + r_r)^2 (arXiv 2312.09244; "
                                "default 0)."})
    num_generations: int | None = field(
        default=None, metadata={"help": "GRPO family: responses sampled per prompt, one group (default: GRPO 8, "
                                "RLOO and REINFORCE++ 4). --batch_size counts responses, as in TRL."})
    epsilon: float | None = field(
        default=None, metadata={"help": "GRPO family: lower clip range of the policy ratio (default 0.2)."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "GRPO family: upper clip range (default: --epsilon; DAPO's clip-higher "
                                "uses 0.28)."})
    scale_rewards: str | None = field(
        default=None, metadata={"help": "GRPO: divide the group-centred rewards by the std of the group (group, "
                                "default), of the whole batch (batch), or not at all (none: Dr. GRPO)."})
    mask_truncated_completions: bool | None = field(
        default=None, metadata={"help": "GRPO family: responses cut by --response_length (no end-of-turn token) "
                                "add nothing to the loss (default false; DAPO's overlong filtering)."})
    num_iterations: int | None = field(
        default=None, metadata={"help": "GRPO family: optimisation epochs over each rollout batch (TRL's mu; "
                                "default 1)."})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Run the reference once over the data and cache its log-probs."})
    logprob_impl: str = field(
        default="auto", metadata={"help": "Per-token log-prob op behind the LM head: auto (the CUDA kernel of csrc/ "
                                  "when it is built and tensors are on CUDA, else torch), cuda (fail at start-up "
                                  "if the kernel is not built), or torch (the chunked torch path)."})


@dataclass
class TrainConfig:
    output_dir: str = field(default="output", metadata={"help": "Runs go to output_dir/<run_name>/."})
    run_name: str | None = field(default=None, metadata={"help": "Run directory name (default: time-stamped)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training data."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs decide)."})
    batch_size: int = field(default=1, metadata={"help": "Examples (pairs) per micro-batch per process (PPO: "
                                                  "prompts, default 8 as TRL's PPO trainer)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak LR (default 1e-4 LoRA, 1e-5 full; "
                                                               "PPO with LoRA 3e-4)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps with linear warm-up, then cosine decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "An update whose loss or gradient is NaN or infinite is skipped (weights "
                             "and optimizer state untouched) and counted; this many skipped updates in a row stop "
                             "the run with an error naming the step and the last checkpoint before it (1: stop "
                             "at the first)."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in backward to save memory (default: on with "
                                "a GPU or full fine-tuning; with LoRA on CPU decided by memory: off while a "
                                "micro-batch's estimated activations fit a quarter of the memory available to the "
                                "rank, else on for the fewest layers that make them fit; recompute costs ~1/3 "
                                "more time)."})
    gradient_checkpointing_layers: int | None = field(
        default=None, metadata={"help": "With gradient checkpointing on: recompute only the first N decoder "
                                "layers (the others keep their activations), between all and nothing. Default: "
                                "every layer, or what the memory rule of --gradient_checkpointing decides."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, init and dropout."})
    eval_steps: int = field(default=100, metadata={"help": "Evaluate held-out preference accuracy every N steps (0: only before and after training, which also run the generation task metric)."})
    save_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N steps (and at the end)."})
    logging_steps: int = field(default=5, metadata={"help": "Log metrics every N steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint directory, or `latest`: the newest complete checkpoint of "
                                "--run_name, or without --run_name of the run under --output_dir (same --rlhf_type) "
                                "that saved last. The run continues exactly: the batch plan (ranks, --batch_size, "
                                "accumulation, data size, seed) must be the checkpoint's, later checkpoints move to "
                                "superseded/, log lines after it are dropped."})
    deepspeed: str = field(
        default="zero0", metadata={"help": "zero0, zero2, zero3, zero3_offload, or a DeepSpeed JSON file."})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={"help": "none, wandb, tensorboard."})
    eval_before_train: bool = field(default=True, metadata={"help": "Evaluate the held-out split before training."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: all cores)."})
    ddp_timeout: int = field(
        default=1800, metadata={"help": "Seconds a rank waits in a collective before the run fails (the process "
                                "group's timeout; HF Trainer's name and default). The ranks that read the "
                                "tokenization cache wait for rank 0 to fill it: raise this for data sets that "
                                "take longer to tokenize the first time (the log prints the time it took)."})
    disable_dropout: bool | None = field(
        default=None, metadata={"help": "Set every dropout probability of the policy and reference to 0 (the "
                                "model's, attention's and LoRA's). Default: on for the algorithms with a "
                                "reference model (DPO, KTO), as TRL does: the adapter-off reference is then "
                                "deterministic and the shared-prompt layout exact; off for the others."})


@dataclass
class PPOConfig:
    """PPO (arXiv 2203.02155) as in the swift document; names and defaults follow TRL's PPOv2 trainer."""

    reward_model_id_or_path: str | None = field(
        default=None, metadata={"help": "PPO: reward model: an hpalign RM checkpoint (adapter or full weights + "
                                "value_head.safetensors; an RM run directory means its latest checkpoint) or an HF "
                                "AutoModelForSequenceClassification directory with one label; the value model "
                                "starts from it too."})
    reward_model_type: str | None = field(
        default=None, metadata={"help": "PPO: the swift document's model family of the reward model (e.g. "
                                "llama3-8b-instruct); accepted for its scripts, but hpalign reads the architecture "
                                "from the reward model's config.json and says so when this is set."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "PPO: prompts per no-grad forward pass while sampling rollouts, per process."})
    whiten_rewards: bool = field(default=False, metadata={"help": "PPO: whiten (normalise) the rewards."})
    kl_coef: float = field(default=0.05, metadata={"help": "PPO: weight of the per-token KL penalty to the reference."})
    cliprange: float = field(default=0.2, metadata={"help": "PPO: clip range of the policy loss."})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO: weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "PPO: clip range of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "PPO: discount factor of the cumulative reward."})
    lam: float = field(default=0.95, metadata={"help": "PPO: GAE lambda (arXiv 1506.02438)."})
    num_sample_generations: int = field(
        default=10, metadata={"help": "PPO: debug samples generated and logged during training."})
    response_length: int = field(default=53, metadata={"help": "PPO: max tokens sampled per response."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "PPO: optimisation epochs over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "PPO: mini-batches each rollout batch is split into."})
    temperature: float = field(default=0.7, metadata={"help": "PPO: sampling temperature of the rollouts (the "
                               "policy's log-probs in training are of the same tempered distribution, as in TRL)."})
    stop_token: str = field(
        default="eos", metadata={"help": "PPO: eos (responses end at the chat template's end-of-turn token, "
                                 "TRL's recipe) or none (always sample --response_length tokens, as the swift "
                                 "document's runs do)."})
    missing_eos_penalty: float | None = field(
        default=1.0, metadata={"help": "PPO / GRPO family: subtracted from the score of a response that reached "
                               "--response_length without an end-of-turn token (none: no penalty; only "
                               "meaningful with --stop_token eos). Default: 1.0 for PPO (TRL PPOv2's recipe), none "
                               "for the GRPO family (TRL's GRPOTrainer has none; --mask_truncated_completions is "
                               "its way to handle cut responses)."})
    kl_estimator: str = field(
        default="k1", metadata={"help": "PPO: per-token KL estimate in the reward: k1 (log pi - log ref, "
                                "unbiased) or k3 ((r - 1) - log r with r = ref / pi, non-negative, lower variance)."})
    old_logprobs: str = field(
        default="auto", metadata={"help": "PPO: the old log-probs of the policy ratio: sampler (those the HF "
                                  "sampler drew with, same model and weights: no extra forward, TRL PPOv2's "
                                  "choice), recompute (a packed no-grad forward after sampling), or auto "
                                  "(sampler in float32, where the two agree to ~1e-6; recompute in 16-bit, "
                                  "where the KV-cached and packed forwards round differently)."})
    reward_funcs: list[str] = field(
        default_factory=list, metadata={"help": "PPO: rule rewards summed into the score: emoji, accuracy, length "
                                        "(hpalign/rl/rewards.py). Default: none with --reward_model_id_or_path; "
                                        "emoji accuracy length on the built-in data without one."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "PPO: one weight per --reward_funcs entry (default 1 each); a reward "
                                "model's score always has weight 1."})
    rollout_engine: str = field(
        default="auto", metadata={"help": "PPO / GRPO family: what samples the rollouts: vllm (an in-process vLLM "
                                  "engine per rank, weights pushed after every update; hpalign/rl/vllm_engine.py), "
                                  "hf (HF generate on the policy), or auto (vllm when a supported vLLM is "
                                  "installed, else hf)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vLLM rollouts on a GPU: share of its memory vLLM may take (weights and KV "
                               "cache), beside training."})
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "vLLM rollouts: ranks one vLLM engine is sharded over (1: an engine per "
                             "rank)."})
    vllm_max_model_len: int | None = field(
        default=None, metadata={"help": "vLLM rollouts: longest prompt + response the engine serves (default: the "
                                "longest training prompt + --response_length)."})
    vllm_enable_sleep_mode: bool = field(
        default=True, metadata={"help": "vLLM rollouts on a GPU: the engine drops its weights and KV cache while "
                                "the trainer computes and takes them back for rollouts (no effect on a CPU)."})
    vllm_sync_bucket_mb: int = field(
        default=512, metadata={"help": "vLLM rollouts: MiB of weights per bucket of the weight sync (under ZeRO-3 "
                               "one bucket is gathered at a time)."})


@dataclass
class Config:
    # Names of the fields the user set (flag or config file), filled by `hpalign.cli_args.parse_config`:
    # a setting another one overrides is then a warning instead of silence. Not a field: never dumped.
    user_set: ClassVar[frozenset[str]] = frozenset()

    model: ModelConfig = field(default_factory=ModelConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "tuning": TuningConfig,
    "data": DataConfig,
    "algorithm": AlgorithmConfig,
    "train": TrainConfig,
    "ppo": PPOConfig,
}

# Old or alternative spellings -> canonical field name.
FLAG_ALIASES: dict[str, str] = {
    "model_id_or_path": "model",
    "per_device_train_batch_size": "batch_size",
    "lr": "learning_rate",
    "lora_r": "lora_rank",
    "train_type": "sft_type",
}


# ---------------------------------------------------------------------------------------------
# Defaults that depend on other fields
# ---------------------------------------------------------------------------------------------

RLHF_TYPES: tuple[str, ...] = tuple(HYPERPARAMS)
DEFAULT_LEARNING_RATE: dict[str, float] = {"lora": 1e-4, "full": 1e-5}
PPO_DEFAULT_BATCH_SIZE = 8  # TRL's per-device batch: one prompt per PPO step would be no batch at all
# PPO takes 4 optimizer steps per rollout batch, tens of steps in all: at 1e-4 a LoRA policy barely moves
# in the embedded default's 14 steps (SmolLM2, measured: no reward gain); 5e-4 overshoots (KL 2.6 by step 7).
PPO_LORA_LEARNING_RATE = 3e-4
DEEPSPEED_PRESETS: tuple[str, ...] = ("zero0", "zero2", "zero3", "zero3_offload")


def resolve_defaults(cfg: Config) -> Config:
    """Return a copy of `cfg` with every `None` meaning "the algorithm's default" filled in.

    The chosen algorithm's hyper-parameters from its dataclass (`hpalign.hyperparams`; beta per
    rlhf_type among them), learning_rate per sft_type (`DEFAULT_LEARNING_RATE`), gradient
    checkpointing on with CUDA. Idempotent; fields the user set are kept.
    """
    out = copy.deepcopy(cfg)
    if out.algorithm.rlhf_type in HYPERPARAMS:
        defaults = default_params(out.algorithm.rlhf_type)
        for name in param_names(out.algorithm.rlhf_type):
            if getattr(out.algorithm, name) is None:
                setattr(out.algorithm, name, getattr(defaults, name))
    if out.algorithm.rlhf_type in ROLLOUT_TYPES and "batch_size" not in cfg.user_set:
        out.train.batch_size = PPO_DEFAULT_BATCH_SIZE
    if out.algorithm.rlhf_type in CRITIC_FREE_TYPES and "missing_eos_penalty" not in cfg.user_set:
        out.ppo.missing_eos_penalty = None
    if out.train.learning_rate is None:
        out.train.learning_rate = DEFAULT_LEARNING_RATE.get(out.tuning.sft_type)
        if out.algorithm.rlhf_type in ROLLOUT_TYPES and out.tuning.sft_type == "lora":
            out.train.learning_rate = PPO_LORA_LEARNING_RATE
    if out.train.gradient_checkpointing is None and (_has_cuda() or out.tuning.sft_type == "full"):
        # Else (LoRA on a CPU) it stays unset: the session decides by memory, see
        # hpalign.train.checkpointing.
        out.train.gradient_checkpointing = True
    return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Validation: every problem at once, each with what to do
# ---------------------------------------------------------------------------------------------

def _choice(errors: list[str], flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"--{flag} {value!r} is not valid; use one of: {', '.join(allowed)}.")


def _at_least(errors: list[str], flag: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        errors.append(f"--{flag} is {value}; it must be >= {low}.")


def _in_range(errors: list[str], flag: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        errors.append(f"--{flag} is {value}; it must be in [{low}, {high}).")


def _model_errors(m: ModelConfig, t: TuningConfig) -> list[str]:
    errors: list[str] = []
    _choice(errors, "template", m.template, ("auto", "chatml", "tokenizer"))
    _choice(errors, "torch_dtype", m.torch_dtype, ("auto", "bfloat16", "float16", "float32"))
    _choice(errors, "attn_impl", m.attn_impl, ("auto", "sdpa", "eager", "flash_attention_2"))
    _choice(errors, "sft_type", t.sft_type, ("lora", "full"))
    _at_least(errors, "lora_rank", t.lora_rank, 1)
    _in_range(errors, "lora_dropout", t.lora_dropout, 0.0, 1.0)
    if not t.lora_target_modules:
        errors.append("--lora_target_modules is empty; give ALL, DEFAULT or module names.")
    return errors


def _data_errors(d: DataConfig) -> list[str]:
    errors: list[str] = []
    _in_range(errors, "split_dataset_ratio", d.split_dataset_ratio, 0.0, 1.0)
    _at_least(errors, "max_length", d.max_length, 16)
    if d.max_tokens_per_batch is not None and d.max_tokens_per_batch < d.max_length:
        errors.append(f"--max_tokens_per_batch {d.max_tokens_per_batch} is below --max_length {d.max_length}: "
                      "a full-length example would not fit; raise it or leave it unset (one row per micro-batch).")
    _at_least(errors, "num_eval_generations", d.num_eval_generations, 0)
    _at_least(errors, "max_new_tokens", d.max_new_tokens, 1)
    return errors


def _algorithm_errors(a: AlgorithmConfig) -> list[str]:
    errors: list[str] = []
    _choice(errors, "rlhf_type", a.rlhf_type, RLHF_TYPES)
    if a.loss_type is not None:
        _choice(errors, "loss_type", a.loss_type,
                ("grpo", "dapo", "dr_grpo") if a.rlhf_type in CRITIC_FREE_TYPES else ("sigmoid", "ipo", "hinge"))
    if a.scale_rewards is not None:
        _choice(errors, "scale_rewards", a.scale_rewards, ("group", "batch", "none"))
    _at_least(errors, "num_generations", a.num_generations, 2 if a.rlhf_type == "rloo" else 1)
    _at_least(errors, "num_iterations", a.num_iterations, 1)
    _at_least(errors, "epsilon", a.epsilon, 0.0)
    _at_least(errors, "epsilon_high", a.epsilon_high, 0.0)
    _choice(errors, "logprob_impl", a.logprob_impl, ("auto", "cuda", "torch"))
    _at_least(errors, "beta", a.beta, 0.0)
    _at_least(errors, "rpo_alpha", a.rpo_alpha, 0.0)
    if a.label_smoothing is not None:
        _in_range(errors, "label_smoothing", a.label_smoothing, 0.0, 0.5)
    _at_least(errors, "cpo_alpha", a.cpo_alpha, 0.0)
    _at_least(errors, "desirable_weight", a.desirable_weight, 0.0)
    _at_least(errors, "undesirable_weight", a.undesirable_weight, 0.0)
    return errors


def _deepspeed_errors(deepspeed: str) -> list[str]:
    if deepspeed in DEEPSPEED_PRESETS:
        return []
    path = Path(deepspeed)
    if path.suffix == ".json" and path.is_file():
        return []
    return [f"--deepspeed {deepspeed!r} is neither a preset ({', '.join(DEEPSPEED_PRESETS)}) "
            "nor an existing .json file; pick a preset or fix the path."]


def _train_errors(t: TrainConfig) -> list[str]:
    errors: list[str] = []
    _at_least(errors, "batch_size", t.batch_size, 1)
    _at_least(errors, "gradient_accumulation_steps", t.gradient_accumulation_steps, 1)
    _in_range(errors, "warmup_ratio", t.warmup_ratio, 0.0, 1.0)
    if t.learning_rate is not None and t.learning_rate <= 0:
        errors.append(f"--learning_rate is {t.learning_rate}; it must be > 0.")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        errors.append("nothing to train: set --num_train_epochs > 0 or --max_steps > 0.")
    _at_least(errors, "max_grad_norm", t.max_grad_norm, 0.0)
    _at_least(errors, "max_nonfinite_steps", t.max_nonfinite_steps, 1)
    _at_least(errors, "logging_steps", t.logging_steps, 1)
    _at_least(errors, "save_steps", t.save_steps, 1)
    _at_least(errors, "eval_steps", t.eval_steps, 0)
    _at_least(errors, "save_total_limit", t.save_total_limit, 1)
    _at_least(errors, "num_threads", t.num_threads, 1)
    _at_least(errors, "ddp_timeout", t.ddp_timeout, 1)
    _at_least(errors, "gradient_checkpointing_layers", t.gradient_checkpointing_layers, 0)
    errors += _deepspeed_errors(t.deepspeed)
    bad = [r for r in t.report_to if r not in ("none", "wandb", "tensorboard")]
    if bad:
        errors.append(f"--report_to {' '.join(bad)} is not supported; use none, wandb and/or tensorboard.")
    return errors


def _ppo_errors(p: PPOConfig) -> list[str]:
    errors: list[str] = []
    for flag in ("local_rollout_forward_batch_size", "response_length", "num_ppo_epochs", "num_mini_batches"):
        _at_least(errors, flag, getattr(p, flag), 1)
    for flag in ("kl_coef", "vf_coef", "cliprange", "cliprange_value", "num_sample_generations"):
        _at_least(errors, flag, getattr(p, flag), 0)
    for flag in ("gamma", "lam"):
        value = getattr(p, flag)
        if not 0.0 <= value <= 1.0:
            errors.append(f"--{flag} is {value}; it must be in [0, 1].")
    if p.temperature <= 0:
        errors.append(f"--temperature is {p.temperature}; it must be > 0 (sampling needs a positive temperature).")
    _choice(errors, "stop_token", p.stop_token, ("eos", "none"))
    _choice(errors, "kl_estimator", p.kl_estimator, ("k1", "k3"))
    _choice(errors, "old_logprobs", p.old_logprobs, ("auto", "sampler", "recompute"))
    _choice(errors, "rollout_engine", p.rollout_engine, ("auto", "vllm", "hf"))
    _in_range(errors, "vllm_gpu_memory_utilization", p.vllm_gpu_memory_utilization, 0.01, 1.0)
    _at_least(errors, "vllm_tensor_parallel_size", p.vllm_tensor_parallel_size, 1)
    _at_least(errors, "vllm_max_model_len", p.vllm_max_model_len, 16)
    _at_least(errors, "vllm_sync_bucket_mb", p.vllm_sync_bucket_mb, 1)
    if p.reward_weights is not None and len(p.reward_weights) != len(p.reward_funcs):
        errors.append(f"--reward_weights has {len(p.reward_weights)} values for {len(p.reward_funcs)} "
                      "--reward_funcs; give one weight per reward function.")
    return errors


# PPO's prompt budget (--max_length - --response_length) must exceed this: it is
# hpalign.data.templates.MIN_PROMPT_TOKENS (not imported: the config stays free of the data layer).
PPO_MIN_PROMPT_TOKENS = 8


def _cross_errors(cfg: Config) -> list[str]:
    errors: list[str] = []
    if cfg.model.attn_impl == "eager" and cfg.data.packing:
        errors.append("--attn_impl eager cannot attend per sequence inside packed rows; use --attn_impl sdpa or "
                      "flash_attention_2 with packing, or --packing false for eager attention.")
    max_length, response_length = cfg.data.max_length, cfg.ppo.response_length
    if cfg.algorithm.rlhf_type in ROLLOUT_TYPES and response_length >= max_length - PPO_MIN_PROMPT_TOKENS:
        errors.append(f"--response_length {response_length} leaves {max_length - response_length} of --max_length "
                      f"{max_length} tokens for the prompt (PPO needs more than {PPO_MIN_PROMPT_TOKENS}); raise "
                      f"--max_length to at least {response_length + PPO_MIN_PROMPT_TOKENS + 1} or lower "
                      f"--response_length to at most {max_length - PPO_MIN_PROMPT_TOKENS - 1}.")
    generations = cfg.algorithm.num_generations
    if cfg.algorithm.rlhf_type in CRITIC_FREE_TYPES and generations:
        responses = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * cfg.ppo.num_mini_batches
        if responses % generations:
            errors.append(f"--batch_size x --gradient_accumulation_steps x --num_mini_batches = {responses} responses "
                          f"per process per step do not split into groups of --num_generations {generations} (a "
                          "group never straddles processes); make it a multiple, e.g. --batch_size "
                          f"{math.lcm(cfg.train.batch_size, generations)}.")
    return errors


# The `ppo` section's flags of PPO's critic and GAE, which the critic-free algorithms do not read; their
# counterparts: --beta (kl_coef), --epsilon (cliprange), --num_iterations (num_ppo_epochs).
CRITIC_ONLY_FLAGS = frozenset({"kl_coef", "cliprange", "vf_coef", "cliprange_value", "gamma", "lam", "whiten_rewards",
                               "num_ppo_epochs"})


def rollout_flags_read(rlhf_type: str) -> set[str]:
    """The `ppo` section's flags `rlhf_type` reads (none for the offline algorithms)."""
    ppo_flags = {f.name for f in dataclasses.fields(PPOConfig)}
    if rlhf_type == "ppo":
        return ppo_flags
    if rlhf_type == "grpo":  # its KL is k3, in the loss
        return ppo_flags - CRITIC_ONLY_FLAGS - {"kl_estimator"}
    if rlhf_type in CRITIC_FREE_TYPES:
        return ppo_flags - CRITIC_ONLY_FLAGS
    return set()


def unused_flag_warnings(cfg: Config, *, needs_reference: bool) -> list[str]:
    """One line per flag the user set that the chosen algorithm does not read (`Config.user_set`)."""
    rlhf_type = cfg.algorithm.rlhf_type
    ppo_flags = {f.name for f in dataclasses.fields(PPOConfig)}
    reads = set(param_names(rlhf_type)) | rollout_flags_read(rlhf_type)
    if needs_reference:
        reads.add("precompute_ref_log_probs")
    specific = all_param_names() | ppo_flags | {"precompute_ref_log_probs"}
    return [f"--{name} is set but --rlhf_type {rlhf_type} does not use it (it reads: "
            f"{', '.join(sorted(reads)) or 'none of the algorithm flags'}); it has no effect"
            for name in sorted(cfg.user_set & (specific - reads))]


def validate(cfg: Config) -> None:
    """Raise one ValueError listing every invalid setting of `cfg`, each with what to do."""
    errors = (_model_errors(cfg.model, cfg.tuning) + _data_errors(cfg.data) + _algorithm_errors(cfg.algorithm)
              + _train_errors(cfg.train) + _ppo_errors(cfg.ppo) + _cross_errors(cfg))
    if errors:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(errors))


# ---------------------------------------------------------------------------------------------
# Files: the resolved configuration is dumped into the run directory and loads back via --config
# ---------------------------------------------------------------------------------------------

def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The configuration nested by section: {"algorithm": {"beta": 0.1, ...}, ...}."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, *, fmt: str = "yaml") -> str:
    """Text of `cfg` as YAML (`fmt="yaml"`, JSON when PyYAML is missing) or JSON (`fmt="json"`)."""
    data = config_to_dict(cfg)
    if fmt == "yaml":
        try:
            import yaml
        except ImportError:
            fmt = "json"
        else:
            return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    if fmt != "json":
        raise ValueError(f"unknown config format {fmt!r}; use yaml or json.")
    return json.dumps(data, indent=2) + "\n"


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write `cfg` to `path` (JSON for a .json path, else YAML; JSON is valid YAML if PyYAML is missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg, fmt="json" if path.suffix == ".json" else "yaml"), encoding="utf-8")
    return path


def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that reads `1e-5` as a float: YAML 1.1 would make it a string."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def _parse_config_text(text: str, suffix: str) -> Any:
    if suffix == ".json":
        return json.loads(text)
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass: no arbitrary objects


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a .toml, .yaml/.yml or .json config file into a dict (flat or nested by section).

    Only the syntax is checked here; `hpalign.cli_args` checks keys and value types.
    """
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json.")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; check the --config path.")
    try:
        data = _parse_config_text(path.read_text(encoding="utf-8"), path.suffix)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data
