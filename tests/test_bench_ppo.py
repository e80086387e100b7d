"""benchmarks/bench_ppo.py, hpalign's PPO against TRL 1.12's PPOTrainer: its prompt sets (lengths, hpalign's
order, TRL's rendered rows), reward model, commands, the summary and ratio arithmetic and the table
(fast), and (slow) one tiny run of both tools, skipped without the TRL venv of scripts/trl_ppo_env.sh."""

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpalign.data.templates import resolve_template
from hpalign.tiny_model import build_byte_tokenizer, build_tiny_llama
from tests.benchmark_modules import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bp():
    return load_benchmark("bench_ppo")


def ppo_args(bp, *extra: str) -> argparse.Namespace:
    args = bp.parse_args(["--model", "tiny-random-llama", "--batch_size", "4", "--steps", "2", "--warmup", "1",
                          "--threads", "1", *extra])
    args.cuda, args.dtype = False, "float32"
    return args


def test_bench_train_hands_ppo_over(bp):
    assert bp.requested(["--rlhf_type", "ppo", "--vs", "trl"]) and bp.requested(["--rlhf_type=ppo"])
    assert not bp.requested(["--rlhf_type", "dpo", "--variant", "ppo"]) and not bp.requested(["ppo"])
    args = bp.parse_args(["--rlhf_type", "ppo", "--vs", "trl", "--prompts", "builtin"])
    assert args.tools == ["trl", "hpalign"] and args.prompts == "builtin" and args.batch_size == 8
    assert args.engines == {"hpalign": "hf"} and args.variants == {"hpalign": []}
    with pytest.raises(SystemExit):
        bp.parse_args(["--batch_size", "6", "--num_mini_batches", "4"])


def test_hpalign_engines_are_tools_of_their_own(bp):
    args = bp.parse_args(["--vs", "trl", "--hpalign_engines", "hf", "vllm", "--variant", "no-gc=--gradient_checkpointing "
                          "false"])
    assert args.tools == ["trl", "hpalign", "hpalign-vllm", "no-gc"]
    assert args.engines == {"hpalign": "hf", "hpalign-vllm": "vllm", "no-gc": "hf"}
    assert args.variants["no-gc"] == ["--gradient_checkpointing", "false"] and args.variants["hpalign-vllm"] == []
    assert bp.parse_args(["--hpalign_engines", "vllm", "vllm"]).tools == ["hpalign-vllm"]
    for bad in (["--hpalign_engines", "sglang"], ["--variant", "hpalign-vllm=--packing false"], ["--variant", "trl="]):
        with pytest.raises(SystemExit):
            bp.parse_args(bad)


def test_missing_vllm_skips_that_engine(bp, monkeypatch, capsys):
    args = bp.parse_args(["--vs", "trl", "--hpalign_engines", "hf", "vllm"])
    monkeypatch.setattr(bp, "vllm_python", lambda: None)
    pythons, skipped = bp.resolve_engine_pythons(args)
    assert pythons == {"hf": sys.executable} and args.tools == ["trl", "hpalign"] and list(args.engines) == ["hpalign"]
    assert len(skipped) == 1 and skipped[0].startswith("hpalign-vllm skipped: vLLM is not installed here")
    assert skipped[0] in capsys.readouterr().out
    monkeypatch.setattr(bp, "vllm_python", lambda: "/venv/bin/python")
    args = bp.parse_args(["--hpalign_engines", "vllm"])
    assert bp.resolve_engine_pythons(args) == ({"hf": sys.executable, "vllm": "/venv/bin/python"}, [])
    assert bp.resolve_engine_pythons(bp.parse_args([])) == ({"hf": sys.executable}, [])  # hf alone: no check


def test_shortest_prefix_reaches_the_target_and_no_more(bp):
    pool = ["ab", "c", "defg", "h"]
    count = lambda text: len(text.replace(" ", ""))  # noqa: E731
    assert bp.shortest_prefix(pool, 3, count) == "ab c"
    assert bp.shortest_prefix(pool, 1, count) == "ab" and bp.shortest_prefix(pool, 99, count) == "ab c defg h"


def test_mixed_prompts_vary_widely_in_length(bp):
    tokenizer = build_byte_tokenizer()
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    texts = bp.mixed_prompt_texts(48, seed=0, count_tokens=count)
    lengths = [count(t) for t in texts]
    assert min(lengths) >= 10 and max(lengths) <= 300 + 12  # the last word may overshoot the target
    assert max(lengths) > 8 * min(lengths)
    assert texts == bp.mixed_prompt_texts(48, seed=0, count_tokens=count)
    assert texts != bp.mixed_prompt_texts(48, seed=1, count_tokens=count)


