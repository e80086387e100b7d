"""PPO throughput: hpalign's rollout loop against TRL 1.12's PPOTrainer, same prompts, models and settings.

  python benchmarks/bench_train.py --rlhf_type ppo --vs trl                   # SmolLM2 LoRA, mixed prompts
  python benchmarks/bench_ppo.py --vs trl --prompts builtin                    # hpalign's built-in prompts
  python benchmarks/bench_ppo.py --model tiny-random-llama --vs trl --steps 1 --repeats 1 --response_length 8
  python benchmarks/bench_ppo.py --vs trl --hpalign_engines hf vllm             # hpalign with both rollout engines

Prompts (`--prompts`): `mixed`, user turns of log-uniform length, 10..300 tokens of text, made of
bench_train's words; or `builtin`, the first prompts of `builtin_dataset("prompt", "train")`. hpalign
reads them as chat messages and orders them by its own schedule (`micro_batches_for_step`); TRL gets
the same rows in that order, pre-rendered with hpalign's template (`trl_ppo.py` tokenizes text as it
is), so step k of both tools samples from the same prompt token ids. Checked: TRL's prompt tokens per
step equal hpalign's ids, hpalign loaded every prompt whole, both ran the prompts per step asked.

Models: the policy (`--model`), and one reward model for both: the policy's backbone with a seeded
random score head, saved as an HF sequence-classification directory (TRL's reward and value model,
hpalign's `--reward_model_id_or_path`), padded with a token that is not the end of turn. The same
weights can go to hpalign as an hpalign RM checkpoint (`--hpalign_reward_format rm-checkpoint`).

Runs: child processes, alternating TRL, hpalign, hpalign-vllm, variant ... per repeat, so drift falls
on all. hpalign's rollout engines (`--hpalign_engines`, default hf): `vllm` runs the hpalign child with
`--rollout_engine vllm` (skipped with a message when vLLM is not installed); variants run on hf. Per tool over the steps after `--warmup`: s/step
(median), split into generation / scoring / update / other by each phase's share of the summed step
time (hpalign's `time/*`, its `time/weight_sync` counted in generation; TRL's phases as in
`trl_ppo.py`), rollout tokens/s (generated tokens / generation seconds), episodes/s (prompts per
step / median s/step), peak RSS (`os.wait4`) and, on CUDA, peak GPU memory. Target: hpalign at
least 2x TRL's step throughput at no more memory. What differs by construction is in `NOTES`.

Writes benchmarks/results/ppo_<sft_type>[_<model>][_vs-trl]_<device>_<date>_<prompts>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench_train import (  # noqa: E402
    BASELINE,
    DEFAULT_LR,
    RANDOM_LLAMA_SHAPES,
    REPO,
    VLLM_MISSING,
    device_slug,
    model_directory,
    result_stem,
    run_child,
    vllm_installed,
    write_jsonl,
    write_results,
)
from data_profiles import words  # noqa: E402

PROMPT_SETS = ("mixed", "builtin")
PROMPT_TOKENS = (10, 300)  # text tokens of a mixed prompt, log-uniform
HPALIGN_PROMPTS, TRL_PROMPTS = "hpalign_prompts.jsonl", "trl_prompts.jsonl"
PHASES = ("generation", "scoring", "update", "other")
ENGINES = ("hf", "vllm")  # hpalign's --rollout_engine choices the benchmark runs
TARGET = (2.0, 1.0)  # hpalign / TRL: step throughput at least, peak memory at most
NOTES = (
    "value model: TRL's is a full copy of the reward model, trained in full even with LoRA; hpalign's LoRA "
    "value model is an adapter on the reward model's backbone, which with the adapter off is the reward model "
    "(one copy for both). Full fine-tuning: both train a full copy",
    "reference: the adapter-off policy with LoRA (both), a frozen copy with full fine-tuning (both)",
    "old log-probs: both take them from the sampler's logits (no forward; hpalign's --old_logprobs auto in "
    "float32, recomputed in 16-bit)",
    "LoRA while sampling: hpalign merges the LoRA deltas into weight copies while sampling (one matmul per layer), TRL "
    "samples through the adapter",
    "rollout engine: TRL samples with HF generate, hpalign with HF generate (`hpalign`) or its in-process vLLM "
    "engine (`hpalign-vllm`, which recomputes old log-probs: --old_logprobs auto). hpalign's time/weight_sync "
    "(vLLM: pushing the policy's weights into the engine before each rollout; HF: none) is counted in "
    "generation; vLLM's start-up is in no step, its weights and KV cache are in the peak RSS",
    "layout: TRL pads (left-padded prompts, responses padded to the longest); hpalign packs its scoring and "
    "update passes (no pad tokens computed)",
    "sampling: same prompts, temperature, top_k 0, top_p 1 and stop token, but each tool's own RNG: response "
    "lengths and scores differ by chance",
    "mini-batches: TRL 1.12 accumulates gradients over all mini-batches of an epoch (one optimizer step per "
    "epoch when --num_mini_batches > 1), hpalign steps once per mini-batch; same forward/backward work",
    "gradient checkpointing: TRL's PPOTrainer never checkpoints; hpalign decides itself (auto: shown beside "
    "its ratio), `--variant 'no-gc=--gradient_checkpointing false'` overrides it",
    "learning rate: TRL's one optimizer trains its full value model at the policy's (LoRA) rate too; schedule: "
    "TRL linear decay over PPO steps, hpalign cosine over optimizer steps",
    "step time: TRL's includes its metric gathering and gc.collect calls; hpalign's `time/step` is its "
    "ppo_step (metric all-reduce included, logging after it not)",
)


@dataclass
class PPORun:
    tool: str
    repeat: int
    steps: list[dict]  # every step, warm-up included: <phase>_s, step_s, rollout_tokens, episodes, score
    peak_rss_mib: float
    wall_seconds: float
    peak_gpu_mib: float | None = None
    data: dict | None = None  # hpalign's: summary.json data counts, gradient_checkpointing


@dataclass
class PPOSummary:
    tool: str
    seconds_per_step: float  # median over the timed steps of every repeat
    phase_seconds: dict[str, float]  # the median step split by each phase's share of the summed timed time
    rollout_tokens_per_second: float  # generated tokens / generation seconds, timed steps
    episodes_per_second: float  # prompts per step / median s/step
    mean_response_tokens: float
    peak_rss_mib: float  # max over the runs
    num_timed_steps: int
    peak_gpu_mib: float | None = None
    runs: list[PPORun] = field(default_factory=list)


# ----------------------------------------------------------------------------- prompts


def shortest_prefix(pool: list[str], target: int, count_tokens: Callable[[str], int]) -> str:
    """The fewest leading words of `pool` whose text has at least `target` tokens (all if none do)."""
    low, high = 1, len(pool)
    while low < high:
        middle = (low + high) // 2
        if count_tokens(" ".join(pool[:middle])) >= target:
            high = middle
        else:
            low = middle + 1
    return " ".join(pool[:low])


def mixed_prompt_texts(num_prompts: int, *, seed: int, count_tokens: Callable[[str], int],
                       tokens: tuple[int, int] = PROMPT_TOKENS) -> list[str]:
    """Texts of log-uniform token counts in `tokens` (by `count_tokens`), of bench_train's words."""
    rng = random.Random(seed)
    low, high = tokens
    texts = []
    for _ in range(num_prompts):
        target = round(low * (high / low) ** rng.random())
        pool = words(rng, high).split()  # every word is at least one token: enough for `high`
        texts.append(shortest_prefix(pool, target, count_tokens))
    return texts


