"""The TRL side of the PPO benchmark: TRL's PPOv2 trainer for a given number of PPO steps, each timed
by phase. A child process of the benchmark (the parent reads its peak RSS through `os.wait4`):

  PY=$(scripts/trl_ppo_env.sh)           # a venv with TRL 1.12.0 over this environment's packages
  $PY benchmarks/trl_ppo.py --spec spec.json

TRL 1.13 removed `trl.experimental.ppo`; 1.12.0 is the last release with it, and it runs unchanged on
this environment's transformers 5 / torch / accelerate / peft, so `scripts/trl_ppo_env.sh` installs
just that wheel (`--no-deps`) into a venv that sees the main site-packages.

Spec (JSON object; `SPEC_REQUIRED` must be given, `SPEC_DEFAULTS` may be):
  model_dir            HF causal LM directory: the policy and (full fine-tuning) the reference
  prompts              jsonl of {"prompt": [chat messages] | "text"}: messages go through the tokenizer's
                       chat template with the generation prompt; text is taken as already rendered
                       (no special tokens added), so a parent can give hpalign's exact prompt ids.
                       Step k samples rows [k * R, (k + 1) * R), R = batch_size * gradient_accumulation_steps
                       (no shuffling: the parent puts the rows in hpalign's order).
  reward_model_dir     AutoModelForSequenceClassification with 1 label, or null: model_dir's backbone with
                       a fresh score head (seeded)
  value_model_dir      the same kind; default: reward_model_dir (TRL's own example does this)
  batch_size           TRL's per_device_train_batch_size (micro-batch of the update)
  steps                PPO steps; total_episodes = steps * R
  sft_type             "lora" (r 8, alpha 32, dropout 0, all linear layers, as trl_trainers.LORA; the
                       reference is the adapter-disabled policy; the value model is trained in full) | "full"
  output               where the result JSON goes
  pad_token            needed when the tokenizer has none or pads with its EOS token: TRL's PPO treats every
                       pad id as padding (it would mask the prompt's and the response's EOS tokens)
  dtype                of all four models' weights (float32; bfloat16 for GPU runs)
  stop_token           eos | none, as hpalign's --stop_token
  the rest             TRL PPOConfig fields of the same name (gradient_accumulation_steps, num_mini_batches,
                       num_ppo_epochs, response_length, temperature, learning_rate (default: 1e-4 LoRA,
                       1e-5 full, as hpalign), seed, kl_coef, ...)
TRL's PPOTrainer reads neither `bf16` nor `gradient_checkpointing` (it builds its own Accelerator and
never enables checkpointing), so the spec has neither: TRL runs as it ships.

Timers (wall clock; each mark calls `torch.cuda.synchronize` on CUDA), hooked into `PPOTrainer.train()` by
wrapping the module-level helpers it calls (`trl.experimental.ppo.ppo_trainer.<name>`) and its dataloader:
  step         from the loop taking the next prompt batch to the next one (the last: `on_train_end`)
  generation   the `batch_generation` call (HF `generate`, `output_scores=True`)
  scoring      from there to the first training `forward(model, ...)`: old log-probs (TRL takes them from
               the generation logits: `selective_log_softmax` only, no forward), reference log-probs
               (`forward` of the reference + `selective_log_softmax`), values and scores (`get_reward` of
               the value and reward models), then truncation, rewards, GAE, whitening, TRL's gc.collect
  update       from the first training forward to `on_step_end`: num_ppo_epochs x mini-batches x
               micro-batches of forward, loss, backward, optimizer, then TRL's metrics and lr step
  other        the batch fetch before generation plus TRL's clean-up after `on_step_end` (gc.collect)
so step_s = generation_s + scoring_s + update_s + other_s; old_logprobs_s, ref_logprobs_s, values_s and
scores_s are parts of scoring_s (scoring_other_s the rest), gc_s is the time in TRL's two gc.collect
calls (one in scoring, one in other). rollout_tokens counts the response tokens generate produced: per
row up to and including the first stop token, else the full generated width (response_width).

Output (JSON): {"tool": "trl", "trl_version", "trainer", "settings" (the spec), "pad_token",
"rollout_batch_size", "peak_gpu_mib" (CUDA only), "steps": [{step_s, generation_s, scoring_s,
update_s, other_s, <scoring parts>_s, scoring_other_s, gc_s, rollout_tokens, prompt_tokens,
response_width, metrics: a few of TRL's logged values}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

TRL_PPO_MODULE = "trl.experimental.ppo.ppo_trainer"
SPEC_REQUIRED = ("model_dir", "prompts", "batch_size", "steps", "sft_type", "output")
SPEC_DEFAULTS: dict = {
    "reward_model_dir": None, "value_model_dir": None, "pad_token": None, "dtype": "float32",
    # hpalign's PPO defaults under TRL's PPOv2 names (TRL's own differ in missing_eos_penalty and stop_token: None)
    "gradient_accumulation_steps": 1, "num_mini_batches": 1, "num_ppo_epochs": 4, "response_length": 53,
    "temperature": 0.7, "learning_rate": None, "seed": 0, "kl_coef": 0.05, "kl_estimator": "k1",
    "cliprange": 0.2, "vf_coef": 0.1, "cliprange_value": 0.2, "gamma": 1.0, "lam": 0.95,
    "local_rollout_forward_batch_size": 64, "missing_eos_penalty": 1.0, "stop_token": "eos",
    "whiten_rewards": False,
}
PPO_CONFIG_KEYS = ("gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs", "response_length",
                   "temperature", "learning_rate", "seed", "kl_coef", "kl_estimator", "cliprange", "vf_coef",
                   "cliprange_value", "gamma", "lam", "local_rollout_forward_batch_size", "missing_eos_penalty",
                   "whiten_rewards")
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}  # hpalign's (and bench_train.py's) per sft_type
LOGGED_METRICS = ("objective/kl", "objective/scores", "loss/policy_avg", "loss/value_avg", "val/num_eos_tokens")
SCORING_PARTS = ("old_logprobs", "ref_logprobs", "values", "scores")


# ----------------------------------------------------------------------------- spec


def spec_from_file(path: str | Path, required: tuple[str, ...], defaults: dict) -> dict:
    """A spec file with `defaults` filled in; ValueError on a missing or unknown key or a bad sft_type
    (shared by the TRL children: trl_ppo.py, trl_grpo.py)."""
    given = json.loads(Path(path).read_text())
    missing = [k for k in required if k not in given]
    unknown = sorted(set(given) - set(required) - set(defaults))
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}; "
                         f"required {list(required)}, optional {sorted(defaults)}")
    spec = {**defaults, **given}
    if spec["sft_type"] not in ("lora", "full"):
        raise ValueError(f"sft_type {spec['sft_type']!r}: use lora or full")
    return spec


def read_spec(path: str | Path) -> dict:
    """The spec file with `SPEC_DEFAULTS` filled in; ValueError on a missing, unknown or bad value."""
    spec = spec_from_file(path, SPEC_REQUIRED, SPEC_DEFAULTS)
    if spec["steps"] < 1 or spec["batch_size"] < 1:
        raise ValueError(f"steps ({spec['steps']}) and batch_size ({spec['batch_size']}) must be >= 1")
    if spec["stop_token"] not in ("eos", "none", None):
        raise ValueError(f"stop_token {spec['stop_token']!r}: use eos or none (as hpalign's --stop_token)")
    spec["value_model_dir"] = spec["value_model_dir"] or spec["reward_model_dir"]
    spec["learning_rate"] = spec["learning_rate"] or DEFAULT_LR[spec["sft_type"]]
    return spec


def rollout_batch_size(spec: dict) -> int:
    """Prompts per PPO step in one process (TRL's local_batch_size)."""
    return spec["batch_size"] * spec["gradient_accumulation_steps"]


# ----------------------------------------------------------------------------- counting


def response_tokens(responses_BT, stop_ids: list[int]) -> int:
    """Tokens generate produced: per row up to and including the first stop token, else all T."""
    import torch

    width = responses_BT.shape[1]
    if not stop_ids or width == 0:
        return responses_BT.numel()
    is_stop_BT = torch.isin(responses_BT, torch.tensor(stop_ids, device=responses_BT.device))
    first_B = torch.where(is_stop_BT.any(1), is_stop_BT.int().argmax(1) + 1, width)
    return int(first_B.sum())


def stop_token_ids(generation_config) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


# ----------------------------------------------------------------------------- timing


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Marks of one PPO step at a time (see the module docstring); `steps` holds the finished ones."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.marks: dict[str, float] = {}
        self.step: dict = {}
        self.phase = "idle"  # idle | data | generation | scoring | update | done
        self.after_ref_forward = False

    def now(self) -> float:
        _sync()
        return time.perf_counter()

    def begin_step(self) -> None:
        if self.phase == "data":  # the dataloader restarted its epoch while fetching this step's batch
            return
        t = self.now()
        if self.marks:
            self._close(t)
        self.marks, self.phase = {"begin": t}, "data"
        self.step = {"rollout_tokens": 0, "prompt_tokens": 0, "response_width": 0, "gc_s": 0.0, "metrics": {},
                     **{f"{part}_s": 0.0 for part in SCORING_PARTS}}

    def mark(self, name: str, *, phase: str) -> None:
        self.marks[name] = self.now()
        self.phase = phase

    def add(self, part: str, seconds: float) -> None:
        self.step[f"{part}_s"] += seconds

    def finish(self) -> None:
        if self.marks:
            self._close(self.now())
        self.marks, self.phase = {}, "done"

    def _close(self, end: float) -> None:
        m = self.marks
        if not {"generation_start", "generation_end", "update_start", "update_end"} <= set(m):
            raise RuntimeError(f"a PPO step ended without all its marks ({sorted(m)}): TRL's train() changed")
        scoring = m["update_start"] - m["generation_end"]
        self.steps.append({
            "step_s": end - m["begin"], "generation_s": m["generation_end"] - m["generation_start"],
            "scoring_s": scoring, "update_s": m["update_end"] - m["update_start"],
            "other_s": (m["generation_start"] - m["begin"]) + (end - m["update_end"]),
            "scoring_other_s": scoring - sum(self.step[f"{p}_s"] for p in SCORING_PARTS), **self.step})


def timed_call(timer: PhaseTimer, fn: Callable, classify: Callable[..., str | None]) -> Callable:
    """`fn` with its duration added to the scoring part `classify(*args)` names (None: not timed)."""

    def wrapper(*args, **kwargs):
        part = classify(*args) if timer.phase == "scoring" else None
        if part is None:
            return fn(*args, **kwargs)
        start = timer.now()
        out = fn(*args, **kwargs)
        timer.add(part, timer.now() - start)
        return out

    return wrapper


def install_timers(trainer, timer: PhaseTimer) -> None:
    """Wraps the helpers `PPOTrainer.train()` calls (module globals, looked up at call time) and its
    dataloader, so the marks of `PhaseTimer` fall where the module docstring says."""
    import gc
    import importlib
    import types

    module = importlib.import_module(TRL_PPO_MODULE)
    generate, forward = module.batch_generation, module.forward
    get_reward, log_softmax = module.get_reward, module.selective_log_softmax

    def batch_generation(model, queries_BP, forward_batch_size, pad_token_id, generation_config):
        if timer.phase != "data":  # generate_completions (sample generations are off): not a PPO step
            return generate(model, queries_BP, forward_batch_size, pad_token_id, generation_config)
        timer.mark("generation_start", phase="generation")
        query_responses, logits = generate(model, queries_BP, forward_batch_size, pad_token_id, generation_config)
        timer.mark("generation_end", phase="scoring")
        width = queries_BP.shape[1]
        stops = stop_token_ids(model.generation_config)
        timer.step.update(rollout_tokens=response_tokens(query_responses[:, width:], stops),
                          prompt_tokens=int((queries_BP != pad_token_id).sum()),
                          response_width=query_responses.shape[1] - width)
        return query_responses, logits

    def timed_forward(model, *args, **kwargs):
        if timer.phase == "scoring" and model is trainer.model:  # the first training forward
            timer.mark("update_start", phase="update")
        return forward(model, *args, **kwargs)

    def classify_forward(model, *args) -> str | None:
        if model is trainer.model:
            return None
        timer.after_ref_forward = True
        return "ref_logprobs"

    def classify_log_softmax(*args) -> str:
        part = "ref_logprobs" if timer.after_ref_forward else "old_logprobs"
        timer.after_ref_forward = False
        return part

    def collect(*args) -> int:
        start = timer.now()
        try:
            return gc.collect(*args)
        finally:
            if timer.step:
                timer.step["gc_s"] += timer.now() - start

    module.gc = types.SimpleNamespace(collect=collect)  # only TRL's module sees this `gc`
    module.batch_generation = batch_generation
    module.forward = timed_call(timer, timed_forward, classify_forward)
    module.get_reward = timed_call(timer, get_reward,
                                   lambda model, *a: "scores" if model is trainer.reward_model else "values")
    module.selective_log_softmax = timed_call(timer, log_softmax, classify_log_softmax)
    trainer.dataloader = MarkedLoader(trainer.dataloader, timer.begin_step)


class MarkedLoader:
    """A dataloader that calls `on_next` before each batch is fetched."""

    def __init__(self, loader, on_next: Callable[[], None]) -> None:
        self.loader, self.on_next = loader, on_next

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        while True:
            self.on_next()
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch


def step_callback(timer: PhaseTimer):
    from transformers import TrainerCallback

    class StepMarks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timer.mark("update_end", phase="update")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and timer.phase == "update":
                timer.step["metrics"].update({k: logs[k] for k in LOGGED_METRICS if k in logs})

        def on_train_end(self, args, state, control, **kwargs):
            timer.finish()

    return StepMarks()


# ----------------------------------------------------------------------------- the run


def load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")  # generate needs left
    if spec["pad_token"] is not None:
        if spec["pad_token"] not in tokenizer.get_vocab():
            raise ValueError(f"pad_token {spec['pad_token']!r} is not in {spec['model_dir']}'s vocabulary")
        tokenizer.pad_token = spec["pad_token"]
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{spec['model_dir']}: the tokenizer pads with {tokenizer.pad_token!r}; TRL's PPO takes "
                         "every pad id for padding (masking the EOS tokens of prompts and responses), so give "
                         "a spec \"pad_token\" that is neither EOS nor in any prompt, e.g. \"<|endoftext|>\"")
    return tokenizer