@pytest.mark.parametrize("prompts", ["mixed", "builtin"])
def test_both_tools_get_the_same_prompts_in_hpalign_order(bp, tmp_path, prompts):
    from hpalign.train.schedule import BatchPlan, micro_batches_for_step

    build_byte_tokenizer().save_pretrained(tmp_path / "model")
    args = ppo_args(bp, "--prompts", prompts)
    stats = bp.prepare_prompts(tmp_path, tmp_path / "model", args)
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    rows, trl_rows = read(bp.HPALIGN_PROMPTS), read(bp.TRL_PROMPTS)
    assert len(rows) == len(trl_rows) == 4 * 3 == stats["num_prompts"] and stats["pad_token"] == "<pad>"

    template = resolve_template(build_byte_tokenizer())
    plan = BatchPlan(len(rows), 4, 1, 1)  # what hpalign's PPO runner builds for one process
    order = [micro_batches_for_step(plan, step, seed=args.seed, rank=0)[0] for step in range(3)]
    assert sorted(i for step in order for i in step) == list(range(len(rows)))
    flat = [i for step in order for i in step]
    ids = [template.encode_prompt(rows[i]["prompt"]) for i in flat]
    assert [template.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in trl_rows] == ids
    assert stats["prompt_tokens_per_step"] == [sum(map(len, ids[k * 4:(k + 1) * 4])) for k in range(3)]
    if prompts == "builtin":
        from hpalign.data.builtin import builtin_dataset

        assert [r["prompt"] for r in rows] == [e.prompt for e in builtin_dataset("prompt", "train")[:12]]
    else:
        assert stats["prompt_tokens_max"] > 3 * stats["prompt_tokens_min"]


def test_prompts_that_hpalign_would_cut_are_refused(bp, tmp_path):
    build_byte_tokenizer().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="raise --max_length"):
        bp.prepare_prompts(tmp_path, tmp_path / "model", ppo_args(bp, "--max_length", "200"))


def test_pad_token_is_never_the_stop_token(bp):
    tokenizer = build_byte_tokenizer()
    template = resolve_template(tokenizer)
    assert bp.stop_and_pad(tokenizer, template) == (tokenizer.eos_token_id, "<pad>")
    tokenizer.pad_token = tokenizer.eos_token  # as SmolLM2's tokenizer pads
    assert bp.stop_and_pad(tokenizer, template) == (tokenizer.eos_token_id, "<|endoftext|>")
    template.stop_token_ids = [tokenizer.eos_token_id, 7]
    with pytest.raises(ValueError, match="one stop token"):
        bp.stop_and_pad(tokenizer, template)


def test_both_reward_model_forms_score_alike(bp, tmp_path):
    """The seq-cls directory (TRL) and the hpalign RM checkpoint hold one model: hpalign reads both the
    same, and its score is what HF's sequence-classification forward gives."""
    from transformers import AutoModelForSequenceClassification

    from hpalign.data.collate import pad_batch
    from hpalign.data.types import TokenizedExample
    from hpalign.rl.models import load_frozen_reward_model
    from hpalign.train.forward import reward_stats

    model, tokenizer = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    dirs = {form: bp.write_reward_model(tmp_path / "policy", tmp_path / form, pad_token="<pad>", seed=3, form=form)
            for form in ("seq-cls", "rm-checkpoint")}
    example = TokenizedExample(prompt_ids=[5, 6, 7, 8], responses=[[9, 10, 258]], source="t")
    batch = pad_batch([example], pad_id=tokenizer.pad_token_id)
    scores = [reward_stats(load_frozen_reward_model(str(d), dtype=torch.float32)[0], batch, packed=False)
              .rewards_ER.item() for d in dirs.values()]
    hf = AutoModelForSequenceClassification.from_pretrained(dirs["seq-cls"]).eval()
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10, 258]])).logits.item()
    assert scores == pytest.approx([expected, expected], abs=1e-5) and expected != 0.0
    assert hf.config.pad_token_id == tokenizer.pad_token_id
    again = bp.write_reward_model(tmp_path / "policy", tmp_path / "again", pad_token="<pad>", seed=3, form="seq-cls")
    assert torch.equal(AutoModelForSequenceClassification.from_pretrained(again).score.weight, hf.score.weight)


