"""The TRL side of the GRPO benchmark: TRL 1.16's GRPOTrainer (HF generate, no vLLM) for a given
number of optimizer steps, each timed by phase. A child process of the benchmark (the parent reads
its peak RSS through `os.wait4`), run with the main environment's python (TRL is the `[bench]` extra):

  python benchmarks/trl_grpo.py --spec spec.json

Spec (JSON object; `SPEC_REQUIRED` must be given, `SPEC_DEFAULTS` may be):
  model_dir            HF causal LM directory: the policy and (full fine-tuning) the reference
  prompts              jsonl of {"prompt": "text" | [chat messages], "messages": [chat messages]?}: text is
                       taken as already rendered with hpalign's template (TRL tokenizes it as it is; checked
                       to add no special token), messages go through the tokenizer's chat template. One kind
                       for all rows. "messages" (optional) are what the rule rewards read when the prompt is
                       text. Rows are used in file order (no shuffling: the parent puts them in hpalign's)
  reward_funcs         hpalign rule rewards by name (`hpalign.rl.rewards.REWARD_FUNCS`, e.g. ["accuracy"]),
                       each wrapped as a TRL reward function (`trl_reward`); default ["accuracy"] unless a
                       reward model is given
  reward_model_dir     AutoModelForSequenceClassification with 1 label, or null; beside the rules, weight 1
  sft_type             "lora" (r 8, alpha 32, dropout 0, all linear layers, as trl_trainers.LORA; the reference
                       is the adapter-disabled policy) | "full" (TRL loads a frozen reference copy)
  per_device_train_batch_size  completions per micro-batch (TRL's); x gradient_accumulation_steps = the
                       completions of one optimizer step (one generation batch); / num_generations = prompts
  stop_token_ids       hpalign's stop ids, or null: TRL's must be the same (checked)
  the rest             GRPOConfig fields of the same name, defaulting to hpalign's GRPO defaults
                       (`hpalign.hyperparams.GRPOParams`; temperature and max_completion_length = PPO's
                       temperature and response_length); learning_rate null: hpalign's rollout default
                       (3e-4 LoRA, 1e-5 full); gradient_checkpointing: TRL's own default (true); dtype of the
                       weights (float32; TRL's bf16 autocast stays off).
Pinned to hpalign's settings whatever the spec: top_k 0, top_p 1, min_p None, repetition_penalty 1
(the logits processors generate builds are recorded and must be temperature alone), dropout off
(TRL: on), cosine learning-rate decay without warm-up (TRL: linear), no dataset shuffle.

Timers (wall clock; on CUDA each mark synchronises), per optimizer step, by wrapping the trainer's
own methods on the instance:
  step         from `get_batch_samples` (the loop fetching the step's micro-batches) to the end of the
               step's `_maybe_log_save_evaluate` (TRL's metric logging)
  generation   the policy's `generate` calls (HF generate; 0 in a step reusing a generation batch,
               num_iterations > 1)
  scoring      the rest of `_generate_and_score_completions`: prompt tokenisation, padding, decoding,
               the old (when needed) and reference log-prob forwards (`logps_s`), the rewards
               (`rewards_s`), advantages, TRL's metrics (`scoring_other_s` = scoring - logps - rewards)
  update       `training_step` time outside `_prepare_inputs` (forward, loss, backward) plus the time
               from the last micro-batch to `on_step_end` (gradient clipping, optimizer, scheduler)
  other        the rest: the batch fetch, `_prepare_inputs`' split and shuffle, logging, callbacks
so step_s = generation_s + scoring_s + update_s + other_s. rollout_tokens counts the completion tokens
TRL kept (up to and including the first stop token), prompt_tokens the prompt tokens of every
completion (each prompt num_generations times).

Output (JSON): {"tool": "trl", "trl_version", "trainer", "settings" (the spec), "generation" (the
generate settings and logits processors of the first call), "eos_token_ids", "prompts_per_generation",
"completions_per_step", "peak_gpu_mib" (CUDA only), "steps": [{step_s, generation_s, scoring_s,
update_s, other_s, logps_s, rewards_s, scoring_other_s, rollout_tokens, prompt_tokens, completions,
generations, metrics: a few of TRL's logged values}]}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

SPEC_REQUIRED = ("model_dir", "prompts", "steps", "sft_type", "output")
SPEC_DEFAULTS: dict = {
    "reward_funcs": None, "reward_model_dir": None, "pad_token": None, "dtype": "float32", "stop_token_ids": None,
    "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": None,
    "gradient_checkpointing": True, "seed": 0,
    # hpalign's GRPO defaults (hyperparams.GRPOParams; PPOConfig's temperature and response_length)
    "num_generations": 8, "max_completion_length": 53, "temperature": 0.7, "beta": 0.04, "epsilon": 0.2,
    "epsilon_high": None, "loss_type": "grpo", "scale_rewards": "group", "num_iterations": 1,
    "mask_truncated_completions": False,
}
GRPO_CONFIG_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                    "gradient_checkpointing", "seed", "num_generations", "max_completion_length", "temperature",
                    "beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards", "num_iterations",
                    "mask_truncated_completions")
# hpalign samples softmax(logits / T): no top-k, top-p, min-p, repetition penalty (rollout.py, vllm_engine.py)
PINNED_SAMPLING = {"top_k": 0, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0}
LOGGED_METRICS = ("loss", "reward", "reward_std", "kl", "entropy", "completions/mean_length", "step_time")
PHASES = ("generation", "scoring", "update", "other")


# ----------------------------------------------------------------------------- spec


def read_spec(path: str | Path) -> dict:
    """The spec file with `SPEC_DEFAULTS` filled in; ValueError on a missing, unknown or bad value."""
    from trl_ppo import spec_from_file

    spec = spec_from_file(path, SPEC_REQUIRED, SPEC_DEFAULTS)
    if min(spec["steps"], spec["per_device_train_batch_size"], spec["gradient_accumulation_steps"],
           spec["num_iterations"]) < 1 or spec["num_generations"] < 2:
        raise ValueError("steps, per_device_train_batch_size, gradient_accumulation_steps and num_iterations must "
                         "be >= 1, num_generations >= 2 (GRPO compares responses within a group)")
    if completions_per_step(spec) % spec["num_generations"]:
        raise ValueError(f"per_device_train_batch_size x gradient_accumulation_steps = {completions_per_step(spec)} "
                         f"completions per step do not hold whole groups of num_generations = "
                         f"{spec['num_generations']}")
    if spec["reward_funcs"] is None:
        spec["reward_funcs"] = [] if spec["reward_model_dir"] else ["accuracy"]
    from hpalign.rl.rewards import parse_reward_funcs

    parse_reward_funcs(spec["reward_funcs"])  # unknown or repeated names: hpalign's own message
    if not spec["reward_funcs"] and not spec["reward_model_dir"]:
        raise ValueError("no reward: give reward_funcs (e.g. [\"accuracy\"]) or a reward_model_dir")
    if spec["learning_rate"] is None:
        from hpalign.config import DEFAULT_LEARNING_RATE, PPO_LORA_LEARNING_RATE

        spec["learning_rate"] = PPO_LORA_LEARNING_RATE if spec["sft_type"] == "lora" else DEFAULT_LEARNING_RATE["full"]
    return spec


def completions_per_step(spec: dict) -> int:
    """Completions of one optimizer step in one process: TRL's generation batch (steps_per_generation =
    gradient_accumulation_steps)."""
    return spec["per_device_train_batch_size"] * spec["gradient_accumulation_steps"]


def prompts_needed(spec: dict) -> int:
    """Prompts of all generation batches: one every num_iterations optimizer steps."""
    return math.ceil(spec["steps"] / spec["num_iterations"]) * completions_per_step(spec) // spec["num_generations"]


# ----------------------------------------------------------------------------- prompts and rewards


def prompt_dataset(spec: dict, tokenizer):
    """The first `prompts_needed` rows as TRL's dataset ("prompt", and "messages" when every row has them)."""
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    needed = prompts_needed(spec)
    if len(rows) < needed:
        raise ValueError(f"{spec['prompts']}: {len(rows)} prompts; {spec['steps']} steps need {needed}")
    rows = rows[:needed]
    kinds = {type(row["prompt"]).__name__ for row in rows}
    if kinds not in ({"str"}, {"list"}):
        raise ValueError(f"{spec['prompts']}: prompts of kinds {sorted(kinds)}; give all as text or all as messages")
    for row in rows if kinds == {"str"} else ():
        if tokenizer(row["prompt"])["input_ids"] != tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]:
            raise ValueError(f"TRL tokenizes text prompts with the tokenizer's special tokens, which add tokens to "
                             f"{row['prompt'][:60]!r}...: give messages, or a tokenizer that adds none")
    if kinds == {"str"} and spec["reward_funcs"] and not all("messages" in row for row in rows):
        raise ValueError("the rule rewards read the question from chat messages: give every text prompt its "
                         "\"messages\", or give the prompts as messages")
    columns = {"prompt": [row["prompt"] for row in rows]}
    if all("messages" in row for row in rows):
        columns["messages"] = [row["messages"] for row in rows]
    return Dataset.from_dict(columns)


