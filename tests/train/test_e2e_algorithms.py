"""End to end for every offline algorithm but DPO (tests/train/test_e2e_dpo.py): the real
`hpalign rlhf --rlhf_type X` on tiny-random-llama and the built-in emoji pairs; the loss falls and
the algorithm's own held-out preference metric rises. Plus 2-rank ZeRO-3 runs of KTO and RM.

Which held-out metric is meaningful: chosen answers carry two emoji (4 bytes each with the
byte-level tokenizer), so they are ~10 tokens longer than the rejected ones, and a raw log-prob
SUM favours the rejected answer at the start (`eval/logps/accuracies` is 0 before and after these
short runs). So each algorithm is judged by the reward it optimises:
- ORPO, SimPO: `eval/rewards/accuracies` uses the length-normalised (per-token) log-prob;
- CPO: its reward is beta * the log-prob SUM; the length handicap makes the accuracy start at 0;
  it rises once the emoji tokens become cheap, and the margin rises from the first steps;
- KTO: `eval/rewards/accuracies` on the pair form, with KTO's own reward r = beta * log(pi/ref)
  (0.5 at the start, pi == ref), and the label accuracy with KTO's own boundary, r > z0 (the KL
  reference point), which the trainer's `eval/kto/label_accuracy` also uses (z0 from mismatched held-out pairs);
- RM: the value head's rewards, `eval/rewards/accuracies`;
- SFT has no preference reward: the test measures the per-token log-prob preference of the trained
  checkpoint against the base model itself (SFT on the emoji answers makes them more likely per token).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.train.conftest import TINY_FLAGS, eval_records, run_cli, train_records

pytestmark = pytest.mark.slow

COMMON = [*TINY_FLAGS, "--batch_size", "4", "--learning_rate", "2e-3", "--lora_target_modules", "ALL",
          "--num_eval_generations", "0"]


def train(tmp_path: Path, algorithm: str, *, steps: int, extra: tuple[str, ...] = ()) -> Path:
    run_cli(["--rlhf_type", algorithm, *COMMON, "--max_steps", str(steps), "--output_dir", str(tmp_path),
             "--run_name", algorithm, *extra])
    return tmp_path / algorithm


def losses_of(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in train_records(run_dir)]


def assert_loss_falls(run_dir: Path, steps: int) -> None:
    losses = losses_of(run_dir)
    assert len(losses) == steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


def before_after(run_dir: Path) -> tuple[dict, dict]:
    records = eval_records(run_dir)
    assert records[0]["step"] == 0 and len(records) == 2
    return records[0], records[-1]


@pytest.mark.parametrize(("algorithm", "steps", "before_at_most", "after_at_least"), [
    ("orpo", 20, 0.6, 0.8),
    ("simpo", 20, 0.6, 0.8),
    ("rm", 15, 0.7, 0.9),
])
def test_pair_algorithm_learns_the_preference(tmp_path, algorithm, steps, before_at_most, after_at_least):
    run_dir = train(tmp_path, algorithm, steps=steps)
    assert_loss_falls(run_dir, steps)
    before, after = before_after(run_dir)
    assert before["eval/rewards/accuracies"] <= before_at_most, before
    assert after["eval/rewards/accuracies"] >= after_at_least, (before, after)
    assert after["eval/rewards/margins"] > before["eval/rewards/margins"]


def test_cpo_learns_the_preference_despite_the_length_handicap(tmp_path):
    # lr 3e-3: CPO has to make ~10 emoji bytes nearly free before a summed log-prob can prefer them
    # (probe runs: accuracy 0 -> 0.45 and margin -5.5 -> -0.2 in 30 steps; 0 -> 0.12 with 2e-3)
    run_dir = train(tmp_path, "cpo", steps=30, extra=("--learning_rate", "3e-3"))
    assert_loss_falls(run_dir, 30)
    before, after = before_after(run_dir)
    assert before["eval/rewards/accuracies"] == 0.0, before  # summed log-probs: the longer chosen loses
    assert after["eval/rewards/margins"] > before["eval/rewards/margins"] + 3.0, (before, after)
    assert after["eval/rewards/accuracies"] > 0.25, (before, after)


def test_kto_learns_from_unpaired_labels(tmp_path):
    from peft import PeftModel

    from hpalign.models import load_policy

    run_dir = train(tmp_path, "kto", steps=30)
    assert_loss_falls(run_dir, 30)
    before, after = before_after(run_dir)
    # pi == ref at the start: every implicit reward is 0, every comparison a tie
    assert before["eval/rewards/accuracies"] == pytest.approx(0.5)
    assert before["eval/kto/label_accuracy"] == pytest.approx(0.5)
    assert after["eval/rewards/accuracies"] > 0.8, after
    assert all(r["train/kl"] >= 0 for r in train_records(run_dir))  # z0 = max(0, KL estimate)
    # KTO's value function compares r = log pi/ref with the reference point z0, not with 0: measured so,
    # the held-out labels are learnt (0.99 in a probe run, 0.5 before training).
    base = load_policy("tiny-random-llama", dtype="float32")
    tuned = PeftModel.from_pretrained(base, str(run_dir / "checkpoint-30"))
    accuracy_at_z0, z0 = kto_label_accuracy_at_reference_point(tuned)
    assert accuracy_at_z0 > 0.8 and z0 > 0, (accuracy_at_z0, z0)
    # The trainer's own metric uses the held-out z0 as the boundary too, and agrees.
    assert after["eval/kto/label_accuracy"] > 0.8, (before, after, accuracy_at_z0)
    assert after["eval/kto/kl"] >= 0


@torch.no_grad()
def kto_label_accuracy_at_reference_point(peft_model: torch.nn.Module) -> tuple[float, float]:
    """(share of held-out KTO examples with r > z0 exactly when desirable, z0), r = log pi/ref and
    z0 = max(0, mean r over mismatched (prompt, completion) pairs of the held-out set), as in training."""
    from hpalign.data import builtin
    from hpalign.data.types import KTOExample
    from hpalign.losses import mismatched_completion_index

    examples = builtin.builtin_dataset("kto", "test", seed=0)
    partners = mismatched_completion_index(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    mismatched = [KTOExample(ex.prompt, examples[j].completion, ex.label, "kl")
                  for ex, j in zip(examples, partners, strict=True)]
    logratio_N, labels_N = kto_logratios(peft_model, examples)
    z0 = max(0.0, kto_logratios(peft_model, mismatched)[0].mean().item())
    correct_N = torch.where(logratio_N > z0, labels_N, ~labels_N).float()
    return correct_N.mean().item(), z0


def kto_logratios(peft_model: torch.nn.Module, examples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y|x) - log ref(y|x) [N], labels [N]); the reference is the adapter switched off."""
    batch = held_out_batch(examples)
    policy = sequence_stats_of(peft_model.eval(), batch)
    with peft_model.disable_adapter():
        reference = sequence_stats_of(peft_model, batch)
    return (policy.logps_ER - reference.logps_ER)[:, 0], batch.kto_labels


