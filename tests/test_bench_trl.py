"""benchmarks/bench_trl.py: its data (rows that fit, TRL text = hpalign tokens, hpalign's order) and
its result table. Nothing here trains; the one TRL check (its config accepts our settings) skips
without trl."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from hpalign.data.templates import resolve_template
from hpalign.tiny_model import build_byte_tokenizer
from hpalign.train.schedule import BatchPlan, micro_batches_for_step

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_trl"] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def bench_args(**overrides) -> argparse.Namespace:
    values = dict(steps=2, warmup=1, batch_size=4, max_length=512, seed=0, sft_type="lora", learning_rate=None,
                  trl_bf16=False, trl_gradient_checkpointing=True, precompute_ref_log_probs=False)
    return argparse.Namespace(**{**values, **overrides})


def test_prepare_data_writes_fitting_rows_in_hpalign_order(bench, tmp_path):
    build_byte_tokenizer().save_pretrained(tmp_path / "model")
    args = bench_args()
    stats = bench.prepare_data(tmp_path, tmp_path / "model", args)
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    train, val, trl_rows = read("hpalign_train.jsonl"), read("hpalign_val.jsonl"), read("trl_train.jsonl")
    num_steps = args.warmup + args.steps
    assert len(train) == args.batch_size * num_steps == stats["train_rows"] and len(val) == bench.NUM_VAL_ROWS
    assert stats["rows_fitting_max_length"] < stats["rows_generated"]  # byte tokens: long rows dropped

    template = resolve_template(build_byte_tokenizer())
    plan = BatchPlan(num_examples=len(train), micro_batch_size=args.batch_size, accumulation=1, world_size=1)
    order = [i for step in range(num_steps) for i in micro_batches_for_step(plan, step, seed=args.seed, rank=0)[0]]
    assert sorted(order) == list(range(len(train)))
    lengths = set()
    for row, trl_row in zip((train[i] for i in order), trl_rows, strict=True):
        assert trl_row == bench.rendered_row(row, template)
        prompt_ids = template.encode_prompt([{"role": "user", "content": row["prompt"]}])
        chosen_ids = template.encode_response(row["chosen"])
        assert len(prompt_ids) + max(len(chosen_ids), len(template.encode_response(row["rejected"]))) <= 512
        lengths.add(len(prompt_ids))
        # TRL tokenizes plain text: the rendered strings give exactly hpalign's token ids.
        tokenizer = template.tokenizer
        assert tokenizer(trl_row["prompt"])["input_ids"] == prompt_ids
        assert tokenizer(trl_row["prompt"] + trl_row["chosen"])["input_ids"] == prompt_ids + chosen_ids
    assert max(lengths) > 2 * min(lengths)  # mixed lengths survive the filter


def run(bench, tool: str, repeat: int, seconds: list[float], tokens: list[int], rss: float, logps: float):
    first = {"loss": 0.6931, "logps/chosen": logps, "logps/rejected": -90.0, "tokens": 1000}
    return bench.RunResult(tool, repeat, seconds, tokens, first, rss, 10.0)


def test_summary_table_check_and_files(bench, tmp_path):
    runs = [run(bench, "trl", 0, [4.0, 4.0], [800, 800], 3000.0, -50.0),
            run(bench, "hpalign", 0, [1.0, 3.0], [800, 800], 1000.0, -50.02),
            run(bench, "trl", 1, [4.0], [800], 3200.0, -50.0),
            run(bench, "hpalign", 1, [2.0], [800], 1500.0, -50.0)]
    summaries = [bench.summarise(runs, tool=t, pairs_per_step=4) for t in ("trl", "hpalign")]
    trl, ours = summaries
    assert (trl.seconds_per_step, trl.tokens_per_second, trl.peak_rss_mib, trl.num_timed_steps) == (4.0, 200.0, 3200.0, 3)
    assert (ours.seconds_per_step, ours.tokens_per_second, ours.pairs_per_second) == (2.0, 400.0, 2.0)
    check = bench.step_one_check(runs)
    assert check["all_agree"]  # -50.02 vs -50.0 is within relative 1e-3
    table = bench.markdown_table(summaries, "header", check)
    assert "| hpalign / TRL | 2.00x | 2.00x | 0.50x | 0.47x | |" in table
    assert "Step-1 check (agree)" in table
    path = bench.write_results(tmp_path, "trl_dpo_lora_cpu2_today", meta={"model": "m"}, summaries=summaries,
                               check=check, table=table)
    payload = json.loads(path.with_suffix(".json").read_text())
    assert payload["results"][1]["tool"] == "hpalign" and payload["step_one_check"]["all_agree"]
    assert path.with_suffix(".md").read_text() == table

    runs[1].first_step["logps/chosen"] = -51.0
    assert not bench.step_one_check(runs)["agree"]["logps/chosen"]


def test_hpalign_command_shares_the_settings(bench, tmp_path):
    command = bench.hpalign_command(bench_args(sft_type="full"), Path("/m"), tmp_path, "hpalign-0")
    flags = dict(zip(command[4::2], command[5::2], strict=False))
    assert flags["--rpo_alpha"] == "0" and flags["--beta"] == "0.1" and flags["--max_steps"] == "3"
    assert flags["--learning_rate"] == "1e-05" and flags["--lora_target_modules"] == "ALL"
    variant = bench.hpalign_command(bench_args(), Path("/m"), tmp_path, "v-0", ["--share_prompt", "false"])
    assert variant[-2:] == ["--share_prompt", "false"]


def test_variants_and_tools_from_the_command_line(bench):
    args = bench.parse_args(["--variant", "no-share=--share_prompt false", "--variant", "gc=--gradient_checkpointing true"])
    assert args.tools == ["trl", "hpalign", "no-share", "gc"]
    assert args.variants["no-share"] == ["--share_prompt", "false"]
    assert bench.parse_args(["--no_trl"]).tools == ["hpalign"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--variant", "hpalign=--packing false"])


def test_trl_config_accepts_the_settings(bench, tmp_path):
    pytest.importorskip("trl")
    spec = bench.trl_spec(bench_args(), Path("/m"), tmp_path, "trl-0")
    config = bench.trl_config(spec)
    assert (config.beta, config.max_length, config.per_device_train_batch_size, config.max_steps) == (0.1, 512, 4, 3)
    assert config.learning_rate == 1e-4 and config.loss_type == ["sigmoid"] and not config.bf16
    lora = bench.trl_peft_config("lora")
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (8, 32, "all-linear")