def prompt_rows(kind: str, num_prompts: int, *, seed: int, count_tokens: Callable[[str], int]) -> list[dict]:
    """`num_prompts` rows {"prompt": chat messages} of the prompt set `kind` (mixed | builtin)."""
    if kind == "mixed":
        texts = mixed_prompt_texts(num_prompts, seed=seed, count_tokens=count_tokens)
        return [{"prompt": [{"role": "user", "content": text}]} for text in texts]
    from hpalign.data.builtin import builtin_dataset

    examples = builtin_dataset("prompt", "train")
    if len(examples) < num_prompts:
        raise ValueError(f"the built-in set has {len(examples)} prompts; {num_prompts} asked: fewer steps or prompts")
    return [{"prompt": example.prompt} for example in examples[:num_prompts]]


def hpalign_order(num_prompts: int, *, prompts_per_step: int, num_steps: int, seed: int) -> list[list[int]]:
    """Per PPO step, the prompt indices hpalign samples (its schedule, one process)."""
    from hpalign.train.schedule import BatchPlan, micro_batches_for_step

    plan = BatchPlan(num_prompts, prompts_per_step, 1, 1)
    return [micro_batches_for_step(plan, step, seed=seed, rank=0)[0] for step in range(num_steps)]


def rendered_prompt(template, messages: list[dict], ids: list[int]) -> str:
    """hpalign's prompt as text that tokenizes (no special tokens added) to exactly `ids`."""
    tokenizer = template.tokenizer
    text = tokenizer.decode(template.bos_ids) + template.render_prompt(messages)
    if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
        raise ValueError(f"the rendered prompt {text[:80]!r}... does not tokenize to hpalign's ids: TRL would "
                         "see other tokens")
    return text


