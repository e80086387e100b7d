"""The TRL side of the throughput benchmark: one TRL trainer per hpalign algorithm, set up like hpalign.

`trl_rows` turns hpalign's examples into TRL's plain-text rows (hpalign's template applied, so both
tools see identical token ids; TRL's conversational path would add the newline after `<|im_end|>`
as one more completion token). `run_trl` trains on them in one process and writes, per optimizer
step, the wall seconds, the data tokens, the positions the policy's forwards computed (padding
included), the loss and the time spent in each phase.

Shared settings (those of hpalign's run): rows in the given order (a sequential sampler; the file is
already in hpalign's step order), `max_steps` steps of `batch_size` rows, no gradient accumulation,
fp32 weights (bf16 autocast only if `bf16`), AdamW with hpalign's learning rate, LoRA r=8 alpha 32
dropout 0 on every linear layer but the LM head (`--lora_target_modules ALL`) or full fine-tuning,
TRL's gradient checkpointing as asked, no eval, no checkpoints. TRL's defaults otherwise (padding,
its collators, dropout disabled, with LoRA the adapter-disabled model as the reference).

Per algorithm (TRL trainer, config; where the loss differs from hpalign/losses/*.py):
  dpo    DPOTrainer, DPOConfig(loss_type=["sigmoid"], beta); rpo_alpha > 0 adds TRL's "sft" loss with
         that weight (per-token mean NLL of the batch's chosen tokens, as hpalign). Same loss.
  kto    KTOTrainer, KTOConfig(beta, desirable_weight, undesirable_weight). TRL builds the KL pairs by
         rotating the completions by one within each batch, hpalign by a random derangement of the
         global batch: z0 differs after step 1 (at step 1 policy == reference, so both give 0).
  cpo    CPOTrainer, CPOConfig(loss_type="sigmoid", beta, cpo_alpha). Same loss (sum log-probs;
         NLL = per-token mean over the batch's chosen response tokens).
  simpo  CPOTrainer, CPOConfig(loss_type="simpo", beta, simpo_gamma, cpo_alpha): TRL's
         -logsigmoid(beta (m_w - m_l - gamma / beta)) is hpalign's -logsigmoid(beta (m_w - m_l) - gamma).
  orpo   ORPOTrainer, ORPOConfig(beta = lambda). Odds-ratio term the same; TRL's NLL term averages
         over the chosen sequence's prompt AND response tokens (its "full prompt and response"),
         hpalign's over the chosen response tokens only, so the step-1 losses differ by design.
  rm     RewardTrainer, RewardConfig, AutoModelForSequenceClassification(num_labels=1) on the same
         model directory (LoRA task SEQ_CLS: the fresh `score` head is trained in full). hpalign
         scores the last token with its own fresh value head (with a bias; TRL's `score` has none):
         the heads start from different random weights, so step 1 only agrees in that both losses
         are near log 2. (With pad == eos, as in SmolLM2's tokenizer, TRL reads the reward at the
         token before the final `<|im_end|>`.)
  sft    SFTTrainer, SFTConfig(completion_only_loss=True, packing=False) on prompt/completion rows:
         the per-token mean NLL of the batch's completion tokens, as hpalign.

Phases (one optimizer step): "time/forward" is the time inside `compute_loss` (policy and
reference forwards and the loss), "time/backward" from its end to `on_pre_optimizer_step` (backward
and gradient clipping), "time/optimizer" from there to `on_optimizer_step`. On a GPU each mark waits
for the device (`torch.cuda.synchronize`), so the phases hold the device time, not launch time.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED = ("dpo", "kto", "cpo", "simpo", "orpo", "rm", "sft")
LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


# ----------------------------------------------------------------------------- rows


def trl_rows(rlhf_type: str, examples: list[dict], template) -> list[dict]:
    """TRL training rows, one per hpalign example, in the given order: pairs (dpo, cpo, simpo, orpo,
    rm) -> {"prompt", "chosen", "rejected"}; kto -> {"prompt", "completion", "label"}; sft ->
    {"prompt", "completion"}. The prompt (chat messages, or a string: one user message) is rendered by
hpalign's template and
    every response is wrapped in the template's response prefix and suffix (plain text, so TRL
    tokenizes exactly hpalign's ids)."""
    kind = _data_kind(rlhf_type)

    def prompt(example: dict) -> str:
        messages = example["prompt"]  # chat messages (history included), or one user turn as a string
        return template.render_prompt([{"role": "user", "content": messages}] if isinstance(messages, str) else messages)

    def response(text: str) -> str:
        return f"{template.response_prefix}{text}{template.response_suffix}"

    if kind == "pair":
        return [{"prompt": prompt(e), "chosen": response(e["chosen"]), "rejected": response(e["rejected"])}
                for e in examples]
    rows = [{"prompt": prompt(e), "completion": response(e["completion"])} for e in examples]
    if kind == "kto":
        for row, example in zip(rows, examples, strict=True):
            row["label"] = bool(example["label"])
    return rows


