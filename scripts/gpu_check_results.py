"""How scripts/gpu_check.py judges what it ran: each stage's steps to passed / failed (evaluating
stages), the benchmarks' JSON to the targets of docs/GPU.md (targets), and summary.md / summary.json
(summary). Pure reading of outputs and files: nothing here starts a process.

gpu_check.py imports this module, never the other way round: `python scripts/gpu_check.py` runs
that file as __main__, and importing gpu_check here would load a second copy of it. Context is
imported for type hints only.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_check import Context

LOSS_RTOL = LOSS_ATOL = 2e-2  # bf16: cuda and torch log-prob paths, 5 optimizer steps apart at most
PROBE_TAG = "GPU_CHECK_PROBE "
STANDIN_LABEL = "smollm2-shape, random weights"
# Target thresholds (docs/GPU.md): the kernel's forward at >= 80% of the read-once floor and its
# forward + backward >= 3x naive, on logits of at least 1 GiB (smaller ones time launch overhead);
# DPO on the 1B model >= 1.5x TRL's tokens/s at no more GPU memory, MFU reported.
FLOOR_TARGET, SPEEDUP_TARGET, TRL_TARGET, TARGET_MIN_BYTES = 0.80, 3.0, 1.5, 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class StepResult:
    name: str
    returncode: int | None  # None: killed at its deadline
    seconds: float
    output: str = ""


@dataclass
class StageResult:
    name: str
    status: str  # passed | failed | skipped
    seconds: float = 0.0
    reason: str = ""
    numbers: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    name: str
    status: str  # PASS | FAIL | UNKNOWN | NOT RUN
    value: str = "-"
    detail: str = ""


def exit_text(result: StepResult) -> str:
    return "killed at its deadline" if result.returncode is None else f"exit {result.returncode}"


# ----------------------------------------------------------------------------- evaluating stages
# (gpu_check.EVALUATORS maps each stage to its function here)


def failed_steps(steps: list[StepResult]) -> str:
    return "; ".join(f"{s.name} ({exit_text(s)})" for s in steps if s.returncode != 0)


def outcome(name: str, steps: list[StepResult], numbers: dict[str, object], problems: list[str]) -> StageResult:
    problems = [p for p in [failed_steps(steps), *problems] if p]
    status = "failed" if problems else "passed"
    return StageResult(name, status, reason="; ".join(problems), numbers=numbers)


def parse_probe(output: str) -> dict[str, object]:
    for line in reversed(output.splitlines()):
        if line.startswith(PROBE_TAG):
            return json.loads(line[len(PROBE_TAG):])
    return {}


def evaluate_env(ctx: Context, steps: list[StepResult]) -> StageResult:
    ctx.facts = parse_probe(next((s.output for s in steps if s.name == "versions"), ""))
    ctx.gpu_name = ctx.facts.get("gpu_name") or ctx.gpu_name
    keys = ("gpu_name", "torch", "torch_cuda", "transformers", "deepspeed", "peft", "trl", "python")
    numbers = {k: ctx.facts.get(k) for k in keys if k in ctx.facts}
    problems = []
    if not ctx.facts:
        problems.append("no probe output")
    elif not ctx.facts.get("cuda_available"):
        problems.append("torch sees no CUDA device")
    if ctx.facts.get("deepspeed_import", "ok") != "ok":
        problems.append(f"import deepspeed: {ctx.facts['deepspeed_import']}")
    return outcome("env", steps, numbers, problems)


def evaluate_build(ctx: Context, steps: list[StepResult]) -> StageResult:
    return outcome("build", steps, {}, [])


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's closing line ('3 failed, 40 passed, 2 skipped, 300 deselected in 9s')."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)]
    if not lines:
        return {}
    return {word if word != "errors" else "error": int(n)
            for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", lines[-1])}


def evaluate_pytest(ctx: Context, steps: list[StepResult]) -> StageResult:
    counts = pytest_counts(steps[0].output if steps else "")
    problems = [] if counts.get("passed") else ["no GPU test passed"]
    return outcome("pytest", steps, dict(counts), problems)


@dataclass(frozen=True)
class LossComparison:
    ok: bool
    steps: int = 0
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    reason: str = ""


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from a run's metrics.jsonl (the training records only)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["train/loss"]) for r in records if "train/loss" in r}


def compare_losses(cuda_dir: Path, torch_dir: Path, *, rtol: float = LOSS_RTOL,
                   atol: float = LOSS_ATOL) -> LossComparison:
    """Per-step train/loss of two runs equal within |a - b| <= atol + rtol * |b| (b: the torch run)."""
    try:
        cuda, ref = train_losses(cuda_dir), train_losses(torch_dir)
    except (OSError, ValueError, KeyError) as exc:
        return LossComparison(False, reason=f"cannot read metrics: {exc}")
    if not ref or cuda.keys() != ref.keys():
        return LossComparison(False, reason=f"logged steps differ: cuda {sorted(cuda)}, torch {sorted(ref)}")
    diffs = [abs(cuda[k] - ref[k]) for k in ref]
    rels = [d / abs(ref[k]) if ref[k] else 0.0 for d, k in zip(diffs, ref, strict=True)]
    bad = [k for k, d in zip(ref, diffs, strict=True) if d > atol + rtol * abs(ref[k])]
    reason = f"steps {bad} outside rel {rtol:g} abs {atol:g}" if bad else ""
    return LossComparison(not bad, len(ref), max(diffs), max(rels), reason)


def evaluate_train(ctx: Context, steps: list[StepResult], *,
                   runs: list[tuple[str, str, str, str, str]]) -> StageResult:
    """Each cuda run of `runs` (gpu_check.train_runs: run name, model key, --model, sft type, impl)
    against its torch run."""
    numbers: dict[str, object] = {}
    problems = []
    for name, *_, impl in runs:
        if impl != "cuda":
            continue
        pair = name.removesuffix("-cuda")  # paired with the same run on the torch path
        comparison = compare_losses(ctx.stage_dir("train") / name, ctx.stage_dir("train") / f"{pair}-torch")
        numbers[pair] = asdict(comparison)
        if not comparison.ok:
            problems.append(f"{pair}: {comparison.reason}")
    if not ctx.smollm2_installed:
        numbers["smollm2_note"] = standin_label(ctx)
    return outcome("train", steps, numbers, problems)


def standin_label(ctx: Context) -> str:
    marker = ctx.standin_dir / "STANDIN.txt"
    return marker.read_text().strip() if marker.is_file() else STANDIN_LABEL


def collect_json(ctx: Context, stage: str) -> tuple[dict | None, str]:
    """The stage's benchmark JSON (copied with its md/png into --out), or None and why."""
    found = sorted(ctx.stage_dir(stage).glob("*.json"))
    for path in ctx.stage_dir(stage).glob("*"):
        if path.suffix in (".json", ".md", ".png"):
            shutil.copy2(path, ctx.out / path.name)
    if len(found) != 1:
        return None, f"expected one JSON in {ctx.stage_dir(stage)}, found {len(found)}"
    return json.loads(found[0].read_text()), ""


