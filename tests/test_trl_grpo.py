"""benchmarks/trl_grpo.py: the spec, the prompt rows, hpalign's rule rewards as TRL reward functions, the phase
arithmetic and the sampling check (fast, no TRL needed), and (slow) one GRPO step of TRL's GRPOTrainer on
tiny-random-llama, skipped when TRL is not installed."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpalign.data.templates import resolve_template
from hpalign.rl.rewards import accuracy_reward
from hpalign.tiny_model import build_byte_tokenizer, build_tiny_llama
from tests.benchmark_modules import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tg():
    return load_benchmark("trl_grpo")


def write_spec(path: Path, **values) -> Path:
    base = {"model_dir": "m", "prompts": "p.jsonl", "steps": 1, "sft_type": "lora", "output": "out.json"}
    path.write_text(json.dumps({**base, **values}))
    return path


def test_spec_defaults_and_errors(tg, tmp_path):
    from hpalign.config import DEFAULT_LEARNING_RATE, PPO_LORA_LEARNING_RATE

    spec = tg.read_spec(write_spec(tmp_path / "s.json"))
    assert spec["reward_funcs"] == ["accuracy"] and spec["learning_rate"] == PPO_LORA_LEARNING_RATE
    assert spec["num_generations"] == 8 and spec["max_completion_length"] == 53 and spec["gradient_checkpointing"]
    assert tg.read_spec(write_spec(tmp_path / "s.json", sft_type="full"))["learning_rate"] == DEFAULT_LEARNING_RATE["full"]
    assert tg.read_spec(write_spec(tmp_path / "s.json", reward_model_dir="rm"))["reward_funcs"] == []
    bad = [({"bf16": True}, "unknown keys \\['bf16'\\]"), ({"sft_type": "qlora"}, "sft_type"),
           ({"num_generations": 1}, "num_generations >= 2"), ({"num_generations": 3}, "whole groups"),
           ({"reward_funcs": ["acuracy"]}, "did you mean 'accuracy'"), ({"reward_funcs": []}, "no reward"),
           ({"steps": 0}, "must be >= 1")]
    for values, message in bad:
        with pytest.raises(ValueError, match=message):
            tg.read_spec(write_spec(tmp_path / "s.json", **values))
    (tmp_path / "s.json").write_text(json.dumps({"model_dir": "m"}))
    with pytest.raises(ValueError, match="missing keys"):
        tg.read_spec(tmp_path / "s.json")


def test_steps_prompts_and_completions(tg):
    spec = {"steps": 3, "num_iterations": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
            "num_generations": 2}
    assert tg.completions_per_step(spec) == 4
    assert tg.prompts_needed(spec) == math.ceil(3 / 2) * 4 // 2 == 4  # one generation batch per 2 steps
    assert tg.prompts_needed({**spec, "num_iterations": 1, "num_generations": 4}) == 3


def test_spec_defaults_are_hpalign_grpo_defaults(tg):
    from hpalign.config import PPOConfig
    from hpalign.hyperparams import GRPOParams

    ours = {f.name: f.default for f in dataclasses.fields(GRPOParams)}
    assert set(ours) <= set(tg.SPEC_DEFAULTS) and set(ours) <= set(tg.GRPO_CONFIG_KEYS)
    assert {k: tg.SPEC_DEFAULTS[k] for k in ours} == ours
    ppo = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    assert tg.SPEC_DEFAULTS["temperature"] == ppo["temperature"]
    assert tg.SPEC_DEFAULTS["max_completion_length"] == ppo["response_length"]


QUESTIONS = ["What is 17 + 25?", "Multiply 4 by 6.", "Subtract 3 from 20.", "Tell me a story."]
ANSWERS = ["17 + 25 = 42. 🎉", "It is 25.", "17", "42"]


def test_rule_reward_as_trl_calls_it_equals_hpalign_rule(tg):
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    expected = accuracy_reward(chats, ANSWERS)
    assert expected == [1.0, 0.0, 1.0, 0.0]
    reward = tg.trl_reward("accuracy")
    assert reward.__name__ == "accuracy"
    as_messages = [[{"role": "assistant", "content": a}] for a in ANSWERS]  # TRL's completions for chat prompts
    assert reward(prompts=chats, completions=as_messages, completion_ids=[[1]] * 4, trainer_state=None) == expected
    rendered = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS]
    assert reward(prompts=rendered, completions=ANSWERS, messages=chats, log_metric=print) == expected
    with pytest.raises(ValueError, match="messages"):
        reward(prompts=rendered, completions=ANSWERS)
    assert tg.trl_reward("length")(prompts=chats, completions=["x" * 120] * 4) == [-0.5] * 4


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_prompt_rows_in_file_order_and_checked(tg, tmp_path):
    tokenizer = build_byte_tokenizer()
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    texts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS]
    spec = {"prompts": str(tmp_path / "p.jsonl"), "steps": 1, "num_iterations": 1, "per_device_train_batch_size": 6,
            "gradient_accumulation_steps": 1, "num_generations": 2, "reward_funcs": ["accuracy"]}
    write_rows(tmp_path / "p.jsonl", [{"prompt": t, "messages": c} for t, c in zip(texts, chats, strict=True)])
    dataset = tg.prompt_dataset(spec, tokenizer)
    assert dataset["prompt"] == texts[:3] and dataset["messages"] == chats[:3]
    write_rows(tmp_path / "p.jsonl", [{"prompt": c} for c in chats])
    assert tg.prompt_dataset(spec, tokenizer)["prompt"] == chats[:3] and "messages" not in tg.prompt_dataset(
        spec, tokenizer).column_names
    with pytest.raises(ValueError, match="4 prompts; 1 steps need 5"):
        tg.prompt_dataset({**spec, "per_device_train_batch_size": 10}, tokenizer)
    write_rows(tmp_path / "p.jsonl", [{"prompt": texts[0]}, {"prompt": chats[1]}, {"prompt": texts[2]}])
    with pytest.raises(ValueError, match="all as text or all as messages"):
        tg.prompt_dataset(spec, tokenizer)
    write_rows(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    with pytest.raises(ValueError, match="\"messages\""):
        tg.prompt_dataset(spec, tokenizer)
    assert tg.prompt_dataset({**spec, "reward_funcs": []}, tokenizer)["prompt"] == texts[:3]  # a reward model reads text

    def adds_bos(text, add_special_tokens=True):
        return {"input_ids": [257] * add_special_tokens + tokenizer(text, add_special_tokens=False)["input_ids"]}

    with pytest.raises(ValueError, match="special tokens"):
        tg.prompt_dataset({**spec, "reward_funcs": []}, adds_bos)


def test_step_timer_splits_a_step(tg, monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(tg.StepTimer, "now", lambda self: next(clock))
    timer = tg.StepTimer()
    timer.close()  # nothing open: nothing happens
    timer.begin()  # t=0
    for key, value in (("generation_s", 1.0), ("gen_and_score_s", 3.0), ("prepare_s", 3.5), ("train_steps_s", 5.0),
                       ("logps_s", 0.5), ("rewards_s", 0.25), ("rollout_tokens", 7)):
        timer.add(key, value)
    timer.mark("train_end")  # 1
    timer.close()  # the optimizer step is not done: still open
    timer.mark("update_end")  # 2
    timer.close()  # 3
    step = timer.steps[0]
    assert (step["step_s"], step["generation_s"], step["scoring_s"], step["update_s"]) == (3, 1, 2, 1.5 + 1)
    assert step["other_s"] == 3 - 1 - 2 - 2.5 and step["scoring_other_s"] == 2 - 0.5 - 0.25
    assert step["rollout_tokens"] == 7 and timer.step is None and len(timer.steps) == 1


def test_wrap_times_and_hooks_an_instance_method(tg, monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(tg.StepTimer, "now", lambda self: next(clock))
    timer, calls, active = tg.StepTimer(), [], [True]

    class Model:
        def generate(self, x, *, scale=1):
            return x * scale

    model, other = Model(), Model()
    tg.wrap(model, "generate", timer, key="generation_s", before=lambda: calls.append("before"),
            after=lambda out, x, scale=1: calls.append((out, x, scale)), when=lambda: active[0])
    timer.begin()
    assert model.generate(2, scale=3) == 6 and calls == ["before", (6, 2, 3)]
    assert timer.step["generation_s"] == 1.0 and other.generate(2) == 2  # only the instance is wrapped
    active[0] = False
    assert model.generate(1) == 1 and len(calls) == 2 and timer.step["generation_s"] == 1.0


def test_sampling_check_wants_the_tempered_distribution_alone(tg):
    plain = {"logits_processors": ["TemperatureLogitsWarper"], "do_sample": True, "temperature": 0.7}
    assert tg.sampling_problems(plain, 0.7) == []
    assert tg.sampling_problems({**plain, "logits_processors": [], "temperature": 1.0}, 1.0) == []
    assert "TopKLogitsWarper" in tg.sampling_problems(
        {**plain, "logits_processors": ["TemperatureLogitsWarper", "TopKLogitsWarper"]}, 0.7)[0]
    assert tg.sampling_problems({**plain, "temperature": 1.0}, 0.7)
    assert "no generate call" in tg.sampling_problems({}, 0.7)[0]


# ----------------------------------------------------------------------------- TRL itself (slow)


@pytest.mark.slow
def test_one_trl_grpo_step_is_timed(tmp_path):
    pytest.importorskip("trl", reason="TRL is the benchmark extra: pip install '.[bench]'")
    model, tokenizer = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    template = resolve_template(tokenizer, "auto", None)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
    ids = [template.encode_prompt(chat) for chat in chats]
    write_rows(tmp_path / "p.jsonl", [{"prompt": tokenizer.decode(template.bos_ids) + template.render_prompt(chat),
                                       "messages": chat} for chat in chats])
    spec = write_spec(tmp_path / "spec.json", model_dir=str(tmp_path / "policy"), prompts=str(tmp_path / "p.jsonl"),
                      num_generations=2, per_device_train_batch_size=4, max_completion_length=8,
                      stop_token_ids=list(template.stop_token_ids), output=str(tmp_path / "out.json"))
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trl_grpo.py"), "--spec", str(spec)], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["trl_version"] == "1.16.0" and len(result["steps"]) == 1
    assert result["eos_token_ids"] == list(template.stop_token_ids)
    assert result["generation"]["logits_processors"] == ["TemperatureLogitsWarper"]
    assert (result["generation"]["top_k"], result["generation"]["top_p"]) == (0, 1.0)
    step = result["steps"][0]
    phases = [step[f"{p}_s"] for p in ("generation", "scoring", "update")]
    assert min(phases) > 0 and step["other_s"] >= 0
    assert sum(phases) + step["other_s"] == pytest.approx(step["step_s"], rel=1e-9)
    assert 0 < step["logps_s"] + step["rewards_s"] <= step["scoring_s"]  # beta 0.04: a reference forward
    assert step["completions"] == 4 and step["generations"] == 1 and 0 < step["rollout_tokens"] <= 4 * 8
    assert step["prompt_tokens"] == 2 * sum(map(len, ids))  # hpalign's prompt ids, num_generations times each
    assert step["metrics"]["completions/mean_length"] == pytest.approx(step["rollout_tokens"] / 4)
    print(f"TRL GRPO, 1 tiny step: {step['step_s']:.3f} s; whole child {time.perf_counter() - start:.1f} s")