def stop_and_pad(tokenizer, template) -> tuple[int, str]:
    """(the stop id both tools use, a pad token that is not it). TRL stops at the tokenizer's EOS,
    hpalign at the template's end of turn: they must be the one same id."""
    if list(template.stop_token_ids) != [tokenizer.eos_token_id]:
        raise ValueError(f"hpalign stops at {template.stop_token_ids}, TRL at the EOS id {tokenizer.eos_token_id}: "
                         "the benchmark needs one stop token both tools use")
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.eos_token_id, tokenizer.pad_token
    fallback = "<|endoftext|>"  # SmolLM2 pads with its end of turn
    if fallback in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids(fallback) != tokenizer.eos_token_id:
        return tokenizer.eos_token_id, fallback
    raise ValueError("the tokenizer pads with its EOS and has no <|endoftext|>: TRL would mask every stop token")


def prepare_prompts(tmp_dir: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    """Writes HPALIGN_PROMPTS (chat messages) and TRL_PROMPTS (rendered text, in hpalign's step order);
    returns the pad token, the per-step prompt tokens and length statistics."""
    from transformers import AutoTokenizer

    from hpalign.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = resolve_template(tokenizer)
    _, pad_token = stop_and_pad(tokenizer, template)
    num_steps = args.warmup + args.steps
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows = prompt_rows(args.prompts, args.batch_size * num_steps, seed=args.seed, count_tokens=count_tokens)
    ids = [template.encode_prompt(row["prompt"]) for row in rows]
    budget = args.max_length - args.response_length
    if max(map(len, ids)) > budget:
        raise ValueError(f"a prompt has {max(map(len, ids))} tokens, over --max_length - --response_length = "
                         f"{budget}: hpalign would cut it and TRL not; raise --max_length")
    order = hpalign_order(len(rows), prompts_per_step=args.batch_size, num_steps=num_steps, seed=args.seed)
    write_jsonl(tmp_dir / HPALIGN_PROMPTS, rows)
    write_jsonl(tmp_dir / TRL_PROMPTS, [{"prompt": rendered_prompt(template, rows[i]["prompt"], ids[i])}
                                        for step in order for i in step])
    lengths = [len(p) for p in ids]
    return {"prompts": args.prompts, "num_prompts": len(rows), "pad_token": pad_token,
            "prompt_tokens_min": min(lengths), "prompt_tokens_median": statistics.median(lengths),
            "prompt_tokens_max": max(lengths), "prompt_tokens_per_step": [sum(lengths[i] for i in s) for s in order]}


# ----------------------------------------------------------------------------- reward model


def write_reward_model(model_dir: Path, out_dir: Path, *, pad_token: str, seed: int, form: str) -> Path:
    """`model_dir`'s backbone with a seeded random score head: an HF seq-cls directory ("seq-cls"), or
    the same weights as an hpalign RM checkpoint ("rm-checkpoint": the causal LM + value_head.safetensors
    holding the score weight, bias 0)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report of the new score head (score MISSING) is expected
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = pad_token
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    scorer = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    torch.random.set_rng_state(state)
    scorer.config.pad_token_id = tokenizer.pad_token_id
    if form == "seq-cls":
        scorer.save_pretrained(out_dir)
    else:
        from hpalign.models.value_head import ValueHead, save_value_head

        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # the same backbone weights
        head = ValueHead(lm.config.hidden_size)
        with torch.no_grad():
            head.summary.weight.copy_(scorer.score.weight)
            head.summary.bias.zero_()
        lm.save_pretrained(out_dir)
        save_value_head(head, out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- runs


def learning_rate(args: argparse.Namespace) -> float:
    return args.learning_rate or DEFAULT_LR[args.sft_type]


def micro_batch(args: argparse.Namespace) -> int:
    return args.batch_size // args.num_mini_batches


# hpalign's PPO logs no GPU peak: read it in the child at exit (same measure as trl_ppo.py's).
GPU_PEAK_WRAPPER = (
    "import atexit, json, runpy, sys, torch\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(torch.cuda.max_memory_allocated() / 2**20)))\n"
    "runpy.run_module('hpalign', run_name='__main__', alter_sys=True)\n"
)


def hpalign_launcher(python: str, *, cuda: bool, gpu_file: Path) -> list[str]:
    """`python -m hpalign`, on CUDA through GPU_PEAK_WRAPPER (which writes the GPU peak to `gpu_file`)."""
    return [python, "-c", GPU_PEAK_WRAPPER, str(gpu_file)] if cuda else [python, "-m", "hpalign"]


def hpalign_command(args: argparse.Namespace, model_dir: Path, reward_dir: Path, tmp_dir: Path, run_name: str,
                    extra_flags: list[str] = (), *, engine: str = "hf", python: str = sys.executable) -> list[str]:
    launcher = hpalign_launcher(python, cuda=args.cuda, gpu_file=tmp_dir / f"{run_name}.gpu.json")
    return [
        *launcher, "rlhf", "--rlhf_type", "ppo", "--rollout_engine", engine, "--model", str(model_dir),
        "--reward_model_id_or_path", str(reward_dir),
        "--dataset", str(tmp_dir / HPALIGN_PROMPTS), "--split_dataset_ratio", "0",
        "--max_steps", str(args.warmup + args.steps), "--batch_size", str(micro_batch(args)),
        "--gradient_accumulation_steps", "1", "--num_mini_batches", str(args.num_mini_batches),
        "--num_ppo_epochs", str(args.num_ppo_epochs), "--response_length", str(args.response_length),
        "--temperature", str(args.temperature), "--stop_token", "eos", "--missing_eos_penalty", "1",
        "--learning_rate", str(learning_rate(args)), "--sft_type", args.sft_type, "--lora_target_modules", "ALL",
        "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0", "--max_length", str(args.max_length),
        "--torch_dtype", args.dtype, "--seed", str(args.seed), "--logging_steps", "1",
        "--num_sample_generations", "0", "--eval_before_train", "false", "--num_eval_generations", "0",
        "--eval_steps", "0", "--save_steps", "1000000", "--output_dir", str(tmp_dir), "--run_name", run_name,
        *(["--num_threads", str(args.threads)] if args.threads else []), *extra_flags,
    ]


def trl_spec(args: argparse.Namespace, model_dir: Path, reward_dir: Path, tmp_dir: Path, run_name: str,
             pad_token: str) -> dict:
    """trl_ppo.py's spec: per_device batch x gradient accumulation = the prompts per step (TRL 1.12's
    local batch), split into `num_mini_batches` mini-batches of one micro-batch each."""
    return {"model_dir": str(model_dir), "prompts": str(tmp_dir / TRL_PROMPTS), "reward_model_dir": str(reward_dir),
            "batch_size": micro_batch(args), "gradient_accumulation_steps": args.num_mini_batches,
            "num_mini_batches": args.num_mini_batches, "steps": args.warmup + args.steps, "sft_type": args.sft_type,
            "output": str(tmp_dir / f"{run_name}.json"), "pad_token": pad_token, "dtype": args.dtype,
            "stop_token": "eos", "missing_eos_penalty": 1.0, "response_length": args.response_length,
            "temperature": args.temperature, "num_ppo_epochs": args.num_ppo_epochs,
            "learning_rate": learning_rate(args), "seed": args.seed}


def trl_ppo_python(*, create: bool = True) -> str:
    """The python of scripts/trl_ppo_env.sh's venv (made the first time unless `create` is False)."""
    command = ["bash", str(REPO / "scripts" / "trl_ppo_env.sh"), *([] if create else ["--check"])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or f"{command} failed")
    return done.stdout.strip().splitlines()[-1]