def evaluate_benchmark(ctx: Context, steps: list[StepResult], stage: str, *,
                       peak: tuple[float, str] | None = None) -> StageResult:
    """The stage's JSON, its targets' values as numbers, and `peak` (gpu_check.peak_gbps) when given."""
    doc, why = collect_json(ctx, stage)
    if doc is not None:
        ctx.docs[stage] = doc
    targets = evaluate_logprobs_targets(doc) if stage == "logprobs" else evaluate_suite_targets(doc)
    numbers: dict[str, object] = {t.name: t.value for t in targets if t.value != "-"}
    if peak is not None:
        gbps, source = peak
        numbers["peak_gbps"] = f"{gbps:g} ({source})"
    return outcome(stage, steps, numbers, [why] if why else [])


# ----------------------------------------------------------------------------- targets


def _missing(rows: list[dict], fields: tuple[str, ...], where: str) -> str:
    absent = sorted({f for r in rows for f in fields if f not in r})
    return f"missing field {', '.join(f'{where}[].{f}' for f in absent)}" if absent else ""


def evaluate_logprobs_targets(doc: dict | None) -> list[Target]:
    """The kernel's targets from bench_logprobs.py's JSON ({"meta", "results": [Result ...]})."""
    names = (f"kernel fwd >= {FLOOR_TARGET:.0%} of read-once floor", f"kernel fwd+bwd >= {SPEEDUP_TARGET:g}x naive")
    if doc is None:
        return [Target(n, "NOT RUN") for n in names]
    rows = [r for r in doc.get("results", []) if r.get("path") == "cuda"]
    missing = _missing(rows, ("num_rows", "vocab", "dtype", "fwd_floor_frac", "time_vs_naive", "error"), "results")
    if not rows or missing:
        return [Target(n, "UNKNOWN", detail=missing or "no cuda rows in results[]") for n in names]
    errors = [f"N={r['num_rows']} V={r['vocab']}: {r['error']}" for r in rows if r["error"]]
    big = [r for r in rows if not r["error"] and r["num_rows"] * r["vocab"] * DTYPE_BYTES[r["dtype"]] >= TARGET_MIN_BYTES]
    if not big:
        return [Target(n, "FAIL", detail="; ".join(errors) or "no cuda row with logits >= 1 GiB") for n in names]
    floors = {_shape(r): r["fwd_floor_frac"] for r in big}
    speedups = {_shape(r): 1 / r["time_vs_naive"] if r["time_vs_naive"] else None for r in big}
    return [_min_target(names[0], floors, FLOOR_TARGET, "{:.0%}", errors),
            _min_target(names[1], speedups, SPEEDUP_TARGET, "{:.2f}x", errors)]


