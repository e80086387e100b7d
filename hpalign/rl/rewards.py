"""Rule rewards for PPO (`--reward_funcs`): pure functions over text, no torch, plain floats.

PPO can be rewarded by a reward model, by these rules, or by both. The rules grade the built-in
task `builtin-emoji` (`hpalign.data.builtin`): short questions with a checkable answer, where the
preferred answer starts and ends with an emoji ("🧮 17 + 25 = 42. 🎉"). So a rule reward can
teach what DPO learns from the pairs, with no reward model, and check that the answer stays right.

Every reward function is `fn(prompts, completions) -> list[float]`: `prompts` are chat-message
lists whose last user turn is the question answered, `completions` the decoded responses
(special tokens stripped); one float per completion.

- `emoji`: graded so that a policy that rarely emits emoji still gets signal.
      r = 0.5 * [contains an emoji] + 0.25 * [starts with one] + 0.25 * [ends with one]
  in {0, 0.5, 0.75, 1}, after stripping surrounding whitespace; "emoji" is a character of
  `hpalign.data.builtin.EMOJI_RANGES`; variation selectors, joiners and keycap marks that trail
  the last emoji ("❤️") are skipped, trailing punctuation ("🎉.") is not.
- `accuracy`: for the built-in arithmetic questions ("What is 17 + 25?", "Subtract 3 from 20.",
  "Multiply 4 by 6." ... see `arithmetic_answer`), r = 1.0 when the correct integer appears in
  the completion as a whole number ("42." and "42.0" count; "420", "4.2", "42.5" do not; "-42"
  is minus 42), else 0.0. A prompt that is not such a question scores 0.0: call
  `arithmetic_answer` on its last user turn (None) to tell it apart from a wrong answer. The rule
  only asks that the answer *appears*, so a completion that lists several numbers, or echoes an
  operand equal to the answer (38 - 19 = 19), is credited: pair it with `length` or a reward model.
- `length`: a penalty on characters (Unicode code points, surrounding whitespace stripped), 0 up
  to `target_chars`, then linear, capped at -1:
      r = -min(1, max(0, n - target_chars) / target_chars)
  i.e. -1 from twice the target. The default target, 80 characters (~20 tokens), is the length
  budget of the built-in answers (the longest chosen answer has 45 characters).

`parse_reward_funcs` turns the `--reward_funcs` / `--reward_weights` flags into `WeightedReward`s;
`score_rule_rewards` gives the weighted sum per completion and each function's batch mean.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hpalign.data.builtin import has_emoji
from hpalign.data.types import Message

RewardFunction = Callable[[list[list[Message]], list[str]], list[float]]

DEFAULT_TARGET_CHARS = 80
# Characters that may follow an emoji as part of it: variation selectors, zero-width joiner,
# combining keycap, tag characters (subdivision flags).
_EMOJI_TRAILERS = "\ufe0e\ufe0f\u200d\u20e3" + "".join(chr(c) for c in range(0xE0020, 0xE0080))


def _check_batch(prompts: Sequence[list[Message]], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; "
                         "give one prompt per completion")


def _emoji_score(text: str) -> float:
    text = text.strip()
    if not has_emoji(text):
        return 0.0
    tail = text.rstrip(_EMOJI_TRAILERS)
    return 0.5 + 0.25 * has_emoji(text[0]) + 0.25 * (bool(tail) and has_emoji(tail[-1]))


def emoji_reward(prompts: list[list[Message]], completions: list[str]) -> list[float]:
    """0.5 for containing an emoji, +0.25 for starting with one, +0.25 for ending with one.

    Surrounding whitespace is stripped first; variation selectors / joiners after the last emoji
    are skipped, punctuation is not ("🎉." does not end with an emoji). `prompts` are not read,
    only counted. Values in {0.0, 0.5, 0.75, 1.0}.
    """
    _check_batch(prompts, completions)
    return [_emoji_score(text) for text in completions]


_OPERAND = r"([-−]?\d+)"
_END = r"\s*[?.!]?"
# (pattern, operation on the two captured operands); matched whole, case-insensitive.
_QUESTIONS: tuple[tuple[re.Pattern[str], Callable[[int, int], int]], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), op) for pattern, op in (
        (rf"what(?:\s+is|'s)\s+{_OPERAND}\s*(?:\+|plus)\s*{_OPERAND}{_END}", lambda a, b: a + b),
        (rf"(?:can\s+you\s+)?add\s+{_OPERAND}\s+and\s+{_OPERAND}{_END}", lambda a, b: a + b),
        (rf"what(?:\s+is|'s)\s+{_OPERAND}\s*(?:-|−|minus)\s*{_OPERAND}{_END}", lambda a, b: a - b),
        (rf"subtract\s+{_OPERAND}\s+from\s+{_OPERAND}{_END}", lambda b, a: a - b),
        (rf"what(?:\s+is|'s)\s+{_OPERAND}\s*(?:times|x|×|\*)\s*{_OPERAND}{_END}", lambda a, b: a * b),
        (rf"multiply\s+{_OPERAND}\s+by\s+{_OPERAND}{_END}", lambda a, b: a * b),
    )
)


def _to_int(operand: str) -> int:
    return int(operand.replace("−", "-"))


def arithmetic_answer(question: str) -> int | None:
    """The integer answer to a built-in arithmetic question, or None when `question` is not one.

    Recognised (case and spacing free, final "?", "." or "!" optional, operands may be negative):
    "What is a + b?", "What is a plus b?", "Can you add a and b?", "What is a - b?",
    "What is a minus b?", "Subtract b from a.", "What is a times b?", "What is a x b?" (also "×",
    "*"), "Multiply a by b."; "What's" for "What is". The whole question must match, so
    "What is 2 + 3 + 4?" is None.
    """
    text = question.strip()
    for pattern, op in _QUESTIONS:
        match = pattern.fullmatch(text)
        if match:
            return op(_to_int(match[1]), _to_int(match[2]))
    return None


def last_user_turn(prompt: list[Message]) -> str | None:
    """Content of the last message with role "user", None when there is none."""
    for message in reversed(prompt):
        if message.get("role") == "user":
            return message.get("content", "")
    return None


# A number not glued to other digits: optional minus sign (not after a digit, so "60-18" is
# 60 and 18), digits with optional thousands commas, optional decimals.
_NUMBER = re.compile(r"(?<![0-9.,])([-−]?)"  # sign
                     r"([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(\.[0-9]+)?(?![0-9]|[.,][0-9])")  # digits, decimals


def contains_integer(text: str, value: int) -> bool:
    """True when `text` holds `value` as a whole number: "42." and "42.0" hold 42; "420", "4.2",
    "42.5" and "-42" do not."""
    for sign, digits, decimals in _NUMBER.findall(text):
        if decimals.strip(".0"):
            continue  # a fraction: not an integer
        number = int(digits.replace(",", ""))
        if (-number if sign else number) == value:
            return True
    return False


def accuracy_reward(prompts: list[list[Message]], completions: list[str]) -> list[float]:
    """1.0 when the answer to the arithmetic question in the prompt's last user turn appears in the
    completion as a whole number (`contains_integer`), else 0.0. Prompts whose last user turn is not
    an arithmetic question (`arithmetic_answer` is None) score 0.0."""
    _check_batch(prompts, completions)
    scores = []
    for prompt, text in zip(prompts, completions, strict=True):
        question = last_user_turn(prompt)
        answer = None if question is None else arithmetic_answer(question)
        scores.append(float(answer is not None and contains_integer(text, answer)))
    return scores


def length_reward(prompts: list[list[Message]], completions: list[str], *,
                  target_chars: int = DEFAULT_TARGET_CHARS) -> list[float]:
    """-min(1, max(0, n - target_chars) / target_chars), n = characters of the stripped completion.

    0 up to the target, -1 from twice the target. `prompts` are not read, only counted.
    """
    if target_chars <= 0:
        raise ValueError(f"target_chars must be a positive number of characters, got {target_chars}")
    _check_batch(prompts, completions)
    return [-min(1.0, max(0, len(text.strip()) - target_chars) / target_chars) for text in completions]


REWARD_FUNCS: dict[str, RewardFunction] = {
    "accuracy": accuracy_reward,
    "emoji": emoji_reward,
    "length": length_reward,
}


@dataclass(frozen=True)
class WeightedReward:
    """One entry of `--reward_funcs` with its `--reward_weights` value."""

    name: str
    weight: float
    fn: RewardFunction


def _unknown_name_message(name: str) -> str:
    valid = ", ".join(sorted(REWARD_FUNCS))
    close = difflib.get_close_matches(name, REWARD_FUNCS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"--reward_funcs: unknown reward function {name!r}{hint} Valid names: {valid}"


def parse_reward_funcs(names: list[str], weights: list[float] | None = None) -> list[WeightedReward]:
    """`--reward_funcs` names (and `--reward_weights`, default 1.0 each) -> `WeightedReward`s in order.

    An empty `names` means no rule reward. Unknown or repeated names, a weight count that differs
    from the name count, and non-finite weights raise ValueError.
    """
    for name in names:
        if name not in REWARD_FUNCS:
            raise ValueError(_unknown_name_message(name))
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--reward_funcs names {', '.join(repeated)} more than once; give each reward once "
                         "and set its weight with --reward_weights")
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"--reward_weights has {len(weights)} value(s) {list(weights)} but --reward_funcs "
                         f"names {len(names)} {list(names)}; give one weight per reward function, or omit "
                         "--reward_weights for 1.0 each")
    for name, weight in zip(names, weights, strict=True):
        if not math.isfinite(weight):
            raise ValueError(f"--reward_weights: weight {weight} of {name!r} is not a finite number")
    return [WeightedReward(name, float(weight), REWARD_FUNCS[name])
            for name, weight in zip(names, weights, strict=True)]


def _checked_scores(reward: WeightedReward, values: object, num_completions: int) -> list[float]:
    is_list = isinstance(values, Sequence) and not isinstance(values, str)
    if not is_list or len(values) != num_completions:
        got = f"{len(values)} values" if is_list else f"a {type(values).__name__}"
        raise ValueError(f"reward function {reward.name!r} returned {got} for {num_completions} completions; "
                         "it must return one float per completion")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"reward function {reward.name!r} returned {value!r} for completion {i}; "
                             "every reward must be a finite float")
    return [float(value) for value in values]


def score_rule_rewards(rewards: list[WeightedReward], prompts: list[list[Message]], completions: list[str]
                       ) -> tuple[list[float], dict[str, float]]:
    """Per completion, sum_k weight_k * reward_k; and {"rewards/<name>": batch mean of the raw reward}.

    Each function must return one finite float per completion, else ValueError naming it.
    """
    _check_batch(prompts, completions)
    if not completions:
        raise ValueError("score_rule_rewards needs at least one completion")
    totals = [0.0] * len(completions)
    metrics: dict[str, float] = {}
    for reward in rewards:
        scores = _checked_scores(reward, reward.fn(prompts, completions), len(completions))
        totals = [total + reward.weight * score for total, score in zip(totals, scores, strict=True)]
        metrics[f"rewards/{reward.name}"] = sum(scores) / len(scores)
    return totals, metrics