def test_both_tools_get_the_same_settings(bp, tmp_path):
    from hpalign.cli_args import parse_config

    trl_ppo = load_benchmark("trl_ppo")
    args = ppo_args(bp, "--sft_type", "full", "--batch_size", "8", "--num_mini_batches", "2", "--response_length",
                    "21", "--num_ppo_epochs", "3", "--temperature", "0.9", "--seed", "5")
    command = bp.hpalign_command(args, Path("m"), Path("rm"), tmp_path, "hpalign-0", ["--packing", "false"])
    cfg = parse_config(command[command.index("rlhf") + 1:])
    (tmp_path / "spec.json").write_text(json.dumps(bp.trl_spec(args, Path("m"), Path("rm"), tmp_path, "trl-0", "<pad>")))
    spec = trl_ppo.read_spec(tmp_path / "spec.json")
    assert trl_ppo.rollout_batch_size(spec) == 8 == cfg.train.batch_size * cfg.ppo.num_mini_batches
    assert spec["batch_size"] == cfg.train.batch_size == 4 and spec["num_mini_batches"] == cfg.ppo.num_mini_batches
    for key in ("num_ppo_epochs", "response_length", "temperature", "missing_eos_penalty", "stop_token"):
        assert spec[key] == getattr(cfg.ppo, key), key
    assert spec["learning_rate"] == cfg.train.learning_rate == 1e-5 and spec["seed"] == cfg.train.seed == 5
    assert cfg.train.max_steps == spec["steps"] == 3 and cfg.train.num_threads == 1 and not cfg.data.packing
    assert cfg.ppo.reward_model_id_or_path == "rm" == spec["reward_model_dir"] and spec["pad_token"] == "<pad>"
    assert cfg.ppo.rollout_engine == "hf" and command[:3] == [sys.executable, "-m", "hpalign"]


def test_vllm_engine_runs_in_its_python(bp, tmp_path):
    from hpalign.cli_args import parse_config

    args = ppo_args(bp)
    command = bp.hpalign_command(args, Path("m"), Path("rm"), tmp_path, "hpalign-vllm-0", engine="vllm",
                                 python="/venv/bin/python")
    assert command[:3] == ["/venv/bin/python", "-m", "hpalign"]
    assert parse_config(command[command.index("rlhf") + 1:]).ppo.rollout_engine == "vllm"
    args.cuda = True  # hpalign's GPU peak, read at the child's exit
    command = bp.hpalign_command(args, Path("m"), Path("rm"), tmp_path, "hpalign-vllm-0", engine="vllm",
                                 python="/venv/bin/python")
    assert command[:2] == ["/venv/bin/python", "-c"] and command[3] == str(tmp_path / "hpalign-vllm-0.gpu.json")


def test_results_are_read_from_both_tools(bp, tmp_path):
    run_dir = tmp_path / "hpalign-0"
    run_dir.mkdir()
    lines = [{"step": 1, "time/weight_sync": 0.25, "time/generation": 0.75, "time/scoring": 0.5, "time/update": 2.0,
              "time/step": 3.6, "rollout/response_length": 10.5, "episode": 4, "objective/scores": -0.5},
             {"step": 2, "time/generation": 1.0, "time/scoring": 0.5, "time/update": 2.0, "time/step": 3.5,
              "rollout/response_length": 12.0, "episode": 8}, {"step": 2}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "summary.json").write_text(json.dumps({"data": {"num_train": 8, "num_skipped": 0, "num_truncated": 0}}))
    (run_dir / "config.yaml").write_text("train:\n  gradient_checkpointing: true\nppo:\n  rollout_engine: vllm\n")
    steps, data = bp.read_hpalign_run(run_dir)
    assert [s["rollout_tokens"] for s in steps] == [42, 48] and [s["episodes"] for s in steps] == [4, 4]
    assert steps[0]["other_s"] == pytest.approx(0.1) and steps[1]["other_s"] == 0.0 and data["num_train"] == 8
    assert steps[0]["generation_s"] == 1.0 and steps[0]["weight_sync_s"] == 0.25  # the sync is counted in generation
    assert steps[1]["generation_s"] == 1.0 and steps[1]["weight_sync_s"] == 0.0  # an older log without it: 0
    assert data["gradient_checkpointing"] is True and data["rollout_engine"] == "vllm"
    step = {"step_s": 4.0, "generation_s": 1.0, "scoring_s": 1.0, "update_s": 1.5, "other_s": 0.5,
            "rollout_tokens": 30, "prompt_tokens": 99, "metrics": {"objective/scores": 0.25}}
    (tmp_path / "trl.json").write_text(json.dumps({"trl_version": "1.12.0", "rollout_batch_size": 4,
                                                   "peak_gpu_mib": None, "steps": [step]}))
    steps, info = bp.read_trl_run(tmp_path / "trl.json")
    assert steps[0]["episodes"] == 4 and steps[0]["score"] == 0.25 and info["trl_version"] == "1.12.0"


