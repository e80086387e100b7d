"""benchmarks/trl_trainers.py: TRL rows (hpalign's text, so hpalign's token ids), each algorithm's TRL
config and trainer, the step recorder, and (slow) a 2-step TRL run per algorithm on tiny-random-llama.
The TRL checks skip without trl."""

import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from hpalign.data.templates import resolve_template
from hpalign.tiny_model import build_byte_tokenizer
from tests.benchmark_modules import load_benchmark

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PAIR_TYPES = ("dpo", "cpo", "simpo", "orpo", "rm")
PROMPTS = ["What is 2 + 2?", "Write a haiku\nabout rain.", "Hi", "Explain DPO in one line, please."]


@pytest.fixture(scope="module")
def tt():
    return load_benchmark("trl_trainers")


@pytest.fixture(scope="module")
def template():
    return resolve_template(build_byte_tokenizer())


def examples(kind: str) -> list[dict]:
    if kind == "pair":
        return [{"prompt": p, "chosen": f"Answer {i} :)", "rejected": "no" * (i + 1)} for i, p in enumerate(PROMPTS)]
    if kind == "kto":
        return [{"prompt": p, "completion": f"Answer {i}", "label": i % 2 == 0} for i, p in enumerate(PROMPTS)]
    return [{"prompt": p, "completion": f"Answer {i}"} for i, p in enumerate(PROMPTS)]


def hpalign_tokens(kind: str, example: dict, template) -> int:
    """hpalign's data tokens of one example: pairs 2 prompt + chosen + rejected, else prompt + completion."""
    prompt = len(template.encode_prompt([{"role": "user", "content": example["prompt"]}]))
    if kind == "pair":
        return 2 * prompt + sum(len(template.encode_response(example[k])) for k in ("chosen", "rejected"))
    return prompt + len(template.encode_response(example["completion"]))


def assert_hpalign_ids(template, prompt_text: str, response_text: str, example: dict, response: str) -> None:
    """TRL tokenizes plain text: the rendered strings give exactly hpalign's token ids."""
    tokenizer = template.tokenizer
    prompt_ids = template.encode_prompt([{"role": "user", "content": example["prompt"]}])
    assert tokenizer(prompt_text)["input_ids"] == prompt_ids
    assert tokenizer(prompt_text + response_text)["input_ids"] == prompt_ids + template.encode_response(response)


# ----------------------------------------------------------------------------- rows


def test_pair_rows_render_hpalign_text_in_order(tt, template):
    pairs = examples("pair")
    rows = tt.trl_rows("dpo", pairs, template)
    for algorithm in PAIR_TYPES:
        assert tt.trl_rows(algorithm, pairs, template) == rows
    for row, example in zip(rows, pairs, strict=True):
        wrap = f"{template.response_prefix}{{}}{template.response_suffix}".format
        assert row == {"prompt": template.render_prompt([{"role": "user", "content": example["prompt"]}]),
                       "chosen": wrap(example["chosen"]), "rejected": wrap(example["rejected"])}
        for key in ("chosen", "rejected"):
            assert_hpalign_ids(template, row["prompt"], row[key], example, example[key])
    reordered = tt.trl_rows("dpo", pairs[::-1], template)
    assert reordered == rows[::-1]


@pytest.mark.parametrize("kind", ["kto", "sft"])
def test_unpaired_rows(tt, template, kind):
    data = examples(kind)
    rows = tt.trl_rows(kind, data, template)
    assert len(rows) == len(data)
    for row, example in zip(rows, data, strict=True):
        assert set(row) == ({"prompt", "completion", "label"} if kind == "kto" else {"prompt", "completion"})
        assert_hpalign_ids(template, row["prompt"], row["completion"], example, example["completion"])
        if kind == "kto":
            assert row["label"] is example["label"]
    assert [r["label"] for r in tt.trl_rows("kto", examples("kto"), template)] == [True, False, True, False]


def test_unknown_algorithm(tt, template):
    with pytest.raises(ValueError, match="ppo"):
        tt.trl_rows("ppo", [], template)


def test_row_tokens_counts_the_prompt_per_branch(tt):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"prompt_ids": [[1, 2], [3]], "chosen_ids": [[4], [5, 6]],
                                          "rejected_ids": [[7, 8], [9]]})
    assert tt.row_tokens(dataset, tt.TRL_ALGORITHMS["dpo"].token_columns) == [7, 5]
    assert tt.row_tokens(dataset, {"chosen_ids": 1, "rejected_ids": 1}) == [3, 3]


# ----------------------------------------------------------------------------- configs


def bench_spec(rlhf_type: str, **overrides) -> dict:
    values = dict(rlhf_type=rlhf_type, model_dir="/m", data="/d.jsonl", out_dir="/tmp/out", steps=3, batch_size=4,
                  max_length=512, learning_rate=1e-4, sft_type="lora", seed=0, bf16=False,
                  gradient_checkpointing=True, precompute_ref_log_probs=False, beta=None, cpo_alpha=1.0,
                  simpo_gamma=0.5, desirable_weight=1.0, undesirable_weight=1.5, rpo_alpha=0.0)
    return {**values, **overrides}