def held_out_batch(examples: list):
    """One padded batch of `examples`, templated and truncated as in training (TINY_FLAGS' 256)."""
    from hpalign.data import collate, templates
    from hpalign.data.types import LoadReport
    from hpalign.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-random-llama")
    template = templates.resolve_template(tokenizer, "auto")
    tokenized = templates.tokenize_examples(examples, template, max_length=256, report=LoadReport())
    return collate.pad_batch(tokenized, pad_id=tokenizer.pad_token_id)


def sequence_stats_of(model: torch.nn.Module, batch):
    from hpalign.train.forward import sequence_stats

    return sequence_stats(model, batch, packed=False)


@torch.no_grad()
def per_token_preference(model: torch.nn.Module) -> float:
    """Share of held-out pairs whose chosen answer has the higher MEAN log-prob per token under `model`."""
    from hpalign.data import builtin

    stats = sequence_stats_of(model.eval(), held_out_batch(builtin.builtin_dataset("pair", "test", seed=0)))
    mean_ER = stats.mean_logps_ER
    return (mean_ER[:, 0] > mean_ER[:, 1]).float().mean().item()


def test_sft_makes_the_chosen_style_more_likely(tmp_path):
    from peft import PeftModel

    from hpalign.models import load_policy

    run_dir = train(tmp_path, "sft", steps=20)
    assert_loss_falls(run_dir, 20)
    before, after = before_after(run_dir)
    # held-out log-prob of the chosen (emoji) answer relative to the rejected one rises
    assert after["eval/rewards/margins"] > before["eval/rewards/margins"] + 5.0, (before, after)
    base = load_policy("tiny-random-llama", dtype="float32")
    base_preference = per_token_preference(base)
    tuned = PeftModel.from_pretrained(base, str(run_dir / "checkpoint-20"))
    tuned_preference = per_token_preference(tuned)
    assert base_preference < 0.6 and tuned_preference > 0.8, (base_preference, tuned_preference)


# --- two processes, ZeRO-3 ------------------------------------------------------------------------

DISTRIBUTED = ["--lora_dropout", "0", "--eval_before_train", "false", "--max_steps", "4",
               "--gradient_accumulation_steps", "1"]


def _launcher(port: int) -> list[str]:
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(port)]