def fake_run(bp, tool: str, step_seconds: list[float], *, rss: float, repeat: int = 0, tokens: int = 20,
             gpu: float | None = None):
    steps = [{"step_s": s, "generation_s": s / 4, "scoring_s": s / 4, "update_s": s / 2, "other_s": 0.0,
              "rollout_tokens": tokens, "episodes": 4, "prompt_tokens": 100} for s in step_seconds]
    return bp.PPORun(tool, repeat, steps, rss, 10.0, gpu, {"num_train": 12, "num_skipped": 0, "num_truncated": 0})


def test_summary_ratios_and_target(bp):
    runs = [fake_run(bp, "trl", [50.0, 8.0, 9.0], rss=1000.0), fake_run(bp, "hpalign", [50.0, 4.0, 4.5], rss=600.0),
            fake_run(bp, "trl", [50.0, 10.0, 11.0], rss=1200.0, repeat=1),
            fake_run(bp, "hpalign", [50.0, 4.0, 5.0], rss=500.0, repeat=1)]
    trl = bp.summarise(runs, tool="trl", warmup=1, prompts_per_step=4)
    ours = bp.summarise(runs, tool="hpalign", warmup=1, prompts_per_step=4)
    assert trl.num_timed_steps == 4 and trl.seconds_per_step == 9.5 and ours.seconds_per_step == 4.25  # medians
    assert sum(trl.phase_seconds.values()) == pytest.approx(9.5) and trl.phase_seconds["update"] == pytest.approx(4.75)
    assert trl.rollout_tokens_per_second == pytest.approx(80 / (38 / 4)) and trl.episodes_per_second == 4 / 9.5
    assert trl.mean_response_tokens == 5.0 and trl.peak_rss_mib == 1200.0 and ours.peak_rss_mib == 600.0
    r = bp.ratios(ours, trl)
    assert r["step_throughput"] == pytest.approx(9.5 / 4.25) and r["peak_memory"] == 0.5 and r["memory"] == "RSS"
    assert r["target_met"]
    slow = bp.summarise([fake_run(bp, "hpalign", [1.0, 5.0], rss=100.0)], tool="hpalign", warmup=1, prompts_per_step=4)
    assert not bp.ratios(slow, trl)["target_met"]  # 1.9x
    gpu = [fake_run(bp, "trl", [1.0, 2.0], rss=9e3, gpu=800.0), fake_run(bp, "hpalign", [1.0, 1.0], rss=1.0, gpu=1e3)]
    on_gpu = bp.ratios(*(bp.summarise(gpu, tool=t, warmup=1, prompts_per_step=4) for t in ("hpalign", "trl")))
    assert on_gpu["memory"] == "GPU" and on_gpu["peak_memory"] == 1.25 and not on_gpu["target_met"]


def test_check_catches_different_work(bp):
    runs = [fake_run(bp, "trl", [1.0, 1.0], rss=1.0), fake_run(bp, "hpalign", [1.0, 1.0], rss=1.0)]
    check = lambda: bp.run_check(runs, prompt_tokens_per_step=[100, 100], prompts_per_step=4,  # noqa: E731
                                 response_length=5, num_prompts=12)
    assert check()["all_agree"]
    runs[0].steps[1]["prompt_tokens"] = 101
    runs[1].data["num_truncated"] = 1
    assert sorted(k for k, ok in check()["agree"].items() if not ok) == [
        "hpalign-0: every prompt loaded whole", "trl-0: prompt tokens per step = hpalign's"]
    runs[1].steps[0]["rollout_tokens"] = 21  # more than 4 x 5
    assert not check()["agree"]["hpalign-0: 2 steps of 4 prompts, responses <= 5 tokens"]
    runs[0].steps.pop()
    assert not check()["agree"]["trl-0: 2 steps of 4 prompts, responses <= 5 tokens"]


def test_check_wants_each_hpalign_run_on_its_engine(bp):
    runs = [fake_run(bp, "hpalign", [1.0], rss=1.0), fake_run(bp, "hpalign-vllm", [1.0], rss=1.0)]
    runs[0].data["rollout_engine"], runs[1].data["rollout_engine"] = "hf", "vllm"
    check = lambda: bp.run_check(runs, prompt_tokens_per_step=[100], prompts_per_step=4, response_length=5,  # noqa: E731
                                 num_prompts=12, engines={"hpalign": "hf", "hpalign-vllm": "vllm"})
    assert check()["all_agree"]
    runs[1].data["rollout_engine"] = "hf"  # vLLM asked, HF ran
    assert [k for k, ok in check()["agree"].items() if not ok] == ["hpalign-vllm-0: rollouts on vllm"]


