"""hpalign against TRL's DPOTrainer: same weights, same data in the same order, same batch.

Builds the mixed-length preference set of `bench_train.py` (prompts about 10..400 tokens, responses
about 5..200), keeps the rows that fit `--max_length` whole (so neither tool truncates and both see
the same tokens), and writes it twice: as flat rows for `hpalign rlhf` and, for TRL, in hpalign's
step order as pre-rendered text (the tokenizer's chat template applied by hpalign's template code:
TRL's conversational path would add the newline after `<|im_end|>` as one more completion token).
The TRL run uses a sequential sampler, so step k of both tools trains on the same 4 pairs.

Each run is a child process, alternating TRL, hpalign, TRL, hpalign ... so that drift on the
machine falls on both alike. Per tool: real (non-padding) tokens/s, pairs/s and s/step over the
steps after the `--warmup` ones (hpalign: its own `train/step_seconds`; TRL: `on_step_begin` to
`on_step_end`, the same span), and the child's peak RSS (`os.wait4`). Before the timing is
trusted, step 1 of both is compared: the DPO loss (policy == reference there, so log 2) to 1e-3,
the mean policy log-probs of chosen and rejected (relative 1e-3) and the token count (exact).

Settings shared by both: batch 4 pairs, max_length 512, AdamW, the same learning rate (hpalign's
default: 1e-4 LoRA, 1e-5 full), beta 0.1, no RPO term, LoRA r=8 alpha 32 on every linear layer
but the LM head, dropout 0 (TRL disables dropout by default), fp32 (hpalign's CPU dtype; TRL's
bf16 autocast default is off unless `--trl_bf16`). Each tool's own defaults otherwise: TRL pads
and uses gradient checkpointing (its default) and, with LoRA, the adapter-disabled model as the
reference; hpalign packs, computes log-probs for response tokens only and, with LoRA, also runs
the reference with the adapter off.

  python benchmarks/bench_trl.py --rlhf_type dpo --sft_type lora                  # SmolLM2
  python benchmarks/bench_trl.py --model tiny-random-llama --steps 2 --repeats 1
  python benchmarks/bench_trl.py --check_only                                     # step 1 only
Writes benchmarks/results/trl_dpo_<sft_type>_<device>_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_train import device_slug, write_mixed_length_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASELINE = "hpalign"  # the hpalign variant with its defaults; step 1 of TRL is checked against it
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}
NUM_VAL_ROWS = 4  # hpalign's end-of-run evaluation needs a few held-out pairs (not timed)


@dataclass
class RunResult:
    tool: str
    repeat: int
    step_seconds: list[float]  # timed steps (warm-up excluded)
    step_tokens: list[int]  # real tokens of each timed step
    first_step: dict[str, float]  # step-1 loss, logps/chosen, logps/rejected, tokens
    peak_rss_mib: float
    wall_seconds: float


@dataclass
class Summary:
    tool: str
    tokens_per_second: float  # all real tokens / all timed seconds
    pairs_per_second: float
    seconds_per_step: float
    peak_rss_mib: float  # max over the runs of this tool
    num_timed_steps: int
    runs: list[RunResult] = field(default_factory=list)


# ----------------------------------------------------------------------------- data


def model_directory(name: str, tmp_dir: Path) -> Path:
    """An HF directory both tools load: the cached SmolLM2, or tiny-random-llama saved once."""
    if name == "smollm2":
        from hpalign.model import ensure_smollm2_cached

        return ensure_smollm2_cached()
    from hpalign.tiny_model import build_tiny_llama

    model, tokenizer = build_tiny_llama(seed=0)
    path = tmp_dir / "tiny-random-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fitting_rows(rows: list[dict], tokenizer, *, max_length: int) -> list[dict]:
    """The rows whose prompt + longer response fits `max_length` tokens under hpalign's template."""
    from hpalign.data.templates import resolve_template

    template = resolve_template(tokenizer)
    kept = []
    for row in rows:
        prompt = len(template.encode_prompt([{"role": "user", "content": row["prompt"]}]))
        longest = max(len(template.encode_response(row[k])) for k in ("chosen", "rejected"))
        if prompt + longest <= max_length:
            kept.append(row)
    return kept