def trl_reward(name: str) -> Callable[..., list[float]]:
    """hpalign's rule reward `name` as a TRL reward function: TRL calls it with the batch's prompts
    (text or messages), completions (text, or [{"role": "assistant", "content": text}] for message
    prompts; decoded without special tokens, as hpalign's) and the dataset's other columns; the rule
    reads chat messages, from the "messages" column when the prompts are text."""
    from hpalign.rl.rewards import REWARD_FUNCS

    rule = REWARD_FUNCS[name]

    def reward(prompts: list, completions: list, messages: list | None = None, **_) -> list[float]:
        chats = messages if messages is not None else prompts
        if any(isinstance(chat, str) for chat in chats):
            raise ValueError(f"reward {name!r} reads chat messages; the prompts are text and no \"messages\" "
                             "column was given")
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return rule(chats, texts)

    reward.__name__ = name  # TRL's metric name: rewards/<name>/mean
    return reward


# ----------------------------------------------------------------------------- timing


class StepTimer:
    """The marks and sums of one optimizer step at a time (module docstring); `steps` holds the
    finished ones, `generation` what the first generate call sampled with."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.step: dict | None = None
        self.scoring = False  # inside _generate_and_score_completions
        self.generation: dict = {}  # the first generate call's settings and logits processors

    def now(self) -> float:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        self.step = {"begin": self.now(), "generation_s": 0.0, "gen_and_score_s": 0.0, "prepare_s": 0.0,
                     "train_steps_s": 0.0, "logps_s": 0.0, "rewards_s": 0.0, "rollout_tokens": 0,
                     "prompt_tokens": 0, "completions": 0, "generations": 0, "metrics": {}}

    def add(self, key: str, value: float) -> None:
        if self.step is not None:
            self.step[key] += value

    def mark(self, name: str) -> None:
        if self.step is not None:
            self.step[name] = self.now()

    def close(self) -> None:
        """Ends the open step if its optimizer step is done (called after each logging call)."""
        if self.step is None or "update_end" not in self.step:
            return
        s, end = self.step, self.now()
        scoring = s["gen_and_score_s"] - s["generation_s"]
        update = s["train_steps_s"] - s["prepare_s"] + (s["update_end"] - s["train_end"])
        step_s = end - s["begin"]
        self.steps.append({
            "step_s": step_s, "generation_s": s["generation_s"], "scoring_s": scoring, "update_s": update,
            "other_s": step_s - s["generation_s"] - scoring - update, "logps_s": s["logps_s"],
            "rewards_s": s["rewards_s"], "scoring_other_s": scoring - s["logps_s"] - s["rewards_s"],
            **{k: s[k] for k in ("rollout_tokens", "prompt_tokens", "completions", "generations", "metrics")}})
        self.step = None


def wrap(obj, name: str, timer: StepTimer, *, key: str | None = None, before: Callable[[], None] | None = None,
         after: Callable[..., None] | None = None, when: Callable[[], bool] = lambda: True) -> None:
    """Replaces the method `obj.name` (on the instance) by one that runs `before()`, adds its duration to
    the open step's `key`, then runs `after(result, *args, **kwargs)`; only while `when()`."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        if not when():
            return original(*args, **kwargs)
        if before:
            before()
        start = timer.now()
        out = original(*args, **kwargs)
        if key:
            timer.add(key, timer.now() - start)
        if after:
            after(out, *args, **kwargs)
        return out

    setattr(obj, name, wrapper)