def read_trl_run(path: Path) -> tuple[list[dict], dict]:
    """(steps, {"trl_version", "peak_gpu_mib"}) of trl_ppo.py's result file."""
    result = json.loads(path.read_text())
    steps = [{**{f"{p}_s": s[f"{p}_s"] for p in (*PHASES, "step")}, "rollout_tokens": s["rollout_tokens"],
              "prompt_tokens": s["prompt_tokens"], "episodes": result["rollout_batch_size"],
              "score": s["metrics"].get("objective/scores")} for s in result["steps"]]
    return steps, {"trl_version": result["trl_version"], "peak_gpu_mib": result.get("peak_gpu_mib")}


def read_hpalign_run(run_dir: Path) -> tuple[list[dict], dict]:
    """(steps, summary.json's data counts + the gradient checkpointing and rollout engine it chose) of
    an hpalign rollout run (PPO or GRPO) logged every step; time/weight_sync is counted in generation."""
    import yaml

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps, episodes = [], 0
    for r in (r for r in records if "time/step" in r):
        phases = {f"{p}_s": r[f"time/{p}"] for p in PHASES[:3]}
        phases["generation_s"] += r.get("time/weight_sync", 0.0)
        steps.append({**phases, "step_s": r["time/step"], "other_s": max(0.0, r["time/step"] - sum(phases.values())),
                      "weight_sync_s": r.get("time/weight_sync", 0.0),
                      "rollout_tokens": round(r["rollout/response_length"] * (r["episode"] - episodes)),
                      "episodes": r["episode"] - episodes, "score": r.get("objective/scores", r.get("reward"))})
        episodes = r["episode"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = json.loads((run_dir / "summary.json").read_text())["data"]
    return steps, {**data, "gradient_checkpointing": config["train"]["gradient_checkpointing"],
                   "rollout_engine": config.get("ppo", {}).get("rollout_engine")}


def run_once(args: argparse.Namespace, setup: dict, *, tool: str, repeat: int) -> PPORun:
    tmp_dir, run_name = setup["tmp_dir"], f"{tool}-{repeat}"
    if tool == "trl":
        spec_path = tmp_dir / f"{run_name}.spec.json"
        spec_path.write_text(json.dumps(trl_spec(args, setup["model_dir"], setup["trl_reward"], tmp_dir, run_name,
                                                 setup["pad_token"])))
        command = [setup["trl_python"], str(REPO / "benchmarks" / "trl_ppo.py"), "--spec", str(spec_path)]
    else:
        engine = args.engines.get(tool, "hf")
        command = hpalign_command(args, setup["model_dir"], setup["hpalign_reward"], tmp_dir, run_name,
                                  args.variants[tool], engine=engine, python=setup["pythons"][engine])
    rss_mib, wall = run_child(command, tmp_dir / f"{run_name}.log", threads=args.threads)
    if tool == "trl":
        steps, info = read_trl_run(tmp_dir / f"{run_name}.json")
        return PPORun(tool, repeat, steps, rss_mib, wall, info["peak_gpu_mib"])
    steps, data = read_hpalign_run(tmp_dir / run_name)
    gpu_file = tmp_dir / f"{run_name}.gpu.json"
    peak_gpu = json.loads(gpu_file.read_text()) if gpu_file.is_file() else None
    return PPORun(tool, repeat, steps, rss_mib, wall, peak_gpu, data)


# ----------------------------------------------------------------------------- results


def summarise(runs: list[PPORun], *, tool: str, warmup: int, prompts_per_step: int) -> PPOSummary:
    mine = [r for r in runs if r.tool == tool]
    timed = [s for r in mine for s in r.steps[warmup:]]
    median = statistics.median(s["step_s"] for s in timed)
    total = sum(s["step_s"] for s in timed)
    phases = {p: median * sum(s[f"{p}_s"] for s in timed) / total for p in PHASES}
    generation = sum(s["generation_s"] for s in timed)
    tokens = sum(s["rollout_tokens"] for s in timed)
    gpu = [r.peak_gpu_mib for r in mine if r.peak_gpu_mib is not None]
    return PPOSummary(tool, median, phases, tokens / generation, prompts_per_step / median,
                      tokens / sum(s["episodes"] for s in timed), max(r.peak_rss_mib for r in mine), len(timed),
                      max(gpu) if gpu else None, mine)


def ratios(ours: PPOSummary, trl: PPOSummary) -> dict:
    """hpalign / TRL: step throughput (TRL's s/step over ours), rollout tokens/s, peak memory (GPU when
    both have it, else RSS), and whether TARGET is met."""
    on_gpu = ours.peak_gpu_mib is not None and trl.peak_gpu_mib is not None
    memory = ours.peak_gpu_mib / trl.peak_gpu_mib if on_gpu else ours.peak_rss_mib / trl.peak_rss_mib
    speed = trl.seconds_per_step / ours.seconds_per_step
    return {"step_throughput": speed, "rollout_tokens_per_second": ours.rollout_tokens_per_second /
            trl.rollout_tokens_per_second, "peak_memory": memory, "memory": "GPU" if on_gpu else "RSS",
            "target_met": speed >= TARGET[0] and memory <= TARGET[1]}


def run_check(runs: list[PPORun], *, prompt_tokens_per_step: list[int], prompts_per_step: int,
              response_length: int, num_prompts: int, engines: dict[str, str] | None = None) -> dict:
    """What must agree for the timing to compare like with like (responses differ by sampling)."""
    agree = {}
    for run in runs:
        name = f"{run.tool}-{run.repeat}"
        agree[f"{name}: {len(prompt_tokens_per_step)} steps of {prompts_per_step} prompts, responses <= "
              f"{response_length} tokens"] = len(run.steps) == len(prompt_tokens_per_step) and all(
            s["episodes"] == prompts_per_step and s["rollout_tokens"] <= prompts_per_step * response_length
            for s in run.steps)
        if run.tool == "trl":
            agree[f"{name}: prompt tokens per step = hpalign's"] = [s["prompt_tokens"] for s in run.steps] == \
                prompt_tokens_per_step
        else:
            agree[f"{name}: every prompt loaded whole"] = (run.data["num_train"] == num_prompts and
                                                          run.data["num_skipped"] == run.data["num_truncated"] == 0)
            engine = (engines or {}).get(run.tool, "hf")
            agree[f"{name}: rollouts on {engine}"] = run.data.get("rollout_engine", "hf") == engine
    return {"agree": agree, "all_agree": all(agree.values()), "prompt_tokens_per_step": prompt_tokens_per_step}


def markdown_table(summaries: list[PPOSummary], header: str, *, check: dict | None = None,
                   notes: tuple[str, ...] = NOTES) -> str:
    columns = ("tool", "s/step", "generation s", "scoring s", "update s", "other s", "rollout tokens/s",
               "episodes/s", "response tokens", "peak RSS MiB", "peak GPU MiB", "timed steps")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        gpu = f"{s.peak_gpu_mib:.0f}" if s.peak_gpu_mib is not None else "-"
        lines.append(f"| {s.tool} | {s.seconds_per_step:.2f} | " + " | ".join(f"{s.phase_seconds[p]:.2f}" for p in PHASES)
                     + f" | {s.rollout_tokens_per_second:.0f} | {s.episodes_per_second:.3f} | "
                     f"{s.mean_response_tokens:.1f} | {s.peak_rss_mib:.0f} | {gpu} | {s.num_timed_steps} |")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    trl = next((s for s in summaries if s.tool == "trl"), None)
    for s in (s for s in summaries if trl is not None and s.tool != "trl"):
        r = ratios(s, trl)
        checkpointing = {True: "on", False: "off"}.get((s.runs[0].data or {}).get("gradient_checkpointing"), "?")
        text += (f"\n{s.tool} (gradient checkpointing {checkpointing}) / TRL: step throughput "
                 f"**{r['step_throughput']:.2f}x**, rollout tokens/s {r['rollout_tokens_per_second']:.2f}x, "
                 f"peak {r['memory']} **{r['peak_memory']:.2f}x**; target "
                 f"(>= {TARGET[0]:g}x throughput at <= {TARGET[1]:g}x memory): "
                 f"{'met' if r['target_met'] else 'NOT met'}\n")
    if check:
        failed = [name for name, ok in check["agree"].items() if not ok]
        text += ("\nCheck: " + ("all agree" if not failed else "DISAGREE: " + "; ".join(failed)) + " (prompt tokens "
                 f"per step {check['prompt_tokens_per_step']}, same for both tools)\n")
    return text + "\nBy construction:\n" + "".join(f"- {note}\n" for note in notes)


# ----------------------------------------------------------------------------- main


def requested(argv: list[str]) -> bool:
    """Whether bench_train's command line asks for PPO (`--rlhf_type ppo` or `--rlhf_type=ppo`)."""
    pairs = zip(argv, argv[1:], strict=False)
    return "--rlhf_type=ppo" in argv or any(flag == "--rlhf_type" and value == "ppo" for flag, value in pairs)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hpalign_engines", nargs="+", default=["hf"], choices=ENGINES,
                        help="hpalign's rollout engines, one run each: hf (tool `hpalign`), vllm (`hpalign-vllm`, "
                             "needs vLLM installed)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra hpalign run (HF generate) with these flags, e.g. --variant "
                             "'padded=--packing false'")