def prompt_dataset(spec: dict, tokenizer):
    """The prompts as TRL's PPO wants them: one `input_ids` column."""
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    needed = rollout_batch_size(spec) * spec["steps"]
    if len(rows) < needed:
        raise ValueError(f"{spec['prompts']}: {len(rows)} prompts; {spec['steps']} steps of "
                         f"{rollout_batch_size(spec)} need {needed}")
    ids = [prompt_ids(row["prompt"], tokenizer) for row in rows[:needed]]
    if any(tokenizer.pad_token_id in row for row in ids):
        raise ValueError(f"a prompt holds the pad token {tokenizer.pad_token!r}, which TRL would mask; pick "
                         "another pad_token")
    return Dataset.from_dict({"input_ids": ids})


def prompt_ids(prompt: str | list[dict], tokenizer) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def load_models(spec: dict) -> dict:
    """policy, ref_model (None with LoRA: TRL disables the adapter), reward_model, value_model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = getattr(torch, spec["dtype"])

    def scorer(directory: str | None, seed: int):
        torch.manual_seed(seed)  # the fresh score head when built from the policy
        return AutoModelForSequenceClassification.from_pretrained(directory or spec["model_dir"], num_labels=1,
                                                                  dtype=dtype)

    return {"model": AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype),
            "ref_model": (None if spec["sft_type"] == "lora" else
                          AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)),
            "reward_model": scorer(spec["reward_model_dir"], spec["seed"]),
            "value_model": scorer(spec["value_model_dir"], spec["seed"] + 1)}


def ppo_config(spec: dict, out_dir: Path):
    from trl.experimental.ppo import PPOConfig

    # bf16 and gradient_checkpointing (TRL's defaults: True) are never read by PPOTrainer, which builds its
    # own Accelerator and never enables checkpointing; False keeps the config honest (and valid on CPU).
    return PPOConfig(output_dir=str(out_dir), per_device_train_batch_size=spec["batch_size"],
                     total_episodes=spec["steps"] * rollout_batch_size(spec), num_sample_generations=0,
                     stop_token=None if spec["stop_token"] in ("none", None) else spec["stop_token"],
                     bf16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                     eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                     **{key: spec[key] for key in PPO_CONFIG_KEYS})


def in_order(trainer, dataset, batch_size: int):
    """TRL's dataloader without its shuffle: step k takes rows [k * batch_size, (k + 1) * batch_size)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=trainer.data_collator,
                        drop_last=True)
    return trainer.accelerator.prepare(loader)


