"""GRPO throughput: hpalign's GRPO against TRL 1.16's GRPOTrainer, same prompts, models and settings.

  python benchmarks/bench_grpo.py --vs trl                                     # SmolLM2 LoRA, built-in prompts
  python benchmarks/bench_grpo.py --vs trl --prompts mixed                     # mixed lengths, a reward model
  python benchmarks/bench_grpo.py --vs trl --hpalign_engines hf vllm           # hpalign with both rollout engines
  python benchmarks/bench_grpo.py --model tiny-random-llama --vs trl --steps 1 --repeats 1 --num_generations 2 \
      --batch_size 4 --response_length 8                                       # plumbing, a minute

Prompts (`--prompts`, as bench_ppo's): `builtin`, the first arithmetic questions of hpalign's built-in
prompts (the ones the `accuracy` rule scores, as hpalign's own built-in GRPO task keeps), or `mixed`,
user turns of log-uniform length (10..300 text tokens). hpalign reads them as chat messages and orders
them by its schedule (`--prompts_per_step` per step); TRL gets the same rows in that order, as text
rendered with hpalign's template (plus the messages, which the rule reward reads), so step k of both
tools samples `--num_generations` completions to each of the same prompt token ids.

Reward (`--reward`): auto = the `accuracy` rule (hpalign's, wrapped as a TRL reward function) on
builtin prompts, a seeded random sequence-classification reward model (bench_ppo's: the policy's
backbone with a random score head) on mixed ones; `accuracy` or `model` pick one.

Settings, the same on both sides (TRL's flag names): num_generations 8, 2 prompts per step = 16
completions per optimizer step, in micro-batches of `--batch_size` completions (TRL's
per_device_train_batch_size) x gradient accumulation; max_completion_length (`--response_length`) 53,
temperature 0.7, beta 0.04, epsilon 0.2, loss_type grpo, scale_rewards group, num_iterations 1 (a TRL
step is one hpalign step only then), lr = hpalign's rollout default (3e-4 LoRA r 8 alpha 32, 1e-5 full),
gradient checkpointing pinned (`--gradient_checkpointing`; auto = what hpalign would decide) and checked.

Runs: child processes alternating TRL, hpalign, hpalign-vllm, variant ... per repeat. hpalign's engines
(`--hpalign_engines hf vllm`): vllm runs the hpalign child with `--rollout_engine vllm` (skipped with a
message when vLLM is not installed).
Reported per tool over the steps after `--warmup`: s/step (median), split into generation (hpalign's
time/weight_sync counted in) / scoring / update / other by each phase's share of the summed step time,
rollout tokens/s, completions/s (the table's episodes/s), peak RSS (`os.wait4`), on CUDA the GPU peak;
ratios hpalign / TRL (bench_ppo's: target at least 2x step throughput at no more memory).

Writes benchmarks/results/grpo_<sft_type>[_<model>][_vs-trl]_<device>_<date>_<prompts>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench_ppo import (  # noqa: E402
    HPALIGN_PROMPTS,
    PHASES,
    TRL_PROMPTS,
    PPORun,
    add_engine_arguments,
    hpalign_launcher,
    hpalign_order,
    hpalign_tools,
    markdown_table,
    prompt_rows,
    ratios,
    read_hpalign_run,
    rendered_prompt,
    resolve_engine_pythons,
    stop_and_pad,
    summarise,
    write_reward_model,
)
from bench_train import (  # noqa: E402
    RANDOM_LLAMA_SHAPES,
    REPO,
    device_slug,
    model_directory,
    result_stem,
    run_child,
    write_jsonl,
    write_results,
)

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
NOTES = (
    "reference: the adapter-off policy with LoRA (both), a frozen copy with full fine-tuning (both); beta 0.04: "
    "one reference forward per step in both",
    "old log-probs: none in both (num_iterations 1, one mini-batch: the ratio's denominator is the policy's own "
    "detached log-prob)",
    "generation: both sample with HF generate (hpalign-vllm: its in-process vLLM engine); hpalign merges the LoRA "
    "deltas into weight copies while sampling, TRL samples through the adapter. hpalign's time/weight_sync "
    "(vLLM: pushing the policy's weights into the engine after every update; HF: none) is counted in generation; "
    "vLLM's start-up (LLM(...)) is not in any step, and its weights and KV cache are in the peak RSS",
    "layout: TRL pads (left-padded prompts, completions padded to the longest); hpalign packs its scoring and "
    "update passes (no pad tokens computed) and lays each prompt out once for its completions (--share_prompt)",
    "sampling: same prompts, temperature, top_k 0, top_p 1 and stop token, but each tool's own RNG (and hpalign "
    "one seed per completion): completion lengths and rewards differ by chance",
    "reward model (mixed): hpalign scores its own prompt + completion ids (the end-of-turn token included); TRL "
    "decodes the completion without special tokens and re-tokenises prompt + completion text: same model, "
    "slightly different inputs",
    "missing EOS: no penalty in either (TRL's GRPO has none; hpalign's --missing_eos_penalty none)",
    "gradient checkpointing: pinned to the same value in both (header), checked in hpalign's resolved config",
    "step time: TRL's from fetching the step's micro-batches to the end of its metric logging (trl_grpo.py); "
    "hpalign's `time/step` is its rollout step (metric all-reduce included, logging after it not)",
)


# ----------------------------------------------------------------------------- prompts


def grpo_prompt_rows(kind: str, num_prompts: int, *, seed: int, count_tokens) -> list[dict]:
    """bench_ppo's prompt rows; builtin: only the questions the `accuracy` rule scores."""
    if kind == "mixed":
        return prompt_rows(kind, num_prompts, seed=seed, count_tokens=count_tokens)
    from hpalign.data.builtin import builtin_dataset
    from hpalign.rl.rewards import arithmetic_answer, last_user_turn

    rows = prompt_rows(kind, len(builtin_dataset("prompt", "train")), seed=seed, count_tokens=count_tokens)
    rows = [row for row in rows if arithmetic_answer(last_user_turn(row["prompt"]) or "") is not None]
    if len(rows) < num_prompts:
        raise ValueError(f"the built-in set has {len(rows)} arithmetic prompts; {num_prompts} asked: fewer steps")
    return rows[:num_prompts]


