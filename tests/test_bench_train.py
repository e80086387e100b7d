"""benchmarks/bench_train.py, the throughput suite: its data (rows that fit, TRL rows in hpalign's
order), its commands, and its result table, phase shares and chart. Nothing here trains."""

import argparse
import json
from pathlib import Path

import pytest

from hpalign.data.templates import resolve_template
from hpalign.tiny_model import build_byte_tokenizer
from hpalign.train.schedule import BatchPlan, micro_batches_for_step
from tests.benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_train")


def bench_args(**overrides) -> argparse.Namespace:
    values = dict(steps=2, warmup=1, batch_size=4, max_length=512, seed=0, sft_type="lora", learning_rate=None,
                  trl_bf16=False, trl_gradient_checkpointing=True, precompute_ref_log_probs=False, rlhf_type="dpo",
                  vs="trl", nproc=1)
    return argparse.Namespace(**{**values, **overrides})


def test_prepare_data_writes_fitting_rows_in_hpalign_order(bench, tmp_path):
    build_byte_tokenizer().save_pretrained(tmp_path / "model")
    args = bench_args()
    stats = bench.prepare_data(tmp_path, tmp_path / "model", args)
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    train, val, trl_rows = read("hpalign_train.jsonl"), read("hpalign_val.jsonl"), read("trl_train.jsonl")
    num_steps = args.warmup + args.steps
    assert len(train) == args.batch_size * num_steps == stats["train_rows"] and len(val) == bench.NUM_VAL_ROWS
    assert stats["rows_fitting_max_length"] < stats["rows_read"]  # byte tokens: long rows dropped
    assert stats["source"] == "mixed" and stats["rows"] == len(train) and stats["multi_turn_share"] == 0

    template = resolve_template(build_byte_tokenizer())
    plan = BatchPlan(num_examples=len(train), micro_batch_size=args.batch_size, accumulation=1, world_size=1)
    order = [i for step in range(num_steps) for i in micro_batches_for_step(plan, step, seed=args.seed, rank=0)[0]]
    assert sorted(order) == list(range(len(train)))
    lengths = set()
    for row, trl_row in zip((train[i] for i in order), trl_rows, strict=True):
        prompt_ids = template.encode_prompt(row["prompt"])
        chosen_ids = template.encode_response(row["chosen"])
        assert len(prompt_ids) + max(len(chosen_ids), len(template.encode_response(row["rejected"]))) <= 512
        lengths.add(len(prompt_ids))
        # TRL tokenizes plain text: the rendered strings give exactly hpalign's token ids.
        tokenizer = template.tokenizer
        assert tokenizer(trl_row["prompt"])["input_ids"] == prompt_ids
        assert tokenizer(trl_row["prompt"] + trl_row["chosen"])["input_ids"] == prompt_ids + chosen_ids
    assert max(lengths) > 2 * min(lengths)  # mixed lengths survive the filter


def test_kto_and_sft_examples_follow_hpalign_loading():
    import bench_train

    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    assert bench_train.hpalign_examples("kto", rows) == [{"prompt": "p", "completion": "c", "label": True},
                                                         {"prompt": "p", "completion": "r", "label": False}]
    assert bench_train.hpalign_examples("sft", rows) == [{"prompt": "p", "completion": "c"}]
    assert bench_train.rows_needed(bench_args(rlhf_type="kto")) == 6  # 12 KTO examples = 6 pairs


def run(bench, tool: str, repeat: int, seconds: list[float], tokens: list[int], rss: float, logps: float,
        phases: dict | None = None):
    first = {"loss": 0.6931, "logps/chosen": logps, "logps/rejected": -90.0, "tokens": 1000}
    return bench.RunResult(tool, repeat, seconds, tokens, phases or {}, first, rss, 10.0)