def _data_kind(rlhf_type: str) -> str:
    if rlhf_type not in SUPPORTED:
        raise ValueError(f"rlhf_type {rlhf_type!r}: TRL side supports {', '.join(SUPPORTED)}")
    from hpalign.algorithms import get_algorithm

    return get_algorithm(rlhf_type).data_kind


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class TrlAlgorithm:
    """How one hpalign algorithm runs in TRL."""

    module: str  # where the config and trainer classes live
    config: str
    trainer: str
    extra: tuple[str, ...]  # names of the algorithm's own config settings (built by `_extra`)
    token_columns: dict[str, int]  # tokenized column -> how many times its length counts as data tokens
    peft_task: str = "CAUSAL_LM"
    reference: bool = False  # takes `precompute_ref_log_probs`
    defaults: dict = field(default_factory=dict)  # fixed config values


PAIR_IDS = {"prompt_ids": 2, "chosen_ids": 1, "rejected_ids": 1}  # DPO/KTO style: prompt stored once, counted per branch
LEGACY_PAIR_IDS = {"chosen_input_ids": 1, "rejected_input_ids": 1}  # CPO/ORPO: prompt inside both sequences
TRL_ALGORITHMS: dict[str, TrlAlgorithm] = {
    "dpo": TrlAlgorithm("trl", "DPOConfig", "DPOTrainer", ("beta", "rpo_alpha"), PAIR_IDS, reference=True),
    "kto": TrlAlgorithm("trl", "KTOConfig", "KTOTrainer", ("beta", "desirable_weight", "undesirable_weight"),
                        {"prompt_ids": 1, "completion_ids": 1}, reference=True),
    "cpo": TrlAlgorithm("trl.experimental.cpo", "CPOConfig", "CPOTrainer", ("beta", "cpo_alpha"),
                        LEGACY_PAIR_IDS, defaults={"loss_type": "sigmoid"}),
    "simpo": TrlAlgorithm("trl.experimental.cpo", "CPOConfig", "CPOTrainer", ("beta", "simpo_gamma", "cpo_alpha"),
                          LEGACY_PAIR_IDS, defaults={"loss_type": "simpo"}),
    "orpo": TrlAlgorithm("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer", ("beta",), LEGACY_PAIR_IDS),
    "rm": TrlAlgorithm("trl", "RewardConfig", "RewardTrainer", (), {"chosen_ids": 1, "rejected_ids": 1},
                       peft_task="SEQ_CLS"),
    "sft": TrlAlgorithm("trl", "SFTConfig", "SFTTrainer", (), {"input_ids": 1},
                        defaults={"completion_only_loss": True, "packing": False, "shuffle_dataset": False}),
}


def _algorithm(rlhf_type: str) -> TrlAlgorithm:
    _data_kind(rlhf_type)  # validates the name
    return TRL_ALGORITHMS[rlhf_type]


def _extra(spec: dict, names: tuple[str, ...]) -> dict:
    """The algorithm's own settings from the spec; beta None -> hpalign's default for the algorithm."""
    values = {}
    for name in names:
        if name == "beta":
            from hpalign.hyperparams import default_params

            beta = spec["beta"]
            values["beta"] = beta if beta is not None else default_params(spec["rlhf_type"]).beta
        elif name == "rpo_alpha":  # TRL's RPO: the "sft" loss (chosen NLL, per-token mean) with weight alpha
            alpha = spec["rpo_alpha"] or 0.0
            values.update({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, alpha]} if alpha
                          else {"loss_type": ["sigmoid"]})
        else:
            values[name] = spec[name]
    return values


def trl_classes(rlhf_type: str) -> tuple[type, type]:
    """(config class, trainer class) of an algorithm."""
    algorithm = _algorithm(rlhf_type)
    module = importlib.import_module(algorithm.module)
    return getattr(module, algorithm.config), getattr(module, algorithm.trainer)