def prepare_prompts(tmp_dir: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    """Writes HPALIGN_PROMPTS (chat messages) and TRL_PROMPTS (rendered text + messages, in hpalign's
    step order); returns the pad token, stop ids, the prompt tokens of each step's completions (each
    prompt num_generations times, as TRL counts them) and length statistics."""
    from transformers import AutoTokenizer

    from hpalign.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = resolve_template(tokenizer)
    _, pad_token = stop_and_pad(tokenizer, template)
    num_steps = args.warmup + args.steps
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows = grpo_prompt_rows(args.prompts, args.prompts_per_step * num_steps, seed=args.seed, count_tokens=count_tokens)
    ids = [template.encode_prompt(row["prompt"]) for row in rows]
    budget = args.max_length - args.response_length
    if max(map(len, ids)) > budget:
        raise ValueError(f"a prompt has {max(map(len, ids))} tokens, over --max_length - --response_length = "
                         f"{budget}: hpalign would cut it and TRL not; raise --max_length")
    order = hpalign_order(len(rows), prompts_per_step=args.prompts_per_step, num_steps=num_steps, seed=args.seed)
    write_jsonl(tmp_dir / HPALIGN_PROMPTS, rows)
    write_jsonl(tmp_dir / TRL_PROMPTS, [{"prompt": rendered_prompt(template, rows[i]["prompt"], ids[i]),
                                         "messages": rows[i]["prompt"]} for step in order for i in step])
    lengths = [len(p) for p in ids]
    return {"prompts": args.prompts, "num_prompts": len(rows), "pad_token": pad_token,
            "stop_token_ids": list(template.stop_token_ids), "prompt_tokens_min": min(lengths),
            "prompt_tokens_median": statistics.median(lengths), "prompt_tokens_max": max(lengths),
            "prompt_tokens_mean": statistics.mean(lengths),
            "prompt_tokens_per_step": [args.num_generations * sum(lengths[i] for i in s) for s in order]}


# ----------------------------------------------------------------------------- settings and commands


def completions_per_step(args: argparse.Namespace) -> int:
    return args.prompts_per_step * args.num_generations


def accumulation(args: argparse.Namespace) -> int:
    return completions_per_step(args) // args.batch_size


def learning_rate(args: argparse.Namespace) -> float:
    """--learning_rate, else hpalign's default for a rollout algorithm."""
    from hpalign.config import DEFAULT_LEARNING_RATE, PPO_LORA_LEARNING_RATE

    return args.learning_rate or (PPO_LORA_LEARNING_RATE if args.sft_type == "lora" else DEFAULT_LEARNING_RATE["full"])


def reward_kind(args: argparse.Namespace) -> str:
    return ("accuracy" if args.prompts == "builtin" else "model") if args.reward == "auto" else args.reward


def decide_checkpointing(args: argparse.Namespace, mean_prompt_tokens: float, model_dir: Path, *,
                         available_bytes: float | None = None) -> bool:
    """--gradient_checkpointing; auto: hpalign's own decision (on with CUDA or full fine-tuning, else by
    memory for a micro-batch of prompts + full-length completions, `hpalign.train.checkpointing`; a
    partial plan counts as on: both tools then recompute every layer)."""
    if args.gradient_checkpointing != "auto":
        return args.gradient_checkpointing == "true"
    if args.cuda or args.sft_type == "full":
        return True
    import torch
    from transformers import AutoConfig

    from hpalign.train import checkpointing

    if available_bytes is None:
        available_bytes = checkpointing.available_memory_per_rank(torch.device("cpu"))
    plan = checkpointing.plan_checkpointing(
        tokens=args.batch_size * (mean_prompt_tokens + args.response_length), dtype_bytes=4,
        shape=checkpointing.ModelShape.of(AutoConfig.from_pretrained(model_dir)), available_bytes=available_bytes)
    return plan.enabled


def grpo_flags(args: argparse.Namespace) -> dict[str, str]:
    """hpalign's GRPO flags, TRL GRPOConfig's names."""
    return {"num_generations": str(args.num_generations), "beta": str(args.beta), "epsilon": str(args.epsilon),
            "loss_type": args.loss_type, "scale_rewards": "group", "num_iterations": "1",
            "mask_truncated_completions": "false"}


def hpalign_command(args: argparse.Namespace, setup: dict, run_name: str, extra_flags: list[str] = (), *,
                    engine: str = "hf", python: str = sys.executable) -> list[str]:
    tmp_dir = setup["tmp_dir"]
    reward = (["--reward_model_id_or_path", str(setup["reward_dir"])] if setup["reward_dir"]
              else ["--reward_funcs", "accuracy"])
    return [
        *hpalign_launcher(python, cuda=args.cuda, gpu_file=tmp_dir / f"{run_name}.gpu.json"), "rlhf",
        "--rlhf_type", "grpo", "--model", str(setup["model_dir"]), *reward,
        "--dataset", str(tmp_dir / HPALIGN_PROMPTS), "--split_dataset_ratio", "0",
        "--max_steps", str(args.warmup + args.steps), "--batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", str(accumulation(args)), "--num_mini_batches", "1",
        *(item for name, value in grpo_flags(args).items() for item in (f"--{name}", value)),
        "--response_length", str(args.response_length), "--temperature", str(args.temperature),
        "--stop_token", "eos", "--missing_eos_penalty", "none", "--rollout_engine", engine,
        "--gradient_checkpointing", str(setup["gradient_checkpointing"]).lower(),
        "--learning_rate", str(learning_rate(args)), "--sft_type", args.sft_type, "--lora_target_modules", "ALL",
        "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0", "--max_length", str(args.max_length),
        "--torch_dtype", args.dtype, "--seed", str(args.seed), "--logging_steps", "1",
        "--num_sample_generations", "0", "--eval_before_train", "false", "--num_eval_generations", "0",
        "--eval_steps", "0", "--save_steps", "1000000", "--output_dir", str(tmp_dir), "--run_name", run_name,
        *(["--num_threads", str(args.threads)] if args.threads else []), *extra_flags,
    ]


def trl_spec(args: argparse.Namespace, setup: dict, run_name: str) -> dict:
    """trl_grpo.py's spec: the same completions per micro-batch and per step, the same GRPO settings."""
    return {"model_dir": str(setup["model_dir"]), "prompts": str(setup["tmp_dir"] / TRL_PROMPTS),
            "steps": args.warmup + args.steps, "sft_type": args.sft_type,
            "output": str(setup["tmp_dir"] / f"{run_name}.json"),
            "reward_funcs": [] if setup["reward_dir"] else ["accuracy"],
            "reward_model_dir": str(setup["reward_dir"]) if setup["reward_dir"] else None,
            "pad_token": setup["pad_token"], "dtype": args.dtype, "stop_token_ids": setup["stop_token_ids"],
            "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": accumulation(args),
            "learning_rate": learning_rate(args), "gradient_checkpointing": setup["gradient_checkpointing"],
            "seed": args.seed, "num_generations": args.num_generations, "max_completion_length": args.response_length,
            "temperature": args.temperature, "beta": args.beta, "epsilon": args.epsilon, "epsilon_high": None,
            "loss_type": args.loss_type, "scale_rewards": "group", "num_iterations": 1,
            "mask_truncated_completions": False}


def read_trl_run(path: Path) -> tuple[list[dict], dict]:
    """(steps, {"trl_version", "peak_gpu_mib", "gradient_checkpointing"}) of trl_grpo.py's result file."""
    result = json.loads(path.read_text())
    steps = [{**{f"{p}_s": s[f"{p}_s"] for p in (*PHASES, "step")}, "rollout_tokens": s["rollout_tokens"],
              "prompt_tokens": s["prompt_tokens"], "episodes": s["completions"],
              "score": s["metrics"].get("reward")} for s in result["steps"]]
    return steps, {"trl_version": result["trl_version"], "peak_gpu_mib": result.get("peak_gpu_mib"),
                   "gradient_checkpointing": result["settings"]["gradient_checkpointing"]}


def run_once(args: argparse.Namespace, setup: dict, *, tool: str, repeat: int) -> PPORun:
    tmp_dir, run_name = setup["tmp_dir"], f"{tool}-{repeat}"
    if tool == "trl":
        spec_path = tmp_dir / f"{run_name}.spec.json"
        spec_path.write_text(json.dumps(trl_spec(args, setup, run_name)))
        command = [sys.executable, str(REPO / "benchmarks" / "trl_grpo.py"), "--spec", str(spec_path)]
    else:
        engine = args.engines.get(tool, "hf")
        command = hpalign_command(args, setup, run_name, args.variants[tool], engine=engine,
                                  python=setup["pythons"][engine])
    rss_mib, wall = run_child(command, tmp_dir / f"{run_name}.log", threads=args.threads)
    if tool == "trl":
        steps, info = read_trl_run(tmp_dir / f"{run_name}.json")
        return PPORun(tool, repeat, steps, rss_mib, wall, info["peak_gpu_mib"], info)
    steps, data = read_hpalign_run(tmp_dir / run_name)
    gpu_file = tmp_dir / f"{run_name}.gpu.json"
    peak_gpu = json.loads(gpu_file.read_text()) if gpu_file.is_file() else None
    return PPORun(tool, repeat, steps, rss_mib, wall, peak_gpu, data)


# ----------------------------------------------------------------------------- check


def run_check(runs: list[PPORun], *, prompt_tokens_per_step: list[int], completions_per_step: int,
              response_length: int, num_prompts: int, gradient_checkpointing: bool, engines: dict[str, str],
              variants: tuple[str, ...] = ()) -> dict:
    """What must agree for the timing to compare like with like (completions differ by sampling); the
    `variants` (--variant runs) may change the gradient checkpointing."""
    agree = {}
    for run in runs:
        name = f"{run.tool}-{run.repeat}"
        agree[f"{name}: {len(prompt_tokens_per_step)} steps of {completions_per_step} completions <= "
              f"{response_length} tokens"] = len(run.steps) == len(prompt_tokens_per_step) and all(
            s["episodes"] == completions_per_step and s["rollout_tokens"] <= completions_per_step * response_length
            for s in run.steps)
        if run.tool not in variants:
            agree[f"{name}: gradient checkpointing {gradient_checkpointing}"] = \
                run.data["gradient_checkpointing"] == gradient_checkpointing
        if run.tool == "trl":
            agree[f"{name}: prompt tokens per step = hpalign's"] = [s["prompt_tokens"] for s in run.steps] == \
                prompt_tokens_per_step
        else:
            agree[f"{name}: every prompt loaded whole, rollouts on {engines.get(run.tool, 'hf')}"] = (
                run.data["num_train"] == num_prompts and run.data["num_skipped"] == run.data["num_truncated"] == 0
                and run.data["rollout_engine"] == engines.get(run.tool, "hf"))
    return {"agree": agree, "all_agree": all(agree.values()), "prompt_tokens_per_step": prompt_tokens_per_step}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft_type", default="lora", choices=["lora", "full"])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-random-llama", *RANDOM_LLAMA_SHAPES])
    parser.add_argument("--prompts", default="builtin", choices=["builtin", "mixed"])
    parser.add_argument("--reward", default="auto", choices=["auto", "accuracy", "model"],
                        help="auto: the accuracy rule on builtin prompts, a random seq-cls reward model on mixed")
    parser.add_argument("--vs", choices=["trl"], default=None, help="also run TRL 1.16's GRPOTrainer")
    add_engine_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed GRPO steps at the start of each run (0: the first step is timed too)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool, alternated TRL hpalign TRL ...")
    parser.add_argument("--force", action="store_true", help="time even when the check disagrees")
    parser.add_argument("--prompts_per_step", type=int, default=2)
    parser.add_argument("--num_generations", type=int, default=8, help="completions per prompt (a group)")
    parser.add_argument("--batch_size", type=int, default=8, help="completions per micro-batch (TRL's "
                        "per_device_train_batch_size); the step's completions / this = gradient accumulation")
    parser.add_argument("--response_length", type=int, default=53, help="TRL's max_completion_length")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--loss_type", default="grpo", choices=LOSS_TYPES)
    parser.add_argument("--learning_rate", type=float, default=None, help="default: hpalign's (3e-4 LoRA, 1e-5 full)")
    parser.add_argument("--gradient_checkpointing", default="auto", choices=["auto", "true", "false"],
                        help="both tools; auto: what hpalign would decide")
    parser.add_argument("--max_length", type=int, default=1024, help="hpalign's; every prompt must fit whole")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="both tools' weights; auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both tools (default: $OMP_NUM_THREADS if set)")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats, args.prompts_per_step, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats, --prompts_per_step and --batch_size must be >= 1, --warmup >= 0")
    if args.num_generations < 2:
        parser.error("--num_generations must be >= 2: GRPO compares the completions of a group")
    if completions_per_step(args) % args.batch_size:
        parser.error(f"--prompts_per_step x --num_generations = {completions_per_step(args)} completions per step "
                     f"must be a multiple of --batch_size {args.batch_size}")
    hpalign_tools(parser, args)
    args.variant_names = [spec.partition("=")[0] for spec in args.variant]
    args.tools = (["trl"] if args.vs == "trl" else []) + list(args.variants)
    args.threads = args.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None)
    args.rlhf_type = "grpo"  # result_stem's
    return args


