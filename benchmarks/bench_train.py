"""Training throughput with and without packing, measured on the real training command.

Builds a preference set of widely varying lengths (prompts about 10..400 tokens, responses about
5..200, written as jsonl into a temporary directory), then runs `python -m hpalign rlhf` as a
subprocess per setting, alternating A B A B ... so that drift (other load on the machine, thermal
state) falls on both alike. Every run sees the same examples in the same steps (the schedule is a
pure function of the seed), so the two settings do the same work on the same real tokens.

Per run it reads `metrics.jsonl`: `train/step_seconds` and `train/tokens_per_second` (real tokens,
padding excluded) of each step after the first (warm-up), and the child's peak RSS from
`os.wait4` (that child alone, not the benchmark). Reported per setting (totals over the timed
steps of all repeats, e.g. tokens/s = all real tokens / all step seconds): real tokens/s, pairs/s (global batch / step seconds), s/step, peak RSS; and the
ratio packing on / off.

  python benchmarks/bench_train.py --rlhf_type dpo                         # SmolLM2, both settings
  python benchmarks/bench_train.py --rlhf_type dpo --model tiny-random-llama --steps 4
Writes benchmarks/results/train_<rlhf_type>_<device>_<date>.json and .md next to it.
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": "smollm2-135m-instruct", "tiny-random-llama": "tiny-random-llama"}
WORDS = ("the model learns which answer people prefer from pairs of responses to the same prompt and "
         "packing puts several short sequences into one row so that no compute is spent on padding "
         "tokens while every sequence still attends only to itself").split()


@dataclass
class RunResult:
    packing: bool
    repeat: int
    step_seconds: list[float]  # timed steps (warm-up excluded)
    tokens_per_second: list[float]
    peak_rss_mib: float
    wall_seconds: float


@dataclass
class Summary:
    packing: bool
    tokens_per_second: float  # real (non-padding) tokens per second, median over timed steps
    pairs_per_second: float
    seconds_per_step: float
    peak_rss_mib: float  # max over the runs of this setting
    num_timed_steps: int
    runs: list[RunResult] = field(default_factory=list)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def write_mixed_length_dataset(path: Path, *, num_rows: int, seed: int) -> dict[str, float]:
    """Rows with prompt / chosen / rejected of log-uniform word counts (prompt 8..320, responses
    4..160 words: about 10..400 and 5..200 tokens). Returns summary statistics of the lengths."""
    rng = random.Random(seed)

    def log_uniform(low: int, high: int) -> int:
        return round(low * (high / low) ** rng.random())

    lengths = []
    with path.open("w") as handle:
        for _ in range(num_rows):
            prompt, chosen, rejected = log_uniform(8, 320), log_uniform(4, 160), log_uniform(4, 160)
            lengths.append(prompt + max(chosen, rejected))
            row = {"prompt": words(rng, prompt), "chosen": words(rng, chosen), "rejected": words(rng, rejected)}
            handle.write(json.dumps(row) + "\n")
    return {"rows": num_rows, "words_per_sequence_median": statistics.median(lengths),
            "words_per_sequence_max": max(lengths), "words_per_sequence_min": min(lengths)}


def train_command(args: argparse.Namespace, dataset: Path, out_dir: Path, run_name: str, packing: bool) -> list[str]:
    return [
        sys.executable, "-m", "hpalign", "rlhf", "--rlhf_type", args.rlhf_type, "--model", MODELS[args.model],
        # A few held-out pairs: the end-of-run evaluation needs some (and is not timed).
        "--dataset", str(dataset), "--split_dataset_ratio", "0.05", "--max_steps", str(args.steps + 1),
        "--logging_steps", "1", "--eval_before_train", "false", "--num_eval_generations", "0",
        "--eval_steps", "0", "--save_steps", "1000000", "--packing", str(packing).lower(),
        "--batch_size", str(args.batch_size), "--max_length", str(args.max_length),
        "--output_dir", str(out_dir), "--run_name", run_name, *args.extra,
    ]


def run_once(args: argparse.Namespace, dataset: Path, out_dir: Path, *, packing: bool, repeat: int) -> RunResult:
    """One training run in a child process; its own peak RSS via os.wait4."""
    run_name = f"{'packed' if packing else 'padded'}-{repeat}"
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log_path = out_dir / f"{run_name}.log"
    start = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(train_command(args, dataset, out_dir, run_name, packing), cwd=REPO, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"training run {run_name} failed ({child.returncode}):\n{tail}")
    records = [json.loads(line) for line in (out_dir / run_name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/step_seconds" in r][1:]  # the first step warms up
    if not steps:
        raise RuntimeError(f"{run_name}: no timed steps in metrics.jsonl (need --steps >= 1)")
    rss_mib = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # macOS bytes, Linux KiB
    return RunResult(packing, repeat, [r["train/step_seconds"] for r in steps],
                     [r["train/tokens_per_second"] for r in steps], rss_mib, wall)


def summarise(runs: list[RunResult], *, packing: bool, pairs_per_step: int) -> Summary:
    """Totals over every timed step of this setting: tokens/s = sum of tokens / sum of seconds."""
    mine = [r for r in runs if r.packing == packing]
    seconds = [s for r in mine for s in r.step_seconds]
    tokens = sum(t * s for r in mine for t, s in zip(r.tokens_per_second, r.step_seconds, strict=True))
    total_s = sum(seconds)
    return Summary(packing, tokens / total_s, pairs_per_step * len(seconds) / total_s, total_s / len(seconds),
                   max(r.peak_rss_mib for r in mine), len(seconds), mine)


def markdown_table(summaries: list[Summary], header: str) -> str:
    lines = ["| packing | real tokens/s | pairs/s | s/step | peak RSS MiB | timed steps |", "|" + "---|" * 6]
    for s in summaries:
        lines.append(f"| {'on' if s.packing else 'off'} | {s.tokens_per_second:.0f} | {s.pairs_per_second:.3f} | "
                     f"{s.seconds_per_step:.2f} | {s.peak_rss_mib:.0f} | {s.num_timed_steps} |")
    by = {s.packing: s for s in summaries}
    if len(by) == 2:
        on, off = by[True], by[False]
        lines.append(f"| on / off | {on.tokens_per_second / off.tokens_per_second:.2f}x | "
                     f"{on.pairs_per_second / off.pairs_per_second:.2f}x | "
                     f"{on.seconds_per_step / off.seconds_per_step:.2f}x | "
                     f"{on.peak_rss_mib / off.peak_rss_mib:.2f}x | |")
    return header + "\n\n" + "\n".join(lines) + "\n"


def device_slug() -> str:
    import torch

    if torch.cuda.is_available():
        return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu{torch.get_num_threads()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rlhf_type", default="dpo", choices=["dpo", "cpo", "orpo", "simpo"])
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (one more warms up)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting, alternated A B A B")
    parser.add_argument("--packing", default="both", choices=["both", "true", "false"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the runs (default: torch's own choice)")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for hpalign rlhf")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = {"both": [True, False], "true": [True], "false": [False]}[args.packing]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hpalign-bench-") as tmp:
        tmp_dir = Path(tmp)
        num_rows = args.batch_size * (args.steps + 1) + 16
        data_stats = write_mixed_length_dataset(tmp_dir / "mixed.jsonl", num_rows=num_rows, seed=args.seed)
        runs = []
        for repeat in range(args.repeats):
            for packing in settings:
                run = run_once(args, tmp_dir / "mixed.jsonl", tmp_dir, packing=packing, repeat=repeat)
                print(f"packing={str(packing).lower():5} repeat {repeat}: "
                      f"{statistics.median(run.tokens_per_second):.0f} tok/s, "
                      f"{statistics.median(run.step_seconds):.2f} s/step, {run.peak_rss_mib:.0f} MiB, "
                      f"{run.wall_seconds:.0f} s wall", flush=True)
                runs.append(run)
    summaries = [summarise(runs, packing=p, pairs_per_step=args.batch_size) for p in settings]
    slug, date = device_slug(), dt.date.today().isoformat()
    header = (f"{args.rlhf_type} on {args.model}, {slug} ({platform.machine()}), batch {args.batch_size} pairs, "
              f"max_length {args.max_length}, threads {args.threads or 'default'}, {args.steps} timed steps x {args.repeats} repeat(s) per setting, "
              f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    table = markdown_table(summaries, header)
    print("\n" + table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"train_{args.rlhf_type}_{slug}_{date}"
    meta = {"device": slug, "date": date, "model": args.model, "rlhf_type": args.rlhf_type, "steps": args.steps,
            "repeats": args.repeats, "threads": args.threads, "batch_size": args.batch_size, "max_length": args.max_length,
            "extra_flags": args.extra, "dataset": data_stats,
            "loadavg_1m_before_after": [load_before, os.getloadavg()[0]]}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": [asdict(s) for s in summaries]},
                                                    indent=2))
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