def _shape(row: dict) -> str:
    return f"N={row['num_rows']} V={row['vocab']} {row['dtype']}"


def _min_target(name: str, values: dict[str, float | None], threshold: float, fmt: str,
                errors: list[str]) -> Target:
    """PASS when the smallest value over the shapes reaches the threshold (and no cuda row failed)."""
    if any(v is None for v in values.values()):
        nulls = [k for k, v in values.items() if v is None]
        return Target(name, "UNKNOWN", detail=f"null for {nulls} (not measured on a CUDA device?)")
    detail = "; ".join(f"{k}: {fmt.format(v)}" for k, v in values.items())
    worst = min(values.values())
    status = "PASS" if worst >= threshold and not errors else "FAIL"
    return Target(name, status, f"min {fmt.format(worst)}", "; ".join([detail, *errors]))


def evaluate_suite_targets(doc: dict | None) -> list[Target]:
    """The suite's targets from bench_train.py's JSON ({"meta", "step_one_check", "results": [Summary]})."""
    names = (f"DPO 1B tokens/s >= {TRL_TARGET:g}x TRL", "DPO 1B GPU memory <= TRL", "MFU reported",
             "step-1 loss check vs TRL")
    if doc is None:
        return [Target(n, "NOT RUN") for n in names]
    by_tool = {r.get("tool"): r for r in doc.get("results", [])}
    ours, trl = by_tool.get("hpalign"), by_tool.get("trl")
    if ours is None or trl is None:
        return [Target(n, "UNKNOWN", detail="results[] lacks the hpalign or the trl row") for n in names]
    return [_speed_target(names[0], ours, trl), _memory_target(names[1], ours, trl),
            _mfu_target(names[2], ours), _check_target(names[3], doc)]


def _speed_target(name: str, ours: dict, trl: dict) -> Target:
    missing = _missing([ours, trl], ("tokens_per_second",), "results")
    if missing:
        return Target(name, "UNKNOWN", detail=missing)
    ratio = ours["tokens_per_second"] / trl["tokens_per_second"]
    detail = f"hpalign {ours['tokens_per_second']:.0f} / TRL {trl['tokens_per_second']:.0f} tokens/s"
    return Target(name, "PASS" if ratio >= TRL_TARGET else "FAIL", f"{ratio:.2f}x", detail)


