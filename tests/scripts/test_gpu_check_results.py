"""scripts/gpu_check_results.py on a CPU: the cuda-vs-torch loss comparison, the summary files, and
the targets read from benchmark JSON shaped by the benchmarks' own result dataclasses. Nothing here
needs a GPU or starts a process."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.scripts.conftest import REPO, load, make_ctx

# ----------------------------------------------------------------------------- loss comparison


def write_metrics(run_dir: Path, losses: list[float]) -> Path:
    run_dir.mkdir(parents=True)
    records = [{"step": k + 1, "train/loss": loss, "train/step_seconds": 0.1} for k, loss in enumerate(losses)]
    records.append({"step": len(losses), "eval/rewards/accuracies": 0.5})  # eval records are not compared
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_losses_within_bf16_tolerance_pass(results, tmp_path):
    cuda = write_metrics(tmp_path / "cuda", [0.6931, 0.70, 5.0])
    ref = write_metrics(tmp_path / "torch", [0.6931, 0.71, 5.09])  # 5.09: |d| 0.09 <= 0.02 + 0.02 * 5.09
    result = results.compare_losses(cuda, ref)
    assert result.ok and result.steps == 3
    assert result.max_abs_diff == pytest.approx(0.09)


def test_losses_beyond_tolerance_fail_and_name_the_step(results, tmp_path):
    result = results.compare_losses(write_metrics(tmp_path / "cuda", [0.69, 0.50]),
                               write_metrics(tmp_path / "torch", [0.69, 0.60]))
    assert not result.ok and "[2]" in result.reason
    assert result.max_abs_diff == pytest.approx(0.10)


def test_missing_metrics_or_other_steps_fail(results, tmp_path):
    ref = write_metrics(tmp_path / "torch", [0.69, 0.60])
    missing = results.compare_losses(tmp_path / "never-ran", ref)
    assert not missing.ok and "metrics.jsonl" in missing.reason and missing.max_abs_diff is None
    shorter = results.compare_losses(write_metrics(tmp_path / "cuda", [0.69]), ref)
    assert not shorter.ok and "steps differ" in shorter.reason


def test_train_stage_pairs_each_cuda_run_with_its_torch_run(gc, results, tmp_path):
    ctx = make_ctx(gc, tmp_path, smollm2=True)
    for name, *_, impl in gc.train_runs(ctx):
        write_metrics(ctx.stage_dir("train") / name, [0.69, 0.65 if "full" in name and impl == "cuda" else 0.60])
    steps = [results.StepResult(name, 0, 1.0) for name, *_ in gc.train_runs(ctx)]
    result = gc.EVALUATORS["train"](ctx, steps)  # evaluate_train over gc.train_runs
    assert result.status == "failed"
    assert set(result.numbers) == {"tiny-random-llama-lora", "tiny-random-llama-full", "smollm2-135m-lora",
                                   "smollm2-135m-full"}
    assert result.numbers["tiny-random-llama-lora"]["ok"] and not result.numbers["smollm2-135m-full"]["ok"]
    target = results.train_target(result)
    assert target.status == "FAIL" and target.value == "max |diff| 0.05"


def test_pytest_counts_from_the_closing_line(results):
    out = "....F\nFAILED tests/ops/test_cuda_ext.py::test_x[1001]\n1 failed, 40 passed, 2 skipped, 900 deselected in 12.3s\n"
    assert results.pytest_counts(out) == {"failed": 1, "passed": 40, "skipped": 2, "deselected": 900}
    assert results.pytest_counts("no tests ran") == {}


# ----------------------------------------------------------------------------- summary


def test_summary_has_a_row_per_stage_and_the_reasons_of_skipped_ones(gc, results, tmp_path):
    stages = [results.StageResult("env", "passed", 3.2, numbers={"gpu_name": "NVIDIA H200", "torch": "2.11.0+cu130"}),
              results.StageResult("build", "failed", 40.0, reason="jit build (exit 1)"),
              results.StageResult("pytest", "skipped", reason="out of time (2 s of the budget left)"),
              results.StageResult("train", "skipped", reason="not selected (--stages)"),
              results.StageResult("logprobs", "skipped", reason="out of time (0 s of the budget left)"),
              results.StageResult("suite", "skipped", reason="out of time (0 s of the budget left)")]
    targets = [results.Target("MFU reported", "PASS", "31.0 %"), results.Target("train loss", "PASS", "max |diff| 0.001")]
    text = results.write_summary(tmp_path, stages, targets, {"date": "2026-12-03", "budget": 480, "seconds": 45.0,
                                                         "gpu_name": "NVIDIA H200", "notes": ["a note"]})
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | " in line]
    for stage in stages:
        assert any(row.startswith(f"| {stage.name} | {stage.status} |") for row in rows)
    assert "| pytest | skipped | 0 | out of time (2 s of the budget left) |" in text
    assert "gpu_name: NVIDIA H200" in text and "| MFU reported | PASS | 31.0 % |" in text and "- a note" in text
    assert all(line.count(" | ") == 3 for line in rows)  # a value's own "|" is escaped
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in saved["stages"]] == list(gc.STAGES)
    assert saved["stages"][2]["reason"].startswith("out of time") and saved["targets"][0]["status"] == "PASS"
    assert (tmp_path / "summary.md").read_text() == text


# ----------------------------------------------------------------------------- targets


@pytest.fixture(scope="module")
def bench_logprobs():
    return load("bench_logprobs", REPO / "benchmarks" / "bench_logprobs.py")


@pytest.fixture(scope="module")
def bench_train():
    return load("bench_train", REPO / "benchmarks" / "bench_train.py")


def logprobs_doc(bench_logprobs, *, floor: float | None, cuda_time: float, error: str | None = None) -> dict:
    """bench_logprobs.py's JSON: {"meta", "results": [asdict(Result)]} for one big and one small shape."""
    rows = []
    for num_rows, vocab in ((16384, 128256), (2048, 49152)):  # 4 GiB and 0.2 GiB of bf16 logits
        rows.append(bench_logprobs.Result("naive", num_rows, vocab, "bf16", 10.0, 30.0, time_vs_naive=1.0))
        rows.append(bench_logprobs.Result("cuda", num_rows, vocab, "bf16", 1.0, 30.0 * cuda_time,
                                          time_vs_naive=cuda_time, fwd_floor_frac=floor if num_rows > 2048 else 0.3,
                                          error=error if num_rows > 2048 else None))
    return {"meta": {"device": "nvidia-h200", "peak_gbps": 4800.0}, "results": [asdict(r) for r in rows]}