def test_summary_table_check_and_files(bench, tmp_path):
    runs = [run(bench, "trl", 0, [4.0, 4.0], [800, 800], 3000.0, -50.0, {"forward": 4.0, "backward": 3.0}),
            run(bench, "hpalign", 0, [1.0, 3.0], [800, 800], 1000.0, -50.02, {"policy_forward": 1.0, "backward": 2.0}),
            run(bench, "trl", 1, [4.0], [800], 3200.0, -50.0, {"forward": 2.0, "backward": 1.0}),
            run(bench, "hpalign", 1, [2.0], [800], 1500.0, -50.0, {"policy_forward": 1.0, "backward": 1.0})]
    summaries = [bench.summarise(runs, tool=t, examples_per_step=4) for t in ("trl", "hpalign")]
    trl, ours = summaries
    assert (trl.seconds_per_step, trl.tokens_per_second, trl.peak_rss_mib, trl.num_timed_steps) == (4.0, 200.0, 3200.0, 3)
    assert (ours.seconds_per_step, ours.tokens_per_second, ours.examples_per_second) == (2.0, 400.0, 2.0)
    assert trl.phase_shares == pytest.approx({"forward": 0.5, "backward": 1 / 3, "other": 1 / 6})
    assert ours.phase_shares["policy_forward"] == pytest.approx(1 / 3) and ours.phase_shares["backward"] == 0.5
    check = bench.step_one_check(runs, "dpo")
    assert check["all_agree"]  # -50.02 vs -50.0 is within relative 1e-3
    table = bench.markdown_table(summaries, "header", check)
    assert "| hpalign / TRL | 2.00x | 2.00x | 0.50x | 0.47x | | |" in table
    assert "| trl | - | 50 % | (in policy) | 33 % | - | 17 % |" in table
    assert "| hpalign | - | 33 % | - | 50 % | - | 17 % |" in table
    assert "Step-1 check (agree)" in table
    path = bench.write_results(tmp_path, "dpo_lora_vs-trl_cpu2_today", meta={"model": "m"}, summaries=summaries,
                               check=check, table=table)
    payload = json.loads(path.with_suffix(".json").read_text())
    assert payload["results"][1]["tool"] == "hpalign" and payload["step_one_check"]["all_agree"]
    assert path.with_suffix(".md").read_text() == table
    assert bench.ratio_chart(path.with_suffix(".png"), summaries, title="t", targets=(3.0, 0.5))
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert not bench.ratio_chart(tmp_path / "none.png", summaries[1:], title="t", targets=(3.0, 0.5))

    runs[1].first_step["logps/chosen"] = -51.0
    assert not bench.step_one_check(runs, "dpo")["agree"]["logps/chosen"]
    runs[1].first_step["loss"] = 0.9  # RM: value heads start random, the loss is only reported
    assert "loss" not in bench.step_one_check(runs, "rm")["agree"]


def test_hpalign_command_shares_the_settings(bench, tmp_path):
    command = bench.hpalign_command(bench_args(sft_type="full"), Path("/m"), tmp_path, "hpalign-0")
    flags = dict(zip(command[4::2], command[5::2], strict=False))
    assert flags["--rpo_alpha"] == "0" and flags["--rlhf_type"] == "dpo" and flags["--max_steps"] == "3"
    assert flags["--learning_rate"] == "1e-05" and flags["--lora_target_modules"] == "ALL"
    variant = bench.hpalign_command(bench_args(), Path("/m"), tmp_path, "v-0", ["--share_prompt", "false"])
    assert variant[-2:] == ["--share_prompt", "false"]


def test_variants_and_tools_from_the_command_line(bench):
    args = bench.parse_args(["--vs", "trl", "--variant", "no-share=--share_prompt false",
                             "--variant", "gc=--gradient_checkpointing true"])
    assert args.tools == ["trl", "hpalign", "no-share", "gc"]
    assert args.variants["no-share"] == ["--share_prompt", "false"]
    assert bench.parse_args([]).tools == ["hpalign"]
    assert bench.result_stem(args, "cpu2", "d") == "dpo_lora_vs-trl_cpu2_d"
    with pytest.raises(SystemExit):
        bench.parse_args(["--variant", "hpalign=--packing false"])


def test_mfu_counts_six_n_per_token_plus_two_n_for_a_reference(bench):
    summary = bench.Summary("hpalign", 1000.0, 1.0, 1.0, 1.0, 1, {})
    assert bench.model_flops_utilisation(summary, parameters=10**9, reference=True, peak=989e12) == \
        pytest.approx(1000 * 8e9 / 989e12)
    assert bench.model_flops_utilisation(summary, parameters=10**9, reference=False, peak=None) is None
    assert bench.peak_flops("nvidia-h100-80gb-hbm3") == 989e12 and bench.peak_flops("cpu2") is None


def test_model_parameters_on_the_meta_device(bench, tmp_path):
    from hpalign.tiny_model import build_tiny_llama

    model, _ = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path)
    assert bench.model_parameters(tmp_path) == sum(p.numel() for p in model.parameters())


def test_random_llama_1b_shape(bench):
    hidden, layers, heads, kv_heads, intermediate = bench.RANDOM_LLAMA_SHAPES["random-llama-1b"]
    embedding = 49152 * hidden  # tied with the LM head
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden * kv_heads // heads) + 3 * hidden * intermediate
    assert 1.0e9 < embedding + layers * per_layer < 1.3e9