def run_all(args: argparse.Namespace, setup: dict) -> tuple[list[PPORun], dict]:
    runs: list[PPORun] = []
    check: dict = {}
    for repeat in range(args.repeats):
        for tool in args.tools:
            run = run_once(args, setup, tool=tool, repeat=repeat)
            timed = [s["step_s"] for s in run.steps[args.warmup:]]
            print(f"{tool:14} repeat {repeat}: {statistics.median(timed):.2f} s/step, {run.peak_rss_mib:.0f} MiB, "
                  f"{run.wall_seconds:.0f} s wall", flush=True)
            runs.append(run)
        check = run_check(runs, prompt_tokens_per_step=setup["prompt_tokens_per_step"],
                          completions_per_step=completions_per_step(args), response_length=args.response_length,
                          num_prompts=setup["num_prompts"], gradient_checkpointing=setup["gradient_checkpointing"],
                          engines=args.engines, variants=tuple(args.variant_names))
        if not check["all_agree"] and not args.force:
            failed = [name for name, ok in check["agree"].items() if not ok]
            raise SystemExit(f"the tools did not run the same work ({'; '.join(failed)}): timing not trusted "
                             "(--force to time anyway)")
    return runs, check


def header_line(args: argparse.Namespace, slug: str, setup: dict, load_before: float) -> str:
    trl = f"TRL {setup['trl_version']} GRPOTrainer vs hpalign" if setup.get("trl_version") else "hpalign"
    reward = "accuracy rule" if not setup["reward_dir"] else "policy backbone + seeded random head (seq-cls)"
    skipped = "".join(f"; {message}" for message in setup["skipped"])
    return (f"grpo {args.sft_type} on {args.model}, {slug} ({platform.machine()}), {trl}; prompts {args.prompts} "
            f"({setup['num_prompts']}, {setup['prompt_tokens_min']}..{setup['prompt_tokens_max']} tokens, median "
            f"{setup['prompt_tokens_median']:g}), {args.prompts_per_step} prompts x {args.num_generations} "
            f"generations = {completions_per_step(args)} completions per step in micro-batches of {args.batch_size} "
            f"x {accumulation(args)} accumulation, response_length {args.response_length}, temperature "
            f"{args.temperature:g}, beta {args.beta:g}, epsilon {args.epsilon:g}, loss_type {args.loss_type}, "
            f"num_iterations 1, lr {learning_rate(args):g}, gradient checkpointing "
            f"{'on' if setup['gradient_checkpointing'] else 'off'} (both), {args.dtype}, reward: {reward}, threads "
            f"{args.threads or 'default'}, {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} "
            f"repeat(s) per tool (episodes = completions), load average {load_before:.1f} before / "
            f"{os.getloadavg()[0]:.1f} after{skipped}")