def record_generate(timer: StepTimer) -> Callable[..., None]:
    def after(out, *args, generation_config=None, **kwargs) -> None:
        timer.add("generations", 1)
        if "do_sample" not in timer.generation and generation_config is not None:
            keys = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
                    "eos_token_id", "pad_token_id")
            timer.generation.update({k: getattr(generation_config, k, None) for k in keys})

    return after


def record_processors(timer: StepTimer) -> Callable[..., None]:
    def after(processors, *args, **kwargs) -> None:  # runs inside generate, before its own `after`
        timer.generation.setdefault("logits_processors", [type(p).__name__ for p in processors])

    return after


def count_completions(timer: StepTimer) -> Callable[..., None]:
    def after(out, prompt_ids, *args, **kwargs) -> None:
        completion_ids, _ = out
        timer.add("rollout_tokens", sum(len(ids) for ids in completion_ids))
        timer.add("prompt_tokens", sum(len(ids) for ids in prompt_ids))
        timer.add("completions", len(completion_ids))

    return after


def install_timers(trainer, timer: StepTimer) -> None:
    """Wraps the trainer's methods so the marks of `StepTimer` fall where the module docstring says."""
    model = trainer.model  # what unwrap_model_for_generation hands back in one process
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    scoring = lambda: timer.scoring  # noqa: E731

    wrap(trainer, "get_batch_samples", timer, before=timer.begin)
    wrap(trainer, "training_step", timer, key="train_steps_s", after=lambda *a, **k: timer.mark("train_end"))
    wrap(trainer, "_prepare_inputs", timer, key="prepare_s")
    wrap(trainer, "_generate_and_score_completions", timer, key="gen_and_score_s",
         before=lambda: setattr(timer, "scoring", True), after=lambda *a, **k: setattr(timer, "scoring", False))
    wrap(trainer, "_get_per_token_logps_and_entropies", timer, key="logps_s", when=scoring)
    wrap(trainer, "_calculate_rewards", timer, key="rewards_s")
    wrap(trainer, "_generate_single_turn", timer, after=count_completions(timer))
    wrap(model, "generate", timer, key="generation_s", after=record_generate(timer))
    wrap(base, "_get_logits_processor", timer, after=record_processors(timer))
    wrap(trainer, "_maybe_log_save_evaluate", timer, after=lambda *a, **k: timer.close())


