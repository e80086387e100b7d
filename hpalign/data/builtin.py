"""`builtin-emoji`: a preference set generated from code, after `shareai-llama3-dpo-zh-en-emoji`.

Prompts are short questions with a checkable answer (arithmetic, capitals, colours, opposites,
animal sounds, spelling and letter counts, next numbers), phrased from templates with a seeded
RNG; some carry a system message, some one or two earlier turns of history. Both answers are the
same correct text; the chosen one starts and ends with an emoji ("🧮 17 + 25 = 42. 🎉"), the
rejected one has none ("17 + 25 = 42."). A policy has learnt the preference when its greedy answers
to held-out prompts contain emoji: `task_metric` checks that by program, no judge model needed.
Answers stay under ~20 tokens so that DPO + LoRA on a 135M model trains in minutes on a CPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from hpalign.data.types import KTOExample, Message, PreferenceExample, PromptExample, SFTExample, pairs_to_kto

BUILTIN_NAME = "builtin-emoji"
NUM_TRAIN, NUM_TEST = 400, 64
SPLITS = ("train", "test")

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Ireland": "Dublin", "Austria": "Vienna", "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Australia": "Canberra", "Argentina": "Buenos Aires",
    "Cuba": "Havana", "Denmark": "Copenhagen", "Hungary": "Budapest",
}
COLOURS = {
    "a banana": "yellow", "grass": "green", "the clear sky": "blue", "snow": "white", "coal": "black",
    "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "a lime": "green", "milk": "white",
    "a strawberry": "red", "a carrot": "orange", "chocolate": "brown", "a flamingo": "pink",
    "an eggplant": "purple", "a crow": "black", "a polar bear": "white", "a pumpkin": "orange",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "light": "dark",
    "old": "young", "early": "late", "open": "closed", "full": "empty", "hard": "soft", "loud": "quiet",
    "rich": "poor", "strong": "weak", "tall": "short", "wet": "dry", "win": "lose", "day": "night",
    "left": "right", "begin": "end", "push": "pull", "buy": "sell", "clean": "dirty", "heavy": "light",
}
SOUNDS = {
    "a cow": "moo", "a dog": "woof", "a cat": "meow", "a duck": "quack", "a sheep": "baa", "a lion": "roar",
    "a snake": "hiss", "an owl": "hoot", "a pig": "oink", "a horse": "neigh", "a frog": "ribbit", "a bee": "buzz",
}
WORDS = ("apple", "river", "garden", "pencil", "window", "orange", "planet", "coffee", "rabbit", "guitar",
         "yellow", "bridge", "candle", "island", "monkey", "summer", "winter", "forest", "dragon", "castle",
         "cat", "sun", "moon", "tree", "house", "music", "water", "light", "smile", "cloud")
SYSTEMS = ("You are a helpful assistant.", "Answer briefly.", "You are a friendly tutor for children.",
           "Keep every answer to one sentence.")
LEAD_EMOJI = {"math": "🧮", "capital": "🌍", "colour": "🎨", "opposite": "🔄", "sound": "🐾", "word": "🔤",
              "count": "🔢"}
END_EMOJI = ("🎉", "✨", "😊", "👍")

Item = tuple[str, str, str]  # (question, plain answer, family)


def _arithmetic(rng: random.Random) -> list[Item]:
    items = []
    for _ in range(170):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        q = rng.choice(("What is {a} + {b}?", "What is {a} plus {b}?", "Can you add {a} and {b}?"))
        items.append((q.format(a=a, b=b), f"{a} + {b} = {a + b}.", "math"))
    for _ in range(90):
        a, b = rng.randint(20, 99), rng.randint(1, 19)
        q = rng.choice(("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}."))
        items.append((q.format(a=a, b=b), f"{a} - {b} = {a - b}.", "math"))
    for _ in range(70):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = rng.choice(("What is {a} times {b}?", "What is {a} x {b}?", "Multiply {a} by {b}."))
        items.append((q.format(a=a, b=b), f"{a} × {b} = {a * b}.", "math"))
    return items


def _facts(rng: random.Random) -> list[Item]:
    items = []
    for country, city in CAPITALS.items():
        q = rng.choice(("What is the capital of {c}?", "Which city is the capital of {c}?"))
        items.append((q.format(c=country), f"The capital of {country} is {city}.", "capital"))
    for thing, colour in COLOURS.items():
        q = rng.choice(("What colour is {t}?", "What is the usual colour of {t}?"))
        items.append((q.format(t=thing), f"{thing[0].upper()}{thing[1:]} is {colour}.", "colour"))
    for word, opposite in OPPOSITES.items():
        q = rng.choice(("What is the opposite of '{w}'?", "Give me the opposite of the word '{w}'."))
        items.append((q.format(w=word), f"The opposite of '{word}' is '{opposite}'.", "opposite"))
    for animal, sound in SOUNDS.items():
        items.append((f"What sound does {animal} make?", f"{animal[0].upper()}{animal[1:]} says '{sound}'.", "sound"))
    return items


def _words_and_counts(rng: random.Random) -> list[Item]:
    items = []
    for word in WORDS:
        items.append((f"How many letters are in the word '{word}'?", f"'{word}' has {len(word)} letters.", "word"))
        items.append((f"Spell the word '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'.", "word"))
        items.append((f"What is the first letter of '{word}'?", f"The first letter of '{word}' is '{word[0]}'.", "word"))
    for n in rng.sample(range(5, 500), 60):
        q = rng.choice(("What number comes after {n}?", "What is the next number after {n}?"))
        items.append((q.format(n=n), f"The number after {n} is {n + 1}.", "count"))
    return items


FAMILIES: tuple[Callable[[random.Random], list[Item]], ...] = (_arithmetic, _facts, _words_and_counts)


def _unique_items(seed: int) -> list[Item]:
    """Every question once, shuffled by `seed`."""
    rng = random.Random(seed)
    seen: dict[str, Item] = {}
    for family in FAMILIES:
        for item in family(rng):
            seen.setdefault(item[0], item)
    items = list(seen.values())
    rng.shuffle(items)
    assert len(items) >= NUM_TRAIN + NUM_TEST, len(items)
    return items


def _prompt(item: Item, others: list[Item], rng: random.Random) -> list[Message]:
    """The question, with a system message (1 in 5) and one or two earlier turns (1 in 4)."""
    messages: list[Message] = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    if rng.random() < 0.25:
        num_turns = rng.choice((1, 2))
        earlier = [other for other in rng.sample(others, num_turns + 1) if other is not item][:num_turns]
        for question, answer, _ in earlier:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": item[0]}]


def _pairs(split: str, seed: int) -> list[PreferenceExample]:
    items = _unique_items(seed)
    test, train = items[:NUM_TEST], items[NUM_TEST: NUM_TEST + NUM_TRAIN]
    chosen_items = train if split == "train" else test
    rng = random.Random(f"{seed}:{split}")
    pairs = []
    for i, item in enumerate(chosen_items):
        prompt = _prompt(item, chosen_items, rng)  # history drawn from the same split: no leak
        chosen = f"{LEAD_EMOJI[item[2]]} {item[1]} {rng.choice(END_EMOJI)}"
        pairs.append(PreferenceExample(prompt, chosen, item[1], f"builtin:{split}:{i}"))
    return pairs


def builtin_dataset(kind: str = "pair", split: str = "train", *, seed: int = 0
                    ) -> list[PreferenceExample] | list[KTOExample] | list[SFTExample] | list[PromptExample]:
    """The built-in set: "train" (400 pairs) or "test" (64 pairs, questions disjoint from train).

    kind "pair" -> PreferenceExample; "kto" -> one KTOExample per pair, truly unpaired: the chosen
    answer (desirable) of even pairs, the rejected one (undesirable) of odd pairs, so no prompt is
    seen with both answers and n_D = n_U (a user's pair file still gives two rows per pair,
    `pairs_to_kto`); "sft" -> SFTExample of the chosen answers; "prompt" -> PromptExample, one per
    pair (its prompt and source, for PPO, which samples its own answers). Same seed, same data.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of {BUILTIN_NAME}; expected one of {SPLITS}")
    pairs = _pairs(split, seed)
    if kind == "pair":
        return pairs
    if kind == "kto":
        both = pairs_to_kto(pairs)  # [chosen of pair 0, rejected of pair 0, chosen of pair 1, ...]
        return [both[2 * i + i % 2] for i in range(len(pairs))]
    if kind == "sft":
        return [SFTExample(p.prompt, p.chosen, p.source) for p in pairs]
    if kind == "prompt":
        return [PromptExample(p.prompt, p.source) for p in pairs]
    raise ValueError(f"unknown data kind {kind!r}; expected pair, kto, sft or prompt")