def test_kernel_targets_pass_on_large_logits(results, bench_logprobs):
    floor, speed = results.evaluate_logprobs_targets(logprobs_doc(bench_logprobs, floor=0.86, cuda_time=0.25))
    assert floor.status == "PASS" and floor.value == "min 86%"  # the 0.2 GiB shape (30%) is not judged
    assert speed.status == "PASS" and speed.value == "min 4.00x"


def test_kernel_targets_fail_below_the_thresholds_or_on_errors(results, bench_logprobs):
    floor, speed = results.evaluate_logprobs_targets(logprobs_doc(bench_logprobs, floor=0.7, cuda_time=0.5))
    assert (floor.status, speed.status) == ("FAIL", "FAIL")
    errored = results.evaluate_logprobs_targets(logprobs_doc(bench_logprobs, floor=0.9, cuda_time=0.2,
                                                        error="RuntimeError: CUDA out of memory"))
    assert all(t.status == "FAIL" and "out of memory" in t.detail for t in errored)


def test_kernel_targets_name_a_missing_field_or_a_null(results, bench_logprobs):
    doc = logprobs_doc(bench_logprobs, floor=0.9, cuda_time=0.2)
    for row in doc["results"]:
        row.pop("fwd_floor_frac")
    assert all(t.status == "UNKNOWN" and "results[].fwd_floor_frac" in t.detail
               for t in results.evaluate_logprobs_targets(doc))
    cpu = results.evaluate_logprobs_targets(logprobs_doc(bench_logprobs, floor=None, cuda_time=0.2))
    assert cpu[0].status == "UNKNOWN" and "null" in cpu[0].detail
    assert [t.status for t in results.evaluate_logprobs_targets(None)] == ["NOT RUN", "NOT RUN"]


