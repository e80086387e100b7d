"""benchmarks/trl_ppo.py: the spec, the token count, the phase arithmetic (fast, no TRL needed) and
(slow) two PPO steps of TRL 1.12's PPOTrainer on tiny-random-llama in the venv of
scripts/trl_ppo_env.sh, skipped when that venv is not there."""

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hpalign.tiny_model import build_byte_tokenizer
from tests.benchmark_modules import load_benchmark
from tests.tiny_models import tiny_policy_and_reward

REPO = Path(__file__).resolve().parents[1]
ENV_SCRIPT = REPO / "scripts" / "trl_ppo_env.sh"


@pytest.fixture(scope="module")
def tp():
    return load_benchmark("trl_ppo")


def write_spec(path: Path, **values) -> Path:
    base = {"model_dir": "m", "prompts": "p.jsonl", "batch_size": 2, "steps": 1, "sft_type": "lora",
            "output": "out.json"}
    path.write_text(json.dumps({**base, **values}))
    return path


def test_spec_defaults_and_errors(tp, tmp_path):
    spec = tp.read_spec(write_spec(tmp_path / "s.json", reward_model_dir="rm", gradient_accumulation_steps=3))
    assert spec["value_model_dir"] == "rm" and spec["num_ppo_epochs"] == 4 and spec["response_length"] == 53
    assert spec["learning_rate"] == 1e-4
    assert tp.read_spec(write_spec(tmp_path / "s.json", sft_type="full"))["learning_rate"] == 1e-5
    assert tp.rollout_batch_size(spec) == 6
    with pytest.raises(ValueError, match="unknown keys \\['bf16'\\]"):
        tp.read_spec(write_spec(tmp_path / "s.json", bf16=True))
    with pytest.raises(ValueError, match="sft_type"):
        tp.read_spec(write_spec(tmp_path / "s.json", sft_type="qlora"))
    (tmp_path / "s.json").write_text(json.dumps({"model_dir": "m"}))
    with pytest.raises(ValueError, match="missing keys"):
        tp.read_spec(tmp_path / "s.json")


def test_spec_defaults_are_hpalign_ppo_defaults(tp):
    from hpalign.config import PPOConfig

    ours = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    shared = set(ours) & set(tp.SPEC_DEFAULTS)
    assert {"num_ppo_epochs", "response_length", "temperature", "kl_coef", "cliprange", "lam"} <= shared
    assert {k: tp.SPEC_DEFAULTS[k] for k in shared} == {k: ours[k] for k in shared}


def test_response_tokens_count_up_to_the_first_stop(tp):
    responses = torch.tensor([[5, 7, 2, 9, 9], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    assert tp.response_tokens(responses, [2]) == 3 + 5 + 1
    assert tp.response_tokens(responses, [2, 7]) == 2 + 5 + 1
    assert tp.response_tokens(responses, []) == 15


def test_phase_timer_splits_a_step(tp, monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(tp.PhaseTimer, "now", lambda self: next(clock))
    timer = tp.PhaseTimer()
    timer.begin_step()  # t=0
    timer.begin_step()  # the dataloader restarting its epoch: still the same step (no tick)
    timer.mark("generation_start", phase="generation")  # 1
    timer.mark("generation_end", phase="scoring")  # 2
    timer.add("values", 0.5)
    timer.mark("update_start", phase="update")  # 3
    timer.mark("update_end", phase="update")  # 4
    timer.begin_step()  # 5: closes step 1
    with pytest.raises(RuntimeError, match="without all its marks"):
        timer.finish()
    step = timer.steps[0]
    assert (step["step_s"], step["generation_s"], step["scoring_s"], step["update_s"], step["other_s"]) == (
        5, 1, 1, 1, 2)
    assert step["values_s"] == 0.5 and step["scoring_other_s"] == 0.5


def test_marked_loader_marks_before_each_batch(tp):
    calls = []
    loader = tp.MarkedLoader([10, 20], lambda: calls.append(len(calls)))
    assert list(loader) == [10, 20] and len(calls) == 3  # before each batch and before the end


def test_pad_equal_to_eos_is_refused(tp, tmp_path):
    tokenizer = build_byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    spec = {"model_dir": str(tmp_path), "pad_token": None}
    with pytest.raises(ValueError, match="pad_token"):
        tp.load_tokenizer(spec)
    assert tp.load_tokenizer({**spec, "pad_token": "<pad>"}).pad_token == "<pad>"


def test_prompts_become_input_ids_in_file_order(tp, tmp_path):
    tokenizer = build_byte_tokenizer()
    chat = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": chat}, {"prompt": "<|im_start|>user\nyo<|im_end|>\n"}, {"prompt": "unused"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"prompts": str(tmp_path / "p.jsonl"), "batch_size": 1, "gradient_accumulation_steps": 1, "steps": 2}
    ids = tp.prompt_dataset(spec, tokenizer)["input_ids"]
    assert ids == [tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"],
                   tokenizer("<|im_start|>user\nyo<|im_end|>\n", add_special_tokens=False)["input_ids"]]
    with pytest.raises(ValueError, match="3 prompts; 2 steps of 2 need 4"):
        tp.prompt_dataset({**spec, "batch_size": 2}, tokenizer)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a<pad>b"}) + "\n")
    with pytest.raises(ValueError, match="pad token"):
        tp.prompt_dataset({**spec, "steps": 1}, tokenizer)


# ----------------------------------------------------------------------------- TRL itself (slow)


def trl_ppo_python() -> str:
    """The venv's python, or a skip that says how to make it."""
    check = subprocess.run(["bash", str(ENV_SCRIPT), "--check"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(check.stderr.strip())
    return check.stdout.strip()


@pytest.mark.slow
def test_trl_ppo_steps_are_timed(tmp_path):
    python = trl_ppo_python()
    policy, reward = tiny_policy_and_reward(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": "question " * (i + 1)}]}) + "\n"
                               for i in range(4)))
    spec = write_spec(tmp_path / "spec.json", model_dir=str(policy), prompts=str(prompts),
                      reward_model_dir=str(reward), steps=2, batch_size=2, response_length=8, num_ppo_epochs=1,
                      output=str(tmp_path / "out.json"))
    start = time.perf_counter()
    run = subprocess.run([python, str(REPO / "benchmarks" / "trl_ppo.py"), "--spec", str(spec)], cwd=REPO,
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["trl_version"] == "1.12.0" and len(result["steps"]) == 2
    for step in result["steps"]:
        phases = [step[f"{p}_s"] for p in ("generation", "scoring", "update")]
        assert min(phases) > 0 and step["other_s"] >= 0
        assert sum(phases) + step["other_s"] == pytest.approx(step["step_s"], rel=1e-6)
        assert step["other_s"] <= step["gc_s"] + 0.25 * step["step_s"]  # other: the batch fetch and TRL's gc
        parts = [step[f"{p}_s"] for p in ("ref_logprobs", "values", "scores")]
        assert min(parts) > 0 and sum(parts) + step["old_logprobs_s"] <= step["scoring_s"]
        assert 0 < step["rollout_tokens"] <= 2 * step["response_width"] <= 2 * 8
    print(f"TRL PPO, 2 tiny steps: {[round(s['step_s'], 3) for s in result['steps']]} s; "
          f"whole child {time.perf_counter() - start:.1f} s")