def step_callback(timer: StepTimer):
    from transformers import TrainerCallback

    class StepMarks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timer.mark("update_end")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and timer.step is not None:
                timer.step["metrics"].update({k: logs[k] for k in LOGGED_METRICS if k in logs})

    return StepMarks()


def sampling_problems(generation: dict, temperature: float) -> list[str]:
    """Where TRL's generate call sampled from another distribution than hpalign's softmax(logits / T)."""
    if not {"logits_processors", "do_sample"} <= set(generation):
        return ["no generate call was recorded: TRL's generation path changed"]
    expected = [] if temperature == 1.0 else ["TemperatureLogitsWarper"]
    problems = [] if generation["logits_processors"] == expected else [
        f"logits processors {generation['logits_processors']}, expected {expected}"]
    if not generation["do_sample"] or generation["temperature"] != temperature:
        problems.append(f"do_sample {generation['do_sample']}, temperature {generation['temperature']}")
    return problems


# ----------------------------------------------------------------------------- the run


def load_tokenizer(spec: dict, model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if spec["pad_token"] is not None:
        if spec["pad_token"] not in tokenizer.get_vocab():
            raise ValueError(f"pad_token {spec['pad_token']!r} is not in {model_dir}'s vocabulary")
        tokenizer.pad_token = spec["pad_token"]
    return tokenizer


def grpo_config(spec: dict, out_dir: Path):
    from trl import GRPOConfig

    return GRPOConfig(output_dir=str(out_dir), max_steps=spec["steps"], use_vllm=False, shuffle_dataset=False,
                      disable_dropout=True, bf16=False, fp16=False, lr_scheduler_type="cosine", warmup_steps=0,
                      remove_unused_columns=False, logging_steps=1, save_strategy="no", eval_strategy="no",
                      report_to="none", disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
                      **PINNED_SAMPLING, **{key: spec[key] for key in GRPO_CONFIG_KEYS})


def reward_funcs(spec: dict, dtype) -> list:
    funcs: list = [trl_reward(name) for name in spec["reward_funcs"]]
    if spec["reward_model_dir"]:
        from transformers import AutoModelForSequenceClassification

        funcs.append(AutoModelForSequenceClassification.from_pretrained(spec["reward_model_dir"], num_labels=1,
                                                                        dtype=dtype))
    return funcs


def check_stop_ids(spec: dict, trainer) -> None:
    if spec["stop_token_ids"] is not None and sorted(trainer.eos_token_ids) != sorted(spec["stop_token_ids"]):
        raise ValueError(f"TRL stops at {trainer.eos_token_ids} (tokenizer EOS + the model's generation_config), "
                         f"hpalign at {spec['stop_token_ids']}: the tools would sample different lengths")


def run(spec: dict) -> dict:
    """Trains `spec["steps"]` GRPO steps with TRL; returns the result written to spec["output"]."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import tempfile

    import torch
    import trl
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer
    from trl_trainers import LORA

    dtype = getattr(torch, spec["dtype"])
    tokenizer = load_tokenizer(spec, spec["model_dir"])
    dataset = prompt_dataset(spec, tokenizer)
    peft_config = None
    if spec["sft_type"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(**LORA, task_type="CAUSAL_LM")
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out_dir:
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype),
                              reward_funcs=reward_funcs(spec, dtype), args=grpo_config(spec, Path(out_dir)),
                              train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                              callbacks=[step_callback(timer)])
        check_stop_ids(spec, trainer)
        install_timers(trainer, timer)
        trainer.train()
    if len(timer.steps) != spec["steps"]:
        raise RuntimeError(f"timed {len(timer.steps)} GRPO steps, asked for {spec['steps']}: TRL's loop changed")
    problems = sampling_problems(timer.generation, spec["temperature"])
    if problems:
        raise RuntimeError("TRL did not sample as hpalign does: " + "; ".join(problems))
    return {"tool": "trl", "trl_version": trl.__version__, "trainer": "trl.GRPOTrainer",
            "settings": {k: v for k, v in spec.items() if k != "output"}, "generation": timer.generation,
            "eos_token_ids": list(trainer.eos_token_ids), "completions_per_step": completions_per_step(spec),
            "prompts_per_generation": completions_per_step(spec) // spec["num_generations"],
            "steps": timer.steps, "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON spec (see the module docstring)")
    spec = read_spec(parser.parse_args(argv).spec)
    result = run(spec)
    Path(spec["output"]).write_text(json.dumps(result, indent=1) + "\n")
    for k, step in enumerate(result["steps"]):
        print(f"step {k + 1}: {step['step_s']:.3f} s (" + ", ".join(f"{p} {step[f'{p}_s']:.3f}" for p in PHASES)
              + f"), {step['rollout_tokens']} rollout tokens")


if __name__ == "__main__":
    main()
