"""benchmarks/data_profiles.py: the suite's data shapes are deterministic, have the lengths they claim,
and "mixed" is still the suite's original data set; any preference file becomes rows."""

import json
import random

import pytest

from hpalign.data.templates import resolve_template
from hpalign.tiny_model import build_byte_tokenizer
from tests.benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def profiles():
    return load_benchmark("data_profiles")


def _old_mixed_rows(num_rows: int, seed: int) -> list[dict]:
    """bench_train's generator before the profiles existed (write_mixed_length_dataset), for comparison."""
    rng = random.Random(seed)
    words = ("the model learns which answer people prefer from pairs of responses to the same prompt and "
             "packing puts several short sequences into one row so that no compute is spent on padding "
             "tokens while every sequence still attends only to itself").split()

    def log_uniform(low, high):
        return round(low * (high / low) ** rng.random())

    def text(count):
        return " ".join(rng.choice(words) for _ in range(count))

    rows = []
    for _ in range(num_rows):
        prompt, chosen, rejected = log_uniform(8, 320), log_uniform(4, 160), log_uniform(4, 160)
        rows.append({"prompt": text(prompt), "chosen": text(chosen), "rejected": text(rejected)})
    return rows


def test_mixed_is_the_suites_original_data(profiles):
    rows = profiles.generate_rows("mixed", num_rows=30, seed=3)
    old = _old_mixed_rows(30, seed=3)
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": o["prompt"]}] for o in old]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(o["chosen"], o["rejected"]) for o in old]


@pytest.mark.parametrize("name", ["short_chat", "long_prompts", "long_answers", "multi_turn"])
def test_profiles_are_deterministic_per_row_and_within_their_ranges(profiles, name):
    profile = profiles.PROFILES[name]
    rows = profiles.generate_rows(name, num_rows=40, seed=0)
    assert profiles.generate_rows(name, num_rows=10, seed=0) == rows[:10]  # row i does not depend on the count
    assert profiles.generate_rows(name, num_rows=10, seed=1) != rows[:10]
    for row in rows:
        *history, last = row["prompt"]
        assert last["role"] == "user" and profile.prompt[0] <= len(last["content"].split()) <= profile.prompt[1]
        assert len(history) // 2 in range(profile.history_turns[0], profile.history_turns[1] + 1)
        assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2)
        for answer in (row["chosen"], row["rejected"]):
            assert profile.answer[0] <= len(answer.split()) <= profile.answer[1]
    text = json.dumps(rows, ensure_ascii=False)
    assert any(word in text for word in profiles.MULTILINGUAL_WORDS) == profile.multilingual


def test_length_statistics_tell_the_profiles_apart(profiles):
    template = resolve_template(build_byte_tokenizer())
    stats = {name: profiles.length_stats(profiles.generate_rows(name, num_rows=30, seed=0), template)
             for name in ("short_chat", "long_prompts", "long_answers", "multi_turn")}
    assert stats["long_prompts"]["prompt_tokens_mean"] > 3 * stats["short_chat"]["prompt_tokens_mean"]
    assert stats["long_answers"]["answer_tokens_mean"] > 3 * stats["short_chat"]["answer_tokens_mean"]
    assert stats["multi_turn"]["multi_turn_share"] == 1.0 and stats["short_chat"]["multi_turn_share"] == 0.0
    assert stats["multi_turn"]["prompt_tokens_mean"] > stats["short_chat"]["prompt_tokens_mean"]


def test_any_preference_file_becomes_rows(profiles, tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
                                "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"}) + "\n")
    (row,) = profiles.load_rows(path)
    assert row == {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
