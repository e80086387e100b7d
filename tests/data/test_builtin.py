"""The built-in emoji preference set: determinism, disjoint splits, shape of pairs, the metric."""

from __future__ import annotations

import pytest

from hpalign.data.builtin import BUILTIN_NAME, NUM_TEST, NUM_TRAIN, builtin_dataset, has_emoji, task_metric
from hpalign.data.types import KTOExample, PreferenceExample, PromptExample, SFTExample


def last_question(example) -> str:
    return example.prompt[-1]["content"]


def test_name_and_sizes():
    assert BUILTIN_NAME == "builtin-emoji"
    assert len(builtin_dataset("pair", "train")) == NUM_TRAIN == 400
    assert len(builtin_dataset("pair", "test")) == NUM_TEST == 64


def test_deterministic_and_seed_dependent():
    assert builtin_dataset("pair", "train") == builtin_dataset("pair", "train")
    assert builtin_dataset("pair", "train", seed=1) != builtin_dataset("pair", "train")


@pytest.mark.parametrize("seed", [0, 1])
def test_splits_are_disjoint_and_questions_unique(seed):
    train = {last_question(ex) for ex in builtin_dataset("pair", "train", seed=seed)}
    test = {last_question(ex) for ex in builtin_dataset("pair", "test", seed=seed)}
    assert len(train) == NUM_TRAIN and len(test) == NUM_TEST
    assert not train & test
    for ex in builtin_dataset("pair", "test", seed=seed):  # history never leaks train questions
        assert not {m["content"] for m in ex.prompt if m["role"] == "user"} & train


def test_pairs_differ_only_by_emoji():
    pairs = builtin_dataset("pair", "train")
    for i, ex in enumerate(pairs):
        assert isinstance(ex, PreferenceExample)
        assert ex.source == f"builtin:train:{i}"
        assert has_emoji(ex.chosen[0]) and has_emoji(ex.chosen[-1])
        assert not has_emoji(ex.rejected)
        assert ex.chosen[2:-2] == ex.rejected  # "<emoji> answer <emoji>"
        assert ex.prompt[-1]["role"] == "user"
        assert len(ex.chosen) < 60
    assert any(ex.prompt[0]["role"] == "system" for ex in pairs)
    assert any(sum(m["role"] == "user" for m in ex.prompt) >= 3 for ex in pairs)  # two turns of history
    assert len({ex.prompt[-1]["content"].split()[0] for ex in pairs}) > 5  # varied question forms


def test_answers_are_correct():
    for ex in builtin_dataset("pair", "train"):
        question = last_question(ex)
        if question.startswith("What is ") and " + " in question:
            a, b = question[len("What is "):-1].split(" + ")
            assert ex.rejected == f"{a} + {b} = {int(a) + int(b)}."
        if question.startswith("Spell the word"):
            word = question.split("'")[1]
            assert ex.rejected.endswith(f"'{word[::-1]}'.")


def test_kto_and_sft_forms():
    pairs = builtin_dataset("pair", "test")
    kto = builtin_dataset("kto", "test")
    sft = builtin_dataset("sft", "test")
    assert len(kto) == len(pairs) and all(isinstance(ex, KTOExample) for ex in kto)
    assert [ex.label for ex in kto[:4]] == [True, False, True, False]  # unpaired: one answer per prompt
    assert kto[0].completion == pairs[0].chosen and kto[1].completion == pairs[1].rejected
    assert [ex.prompt for ex in kto] == [p.prompt for p in pairs]
    assert all(isinstance(ex, SFTExample) for ex in sft)
    assert [ex.response for ex in sft] == [ex.chosen for ex in pairs]
    with pytest.raises(ValueError, match="unknown split"):
        builtin_dataset("pair", "validation")
    with pytest.raises(ValueError, match="unknown data kind"):
        builtin_dataset("ppo")


@pytest.mark.parametrize("split", ["train", "test"])
def test_prompt_form_is_one_prompt_per_pair(split):
    pairs = builtin_dataset("pair", split)
    prompts = builtin_dataset("prompt", split)
    assert prompts == [PromptExample(p.prompt, p.source) for p in pairs]
    assert all(isinstance(ex, PromptExample) and ex.prompt[-1]["role"] == "user" for ex in prompts)
    assert any(ex.prompt[0]["role"] == "system" for ex in prompts)  # system and history kept
    assert builtin_dataset("prompt", split) == prompts  # same seed, same data
    assert builtin_dataset("prompt", split, seed=1) != prompts


@pytest.mark.parametrize("text, expected", [
    ("😊 hi", True), ("done ✨", True), ("🧮", True), ("flag 🇫🇷", True), ("☕", True), ("🫠", True),
    ("plain text.", False), ("3 × 4 = 12.", False), ("é à ü — “quotes”", False), ("中文回答", False), ("", False),
])
def test_has_emoji(text, expected):
    assert has_emoji(text) is expected


def test_task_metric():
    prompts = [[{"role": "user", "content": "q"}]] * 4
    assert task_metric(prompts, ["😊 a", "b", "c 🎉", "d"]) == 0.5
    assert task_metric(prompts[:1], ["none"]) == 0.0
    with pytest.raises(ValueError, match="4 prompts but 1 generations"):
        task_metric(prompts, ["x"])
    with pytest.raises(ValueError, match="at least one"):
        task_metric([], [])
