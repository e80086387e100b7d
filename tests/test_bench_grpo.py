"""benchmarks/bench_grpo.py, hpalign's GRPO against TRL 1.16's GRPOTrainer: its arguments, prompts (hpalign's
order, TRL's rendered rows), the flags and spec each tool gets, the runs' results, the summary, ratio and check
arithmetic and the table (fast), and (slow) one tiny run of both tools, and one of hpalign's vLLM engine,
skipped without TRL or without vLLM."""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from hpalign.data.templates import resolve_template
from hpalign.tiny_model import build_byte_tokenizer
from tests.benchmark_modules import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bg():
    return load_benchmark("bench_grpo")


@pytest.fixture(scope="module")
def ppo(bg) -> dict:
    """The globals of the bench_ppo module bench_grpo imported its shared parts from."""
    return bg.resolve_engine_pythons.__globals__


def grpo_args(bg, *extra: str) -> argparse.Namespace:
    args = bg.parse_args(["--model", "tiny-random-llama", "--steps", "2", "--warmup", "1", "--threads", "1", *extra])
    args.cuda, args.dtype = False, "float32"
    return args


def test_defaults_and_argument_errors(bg):
    args = bg.parse_args(["--vs", "trl"])
    assert (args.prompts, args.num_generations, args.prompts_per_step, args.batch_size) == ("builtin", 8, 2, 8)
    assert bg.completions_per_step(args) == 16 and bg.accumulation(args) == 2 and args.tools == ["trl", "hpalign"]
    assert (args.response_length, args.temperature, args.beta, args.epsilon, args.loss_type) == (53, 0.7, 0.04, 0.2,
                                                                                                  "grpo")
    assert bg.reward_kind(args) == "accuracy" and bg.reward_kind(bg.parse_args(["--prompts", "mixed"])) == "model"
    assert bg.reward_kind(bg.parse_args(["--prompts", "mixed", "--reward", "accuracy"])) == "accuracy"
    both = bg.parse_args(["--vs", "trl", "--hpalign_engines", "hf", "vllm", "--variant", "padded=--packing false"])
    assert both.tools == ["trl", "hpalign", "hpalign-vllm", "padded"]
    assert both.engines == {"hpalign": "hf", "hpalign-vllm": "vllm", "padded": "hf"}
    assert both.variants == {"hpalign": [], "hpalign-vllm": [], "padded": ["--packing", "false"]}
    assert both.variant_names == ["padded"]
    assert bg.parse_args(["--hpalign_engines", "vllm"]).tools == ["hpalign-vllm"]
    for bad in (["--batch_size", "6"], ["--num_generations", "1"], ["--warmup", "-1"], ["--loss_type", "sigmoid"],
                ["--variant", "hpalign-vllm=--packing false"], ["--hpalign_engines", "sglang"]):
        with pytest.raises(SystemExit):
            bg.parse_args(bad)


def test_learning_rate_and_checkpointing_are_hpalign_defaults(bg, tmp_path):
    from hpalign.config import DEFAULT_LEARNING_RATE, PPO_LORA_LEARNING_RATE
    from hpalign.tiny_model import build_byte_tokenizer, tiny_llama_config
    from hpalign.train.checkpointing import ACTIVATION_SHARE, ModelShape

    assert bg.learning_rate(grpo_args(bg)) == PPO_LORA_LEARNING_RATE
    assert bg.learning_rate(grpo_args(bg, "--sft_type", "full")) == DEFAULT_LEARNING_RATE["full"]
    assert bg.learning_rate(grpo_args(bg, "--learning_rate", "2e-5")) == 2e-5
    config = tiny_llama_config(len(build_byte_tokenizer()))
    config.save_pretrained(tmp_path)
    args = grpo_args(bg)  # 8 completions per micro-batch of 53 tokens each + the prompt: 8 x 100 tokens
    needed = 8 * 100 * ModelShape.of(config).activation_bytes_per_token_layer(4) * config.num_hidden_layers
    assert not bg.decide_checkpointing(args, 47.0, tmp_path, available_bytes=1.01 * needed / ACTIVATION_SHARE)
    assert bg.decide_checkpointing(args, 47.0, tmp_path, available_bytes=0.9 * needed / ACTIVATION_SHARE)
    assert bg.decide_checkpointing(grpo_args(bg, "--sft_type", "full"), 10.0, tmp_path)
    args.cuda = True
    assert bg.decide_checkpointing(args, 10.0, tmp_path)
    assert not bg.decide_checkpointing(grpo_args(bg, "--gradient_checkpointing", "false", "--sft_type", "full"), 1e4,
                                       tmp_path)
    assert bg.decide_checkpointing(grpo_args(bg, "--gradient_checkpointing", "true"), 10.0, tmp_path)