def rendered_row(row: dict, template) -> dict:
    """The row as TRL's plain-text input: hpalign's prompt and responses, template applied."""
    def response(text: str) -> str:
        return f"{template.response_prefix}{text}{template.response_suffix}"

    return {"prompt": template.render_prompt([{"role": "user", "content": row["prompt"]}]),
            "chosen": response(row["chosen"]), "rejected": response(row["rejected"])}


def hpalign_order(num_examples: int, *, batch_size: int, num_steps: int, seed: int) -> list[int]:
    """Example indices in the order hpalign trains on them (its schedule, one process)."""
    from hpalign.train.schedule import BatchPlan, all_step_indices

    plan = BatchPlan(num_examples=num_examples, micro_batch_size=batch_size, accumulation=1, world_size=1)
    return [i for step in range(num_steps) for i in all_step_indices(plan, step, seed=seed)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def prepare_data(tmp_dir: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    """Writes hpalign_train/val.jsonl and trl_train.jsonl; returns the data statistics."""
    from transformers import AutoTokenizer

    from hpalign.data.templates import resolve_template

    num_steps = args.warmup + args.steps
    wanted = args.batch_size * num_steps + NUM_VAL_ROWS
    # Generous: the byte-level tiny-random-llama tokenizer fits few rows into 512 tokens. The generator
    # is seeded per row, so the first rows are the same whatever the count.
    stats = write_mixed_length_dataset(tmp_dir / "mixed.jsonl", num_rows=8 * wanted + 16, seed=args.seed)
    rows = [json.loads(line) for line in (tmp_dir / "mixed.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kept = fitting_rows(rows, tokenizer, max_length=args.max_length)
    if len(kept) < wanted:
        raise ValueError(f"only {len(kept)} of {len(rows)} rows fit --max_length {args.max_length}; need {wanted}")
    val, train = kept[:NUM_VAL_ROWS], kept[NUM_VAL_ROWS:wanted]
    write_jsonl(tmp_dir / "hpalign_train.jsonl", train)
    write_jsonl(tmp_dir / "hpalign_val.jsonl", val)
    template = resolve_template(tokenizer)
    order = hpalign_order(len(train), batch_size=args.batch_size, num_steps=num_steps, seed=args.seed)
    write_jsonl(tmp_dir / "trl_train.jsonl", [rendered_row(train[i], template) for i in order])
    return {**stats, "rows_generated": len(rows), "rows_fitting_max_length": len(kept),
            "train_rows": len(train), "val_rows": len(val)}


# ----------------------------------------------------------------------------- runs


def learning_rate(args: argparse.Namespace) -> float:
    return args.learning_rate or DEFAULT_LR[args.sft_type]


def hpalign_command(args: argparse.Namespace, model_dir: Path, tmp_dir: Path, run_name: str,
                    extra_flags: list[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "hpalign", "rlhf", "--rlhf_type", "dpo", "--model", str(model_dir),
        "--dataset", str(tmp_dir / "hpalign_train.jsonl"), "--val_dataset", str(tmp_dir / "hpalign_val.jsonl"),
        "--max_steps", str(args.warmup + args.steps), "--batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--beta", "0.1", "--rpo_alpha", "0",
        "--sft_type", args.sft_type, "--lora_target_modules", "ALL", "--lora_rank", "8", "--lora_alpha", "32",
        "--lora_dropout", "0", "--learning_rate", str(learning_rate(args)), "--seed", str(args.seed),
        "--precompute_ref_log_probs", str(args.precompute_ref_log_probs).lower(),
        "--logging_steps", "1", "--eval_before_train", "false", "--num_eval_generations", "0",
        "--eval_steps", "0", "--save_steps", "1000000", "--output_dir", str(tmp_dir), "--run_name", run_name,
        *extra_flags,
    ]


def trl_spec(args: argparse.Namespace, model_dir: Path, tmp_dir: Path, run_name: str) -> dict:
    """What the TRL child needs, as JSON-able values."""
    return {"model_dir": str(model_dir), "data": str(tmp_dir / "trl_train.jsonl"),
            "out_dir": str(tmp_dir / run_name), "steps": args.warmup + args.steps, "batch_size": args.batch_size,
            "max_length": args.max_length, "learning_rate": learning_rate(args), "sft_type": args.sft_type,
            "seed": args.seed, "bf16": args.trl_bf16, "gradient_checkpointing": args.trl_gradient_checkpointing,
            "precompute_ref_log_probs": args.precompute_ref_log_probs}


def trl_command(args: argparse.Namespace, model_dir: Path, tmp_dir: Path, run_name: str) -> list[str]:
    spec = trl_spec(args, model_dir, tmp_dir, run_name)
    return [sys.executable, str(Path(__file__).resolve()), "_trl_child", json.dumps(spec)]


def run_child(command: list[str], log_path: Path, *, threads: int | None) -> tuple[float, float]:
    """Runs one child to the end; (its own peak RSS in MiB, wall seconds)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"{command[1:4]} failed ({os.waitstatus_to_exitcode(status)}):\n{tail}")
    rss_mib = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # macOS bytes, Linux KiB
    return rss_mib, time.perf_counter() - start


def read_hpalign_steps(run_dir: Path) -> list[dict]:
    """Per step: seconds, tokens, loss, logps (hpalign's metrics.jsonl, logging_steps 1)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"seconds": r["train/step_seconds"], "tokens": round(r["train/tokens_per_second"] * r["train/step_seconds"]),
             "loss": r["train/loss"], "logps/chosen": r["train/logps/chosen"],
             "logps/rejected": r["train/logps/rejected"]} for r in records if "train/step_seconds" in r]


def run_once(args: argparse.Namespace, model_dir: Path, tmp_dir: Path, *, tool: str, repeat: int) -> RunResult:
    run_name = f"{tool}-{repeat}"
    if tool == "trl":
        command = trl_command(args, model_dir, tmp_dir, run_name)
    else:
        command = hpalign_command(args, model_dir, tmp_dir, run_name, args.variants[tool])
    rss_mib, wall = run_child(command, tmp_dir / f"{run_name}.log", threads=args.threads)
    if tool == "trl":
        steps = [json.loads(line) for line in (tmp_dir / run_name / "steps.jsonl").read_text().splitlines()]
    else:
        steps = read_hpalign_steps(tmp_dir / run_name)
    first = {k: steps[0][k] for k in ("loss", "logps/chosen", "logps/rejected", "tokens")}
    if len(steps) > 1:  # after one update: informative with full fine-tuning (LoRA's random A differs)
        first["step2_loss"] = steps[1]["loss"]
    timed = steps[args.warmup:]
    return RunResult(tool, repeat, [s["seconds"] for s in timed], [s["tokens"] for s in timed], first, rss_mib, wall)


# ----------------------------------------------------------------------------- TRL child


def trl_config(spec: dict):
    """The DPOConfig of a run: TRL's defaults but for the shared settings (see the module docstring)."""
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["learning_rate"], max_length=spec["max_length"], beta=0.1,
        bf16=spec["bf16"], gradient_checkpointing=spec["gradient_checkpointing"], logging_steps=1,
        save_strategy="no", report_to="none", seed=spec["seed"], dataloader_num_workers=0,
        precompute_ref_log_probs=spec["precompute_ref_log_probs"], model_init_kwargs={"dtype": torch.float32})


def trl_peft_config(sft_type: str):
    """LoRA r=8, alpha 32 on every linear layer but the LM head (hpalign's `--lora_target_modules ALL`)."""
    if sft_type != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def trl_child(spec: dict) -> None:
    """One TRL DPO run; writes per-step seconds, tokens, loss and logps to out_dir/steps.jsonl."""
    from datasets import load_dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    class InOrderDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the file is already in hpalign's step order
            return SequentialSampler(self.train_dataset)

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append({"seconds": time.perf_counter() - self.start})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.steps:
                self.steps[-1].update({k: logs[k] for k in ("loss", "logps/chosen", "logps/rejected")})

    recorder = StepRecorder()
    trainer = InOrderDPOTrainer(
        model=spec["model_dir"], args=trl_config(spec), processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
        train_dataset=load_dataset("json", data_files=spec["data"], split="train"),
        peft_config=trl_peft_config(spec["sft_type"]), callbacks=[recorder])
    data = trainer.train_dataset
    lengths = [2 * len(p) + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                               data["rejected_ids"], strict=True)]
    trainer.train()
    size = spec["batch_size"]
    with (Path(spec["out_dir"]) / "steps.jsonl").open("w") as handle:
        for k, step in enumerate(recorder.steps):  # sequential sampler: step k = rows [k * size, (k + 1) * size)
            handle.write(json.dumps({**step, "tokens": sum(lengths[k * size:(k + 1) * size])}) + "\n")


# ----------------------------------------------------------------------------- results


def step_one_check(runs: list[RunResult]) -> dict:
    """Step 1 of the first run of each tool: loss to 1e-3, logps to relative 1e-3, tokens exact."""
    first = {tool: next(r.first_step for r in runs if r.tool == tool) for tool in ("trl", BASELINE)}
    trl, ours = first["trl"], first[BASELINE]
    agree = {"loss": abs(trl["loss"] - ours["loss"]) <= 1e-3, "tokens": trl["tokens"] == ours["tokens"]}
    for name in ("logps/chosen", "logps/rejected"):
        agree[name] = abs(trl[name] - ours[name]) <= 1e-3 * max(1.0, abs(trl[name]))
    check = {"trl": trl, "hpalign": ours, "agree": agree, "all_agree": all(agree.values())}
    if "step2_loss" in trl and "step2_loss" in ours:
        check["step2_loss"] = {"trl": trl["step2_loss"], "hpalign": ours["step2_loss"]}
    return check


def summarise(runs: list[RunResult], *, tool: str, pairs_per_step: int) -> Summary:
    mine = [r for r in runs if r.tool == tool]
    seconds = sum(s for r in mine for s in r.step_seconds)
    num_steps = sum(len(r.step_seconds) for r in mine)
    tokens = sum(t for r in mine for t in r.step_tokens)
    return Summary(tool, tokens / seconds, pairs_per_step * num_steps / seconds, seconds / num_steps,
                   max(r.peak_rss_mib for r in mine), num_steps, mine)


def markdown_table(summaries: list[Summary], header: str, check: dict | None = None) -> str:
    lines = ["| tool | real tokens/s | pairs/s | s/step | peak RSS MiB | timed steps |", "|" + "---|" * 6]
    for s in summaries:
        lines.append(f"| {s.tool} | {s.tokens_per_second:.0f} | {s.pairs_per_second:.3f} | "
                     f"{s.seconds_per_step:.2f} | {s.peak_rss_mib:.0f} | {s.num_timed_steps} |")
    by = {s.tool: s for s in summaries}
    for ours in summaries:
        if "trl" in by and ours.tool != "trl":
            trl = by["trl"]
            lines.append(f"| {ours.tool} / TRL | {ours.tokens_per_second / trl.tokens_per_second:.2f}x | "
                         f"{ours.pairs_per_second / trl.pairs_per_second:.2f}x | "
                         f"{ours.seconds_per_step / trl.seconds_per_step:.2f}x | "
                         f"{ours.peak_rss_mib / trl.peak_rss_mib:.2f}x | |")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    return text + ("\n" + check_line(check) + "\n" if check else "")


def check_line(check: dict) -> str:
    trl, ours = check["trl"], check["hpalign"]
    parts = [f"{name} TRL {trl[name]:.6g} / hpalign {ours[name]:.6g} ({'ok' if ok else 'DIFFERS'})"
             for name, ok in check["agree"].items()]
    if "step2_loss" in check:  # not part of the check: with LoRA the adapters start from different random A
        parts.append("step-2 loss TRL {trl:.6g} / hpalign {hpalign:.6g}".format(**check["step2_loss"]))
    return f"Step-1 check ({'agree' if check['all_agree'] else 'DISAGREE'}): " + "; ".join(parts)


def write_results(out_dir: Path, stem: str, *, meta: dict, summaries: list[Summary], check: dict,
                  table: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / stem
    payload = {"meta": meta, "step_one_check": check, "results": [asdict(s) for s in summaries]}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    path.with_suffix(".md").write_text(table)
    return path


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rlhf_type", default="dpo", choices=["dpo"])
    parser.add_argument("--sft_type", default="lora", choices=["lora", "full"])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-random-llama"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run (>= 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool, alternated TRL hpalign TRL ...")
    parser.add_argument("--check_only", action="store_true", help="one step per tool: the step-1 check only")
    parser.add_argument("--force", action="store_true", help="time even when the step-1 check disagrees")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=None, help="default: 1e-4 LoRA, 1e-5 full")
    parser.add_argument("--precompute_ref_log_probs", action="store_true", help="for both tools")
    parser.add_argument("--trl_bf16", action="store_true", help="TRL's own default (bf16 autocast); off: fp32")
    parser.add_argument("--trl_gradient_checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"),
                        default=True, help="TRL's own default: true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra hpalign run with these flags, alternated with the others, e.g. "
                             "--variant 'no-share=--share_prompt false' (measures one lever's share)")
    parser.add_argument("--no_trl", action="store_true", help="hpalign variants only (no TRL run, no check)")
    args = parser.parse_args(argv)
    args.variants = {BASELINE: []}
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        if not name or name in args.variants or name == "trl":
            parser.error(f"--variant {spec!r}: give a new NAME=FLAGS")
        args.variants[name] = flags.split()
    args.tools = ([] if args.no_trl else ["trl"]) + list(args.variants)
    if args.check_only:
        args.steps, args.warmup, args.repeats = 0, 1, 1
    if args.steps < 0 or args.warmup < 1 or args.repeats < 1 or (args.steps == 0 and not args.check_only):
        parser.error("--steps must be >= 1 (or --check_only), --warmup >= 1 and --repeats >= 1")
    return args