def test_table_shows_tools_ratios_target_and_notes(bp):
    runs = [fake_run(bp, "trl", [1.0, 9.0], rss=1000.0), fake_run(bp, "hpalign", [1.0, 3.0], rss=700.0)]
    summaries = [bp.summarise(runs, tool=t, warmup=1, prompts_per_step=4) for t in ("trl", "hpalign")]
    check = bp.run_check(runs, prompt_tokens_per_step=[100, 100], prompts_per_step=4, response_length=53,
                         num_prompts=12)
    table = bp.markdown_table(summaries, "HEADER", check=check)
    assert table.startswith("HEADER\n") and "| trl | 9.00 | 2.25 | 2.25 | 4.50 | 0.00 | 9 | 0.444 | 5.0 | 1000 | - | 1 |" in table
    assert "hpalign (gradient checkpointing ?) / TRL: step throughput **3.00x**" in table and "peak RSS **0.70x**" in table and ": met" in table
    assert "Check: all agree" in table and all(note in table for note in bp.NOTES)
    assert "time/weight_sync" in table  # the vLLM engine's new phase, said to be counted in generation
    assert bp.markdown_table(summaries, "H", notes=("only this",)).endswith("By construction:\n- only this\n")


# ----------------------------------------------------------------------------- both tools (slow)


def vllm_python() -> str:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    return sys.executable


def trl_ppo_python() -> str:
    check = subprocess.run(["bash", str(REPO / "scripts" / "trl_ppo_env.sh"), "--check"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"no TRL PPO venv ({check.stderr.strip()})")
    return check.stdout.strip()


@pytest.mark.slow
def test_tiny_run_of_both_tools(bp, tmp_path, capsys):
    trl_ppo_python()
    start = time.perf_counter()
    # rm-checkpoint: hpalign's LoRA value model cannot yet wrap an HF seq-cls reward model (peft's
    # CAUSAL_LM task type asks it for prepare_inputs_for_generation); the weights are the same.
    bp.main(["--model", "tiny-random-llama", "--vs", "trl", "--steps", "1", "--warmup", "1", "--repeats", "1",
             "--batch_size", "4", "--response_length", "8", "--num_ppo_epochs", "1", "--threads", "1",
             "--hpalign_reward_format", "rm-checkpoint", "--out_dir", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and written[0].startswith("ppo_lora_tiny-random-llama_vs-trl_")
    assert written[0].endswith("_mixed.json") and written[1].endswith("_mixed.md")
    result = json.loads((tmp_path / written[0]).read_text())
    assert result["check"]["all_agree"] and result["meta"]["trl"] == "1.12.0"
    for summary in result["results"]:
        assert summary["num_timed_steps"] == 1 and 0 < summary["mean_response_tokens"] <= 8
        assert min(summary["phase_seconds"][p] for p in ("generation", "scoring", "update")) > 0
        assert summary["peak_rss_mib"] > 100
    assert "hpalign (gradient checkpointing off) / TRL: step throughput" in capsys.readouterr().out
    print(f"bench_ppo tiny run: {time.perf_counter() - start:.1f} s")


@pytest.mark.slow
def test_tiny_run_of_both_hpalign_engines(bp, tmp_path, capsys):
    vllm_python()
    start = time.perf_counter()
    bp.main(["--model", "tiny-random-llama", "--hpalign_engines", "hf", "vllm", "--steps", "1", "--warmup", "1",
             "--repeats", "1", "--batch_size", "2", "--response_length", "8", "--num_ppo_epochs", "1", "--threads", "1",
             "--hpalign_reward_format", "rm-checkpoint", "--out_dir", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and written[0].startswith("ppo_lora_tiny-random-llama_cpu")
    result = json.loads((tmp_path / written[0]).read_text())
    assert result["check"]["all_agree"] and result["meta"]["skipped"] == []
    assert [s["tool"] for s in result["results"]] == ["hpalign", "hpalign-vllm"]
    for summary in result["results"]:
        assert summary["num_timed_steps"] == 1 and 0 < summary["mean_response_tokens"] <= 8
        assert min(summary["phase_seconds"][p] for p in ("generation", "scoring", "update")) > 0
    assert "hpalign-vllm" in capsys.readouterr().out
    print(f"bench_ppo tiny run of both engines: {time.perf_counter() - start:.1f} s")