EMOJI_RANGES = (
    (0x1F000, 0x1F02F),  # mahjong tiles (🀄)
    (0x1F0A0, 0x1F0FF),  # playing cards (🃏)
    (0x1F1E6, 0x1F1FF),  # regional indicators (flags)
    (0x1F300, 0x1F5FF),  # misc symbols and pictographs
    (0x1F600, 0x1F64F),  # emoticons
    (0x1F680, 0x1F6FF),  # transport and map
    (0x1F900, 0x1F9FF),  # supplemental symbols and pictographs
    (0x1FA70, 0x1FAFF),  # symbols and pictographs extended-A
    (0x2600, 0x26FF),  # misc symbols (☀ ☕ ⚡)
    (0x2700, 0x27BF),  # dingbats (✨ ✅ ❤)
    (0x2B50, 0x2B55),  # ⭐ ⭕
    (0x231A, 0x231B),  # ⌚ ⌛
    (0x23E9, 0x23FA),  # ⏩ ... ⏰ ⏳
)


def has_emoji(text: str) -> bool:
    """True when `text` holds a character from an emoji pictograph or symbol block (`EMOJI_RANGES`)."""
    return any(lo <= ord(ch) <= hi for ch in text for lo, hi in EMOJI_RANGES)


def task_metric(prompts: list[list[Message]], generations: list[str]) -> float:
    """Share of generations that contain an emoji, in [0, 1]: the program-checked preference
    of `builtin-emoji` (chosen answers have emoji, rejected ones none). `prompts` are the held-out
    prompts the generations answer; only their number is checked, the answer itself is not judged."""
    if len(prompts) != len(generations):
        raise ValueError(f"{len(prompts)} prompts but {len(generations)} generations")
    if not generations:
        raise ValueError("task_metric needs at least one generation")
    return sum(has_emoji(g) for g in generations) / len(generations)