def _memory_target(name: str, ours: dict, trl: dict) -> Target:
    if ours.get("peak_gpu_mib") is not None and trl.get("peak_gpu_mib") is not None:
        ratio = ours["peak_gpu_mib"] / trl["peak_gpu_mib"]
        return Target(name, "PASS" if ratio <= 1.0 else "FAIL", f"{ratio:.2f}x",
                      f"hpalign {ours['peak_gpu_mib']:.0f} / TRL {trl['peak_gpu_mib']:.0f} MiB")
    rss = ""
    if "peak_rss_mib" in ours and "peak_rss_mib" in trl:
        rss = f"; host RSS only: hpalign {ours['peak_rss_mib']:.0f} / TRL {trl['peak_rss_mib']:.0f} MiB"
    return Target(name, "UNKNOWN", detail="results[].peak_gpu_mib is missing or null (a run without CUDA "
                  "records the host RSS only)" + rss)


def _mfu_target(name: str, ours: dict) -> Target:
    if "mfu" not in ours:
        return Target(name, "UNKNOWN", detail="missing field results[].mfu")
    if ours["mfu"] is None:
        return Target(name, "FAIL", detail="results[].mfu is null (GPU not in PEAK_BF16_FLOPS?)")
    return Target(name, "PASS", f"{100 * ours['mfu']:.1f} %")


def _check_target(name: str, doc: dict) -> Target:
    check = doc.get("step_one_check")
    if not check or "all_agree" not in check:
        return Target(name, "UNKNOWN", detail="missing field step_one_check.all_agree")
    detail = ", ".join(f"{k} {'ok' if v else 'DIFFERS'}" for k, v in check.get("agree", {}).items())
    return Target(name, "PASS" if check["all_agree"] else "FAIL", detail=detail + " (timed with --force)")


def train_target(stage: StageResult | None) -> Target:
    name = f"train: cuda == torch loss (rel {LOSS_RTOL:g}, abs {LOSS_ATOL:g})"
    if stage is None or stage.status == "skipped":
        return Target(name, "NOT RUN")
    pairs = {k: v for k, v in stage.numbers.items() if isinstance(v, dict)}
    diffs = [v["max_abs_diff"] for v in pairs.values() if v.get("max_abs_diff") is not None]
    value = f"max |diff| {max(diffs):.2g}" if diffs else "-"
    ok = bool(pairs) and all(v["ok"] for v in pairs.values())
    return Target(name, "PASS" if ok else "FAIL", value, "; ".join(f"{k}: {v['reason'] or 'ok'}" for k, v in pairs.items()))


def all_targets(ctx: Context, stages: list[StageResult]) -> list[Target]:
    by_name = {s.name: s for s in stages}
    return [train_target(by_name.get("train")), *evaluate_logprobs_targets(ctx.docs.get("logprobs")),
            *evaluate_suite_targets(ctx.docs.get("suite"))]


# ----------------------------------------------------------------------------- summary


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cell(numbers: dict[str, object]) -> str:
    parts = []
    for key, value in numbers.items():
        if isinstance(value, dict):  # a train pair
            diff = value.get("max_abs_diff")
            value = f"{'ok' if value.get('ok') else 'FAIL'}, max |diff| {diff:.2g}" if diff is not None else value.get("reason")
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def summary_markdown(stages: list[StageResult], targets: list[Target], meta: dict[str, object]) -> str:
    lines = [f"# hpalign GPU check, {meta.get('date')}", "",
             f"{meta.get('gpu_name') or 'GPU unknown'}; budget {meta.get('budget', 0):.0f} s, took {meta.get('seconds', 0):.0f} s.",
             "", "| stage | status | seconds | key numbers |", "|---|---|---|---|"]
    for s in stages:
        cell = "; ".join(p for p in (s.reason, _cell(s.numbers)) if p)
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {_md(cell)} |")
    lines += ["", "| target | status | value | detail |", "|---|---|---|---|"]
    lines += [f"| {_md(t.name)} | {t.status} | {_md(t.value)} | {_md(t.detail)} |" for t in targets]
    notes = meta.get("notes") or []
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def write_summary(out: Path, stages: list[StageResult], targets: list[Target], meta: dict[str, object]) -> str:
    """summary.md and summary.json in `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = summary_markdown(stages, targets, meta)
    (out / "summary.md").write_text(text)
    payload = {"meta": meta, "stages": [asdict(s) for s in stages], "targets": [asdict(t) for t in targets]}
    (out / "summary.json").write_text(json.dumps(payload, indent=2, default=str))
    return text
