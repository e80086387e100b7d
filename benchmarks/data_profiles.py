"""The shapes of data the training suite measures: built-in length profiles, generated deterministically,
or any preference file hpalign reads.

A row is {"prompt": chat messages ending with a user turn, "chosen": str, "rejected": str}: what
hpalign reads (TRL's conversational prompt format) and what `trl_trainers.trl_rows` renders for TRL.

Profiles (word counts log-uniform in the ranges; about 1.25 SmolLM2 tokens per English word, more
for the Chinese words and emoji that `multilingual` mixes in):

  mixed          prompts 8..320 words, answers 4..160: the suite's original data (same rows as before)
  short_chat     prompts 4..40, answers 6..40, multilingual: a chat assistant's everyday traffic
  long_prompts   prompts 160..340 (retrieval-style context and a question), answers 6..40
  long_answers   prompts 16..90, answers 100..280: UltraFeedback-like
  multi_turn     2..4 earlier user/assistant turns (4..40 / 8..50 words) before the last question
                 (4..40), answers 8..60, multilingual

Each row is generated from its own seeded generator (seed, profile, row index), so the first rows are
the same whatever the count.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

WORDS = ("the model learns which answer people prefer from pairs of responses to the same prompt and "
         "packing puts several short sequences into one row so that no compute is spent on padding "
         "tokens while every sequence still attends only to itself").split()
# Chinese words and emoji: more tokens per character than English, and multi-byte UTF-8 on the way.
MULTILINGUAL_WORDS = ("模型 学习 人们 更喜欢 哪个 回答 偏好 数据 训练 对齐 😀 🚀 ✨ 👍 🤖 é ñ ü").split()


@dataclass(frozen=True)
class Profile:
    """Word-count ranges (log-uniform, inclusive) of one data shape."""

    prompt: tuple[int, int]
    answer: tuple[int, int]
    history_turns: tuple[int, int] = (0, 0)  # earlier user/assistant exchanges before the last question
    history_user: tuple[int, int] = (4, 40)
    history_assistant: tuple[int, int] = (8, 50)
    multilingual: bool = False  # one word in four from MULTILINGUAL_WORDS


PROFILES: dict[str, Profile] = {
    "mixed": Profile(prompt=(8, 320), answer=(4, 160)),
    "short_chat": Profile(prompt=(4, 40), answer=(6, 40), multilingual=True),
    "long_prompts": Profile(prompt=(160, 340), answer=(6, 40)),
    "long_answers": Profile(prompt=(16, 90), answer=(100, 280)),
    "multi_turn": Profile(prompt=(4, 40), answer=(8, 60), history_turns=(2, 4), multilingual=True),
}


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return round(low * (high / low) ** rng.random())


def words(rng: random.Random, count: int) -> str:
    """`count` English words of the suite's vocabulary."""
    return " ".join(rng.choice(WORDS) for _ in range(count))


def _text(rng: random.Random, count: int, *, multilingual: bool) -> str:
    if not multilingual:
        return words(rng, count)
    return " ".join(rng.choice(MULTILINGUAL_WORDS) if rng.random() < 0.25 else rng.choice(WORDS)
                    for _ in range(count))


def _single_turn_row(profile: Profile, rng: random.Random) -> dict:
    """The suite's original draw order (three lengths, then three texts): "mixed" keeps its old rows."""
    prompt, chosen, rejected = (_log_uniform(rng, *profile.prompt), _log_uniform(rng, *profile.answer),
                                _log_uniform(rng, *profile.answer))
    return {"prompt": [{"role": "user", "content": words(rng, prompt)}], "chosen": words(rng, chosen),
            "rejected": words(rng, rejected)}


def generate_row(profile: Profile, rng: random.Random) -> dict:
    """One preference row of the profile's shape."""
    text = lambda counts: _text(rng, _log_uniform(rng, *counts), multilingual=profile.multilingual)  # noqa: E731
    messages = []
    for _ in range(rng.randint(*profile.history_turns)):
        messages += [{"role": "user", "content": text(profile.history_user)},
                     {"role": "assistant", "content": text(profile.history_assistant)}]
    messages.append({"role": "user", "content": text(profile.prompt)})
    return {"prompt": messages, "chosen": text(profile.answer), "rejected": text(profile.answer)}


def generate_rows(name: str, *, num_rows: int, seed: int) -> list[dict]:
    """`num_rows` rows of profile `name`; row i depends on (seed, name, i) only ("mixed": on the seed
    and the rows before it, as the suite always generated it)."""
    profile = PROFILES[name]
    if name == "mixed":
        rng = random.Random(seed)
        return [_single_turn_row(profile, rng) for _ in range(num_rows)]
    return [generate_row(profile, random.Random(f"{seed}:{name}:{i}")) for i in range(num_rows)]


def load_rows(path: Path) -> list[dict]:
    """The pairs of any preference file hpalign reads (every pair format, jsonl/json/parquet/csv), as rows."""
    from hpalign.data.formats import load_examples

    examples = load_examples([str(path)], kind="pair")
    return [{"prompt": [dict(m) for m in e.prompt], "chosen": e.chosen, "rejected": e.rejected} for e in examples]


def length_stats(rows: list[dict], template) -> dict[str, float]:
    """Token statistics of rows under `template`: prompt and answer lengths (mean, median, max) and the
    share of prompts with earlier turns."""
    prompts = template.encode_prompts([r["prompt"] for r in rows])
    answers = template.encode_responses([r[k] for r in rows for k in ("chosen", "rejected")])
    prompt_lengths, answer_lengths = [len(p) for p in prompts], [len(a) for a in answers]
    return {"rows": len(rows),
            "prompt_tokens_mean": round(statistics.fmean(prompt_lengths), 1),
            "prompt_tokens_median": statistics.median(prompt_lengths), "prompt_tokens_max": max(prompt_lengths),
            "answer_tokens_mean": round(statistics.fmean(answer_lengths), 1),
            "answer_tokens_median": statistics.median(answer_lengths), "answer_tokens_max": max(answer_lengths),
            "multi_turn_share": round(sum(len(r["prompt"]) > 1 for r in rows) / len(rows), 3)}


def rows_to_generate(wanted: int, name: str) -> int:
    """Rows to generate so that `wanted` fit max_length (generous: the long profiles lose some)."""
    return 8 * wanted + 16 if name == "mixed" else math.ceil(2 * wanted) + 16