def trl_config(spec: dict):
    """The algorithm's TRL config: TRL's defaults but for the shared settings (module docstring)."""
    import torch

    algorithm = _algorithm(spec["rlhf_type"])
    config_cls, _ = trl_classes(spec["rlhf_type"])
    kwargs = dict(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["learning_rate"], max_length=spec["max_length"],
        bf16=spec["bf16"], gradient_checkpointing=spec["gradient_checkpointing"], logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", seed=spec["seed"], dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32}, **algorithm.defaults, **_extra(spec, algorithm.extra))
    if algorithm.reference:
        kwargs["precompute_ref_log_probs"] = spec["precompute_ref_log_probs"]
    if spec["bf16"] and not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # transformers allows bf16 autocast on a CPU-only machine only when told so
    return config_cls(**kwargs)


def trl_peft_config(sft_type: str, rlhf_type: str = "dpo"):
    """LoRA r=8, alpha 32, dropout 0 on every linear layer but the LM head / score head
    (hpalign's `--lora_target_modules ALL`); None for full fine-tuning."""
    if sft_type != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(**LORA, task_type=_algorithm(rlhf_type).peft_task)


# ----------------------------------------------------------------------------- timing


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _phase_recorder():
    """A TrainerCallback that times each optimizer step and its phases; `loss_done(start)` is
    called by the trainer's `compute_loss` (see `_in_order`)."""
    from transformers import TrainerCallback

    class PhaseRecorder(TrainerCallback):
        LOGGED = ("loss", "logps/chosen", "logps/rejected")

        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.marks: dict[str, float] = {}
            self.forward = 0.0
            self.positions = 0  # input positions of the step's forwards with autograd on (the policy's)

        def count_positions(self, _module, args) -> None:
            """A forward pre-hook on the input embeddings: the policy's forwards run with autograd on,
            the reference's (and KTO's KL pass) under no_grad; padding positions count, as computed."""
            import torch

            if torch.is_grad_enabled() and args:
                self.positions += args[0].numel()

        def mark(self, name: str) -> float:
            _sync()
            self.marks[name] = time.perf_counter()
            return self.marks[name]

        def loss_done(self, start: float) -> None:
            self.forward += self.mark("loss_end") - start

        def on_step_begin(self, args, state, control, **kwargs):
            self.marks, self.forward, self.positions = {}, 0.0, 0
            self.mark("begin")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.mark("pre_optimizer")

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.mark("optimizer")

        def on_step_end(self, args, state, control, **kwargs):
            m = {**self.marks, "end": self.mark("end")}
            self.steps.append({"seconds": m["end"] - m["begin"], "time/forward": self.forward,
                               "time/backward": m["pre_optimizer"] - m["loss_end"],
                               "time/optimizer": m["optimizer"] - m["pre_optimizer"],
                               "computed_positions": self.positions})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.steps:
                self.steps[-1].update({k: logs[k] for k in self.LOGGED if k in logs})

    return PhaseRecorder()


def _in_order(trainer_cls: type, recorder) -> type:
    """`trainer_cls` with a sequential sampler (rows are already in hpalign's order) and a timed
    `compute_loss`."""
    from torch.utils.data import SequentialSampler

    class InOrder(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

        def compute_loss(self, *args, **kwargs):
            _sync()
            start = time.perf_counter()
            try:
                return super().compute_loss(*args, **kwargs)
            finally:
                recorder.loss_done(start)

    InOrder.__name__ = InOrder.__qualname__ = f"InOrder{trainer_cls.__name__}"
    return InOrder


# ----------------------------------------------------------------------------- the run


def row_tokens(dataset, token_columns: dict[str, int]) -> list[int]:
    """Data tokens of each tokenized row: pairs 2 prompt + chosen + rejected, kto/sft prompt + completion."""
    columns = {name: dataset[name] for name in token_columns}
    return [sum(weight * len(columns[name][i]) for name, weight in token_columns.items())
            for i in range(len(dataset))]


def run_trl(spec: dict) -> None:
    """One TRL training run in this process; writes spec["out_dir"]/steps.jsonl, one line per
    optimizer step: seconds, tokens, loss, time/forward, time/backward, time/optimizer (and TRL's
    logps/chosen, logps/rejected where it logs them)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from datasets import load_dataset
    from transformers import AutoTokenizer

    algorithm = _algorithm(spec["rlhf_type"])
    _, trainer_cls = trl_classes(spec["rlhf_type"])
    recorder = _phase_recorder()
    rows = load_dataset("json", data_files=spec["data"], split="train")
    size, steps = spec["batch_size"], spec["steps"]
    if len(rows) < size * steps:
        raise ValueError(f"{spec['data']}: {len(rows)} rows, {steps} steps of {size} need {size * steps}")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    trainer = _in_order(trainer_cls, recorder)(
        model=spec["model_dir"], args=trl_config(spec), processing_class=tokenizer, train_dataset=rows, peft_config=trl_peft_config(spec["sft_type"], spec["rlhf_type"]), callbacks=[recorder])
    trainer.model.get_input_embeddings().register_forward_pre_hook(recorder.count_positions)
    lengths = row_tokens(trainer.train_dataset, algorithm.token_columns)
    if len(lengths) != len(rows):  # TRL filters rows that do not fit: the order would no longer be hpalign's
        raise ValueError(f"TRL kept {len(lengths)} of {len(rows)} rows (max_length {spec['max_length']})")
    trainer.train()
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    peak_gpu = _peak_gpu_mib()
    with (out / "steps.jsonl").open("w") as handle:
        for k, step in enumerate(recorder.steps):  # sequential sampler: step k = rows [k * size, (k + 1) * size)
            step = {**step, "tokens": sum(lengths[k * size:(k + 1) * size])}
            if peak_gpu is not None:  # the run's peak (the allocator keeps no per-step maximum here)
                step["peak_gpu_mib"] = peak_gpu
            handle.write(json.dumps(step) + "\n")


def _peak_gpu_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