def suite_doc(bench_train, *, ours: float, mfu: float | None, agree: bool = True) -> dict:
    """bench_train.py's JSON: {"meta", "step_one_check", "results": [asdict(Summary)]}."""
    summaries = [bench_train.Summary("trl", 10_000.0, 20.0, 0.8, 9000.0, 3, {"forward": 0.5}),
                 bench_train.Summary("hpalign", ours, 40.0, 0.4, 6000.0, 3, {"policy_forward": 0.3}, mfu=mfu)]
    check = {"trl": {"loss": 0.6931}, "hpalign": {"loss": 0.6931}, "agree": {"tokens": True, "loss": agree},
             "all_agree": agree, "why_not": None}
    return {"meta": {"device": "nvidia-h200", "model": "random-llama-1b", "rlhf_type": "dpo"},
            "step_one_check": check, "results": [asdict(s) for s in summaries]}


def test_suite_targets_from_bench_train_json(results, bench_train):
    speed, memory, mfu, check = results.evaluate_suite_targets(suite_doc(bench_train, ours=18_000.0, mfu=0.31))
    assert speed.status == "PASS" and speed.value == "1.80x"
    assert memory.status == "UNKNOWN" and "results[].peak_gpu_mib" in memory.detail
    assert "host RSS only: hpalign 6000 / TRL 9000 MiB" in memory.detail
    assert mfu.status == "PASS" and mfu.value == "31.0 %"
    assert check.status == "PASS"
    slow = results.evaluate_suite_targets(suite_doc(bench_train, ours=12_000.0, mfu=None, agree=False))
    assert [t.status for t in slow] == ["FAIL", "UNKNOWN", "FAIL", "FAIL"]
    assert "DIFFERS" in slow[3].detail


def test_suite_targets_without_the_trl_row_or_the_run(results, bench_train):
    doc = suite_doc(bench_train, ours=18_000.0, mfu=0.3)
    doc["results"] = doc["results"][1:]
    assert all(t.status == "UNKNOWN" and "trl" in t.detail for t in results.evaluate_suite_targets(doc))
    assert {t.status for t in results.evaluate_suite_targets(None)} == {"NOT RUN"}


def test_benchmark_stage_copies_its_outputs_and_keeps_the_json(gc, results, tmp_path, bench_train):
    ctx = make_ctx(gc, tmp_path)
    ctx.out.mkdir()
    ctx.stage_dir("suite").mkdir(parents=True)
    stem = ctx.stage_dir("suite") / "dpo_lora_random-llama-1b_vs-trl_nvidia-h200_2026-12-03"
    stem.with_suffix(".json").write_text(json.dumps(suite_doc(bench_train, ours=18_000.0, mfu=0.3)))
    stem.with_suffix(".md").write_text("table")
    result = results.evaluate_benchmark(ctx, [results.StepResult("bench_train dpo 1B vs trl", 0, 60.0)], "suite")
    assert result.status == "passed" and result.numbers["DPO 1B tokens/s >= 1.5x TRL"] == "1.80x"
    assert sorted(p.name for p in ctx.out.iterdir()) == [stem.name + ".json", stem.name + ".md"]
    assert results.all_targets(ctx, [result])[4].status == "UNKNOWN"  # memory, read from the kept JSON
    empty = gc.EVALUATORS["logprobs"](ctx, [results.StepResult("bench_logprobs", 1, 3.0)])
    assert empty.status == "failed" and "found 0" in empty.reason and "exit 1" in empty.reason
    assert empty.numbers["peak_gbps"] == "3350 (unknown GPU None: H100 SXM's figure)"  # the plan's peak