def run(spec: dict) -> dict:
    """Trains `spec["steps"]` PPO steps with TRL; returns the result written to spec["output"]."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import tempfile

    import trl
    from trl.experimental.ppo import PPOTrainer
    from trl_trainers import LORA

    tokenizer = load_tokenizer(spec)
    dataset = prompt_dataset(spec, tokenizer)
    peft_config = None
    if spec["sft_type"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(**LORA, task_type="CAUSAL_LM")
    timer = PhaseTimer()
    with tempfile.TemporaryDirectory(prefix="trl-ppo-") as out_dir:
        trainer = PPOTrainer(args=ppo_config(spec, Path(out_dir)), processing_class=tokenizer,
                             train_dataset=dataset, eval_dataset=dataset, peft_config=peft_config,
                             callbacks=[step_callback(timer)], **load_models(spec))
        trainer.dataloader = in_order(trainer, dataset, rollout_batch_size(spec))
        install_timers(trainer, timer)
        trainer.train()
    if len(timer.steps) != spec["steps"]:
        raise RuntimeError(f"timed {len(timer.steps)} PPO steps, asked for {spec['steps']}")
    return {"tool": "trl", "trl_version": trl.__version__, "trainer": f"{TRL_PPO_MODULE}.PPOTrainer",
            "settings": {k: v for k, v in spec.items() if k != "output"}, "pad_token": tokenizer.pad_token,
            "rollout_batch_size": rollout_batch_size(spec), "steps": timer.steps,
            "peak_gpu_mib": _peak_gpu_mib()}


def _peak_gpu_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON spec (see the module docstring)")
    spec = read_spec(parser.parse_args(argv).spec)
    result = run(spec)
    Path(spec["output"]).write_text(json.dumps(result, indent=1) + "\n")
    for k, step in enumerate(result["steps"]):
        print(f"step {k + 1}: {step['step_s']:.3f} s (generation {step['generation_s']:.3f}, scoring "
              f"{step['scoring_s']:.3f}, update {step['update_s']:.3f}), {step['rollout_tokens']} rollout tokens")


if __name__ == "__main__":
    main()