@pytest.mark.parametrize("available_gib", [0.05, 64.0])
def test_checkpointing_auto_is_what_hpalign_decides(bg, available_gib, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from hpalign.cli import build_config
    from hpalign.rl.session import update_micro_batch_tokens
    from hpalign.tiny_model import build_tiny_llama
    from hpalign.train import checkpointing
    from hpalign.train.session import decide_checkpointing_by_memory

    model, tokenizer = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(checkpointing, "available_memory_per_rank", lambda device: available_gib * 2**30)
    args = grpo_args(bg)
    cfg = build_config(["--rlhf_type", "grpo", "--batch_size", "8", "--gradient_accumulation_steps", "2",
                        "--response_length", "53", "--dataset", "x.jsonl", "--reward_funcs", "accuracy",
                        "--model", str(tmp_path)])
    assert cfg.train.gradient_checkpointing is None  # LoRA on a CPU: hpalign decides from the data
    prompts = [SimpleNamespace(prompt_ids=[0] * 200)]
    decide_checkpointing_by_memory(cfg, tokens=update_micro_batch_tokens(cfg, prompts), dtype=torch.float32)
    assert bg.decide_checkpointing(args, 200, tmp_path) == cfg.train.gradient_checkpointing == (available_gib < 1)


def test_builtin_prompts_are_the_arithmetic_questions(bg):
    from hpalign.rl.rewards import arithmetic_answer, last_user_turn

    rows = bg.grpo_prompt_rows("builtin", 30, seed=0, count_tokens=len)
    assert len(rows) == 30 and all(arithmetic_answer(last_user_turn(r["prompt"])) is not None for r in rows)
    with pytest.raises(ValueError, match="arithmetic prompts"):
        bg.grpo_prompt_rows("builtin", 10_000, seed=0, count_tokens=len)


@pytest.mark.parametrize("prompts", ["builtin", "mixed"])
def test_both_tools_get_the_same_prompts_in_hpalign_order(bg, tmp_path, prompts):
    from hpalign.train.schedule import BatchPlan, micro_batches_for_step

    build_byte_tokenizer().save_pretrained(tmp_path / "model")
    args = grpo_args(bg, "--prompts", prompts, "--num_generations", "4", "--prompts_per_step", "3", "--batch_size", "4")
    stats = bg.prepare_prompts(tmp_path, tmp_path / "model", args)
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    rows, trl_rows = read(bg.HPALIGN_PROMPTS), read(bg.TRL_PROMPTS)
    assert len(rows) == len(trl_rows) == 3 * 3 == stats["num_prompts"] and stats["pad_token"] == "<pad>"

    template = resolve_template(build_byte_tokenizer())
    plan = BatchPlan(len(rows), 3, 1, 1)  # what hpalign's rollout session builds: 12 responses / 4 per prompt
    order = [i for step in range(3) for i in micro_batches_for_step(plan, step, seed=args.seed, rank=0)[0]]
    assert sorted(order) == list(range(len(rows)))
    ids = [template.encode_prompt(rows[i]["prompt"]) for i in order]
    assert [template.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in trl_rows] == ids
    assert [r["messages"] for r in trl_rows] == [rows[i]["prompt"] for i in order]  # what the rule reward reads
    assert stats["prompt_tokens_per_step"] == [4 * sum(map(len, ids[k * 3:(k + 1) * 3])) for k in range(3)]
    assert stats["stop_token_ids"] == list(template.stop_token_ids)


def setup_for(tmp_path: Path, *, reward_dir: Path | None, checkpointing: bool = False) -> dict:
    return {"tmp_dir": tmp_path, "model_dir": Path("m"), "reward_dir": reward_dir, "pad_token": "<pad>",
            "stop_token_ids": [2], "gradient_checkpointing": checkpointing}


@pytest.mark.parametrize("sft_type", ["lora", "full"])
def test_both_tools_get_the_same_settings(bg, tmp_path, sft_type):
    from hpalign.cli import build_config

    trl_grpo = load_benchmark("trl_grpo")
    args = grpo_args(bg, "--sft_type", sft_type, "--num_generations", "4", "--prompts_per_step", "3", "--batch_size",
                     "6", "--response_length", "21", "--temperature", "0.9", "--beta", "0.1", "--epsilon", "0.3",
                     "--loss_type", "dapo", "--seed", "5")
    setup = setup_for(tmp_path, reward_dir=None, checkpointing=True)
    command = bg.hpalign_command(args, setup, "hpalign-0", ["--packing", "false"])
    cfg = build_config(command[command.index("rlhf") + 1:])
    (tmp_path / "spec.json").write_text(json.dumps(bg.trl_spec(args, setup, "trl-0")))
    spec = trl_grpo.read_spec(tmp_path / "spec.json")
    assert trl_grpo.completions_per_step(spec) == 12 == cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    assert spec["per_device_train_batch_size"] == cfg.train.batch_size == 6 and cfg.ppo.num_mini_batches == 1
    assert spec["gradient_accumulation_steps"] == cfg.train.gradient_accumulation_steps == 2
    algorithm = cfg.algorithm
    for key in ("num_generations", "beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards", "num_iterations",
                "mask_truncated_completions"):
        assert spec[key] == getattr(algorithm, key), key
    assert (algorithm.num_generations, algorithm.beta, algorithm.loss_type, algorithm.num_iterations) == (4, 0.1,
                                                                                                       "dapo", 1)
    assert spec["max_completion_length"] == cfg.ppo.response_length == 21
    assert spec["temperature"] == cfg.ppo.temperature == 0.9
    lr = 3e-4 if sft_type == "lora" else 1e-5
    assert spec["learning_rate"] == cfg.train.learning_rate == lr and spec["seed"] == cfg.train.seed == 5
    assert spec["gradient_checkpointing"] is cfg.train.gradient_checkpointing is True
    assert cfg.ppo.missing_eos_penalty is None and cfg.ppo.stop_token == "eos" and cfg.ppo.rollout_engine == "hf"
    assert spec["reward_funcs"] == cfg.ppo.reward_funcs == ["accuracy"] and spec["reward_model_dir"] is None
    assert cfg.train.max_steps == spec["steps"] == 3 and cfg.train.num_threads == 1 and not cfg.data.packing
    assert cfg.tuning.sft_type == spec["sft_type"] == sft_type and spec["stop_token_ids"] == [2]


def test_reward_model_and_vllm_engine_flags(bg, tmp_path):
    from hpalign.cli import build_config

    args = grpo_args(bg, "--prompts", "mixed", "--gradient_checkpointing", "false")
    setup = setup_for(tmp_path, reward_dir=tmp_path / "rm")
    command = bg.hpalign_command(args, setup, "hpalign-vllm-0", engine="vllm", python="/venv/bin/python")
    assert command[:3] == ["/venv/bin/python", "-m", "hpalign"]
    cfg = build_config(command[command.index("rlhf") + 1:])
    assert cfg.ppo.rollout_engine == "vllm" and cfg.ppo.reward_model_id_or_path == str(tmp_path / "rm")
    assert cfg.ppo.reward_funcs == [] and cfg.train.gradient_checkpointing is False
    spec = bg.trl_spec(args, setup, "trl-0")
    assert spec["reward_model_dir"] == str(tmp_path / "rm") and spec["reward_funcs"] == []
    assert spec["gradient_checkpointing"] is False
    args.cuda = True  # the GPU peak comes from the wrapper's file
    command = bg.hpalign_command(args, setup, "hpalign-0")
    assert command[1] == "-c" and command[3] == str(tmp_path / "hpalign-0.gpu.json") and command[4] == "rlhf"


def test_missing_vllm_skips_that_engine(bg, ppo, monkeypatch, capsys):
    args = bg.parse_args(["--vs", "trl", "--hpalign_engines", "hf", "vllm"])
    monkeypatch.setitem(ppo, "vllm_python", lambda: None)
    pythons, skipped = bg.resolve_engine_pythons(args)
    assert pythons == {"hf": sys.executable} and args.tools == ["trl", "hpalign"] and "hpalign-vllm" not in args.engines
    assert len(skipped) == 1 and skipped[0].startswith("hpalign-vllm skipped: vLLM is not installed here")
    assert skipped[0] in capsys.readouterr().out
    args = bg.parse_args(["--hpalign_engines", "hf", "vllm"])
    monkeypatch.setitem(ppo, "vllm_python", lambda: "/venv/bin/python")
    assert bg.resolve_engine_pythons(args) == ({"hf": sys.executable, "vllm": "/venv/bin/python"}, [])


def test_results_are_read_from_both_tools(bg, tmp_path):
    step = {"step_s": 4.0, "generation_s": 1.0, "scoring_s": 1.0, "update_s": 1.5, "other_s": 0.5,
            "rollout_tokens": 30, "prompt_tokens": 99, "completions": 16, "metrics": {"reward": 0.25}}
    (tmp_path / "trl.json").write_text(json.dumps({"trl_version": "1.16.0", "peak_gpu_mib": None, "steps": [step],
                                                   "settings": {"gradient_checkpointing": False}}))
    steps, info = bg.read_trl_run(tmp_path / "trl.json")
    assert steps[0]["episodes"] == 16 and steps[0]["score"] == 0.25 and steps[0]["prompt_tokens"] == 99
    assert info == {"trl_version": "1.16.0", "peak_gpu_mib": None, "gradient_checkpointing": False}
    run_dir = tmp_path / "hpalign-vllm-0"
    run_dir.mkdir()
    lines = [{"step": 1, "time/weight_sync": 0.5, "time/generation": 1.0, "time/scoring": 0.5, "time/update": 2.0,
              "time/step": 4.25, "rollout/response_length": 10.5, "completions/mean_length": 10.5, "episode": 16,
              "reward": 0.75}, {"step": 1}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "summary.json").write_text(json.dumps({"data": {"num_train": 4, "num_skipped": 0, "num_truncated": 0}}))
    (run_dir / "config.yaml").write_text("train:\n  gradient_checkpointing: false\nppo:\n  rollout_engine: vllm\n")
    steps, data = bg.read_hpalign_run(run_dir)
    assert steps[0]["generation_s"] == 1.5 and steps[0]["weight_sync_s"] == 0.5  # the sync is generation's
    assert steps[0]["other_s"] == pytest.approx(0.25) and steps[0]["rollout_tokens"] == 168
    assert steps[0]["episodes"] == 16 and steps[0]["score"] == 0.75
    assert data["rollout_engine"] == "vllm" and data["gradient_checkpointing"] is False


def fake_run(bg, tool: str, step_seconds: list[float], *, rss: float, repeat: int = 0, tokens: int = 160,
             engine: str = "hf", checkpointing: bool = False):
    steps = [{"step_s": s, "generation_s": s / 2, "scoring_s": s / 8, "update_s": s / 4, "other_s": s / 8,
              "rollout_tokens": tokens, "episodes": 16, "prompt_tokens": 400} for s in step_seconds]
    data = {"num_train": 4, "num_skipped": 0, "num_truncated": 0, "gradient_checkpointing": checkpointing,
            "rollout_engine": engine}
    return bg.PPORun(tool, repeat, steps, rss, 10.0, None, data)


def test_summary_and_ratios(bg):
    runs = [fake_run(bg, "trl", [30.0, 8.0, 12.0], rss=2000.0), fake_run(bg, "hpalign", [30.0, 4.0, 6.0], rss=900.0),
            fake_run(bg, "hpalign-vllm", [30.0, 2.0, 3.0], rss=2200.0, engine="vllm")]
    trl, hf, vllm = (bg.summarise(runs, tool=t, warmup=1, prompts_per_step=16) for t in ("trl", "hpalign",
                                                                                          "hpalign-vllm"))
    assert trl.seconds_per_step == 10.0 and hf.seconds_per_step == 5.0 and vllm.seconds_per_step == 2.5
    assert trl.phase_seconds == pytest.approx({"generation": 5.0, "scoring": 1.25, "update": 2.5, "other": 1.25})
    assert trl.rollout_tokens_per_second == pytest.approx(320 / 10.0) and trl.episodes_per_second == 1.6
    assert trl.mean_response_tokens == 10.0 and trl.num_timed_steps == 2
    r = bg.ratios(hf, trl)
    assert r["step_throughput"] == 2.0 and r["rollout_tokens_per_second"] == 2.0 and r["peak_memory"] == 0.45
    assert r["target_met"]
    r = bg.ratios(vllm, trl)
    assert r["step_throughput"] == 4.0 and r["peak_memory"] == 1.1 and not r["target_met"]  # more memory


def test_check_catches_different_work(bg):
    runs = [fake_run(bg, "trl", [1.0, 1.0], rss=1.0), fake_run(bg, "hpalign-vllm", [1.0, 1.0], rss=1.0, engine="vllm")]
    check = lambda: bg.run_check(runs, prompt_tokens_per_step=[400, 400], completions_per_step=16,  # noqa: E731
                                 response_length=10, num_prompts=4, gradient_checkpointing=False,
                                 engines={"hpalign-vllm": "vllm"})
    assert check()["all_agree"]
    runs[0].steps[1]["prompt_tokens"] = 401
    runs[0].data["gradient_checkpointing"] = True
    runs[1].data["rollout_engine"] = "hf"
    assert sorted(k for k, ok in check()["agree"].items() if not ok) == [
        "hpalign-vllm-0: every prompt loaded whole, rollouts on vllm", "trl-0: gradient checkpointing False",
        "trl-0: prompt tokens per step = hpalign's"]
    variant = fake_run(bg, "no-gc", [1.0, 1.0], rss=1.0, checkpointing=True)
    assert bg.run_check([variant], prompt_tokens_per_step=[400, 400], completions_per_step=16, response_length=10,
                        num_prompts=4, gradient_checkpointing=False, engines={"no-gc": "hf"},
                        variants=("no-gc",))["all_agree"]  # a --variant may change it
    runs[1].steps[0]["episodes"] = 8
    assert not check()["agree"]["hpalign-vllm-0: 2 steps of 16 completions <= 10 tokens"]
    runs[0].steps[0]["rollout_tokens"] = 161  # more than 16 x 10
    assert not check()["agree"]["trl-0: 2 steps of 16 completions <= 10 tokens"]


def test_table_shows_tools_ratios_and_grpo_notes(bg, ppo):
    runs = [fake_run(bg, "trl", [1.0, 8.0], rss=1000.0), fake_run(bg, "hpalign", [1.0, 4.0], rss=700.0),
            fake_run(bg, "hpalign-vllm", [1.0, 2.0], rss=1200.0, engine="vllm")]
    summaries = [bg.summarise(runs, tool=t, warmup=1, prompts_per_step=16) for t in ("trl", "hpalign", "hpalign-vllm")]
    check = bg.run_check(runs, prompt_tokens_per_step=[400, 400], completions_per_step=16, response_length=53,
                         num_prompts=4, gradient_checkpointing=False, engines={"hpalign-vllm": "vllm"})
    table = bg.markdown_table(summaries, "HEADER", check=check, notes=bg.NOTES)
    assert "| trl | 8.00 | 4.00 | 1.00 | 2.00 | 1.00 | 40 | 2.000 | 10.0 | 1000 | - | 1 |" in table
    assert "hpalign (gradient checkpointing off) / TRL: step throughput **2.00x**" in table
    assert "hpalign-vllm (gradient checkpointing off) / TRL: step throughput **4.00x**" in table
    assert "Check: all agree" in table and all(note in table for note in bg.NOTES)
    assert ppo["NOTES"][0] not in table  # PPO's value-model note


# ----------------------------------------------------------------------------- real runs (slow)


def vllm_python() -> str:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    return sys.executable


TINY = ["--model", "tiny-random-llama", "--steps", "1", "--warmup", "0", "--repeats", "1", "--prompts_per_step", "2",
        "--num_generations", "2", "--batch_size", "2", "--response_length", "8", "--threads", "1"]


def written_result(tmp_path: Path, prefix: str) -> dict:
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and written[0].startswith(prefix), written
    assert written[0].endswith("_builtin.json") and written[1].endswith("_builtin.md")
    return json.loads((tmp_path / written[0]).read_text())


def check_summaries(result: dict, tools: list[str]) -> None:
    assert result["check"]["all_agree"] and [s["tool"] for s in result["results"]] == tools
    for summary in result["results"]:
        assert summary["num_timed_steps"] == 1 and 0 < summary["mean_response_tokens"] <= 8
        assert min(summary["phase_seconds"][p] for p in ("generation", "scoring", "update")) > 0
        assert summary["peak_rss_mib"] > 100 and summary["episodes_per_second"] > 0


@pytest.mark.slow
def test_tiny_run_of_both_tools_and_both_hpalign_engines(bg, tmp_path, capsys):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is the benchmark extra: pip install '.[bench]'")
    vllm_python()
    start = time.perf_counter()
    bg.main([*TINY, "--vs", "trl", "--hpalign_engines", "hf", "vllm", "--out_dir", str(tmp_path)])
    result = written_result(tmp_path, "grpo_lora_tiny-random-llama_vs-trl_")
    check_summaries(result, ["trl", "hpalign", "hpalign-vllm"])
    assert result["meta"]["trl"] == "1.16.0" and result["meta"]["reward"] == "accuracy"
    assert result["meta"]["engines"] == {"hpalign": "hf", "hpalign-vllm": "vllm"} and result["meta"]["skipped"] == []
    assert result["meta"]["gradient_checkpointing"] is False and result["check"]["prompt_tokens_per_step"][0] > 0
    assert "hpalign (gradient checkpointing off) / TRL: step throughput" in capsys.readouterr().out
    print(f"bench_grpo tiny run: {time.perf_counter() - start:.1f} s")