def engine_tool(engine: str) -> str:
    return BASELINE if engine == "hf" else f"{BASELINE}-{engine}"


def hpalign_tools(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """args.variants {tool: extra flags} (one per engine, then the --variant ones) and args.engines
    {tool: rollout engine}."""
    engines = list(dict.fromkeys(args.hpalign_engines))
    args.engines = {engine_tool(engine): engine for engine in engines}
    args.variants = {tool: [] for tool in args.engines}
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        if not name or name in args.variants or name in ("trl", *map(engine_tool, ENGINES)):
            parser.error(f"--variant {spec!r}: give a new NAME=FLAGS")
        args.variants[name] = flags.split()
        args.engines[name] = "hf"


def vllm_python() -> str | None:
    """This python when it has vLLM, else None."""
    return sys.executable if vllm_installed() else None


def resolve_engine_pythons(args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """({engine: the python its hpalign child runs with}, skip messages); an engine whose environment
    is missing is dropped from args.tools, args.variants and args.engines."""
    pythons, skipped = {"hf": sys.executable}, []
    if "vllm" in args.engines.values():
        found = vllm_python()
        if found:
            pythons["vllm"] = found
        else:
            tool = engine_tool("vllm")
            skipped.append(f"{tool} skipped: {VLLM_MISSING}")
            print(skipped[-1], flush=True)
            args.tools = [t for t in args.tools if t != tool]
            del args.variants[tool], args.engines[tool]
    return pythons, skipped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rlhf_type", default="ppo", choices=["ppo"], help="bench_train.py hands PPO over here")
    parser.add_argument("--sft_type", default="lora", choices=["lora", "full"])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-random-llama", *RANDOM_LLAMA_SHAPES])
    parser.add_argument("--prompts", default="mixed", choices=PROMPT_SETS)
    parser.add_argument("--vs", choices=["trl"], default=None, help="also run TRL 1.12's PPOTrainer")
    add_engine_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed PPO steps at the start of each run (>= 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool, alternated TRL hpalign TRL ...")
    parser.add_argument("--force", action="store_true", help="time even when the check disagrees")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per PPO step")
    parser.add_argument("--num_mini_batches", type=int, default=1)
    parser.add_argument("--num_ppo_epochs", type=int, default=4)
    parser.add_argument("--response_length", type=int, default=53)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_length", type=int, default=1024, help="hpalign's; every prompt must fit whole")
    parser.add_argument("--learning_rate", type=float, default=None, help="default: 1e-4 LoRA, 1e-5 full")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="both tools' weights; auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--hpalign_reward_format", default="seq-cls", choices=["seq-cls", "rm-checkpoint"],
                        help="how hpalign gets the (same) reward model: the HF seq-cls directory TRL reads, or "
                             "an hpalign RM checkpoint of the same weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both tools (default: $OMP_NUM_THREADS if set)")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if min(args.steps, args.warmup, args.repeats, args.num_mini_batches, args.num_ppo_epochs) < 1:
        parser.error("--steps, --warmup, --repeats, --num_mini_batches and --num_ppo_epochs must be >= 1")
    if args.batch_size % args.num_mini_batches:
        parser.error(f"--batch_size {args.batch_size} must be a multiple of --num_mini_batches {args.num_mini_batches}")
    hpalign_tools(parser, args)
    args.tools = (["trl"] if args.vs == "trl" else []) + list(args.variants)
    args.threads = args.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None)
    return args


def run_all(args: argparse.Namespace, setup: dict) -> tuple[list[PPORun], dict]:
    runs: list[PPORun] = []
    check: dict = {}
    for repeat in range(args.repeats):
        for tool in args.tools:
            run = run_once(args, setup, tool=tool, repeat=repeat)
            timed = [s["step_s"] for s in run.steps[args.warmup:]]
            print(f"{tool:10} repeat {repeat}: {statistics.median(timed):.2f} s/step, {run.peak_rss_mib:.0f} MiB, "
                  f"{run.wall_seconds:.0f} s wall", flush=True)
            runs.append(run)
        check = run_check(runs, prompt_tokens_per_step=setup["prompt_tokens_per_step"],
                          prompts_per_step=args.batch_size, response_length=args.response_length,
                          num_prompts=setup["num_prompts"], engines=args.engines)
        if not check["all_agree"] and not args.force:
            failed = [name for name, ok in check["agree"].items() if not ok]
            raise SystemExit(f"the tools did not run the same work ({'; '.join(failed)}): timing not trusted "
                             "(--force to time anyway)")
    return runs, check


def header_line(args: argparse.Namespace, slug: str, setup: dict, load_before: float) -> str:
    trl = f"TRL {setup['trl_version']} PPOTrainer vs hpalign" if setup.get("trl_version") else "hpalign"
    return (f"ppo {args.sft_type} on {args.model}, {slug} ({platform.machine()}), {trl}; prompts {args.prompts} "
            f"({setup['num_prompts']}, {setup['prompt_tokens_min']}..{setup['prompt_tokens_max']} tokens, median "
            f"{setup['prompt_tokens_median']:g}), {args.batch_size} prompts per step in {args.num_mini_batches} "
            f"mini-batch(es), response_length {args.response_length}, temperature {args.temperature:g}, "
            f"num_ppo_epochs {args.num_ppo_epochs}, lr {learning_rate(args):g}, {args.dtype}, stop at EOS with "
            f"missing_eos_penalty 1, reward model: policy backbone + seeded random head, threads "
            f"{args.threads or 'default'}, {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} "
            f"repeat(s) per tool, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after"
            + "".join(f"; {message}" for message in setup.get("skipped", ())))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    slug, date = device_slug(), dt.date.today().isoformat()
    args.cuda = not slug.startswith("cpu")
    args.dtype = ("bfloat16" if args.cuda else "float32") if args.dtype == "auto" else args.dtype
    pythons, skipped = resolve_engine_pythons(args)
    with tempfile.TemporaryDirectory(prefix="hpalign-bench-ppo-") as tmp:
        tmp_dir = Path(tmp)
        model_dir = model_directory(args.model, tmp_dir)
        setup = {"tmp_dir": tmp_dir, "model_dir": model_dir, "pythons": pythons, "skipped": skipped,
                 **prepare_prompts(tmp_dir, model_dir, args)}
        reward = lambda form: write_reward_model(model_dir, tmp_dir / f"reward-{form}", pad_token=setup["pad_token"],  # noqa: E731
                                                 seed=args.seed, form=form)
        setup["trl_reward"] = reward("seq-cls")
        setup["hpalign_reward"] = (setup["trl_reward"] if args.hpalign_reward_format == "seq-cls"
                                   else reward("rm-checkpoint"))
        setup["trl_python"] = trl_ppo_python() if args.vs == "trl" else None
        runs, check = run_all(args, setup)
        if args.vs == "trl":
            setup["trl_version"] = read_trl_run(tmp_dir / "trl-0.json")[1]["trl_version"]
    summaries = [summarise(runs, tool=t, warmup=args.warmup, prompts_per_step=args.batch_size) for t in args.tools]
    table = markdown_table(summaries, header_line(args, slug, setup, load_before), check=check)
    print("\n" + table)
    meta = {"device": slug, "date": date, **{k: v for k, v in vars(args).items() if k not in ("out_dir", "cuda")},
            "trl": setup.get("trl_version"), "prompt_set": {k: setup[k] for k in setup if k.startswith(("prompt", "num_"))},
            "pad_token": setup["pad_token"], "loadavg_1m_before_after": [load_before, os.getloadavg()[0]],
            "skipped": setup["skipped"],
            "ratios": {s.tool: ratios(s, summaries[0]) for s in summaries[1:]} if args.vs == "trl" else {},
            "notes": list(NOTES), "aggregation": "s/step: median over timed steps of all repeats; phases split it "
            "by their share of the summed timed time; rollout tokens/s: sum generated tokens / sum generation s"}
    stem = f"{result_stem(args, slug, date)}_{args.prompts}"
    path = write_results(args.out_dir, stem, meta=meta, summaries=summaries, check=check, table=table,
                         check_key="check")
    print(f"wrote {path}.json and {path}.md")


if __name__ == "__main__":
    main()