def set_up(args: argparse.Namespace, tmp_dir: Path) -> dict:
    """The tools' environments (first: they may stop the run or skip an engine), the policy, the prompts,
    the reward model and the pinned gradient checkpointing."""
    if args.vs == "trl":
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            raise SystemExit("--vs trl needs TRL in this environment (the benchmark extra): pip install '.[bench]'")
    pythons, skipped = resolve_engine_pythons(args)
    model_dir = model_directory(args.model, tmp_dir)
    setup = {"tmp_dir": tmp_dir, "model_dir": model_dir, "pythons": pythons, "skipped": skipped,
             **prepare_prompts(tmp_dir, model_dir, args)}
    setup["reward_dir"] = (write_reward_model(model_dir, tmp_dir / "reward-seq-cls", pad_token=setup["pad_token"],
                                              seed=args.seed, form="seq-cls") if reward_kind(args) == "model" else None)
    setup["gradient_checkpointing"] = decide_checkpointing(args, setup["prompt_tokens_mean"], model_dir)
    return setup


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    slug, date = device_slug(), dt.date.today().isoformat()
    args.cuda = not slug.startswith("cpu")
    args.dtype = ("bfloat16" if args.cuda else "float32") if args.dtype == "auto" else args.dtype
    with tempfile.TemporaryDirectory(prefix="hpalign-bench-grpo-") as tmp:
        setup = set_up(args, Path(tmp))
        runs, check = run_all(args, setup)
        if args.vs == "trl":
            setup["trl_version"] = read_trl_run(Path(tmp) / "trl-0.json")[1]["trl_version"]
    per_step = completions_per_step(args)
    summaries = [summarise(runs, tool=t, warmup=args.warmup, prompts_per_step=per_step) for t in args.tools]
    table = markdown_table(summaries, header_line(args, slug, setup, load_before), check=check, notes=NOTES)
    print("\n" + table)
    meta = {"device": slug, "date": date, **{k: v for k, v in vars(args).items() if k not in ("out_dir", "cuda")},
            "trl": setup.get("trl_version"), "learning_rate": learning_rate(args), "reward": reward_kind(args),
            "gradient_checkpointing": setup["gradient_checkpointing"], "skipped": setup["skipped"],
            "prompt_set": {k: setup[k] for k in setup if k.startswith(("prompt", "num_"))},
            "ratios": {s.tool: ratios(s, summaries[0]) for s in summaries[1:]} if args.vs == "trl" else {},
            "notes": list(NOTES), "aggregation": "s/step: median over timed steps of all repeats; phases split it "
            "by their share of the summed timed time; rollout tokens/s: sum generated tokens / sum generation s "
            "(weight sync included)"}
    stem = f"{result_stem(args, slug, date)}_{args.prompts}"
    path = write_results(args.out_dir, stem, meta=meta, summaries=summaries, check=check, table=table,
                         check_key="check")
    print(f"wrote {path}.json and {path}.md")


if __name__ == "__main__":
    main()