EXPECTED = {
    "dpo": {"beta": 0.1, "loss_type": ["sigmoid"], "precompute_ref_log_probs": False},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.5, "precompute_ref_log_probs": False},
    "cpo": {"beta": 0.1, "loss_type": "sigmoid", "cpo_alpha": 1.0},
    "simpo": {"beta": 2.0, "loss_type": "simpo", "simpo_gamma": 0.5, "cpo_alpha": 1.0},
    "orpo": {"beta": 0.1},
    "rm": {"center_rewards_coefficient": None},
    "sft": {"completion_only_loss": True, "packing": False, "shuffle_dataset": False},
}


@pytest.mark.parametrize("rlhf_type", list(EXPECTED))
def test_config_and_trainer_accept_the_settings(tt, rlhf_type):
    pytest.importorskip("trl")
    import torch

    assert set(EXPECTED) == set(tt.SUPPORTED)
    config = tt.trl_config(bench_spec(rlhf_type))
    shared = (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.max_steps,
              config.learning_rate, config.max_length, config.bf16, config.gradient_checkpointing,
              config.logging_steps, config.save_strategy, config.report_to, config.dataloader_num_workers)
    assert shared == (4, 1, 3, 1e-4, 512, False, True, 1, "no", [], 0)
    assert config.model_init_kwargs["dtype"] == torch.float32
    assert {k: getattr(config, k) for k in EXPECTED[rlhf_type]} == EXPECTED[rlhf_type]

    config_cls, trainer_cls = tt.trl_classes(rlhf_type)
    assert isinstance(config, config_cls)
    trainer = tt._in_order(trainer_cls, recorder=None)
    assert issubclass(trainer, trainer_cls)
    inspect.signature(trainer.__init__).bind(None, model="/m", args=config, processing_class=None, train_dataset=[],
                                             peft_config=None, callbacks=[])
    sampler = trainer._get_train_sampler(SimpleNamespace(train_dataset=list("abcde")))
    assert list(sampler) == [0, 1, 2, 3, 4]


def test_config_options(tt):
    pytest.importorskip("trl")
    dpo = tt.trl_config(bench_spec("dpo", beta=0.3, rpo_alpha=0.5, precompute_ref_log_probs=True))
    assert (dpo.beta, dpo.loss_type, dpo.loss_weights, dpo.precompute_ref_log_probs) == (
        0.3, ["sigmoid", "sft"], [1.0, 0.5], True)
    lora = tt.trl_peft_config("lora", "dpo")
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (8, 32, 0.0, "all-linear")
    assert lora.task_type == "CAUSAL_LM" and tt.trl_peft_config("lora", "rm").task_type == "SEQ_CLS"
    assert tt.trl_peft_config("full", "dpo") is None


def test_phase_recorder(tt):
    pytest.importorskip("transformers")
    recorder = tt._phase_recorder()
    recorder.on_step_begin(None, None, None)
    start = recorder.marks["begin"]
    recorder.loss_done(start)
    recorder.on_pre_optimizer_step(None, None, None)
    recorder.on_optimizer_step(None, None, None)
    recorder.on_step_end(None, None, None)
    recorder.on_log(None, None, None, logs={"loss": 0.69, "logps/chosen": -3.0, "grad_norm": 1.0})
    recorder.on_log(None, None, None, logs={"train_loss": 0.5})  # the end-of-training summary: ignored
    (step,) = recorder.steps
    assert set(step) == {"seconds", "time/forward", "time/backward", "time/optimizer", "loss", "logps/chosen",
                         "computed_positions"}
    assert step["loss"] == 0.69 and all(step[k] >= 0 for k in ("time/forward", "time/backward", "time/optimizer"))
    assert step["seconds"] >= step["time/forward"] + step["time/backward"] + step["time/optimizer"]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from hpalign.tiny_model import build_tiny_llama

    model, tokenizer = build_tiny_llama(seed=0)
    path = tmp_path_factory.mktemp("tiny-random-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("rlhf_type", ["dpo", "kto", "cpo", "simpo", "orpo", "rm", "sft"])
def test_run_trl_two_steps(tt, template, tiny_model_dir, tmp_path, rlhf_type):
    pytest.importorskip("trl")
    kind = {"kto": "kto", "sft": "sft"}.get(rlhf_type, "pair")
    data = examples(kind)
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tt.trl_rows(rlhf_type, data, template)))
    spec = bench_spec(rlhf_type, model_dir=str(tiny_model_dir), data=str(tmp_path / "trl.jsonl"),
                      out_dir=str(tmp_path / "out"), steps=2, batch_size=2, max_length=128)
    tt.run_trl(spec)
    steps = [json.loads(line) for line in (tmp_path / "out" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for k, step in enumerate(steps):
        assert step["seconds"] > 0 and math.isfinite(step["loss"])
        assert all(step[name] >= 0 for name in ("time/forward", "time/backward", "time/optimizer"))
        assert step["time/forward"] > 0
        assert step["tokens"] == sum(hpalign_tokens(kind, e, template) for e in data[2 * k:2 * k + 2])
        # the policy's forwards compute every data token (a pair's prompt once per branch), and padding
        assert step["computed_positions"] >= step["tokens"]
    # policy == reference: DPO log 2, KTO 0.5 per weight (batch 1 = one desirable w 1.0, one undesirable w 1.5);
    # RM: a fresh head, so only near log 2
    step_one = {"dpo": math.log(2), "kto": 0.5 * (1.0 + 1.5) / 2, "rm": math.log(2)}
    if rlhf_type in step_one:
        assert steps[0]["loss"] == pytest.approx(step_one[rlhf_type], abs=1e-4 if rlhf_type != "rm" else 0.05)