def _assert_same_steps(single: Path, ranks: Path) -> None:
    a = [(r["train/loss"], r["train/grad_norm"]) for r in train_records(single)]
    b = [(r["train/loss"], r["train/grad_norm"]) for r in train_records(ranks)]
    assert len(a) == len(b) == 4
    for (loss_a, grad_a), (loss_b, grad_b) in zip(a, b, strict=True):
        assert loss_a == pytest.approx(loss_b, abs=1e-4, rel=1e-4), (a, b)
        assert grad_a == pytest.approx(grad_b, abs=1e-4, rel=1e-4), (a, b)


@pytest.mark.distributed
def test_kto_two_rank_zero3_matches_single_process(tmp_path):
    """KTO's reference point z0 is the KL estimate over the GLOBAL batch (all-reduced): 2 ranks x
    micro-batch 2 must give the single process's micro-batch 4 losses, z0 included."""
    launcher = _launcher(29847)
    flags = ["--rlhf_type", "kto", *COMMON, *DISTRIBUTED, "--output_dir", str(tmp_path)]
    run_cli([*flags, "--run_name", "single"])
    run_cli([*flags, "--run_name", "ranks", "--batch_size", "2", "--deepspeed", "zero3"], launcher=launcher,
            timeout=600)
    _assert_same_steps(tmp_path / "single", tmp_path / "ranks")
    kl_single = [r["train/kl"] for r in train_records(tmp_path / "single")]
    kl_ranks = [r["train/kl"] for r in train_records(tmp_path / "ranks")]
    assert kl_ranks == pytest.approx(kl_single, abs=1e-4) and max(kl_single) > 0, (kl_single, kl_ranks)
    # the sharded held-out evaluation sees every example once: same accuracy up to a near-tie flip
    after_single, after_ranks = eval_records(tmp_path / "single")[-1], eval_records(tmp_path / "ranks")[-1]
    for name in ("eval/kto/label_accuracy", "eval/rewards/accuracies"):
        assert after_ranks[name] == pytest.approx(after_single[name], abs=0.02), (after_single, after_ranks)


@pytest.mark.distributed
def test_rm_two_rank_zero3_writes_a_loadable_value_head(tmp_path):
    """Under ZeRO-3 the value head is partitioned; the checkpoint must hold the gathered, trained head."""
    from hpalign.data import builtin
    from hpalign.models import RewardModel, load_policy
    from hpalign.score import load_reward_model, score_pairs

    launcher = _launcher(29853)
    flags = ["--rlhf_type", "rm", *COMMON, *DISTRIBUTED, "--output_dir", str(tmp_path)]
    run_cli([*flags, "--run_name", "single"])
    run_cli([*flags, "--run_name", "ranks", "--batch_size", "2", "--deepspeed", "zero3"], launcher=launcher,
            timeout=600)
    _assert_same_steps(tmp_path / "single", tmp_path / "ranks")
    checkpoint = tmp_path / "ranks" / "checkpoint-4"
    assert (checkpoint / "value_head.safetensors").is_file()
    pairs = builtin.builtin_dataset("pair", "test", seed=0)[:16]
    scores = {}
    for name in ("single", "ranks"):
        reward_model, tokenizer, template = load_reward_model(tmp_path / name / "checkpoint-4")
        scores[name] = score_pairs(reward_model, tokenizer, template, pairs, max_length=256)
    torch.testing.assert_close(scores["ranks"].chosen_N, scores["single"].chosen_N, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(scores["ranks"].rejected_N, scores["single"].rejected_N, atol=1e-3, rtol=1e-3)
    seed = json.loads((checkpoint / "trainer_state.json").read_text())["seed"]
    initial = RewardModel.with_new_head(load_policy("tiny-random-llama", dtype="float32"), seed=seed).value_head
    # the trained head, gathered from its ZeRO-3 partitions, not the initial one
    assert not torch.allclose(reward_model.value_head.summary.weight, initial.summary.weight)


@pytest.mark.distributed
@pytest.mark.parametrize(("algorithm", "port"), [("cpo", 29861), ("orpo", 29867), ("simpo", 29873),
                                                  ("sft", 29879)])
def test_two_rank_zero3_matches_single_process(tmp_path, algorithm, port):
    """`deepspeed --num_gpus 2 launch/train.py` with ZeRO-3: each algorithm's step losses and gradient
    norms equal the single process's on the same global batch (and DPO: tests/train/test_invariants.py)."""
    launcher = _launcher(port)
    flags = ["--rlhf_type", algorithm, *COMMON, *DISTRIBUTED, "--output_dir", str(tmp_path)]
    run_cli([*flags, "--run_name", "single"])
    run_cli([*flags, "--run_name", "ranks", "--batch_size", "2", "--deepspeed", "zero3"], launcher=launcher,
            timeout=600)
    _assert_same_steps(tmp_path / "single", tmp_path / "ranks")
    assert losses_of(tmp_path / "ranks")[-1] < losses_of(tmp_path / "ranks")[0]
