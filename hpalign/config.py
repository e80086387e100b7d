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

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
        default="auto", metadata={"help": "Attention backend: auto, sdpa, eager, flash_attention_2."})
    ref_model: str | None = field(
        default=None, metadata={"help": "Reference model directory (default: the policy's starting weights)."})


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
    packing: bool = field(default=True, metadata={"help": "Pack sequences into token-budget rows."})
    max_tokens_per_batch: int | None = field(
        default=None, metadata={"help": "Token budget per packed row (default: max_length)."})
    num_eval_generations: int = field(
        default=32, metadata={"help": "Held-out prompts generated greedily for the task metric."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per held-out prompt."})


@dataclass
class AlgorithmConfig:
    rlhf_type: str = field(default="dpo", metadata={"help": "dpo, kto, cpo, orpo, simpo, rm, ppo or sft."})
    beta: float | None = field(
        default=None, metadata={"help": "KL strength (DPO, KTO, CPO 0.1; SimPO 2.0); ORPO's lambda."})
    rpo_alpha: float = field(default=1.0, metadata={"help": "DPO: weight of the NLL loss on the chosen answer."})
    loss_type: str = field(default="sigmoid", metadata={"help": "DPO loss: sigmoid, ipo or hinge."})
    label_smoothing: float = field(default=0.0, metadata={"help": "DPO conservative label smoothing."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "CPO / SimPO: NLL weight."})
    simpo_gamma: float = field(default=1.0, metadata={"help": "SimPO reward margin."})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO lambda_D."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO lambda_U."})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Run the reference once over the data and cache its log-probs."})
    logprob_impl: str = field(default="auto", metadata={"help": "Per-token log-prob path: auto, cuda, torch."})


@dataclass
class TrainConfig:
    output_dir: str = field(default="output", metadata={"help": "Runs go to output_dir/<run_name>/."})
    run_name: str | None = field(default=None, metadata={"help": "Run directory name (default: time-stamped)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training data."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs decide)."})
    batch_size: int = field(default=1, metadata={"help": "Examples (pairs) per micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak LR (default 1e-4 LoRA, 1e-5 full)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps with linear warm-up, then cosine decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, init and dropout."})
    eval_steps: int = field(default=50, metadata={"help": "Evaluate the held-out split every N steps (0: only at the ends)."})
    save_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N steps (and at the end)."})
    logging_steps: int = field(default=5, metadata={"help": "Log metrics every N steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "checkpoint directory, or `latest` for the newest in the run dir."})
    deepspeed: str = field(
        default="zero0", metadata={"help": "zero0, zero2, zero3, zero3_offload, or a DeepSpeed JSON file."})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={"help": "none, wandb, tensorboard."})
    eval_before_train: bool = field(default=True, metadata={"help": "Evaluate the held-out split before training."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: all cores)."})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "tuning": TuningConfig,
    "data": DataConfig,
    "algorithm": AlgorithmConfig,
    "train": TrainConfig,
}

# Old or alternative spellings -> canonical field name.
FLAG_ALIASES: dict[str, str] = {
    "model_id_or_path": "model",
    "per_device_train_batch_size": "batch_size",
    "lr": "learning_rate",
    "lora_r": "lora_rank",
    "train_type": "sft_type",
}
