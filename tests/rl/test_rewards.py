"""Rule rewards for PPO: hand-worked cases, the built-in arithmetic prompts, flag parsing, weighted sums."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from hpalign.data.builtin import LEAD_EMOJI, builtin_dataset
from hpalign.rl.rewards import (
    DEFAULT_TARGET_CHARS,
    REWARD_FUNCS,
    WeightedReward,
    accuracy_reward,
    arithmetic_answer,
    contains_integer,
    emoji_reward,
    last_user_turn,
    length_reward,
    parse_reward_funcs,
    score_rule_rewards,
)


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def emoji_of(text: str) -> float:
    return emoji_reward([ask("hi")], [text])[0]


def accuracy_of(question: str, completion: str) -> float:
    return accuracy_reward([ask(question)], [completion])[0]


# ---- emoji -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("🧮 17 + 25 = 42. 🎉", 1.0),  # the built-in chosen style: contains, starts, ends
    ("17 + 25 = 42.", 0.0),  # the built-in rejected style
    ("🧮 17 + 25 = 42.", 0.75),  # starts only
    ("17 + 25 = 42. 🎉", 0.75),  # ends only
    ("17 + 25 🎉 = 42.", 0.5),  # inside only
    ("🎉", 1.0),  # one emoji both starts and ends the text
    ("  \n🧮 42 ✨ \n", 1.0),  # surrounding whitespace is ignored
    ("Done 🎉.", 0.5),  # punctuation after the last emoji: does not end with one
    ("I ❤️", 0.75),  # heart + variation selector-16 still ends with an emoji
    ("3 × 4 = 12.", 0.0),  # the multiplication sign is not an emoji
    ("", 0.0),
    ("   ", 0.0),
])
def test_emoji_hand_worked(text: str, expected: float) -> None:
    assert emoji_of(text) == expected


def test_emoji_one_score_per_completion_in_order() -> None:
    completions = ["a", "😊 a", "a 😊", "😊 a 😊"]
    assert emoji_reward([ask("q")] * 4, completions) == [0.0, 0.75, 0.75, 1.0]


def test_emoji_chosen_full_marks_rejected_none_on_builtin() -> None:
    pairs = builtin_dataset("pair", "train")
    assert set(emoji_reward([p.prompt for p in pairs], [p.chosen for p in pairs])) == {1.0}
    assert set(emoji_reward([p.prompt for p in pairs], [p.rejected for p in pairs])) == {0.0}


def test_reward_rejects_count_mismatch() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        emoji_reward([ask("a"), ask("b")], ["x"])


# ---- accuracy --------------------------------------------------------------------------------

@pytest.mark.parametrize(("question", "answer"), [
    ("What is 17 + 25?", 42),
    ("What is 17 plus 25?", 42),
    ("Can you add 17 and 25?", 42),
    ("What is 60 - 18?", 42),
    ("What is 60 minus 18?", 42),
    ("Subtract 18 from 60.", 42),  # operands in the other order: 60 - 18
    ("What is 6 times 7?", 42),
    ("What is 6 x 7?", 42),
    ("What is 6 × 7?", 42),
    ("What is 6 * 7?", 42),
    ("Multiply 6 by 7.", 42),
    ("what is 17+25", 42),  # case, spacing and final punctuation are free
    ("  What's 6x7 ?  ", 42),
    ("What is 5 - 12?", -7),  # a negative result
    ("What is -5 + 3?", -2),  # a negative operand
    ("Subtract 3 from -4.", -7),
    ("What is 5 − −3?", 8),  # the Unicode minus sign
    ("Multiply -6 by 7.", -42),
])
def test_arithmetic_answer_variants(question: str, answer: int) -> None:
    assert arithmetic_answer(question) == answer


@pytest.mark.parametrize("question", [
    "What is the capital of France?",
    "What number comes after 41?",
    "How many letters are in the word 'apple'?",
    "What is 2 + 3 + 4?",  # not one of the templates: the whole question must match
    "What is 17 + 25? And 3 + 4?",
    "What is 6 divided by 3?",
    "Tell me: what is 17 + 25?",
    "",
])
def test_arithmetic_answer_none_for_other_questions(question: str) -> None:
    assert arithmetic_answer(question) is None


@pytest.mark.parametrize(("text", "value", "expected"), [
    ("42", 42, True),
    ("17 + 25 = 42.", 42, True),  # followed by a full stop
    ("The answer is 42!", 42, True),
    ("42.0", 42, True),  # a decimal equal to the integer
    ("420", 42, False),  # part of a larger number
    ("1420 or 4200", 42, False),
    ("4.2", 42, False),
    ("0.42", 42, False),
    ("42.5", 42, False),  # a fraction
    ("-42", 42, False),  # minus 42 is not 42
    ("5 - 12 = -7.", -7, True),
    ("5 - 12 = 7.", -7, False),
    ("60-18=42", 18, True),  # a binary minus between digits is not a sign
    ("60-18=42", -18, False),
    ("1,042 apples", 1042, True),  # thousands separators
    ("1,042 apples", 42, False),
    ("no number here", 42, False),
])
def test_contains_integer(text: str, value: int, expected: bool) -> None:
    assert contains_integer(text, value) is expected


@pytest.mark.parametrize(("question", "completion", "expected"), [
    ("What is 17 + 25?", "🧮 17 + 25 = 42. 🎉", 1.0),
    ("What is 17 + 25?", "42", 1.0),
    ("What is 17 + 25?", "17 + 25 = 420.", 0.0),  # the answer only inside a larger number
    ("What is 17 + 25?", "17 + 25 = 43.", 0.0),
    ("Subtract 18 from 60.", "60 - 18 = 42.", 1.0),
    ("Subtract 18 from 60.", "18 - 60 = -42.", 0.0),  # the reversed subtraction is wrong
    ("What is 6 x 7?", "6 × 7 = 42.", 1.0),
    ("Multiply 6 by 7.", "6 x 7 = 42", 1.0),
    ("What is 5 - 12?", "5 - 12 = -7.", 1.0),
    ("What is 5 - 12?", "5 - 12 = 7.", 0.0),
    ("What is the capital of France?", "The capital of France is Paris.", 0.0),  # not scored: 0.0
])
def test_accuracy_hand_worked(question: str, completion: str, expected: float) -> None:
    assert accuracy_of(question, completion) == expected


def test_accuracy_reads_the_last_user_turn() -> None:
    prompt = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "1 + 1 = 2."},
        {"role": "user", "content": "What is 3 times 4?"},
    ]
    assert last_user_turn(prompt) == "What is 3 times 4?"
    assert accuracy_reward([prompt, prompt], ["12", "2"]) == [1.0, 0.0]
    # an earlier arithmetic turn does not make a later non-arithmetic question scored
    follow_up = prompt[:3] + [{"role": "user", "content": "What is the capital of Peru?"}]
    assert accuracy_reward([follow_up], ["2"]) == [0.0]


def test_accuracy_prompt_without_user_turn_scores_zero() -> None:
    prompt = [{"role": "system", "content": "What is 1 + 1?"}]
    assert last_user_turn(prompt) is None
    assert accuracy_reward([prompt], ["2"]) == [0.0]


@pytest.mark.parametrize("split", ["train", "test"])
def test_accuracy_on_every_builtin_arithmetic_prompt(split: str) -> None:
    pairs = builtin_dataset("pair", split)
    math_pairs = [p for p in pairs if p.chosen.startswith(LEAD_EMOJI["math"])]  # the arithmetic family
    parsed = [p for p in pairs if arithmetic_answer(p.prompt[-1]["content"]) is not None]
    assert parsed == math_pairs  # every arithmetic prompt parses, and nothing else does
    assert len(math_pairs) == {"train": 232, "test": 38}[split]
    num_echoed = 0
    for pair in math_pairs:
        answer = arithmetic_answer(pair.prompt[-1]["content"])
        a, b, result = (int(n) for n in re.fullmatch(r"(\d+) [-+×] (\d+) = (\d+)\.", pair.rejected).groups())
        assert answer == result  # the parser agrees with the data set's own answer
        assert accuracy_reward([pair.prompt] * 2, [pair.chosen, pair.rejected]) == [1.0, 1.0]
        wrong = pair.chosen.replace(f"= {result}.", f"= {result + 1}.")
        num_echoed += result in (a, b)  # e.g. 38 - 19 = 19: the echoed operand holds the answer
        assert accuracy_reward([pair.prompt], [wrong]) == [float(result in (a, b))]
    assert num_echoed < len(math_pairs) // 10


# ---- length ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("num_chars", "expected"), [
    (0, 0.0),
    (40, 0.0),  # below the target
    (80, 0.0),  # at the target
    (81, -1 / 80),  # just above: linear
    (100, -0.25),  # 20 over / 80
    (120, -0.5),
    (160, -1.0),  # twice the target: the cap
    (500, -1.0),  # capped
])
def test_length_hand_worked(num_chars: int, expected: float) -> None:
    assert DEFAULT_TARGET_CHARS == 80
    assert length_reward([ask("q")], ["a" * num_chars]) == [pytest.approx(expected)]


def test_length_counts_stripped_characters_and_code_points() -> None:
    assert length_reward([ask("q")], ["  " + "a" * 80 + "\n\n "]) == [0.0]  # surrounding whitespace
    assert length_reward([ask("q")], ["🎉" * 100]) == [pytest.approx(-0.25)]  # one emoji = one character


def test_length_custom_target() -> None:
    assert length_reward([ask("q")] * 3, ["a" * 10, "a" * 15, "a" * 30], target_chars=10) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="target_chars must be a positive"):
        length_reward([ask("q")], ["a"], target_chars=0)


def test_length_builtin_answers_unpenalised() -> None:
    pairs = builtin_dataset("pair", "train")
    assert set(length_reward([p.prompt for p in pairs], [p.chosen for p in pairs])) == {0.0}


# ---- flags -----------------------------------------------------------------------------------

def test_registry_names() -> None:
    assert REWARD_FUNCS == {"accuracy": accuracy_reward, "emoji": emoji_reward, "length": length_reward}


def test_parse_default_and_given_weights() -> None:
    parsed = parse_reward_funcs(["emoji", "accuracy"], None)
    assert parsed == [WeightedReward("emoji", 1.0, emoji_reward), WeightedReward("accuracy", 1.0, accuracy_reward)]
    parsed = parse_reward_funcs(["length", "emoji"], [0.5, 2])
    assert [(r.name, r.weight, r.fn) for r in parsed] == [("length", 0.5, length_reward), ("emoji", 2.0, emoji_reward)]
    assert parse_reward_funcs([], None) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed[0].weight = 3.0  # type: ignore[misc]


def test_parse_unknown_name_suggests_closest() -> None:
    with pytest.raises(ValueError) as info:
        parse_reward_funcs(["emoji", "acuracy"], None)
    message = str(info.value)
    assert "--reward_funcs" in message and "'acuracy'" in message
    assert "did you mean 'accuracy'?" in message
    assert "accuracy, emoji, length" in message


def test_parse_unknown_name_without_close_match() -> None:
    with pytest.raises(ValueError) as info:
        parse_reward_funcs(["bleu"], None)
    assert "'bleu'" in str(info.value) and "did you mean" not in str(info.value)
    assert "accuracy, emoji, length" in str(info.value)


def test_parse_wrong_weight_count() -> None:
    with pytest.raises(ValueError) as info:
        parse_reward_funcs(["emoji", "accuracy"], [0.5])
    message = str(info.value)
    assert "--reward_weights has 1 value(s) [0.5]" in message
    assert "--reward_funcs names 2 ['emoji', 'accuracy']" in message
    with pytest.raises(ValueError, match="--reward_weights has 1"):
        parse_reward_funcs([], [1.0])


def test_parse_repeated_name_and_bad_weight() -> None:
    with pytest.raises(ValueError, match="--reward_funcs names emoji more than once"):
        parse_reward_funcs(["emoji", "length", "emoji"], None)
    with pytest.raises(ValueError, match="--reward_weights: weight nan of 'emoji'"):
        parse_reward_funcs(["emoji"], [math.nan])


# ---- scoring ---------------------------------------------------------------------------------

def test_score_weighted_sum_hand_worked() -> None:
    prompts = [ask("What is 17 + 25?"), ask("What is 6 x 7?"), ask("What is the capital of France?")]
    completions = ["🧮 17 + 25 = 42. 🎉", "6 × 7 = 41. 😊", "Paris " + "!" * 94]  # 100 characters
    rewards = parse_reward_funcs(["emoji", "accuracy", "length"], [1.0, 2.0, 0.5])
    totals, metrics = score_rule_rewards(rewards, prompts, completions)
    # emoji [1, 0.75, 0]; accuracy [1, 0, 0]; length [0, 0, -0.25]
    assert totals == pytest.approx([1.0 + 2.0, 0.75, 0.5 * -0.25])
    assert metrics == pytest.approx({"rewards/emoji": 1.75 / 3, "rewards/accuracy": 1 / 3,
                                     "rewards/length": -0.25 / 3})  # raw means, not weighted


def test_score_no_rewards_and_inputs_untouched() -> None:
    prompts, completions = [ask("q")], ["a"]
    assert score_rule_rewards([], prompts, completions) == ([0.0], {})
    score_rule_rewards(parse_reward_funcs(["emoji"], None), prompts, completions)
    assert prompts == [ask("q")] and completions == ["a"]


@pytest.mark.parametrize(("returned", "match"), [
    ([1.0, 2.0], "'bad' returned 2 values for 1 completions"),
    (0.5, "'bad' returned a float"),
    ([math.nan], "'bad' returned nan for completion 0"),
    ([math.inf], "'bad' returned inf"),
    (["1.0"], "'bad' returned '1.0'"),
    ([True], "'bad' returned True"),
])
def test_score_checks_each_function(returned: object, match: str) -> None:
    bad = WeightedReward("bad", 1.0, lambda prompts, completions: returned)  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError, match=re.escape(match)):
        score_rule_rewards([bad], [ask("q")], ["a"])


def test_score_accepts_ints_as_floats() -> None:
    ones = WeightedReward("ones", 0.5, lambda prompts, completions: [1 for _ in completions])
    assert score_rule_rewards([ones], [ask("q")] * 2, ["a", "b"]) == ([0.5, 0.5], {"rewards/ones": 1.0})


def test_score_rejects_bad_batches() -> None:
    with pytest.raises(ValueError, match="at least one completion"):
        score_rule_rewards(parse_reward_funcs(["emoji"], None), [], [])
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        score_rule_rewards(parse_reward_funcs(["emoji"], None), [ask("q")], ["a", "b"])