def test_a_preference_file_is_a_data_source(bench, tmp_path):
    """--dataset: any pair format hpalign reads (here swift's query/response/rejected_response with
    history), its fitting rows in file order; TRL's rows render the same history."""
    build_byte_tokenizer().save_pretrained(tmp_path / "model")
    rows = [{"query": f"question {i}", "response": "yes", "rejected_response": "no",
             "history": [["hi", "hello"]] if i % 2 else []} for i in range(20)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = bench.parse_args(["--vs", "trl", "--dataset", str(tmp_path / "mine.jsonl"), "--steps", "2"])
    assert args.sources == [("mine", str(tmp_path / "mine.jsonl"))]
    stats = bench.prepare_data(tmp_path, tmp_path / "model", args, args.sources[0][1])
    assert stats["rows_read"] == 20 and stats["train_rows"] == 12 and stats["multi_turn_share"] > 0
    train = [json.loads(line) for line in (tmp_path / "hpalign_train.jsonl").read_text().splitlines()]
    assert train[1]["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                  {"role": "user", "content": "question 5"}]  # rows 0-3 are held out
    template = resolve_template(build_byte_tokenizer())
    trl_prompts = {json.loads(line)["prompt"] for line in (tmp_path / "trl_train.jsonl").read_text().splitlines()}
    assert template.render_prompt(train[1]["prompt"]) in trl_prompts
    with pytest.raises(SystemExit):
        bench.parse_args(["--dataset", str(tmp_path / "missing.jsonl")])


def test_profiles_from_the_command_line(bench):
    assert bench.parse_args([]).sources == [("mixed", "mixed")]
    every = bench.parse_args(["--profile", "all"]).sources
    assert [label for label, _ in every] == ["mixed", "short_chat", "long_prompts", "long_answers", "multi_turn"]
    assert bench.parse_args(["--profile", "short_chat", "short_chat"]).sources == [("short_chat", "short_chat")]
    args = bench.parse_args(["--vs", "trl"])
    assert bench.result_stem(args, "cpu2", "d", "long_answers") == "dpo_lora_vs-trl_cpu2_d_long_answers"


def test_model_flops_count_the_passes_each_tool_runs(bench):
    assert bench.passes_per_position(sft_type="lora", reference=True) == 6  # the three forward-equivalents
    assert bench.passes_per_position(sft_type="full", reference=False) == 6
    assert bench.step_model_flops(1000, parameters=10, sft_type="lora", reference=False) == 40_000
    summaries = [bench.Summary("trl", 100.0, 1.0, 2.0, 1.0, 1, {}, computed_positions_per_step=1000.0),
                 bench.Summary("hpalign", 400.0, 1.0, 0.5, 1.0, 1, {}, computed_positions_per_step=500.0)]
    bench.add_model_flops(summaries, parameters=10, sft_type="lora", reference=True)
    assert summaries[0].model_flops_per_second == 1000 * 10 * 6 / 2.0
    assert summaries[1].model_flops_per_second == 500 * 10 * 6 / 0.5


def test_matmul_probe_measures_each_shape_and_the_best(bench):
    flops = bench.matmul_peak_flops(shapes=((64, 64, 64), (32, 16, 8)), seconds=0.01)
    assert set(flops) == {"64x64x64", "32x16x8", "peak"} and flops["peak"] == max(flops["64x64x64"], flops["32x16x8"])
    assert flops["peak"] > 0


def test_work_and_profile_tables(bench):
    def summary(tool, seconds, tokens_per_second, positions, rss):
        return bench.Summary(tool, tokens_per_second, 1.0, seconds, rss, 2, {}, data_tokens_per_step=600.0,
                             computed_positions_per_step=positions)

    trl, ours = summary("trl", 12.0, 50.0, 1400.0, 9000.0), summary("hpalign", 4.0, 150.0, 600.0, 4000.0)
    bench.add_model_flops([trl, ours], parameters=10**8, sft_type="lora", reference=True)
    work = bench.work_table([trl, ours], matmul_peak=1.4e11)
    # hpalign: 600 positions in 4 s = 6.67 ms each, 600 x 1e8 x 6 / 4 s = 90 GFLOP/s = 64 % of 140
    assert "| hpalign | 600 | 600 | 1.00 | 6.67 | 90.0 | 64 % |" in work
    assert "| trl | 600 | 1400 | 2.33 | 8.57 | 70.0 | 50 % |" in work
    profile = bench.ProfileRun("short_chat", {}, [], {}, [trl, ours])
    table = bench.profiles_table([profile], matmul_peak=1.4e11, targets=(3.0, 0.5))
    # tokens/s 3x at 0.44x the memory: met; per computed position 6.67 / 8.57 ms = 0.78x
    assert "| short_chat | hpalign | 600 | 12.00 | 4.00 | 3.00x | 0.44x | 1400 | 600 | 0.78x | 50 % / 64 % | met |" in table
    unknown = bench.Summary("trl", 1.0, 1.0, 1.0, 1.0, 1, {}, data_tokens_per_step=5.0)
    assert "| trl | 5 | - | - | - | - | - |" in bench.work_table([unknown], matmul_peak=None)