def result_stem(args: argparse.Namespace, slug: str, date: str) -> str:
    model = "" if args.model == "smollm2" else f"_{args.model}"
    return f"trl_{args.rlhf_type}_{args.sft_type}{model}_{slug}_{date}"


def run_all(args: argparse.Namespace, model_dir: Path, tmp_dir: Path) -> tuple[list[RunResult], dict]:
    runs: list[RunResult] = []
    check: dict = {}
    for repeat in range(args.repeats):
        for tool in args.tools:
            run = run_once(args, model_dir, tmp_dir, tool=tool, repeat=repeat)
            timed = f"{sum(run.step_seconds) / max(len(run.step_seconds), 1):.2f} s/step, " if run.step_seconds else ""
            print(f"{tool:8} repeat {repeat}: {timed}{run.peak_rss_mib:.0f} MiB, {run.wall_seconds:.0f} s wall, "
                  f"step-1 loss {run.first_step['loss']:.6f}", flush=True)
            runs.append(run)
        if repeat == 0 and "trl" in args.tools:
            check = step_one_check(runs)
            print(check_line(check), flush=True)
            if not check["all_agree"] and not args.force:
                raise SystemExit("step 1 differs between the tools: timing not trusted (--force to time anyway)")
    return runs, check


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:2] == ["_trl_child"]:
        trl_child(json.loads(sys.argv[2]))
        return
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hpalign-bench-trl-") as tmp:
        tmp_dir = Path(tmp)
        model_dir = model_directory(args.model, tmp_dir)
        data_stats = prepare_data(tmp_dir, model_dir, args)
        runs, check = run_all(args, model_dir, tmp_dir)
    if args.check_only:
        return
    import trl

    summaries = [summarise(runs, tool=t, pairs_per_step=args.batch_size) for t in args.tools]
    slug, date = device_slug(), dt.date.today().isoformat()
    header = (f"dpo {args.sft_type} on {args.model}, {slug} ({platform.machine()}), TRL {trl.__version__}, "
              f"batch {args.batch_size} pairs, max_length {args.max_length}, lr {learning_rate(args):g}, "
              f"TRL {'bf16' if args.trl_bf16 else 'fp32'} gradient checkpointing "
              f"{'on' if args.trl_gradient_checkpointing else 'off'}, precompute_ref_log_probs "
              f"{str(args.precompute_ref_log_probs).lower()}, threads {args.threads or 'default'}, "
              f"{args.warmup} warm-up + {args.steps} timed steps x {args.repeats} repeat(s) per tool, "
              f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    table = markdown_table(summaries, header, check)
    print("\n" + table)
    meta = {"device": slug, "date": date, "model": args.model, "sft_type": args.sft_type, "trl": trl.__version__,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads, "batch_size": args.batch_size,
            "max_length": args.max_length, "learning_rate": learning_rate(args), "trl_bf16": args.trl_bf16,
            "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
            "precompute_ref_log_probs": args.precompute_ref_log_probs, "dataset": data_stats,
            "loadavg_1m_before_after": [load_before, os.getloadavg()[0]],
            "aggregation": "totals over timed steps: tokens/s = sum tokens / sum seconds"}
    path = write_results(args.out_dir, result_stem(args, slug, date), meta=meta, summaries=summaries,
                         check=check, table=table)
    print(f"wrote {path}.json and {path}.md")


if __name__ == "__main__":
    main()
