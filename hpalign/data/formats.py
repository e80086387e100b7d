"""Loading pair, KTO, SFT and prompt data from local files; every bad row is named by file and line or row.

Files: .jsonl (source "path:LINE", 1-based), .json (a list, or {"data": [...]}), .parquet, .csv/.tsv
and `datasets.save_to_disk` folders (source "path:row N", 0-based). The format is detected per row
from its columns (see `PAIR_FORMATS`, `KTO_FORMATS`, `SFT_FORMATS`, `PROMPT_FORMATS`); history always
ends up in the prompt, a list of chat messages ending with the last user turn (system message first).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from typing import Any

from hpalign.data.readers import read_rows, type_name
from hpalign.data.types import (
    DataFormatError,
    KTOExample,
    LoadReport,
    Message,
    PreferenceExample,
    PromptExample,
    SFTExample,
    pairs_to_kto,
)

PAIR_FORMATS = (
    "prompt/chosen/rejected strings (+ optional system, history=[[query, response], ...], margin)",
    "query/response/rejected_response (swift)",
    "prompt as chat messages + chosen/rejected as strings or assistant messages (TRL conversational)",
    "messages (ending with the chosen assistant turn) + rejected_response",
    "chosen/rejected as whole conversations (TRL implicit prompt)",
    "chosen/rejected raw text with '\\n\\nHuman:'/'\\n\\nAssistant:' turns (Anthropic HH-RLHF)",
)
KTO_FORMATS = (
    "prompt/completion/label (prompt a string or chat messages; + optional system, history)",
    "query/response/label (swift)",
    "messages (ending with the assistant turn) + label",
    "any pair format above: each pair gives one desirable and one undesirable row",
)
SFT_FORMATS = (
    "prompt/response or query/response (+ optional system, history)",
    "messages (ending with the assistant turn)",
    "any pair format: the chosen answer is the response",
)
PROMPT_FORMATS = (
    "prompt or query, a string or chat messages ending with a user turn (+ optional system, history), no response",
    "messages (ending with a user turn, or with an assistant turn: the response, dropped)",
    "any row the pair, KTO or SFT kinds accept (prompt/chosen/rejected, query/response, prompt/completion/label, "
    "HH-RLHF ...): its prompt is kept, its responses dropped (counted)",
)
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
Row = dict[str, Any]


# ----------------------------------------------------------------------------- fields


def _has(row: Row, name: str) -> bool:
    return row.get(name) is not None


def _missing(row: Row, field_name: str, source: str, formats: tuple[str, ...]) -> DataFormatError:
    found = ", ".join(sorted(row)) or "none"
    accepted = "; ".join(formats)
    return DataFormatError(source, field_name, f"missing. Columns found: {found}. Accepted formats: {accepted}")


def to_messages(value: Any, source: str, field_name: str) -> list[Message]:
    """A list of {"role", "content"} dicts (also sharegpt {"from", "value"}), roles normalised."""
    if not isinstance(value, list):
        raise DataFormatError(source, field_name, f"expected a list of chat messages, got a {type_name(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataFormatError(source, field_name,
                                  f"message {i} is a {type_name(message)}, expected {{'role': ..., 'content': ...}}")
        role = ROLES.get(str(message.get("role", message.get("from"))).lower())
        content = message.get("content", message.get("value"))
        if role is None:
            raise DataFormatError(source, field_name, f"message {i} has role {message.get('role')!r}; "
                                  "expected system, user or assistant")
        if not isinstance(content, str):
            raise DataFormatError(source, field_name, f"message {i} content is a {type_name(content)}, expected a string")
        messages.append({"role": role, "content": content})
    return messages


def _history(value: Any, source: str) -> list[Message]:
    if isinstance(value, list) and all(isinstance(turn, dict) for turn in value):
        return to_messages(value, source, "history")
    if not isinstance(value, list):
        raise DataFormatError(source, "history", f"expected a list of [query, response] pairs, got a {type_name(value)}")
    messages: list[Message] = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataFormatError(source, "history", f"turn {i} must be a [query, response] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return messages


def _check_prompt(messages: list[Message], source: str, field_name: str) -> list[Message]:
    if not messages or messages[-1]["role"] != "user":
        last = messages[-1]["role"] if messages else "nothing"
        raise DataFormatError(source, field_name, f"the prompt must end with a user turn; it ends with {last}")
    if not messages[-1]["content"].strip():
        raise DataFormatError(source, field_name, "the last user turn is empty")
    return messages


def build_prompt(row: Row, field_name: str, source: str) -> list[Message]:
    """system + history + the prompt (a string or chat messages) as one message list."""
    value = row[field_name]
    if isinstance(value, str):
        turns = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        turns = to_messages(value, source, field_name)
    else:
        raise DataFormatError(source, field_name, f"expected a string or chat messages, got a {type_name(value)}")
    history = _history(row["history"], source) if _has(row, "history") else []
    messages = history + turns
    if _has(row, "system") and not (messages and messages[0]["role"] == "system"):
        if not isinstance(row["system"], str):
            raise DataFormatError(source, "system", f"expected a string, got a {type_name(row['system'])}")
        messages = [{"role": "system", "content": row["system"]}] + messages
    return _check_prompt(messages, source, field_name)


def response_text(value: Any, prompt: list[Message], source: str, field_name: str) -> str:
    """A response given as a string or as assistant message(s), possibly prefixed by the prompt."""
    if isinstance(value, list):
        messages = to_messages(value, source, field_name)
        user_turns = [m for m in prompt if m["role"] != "system"]
        for prefix in (prompt, user_turns):
            if len(messages) > len(prefix) and messages[: len(prefix)] == prefix:
                messages = messages[len(prefix):]
                break
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataFormatError(source, field_name, "expected one assistant message after the prompt; "
                                  f"got roles {[m['role'] for m in messages]}")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise DataFormatError(source, field_name,
                              f"expected a string or assistant messages, got a {type_name(value)} ({value!r:.40})")
    if not value.strip():
        raise DataFormatError(source, field_name, "the response is empty")
    return value


def _split_conversation(value: Any, source: str, field_name: str) -> tuple[list[Message], str]:
    messages = to_messages(value, source, field_name)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataFormatError(source, field_name, "the conversation must end with an assistant turn (the answer)")
    answer = response_text(messages[-1]["content"], [], source, field_name)
    return _check_prompt(messages[:-1], source, field_name), answer


def _margin(row: Row, source: str) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        margin = float(value)
    except (TypeError, ValueError):
        raise DataFormatError(source, "margin", f"expected a number, got {value!r:.40}") from None
    if margin != margin:  # NaN: parquet's missing float
        return None
    return margin


def parse_label(value: Any, source: str) -> bool:
    """True/False, 1/0 or "true"/"false"/"1"/"0" (any case); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataFormatError(source, "label", f"expected true/false or 1/0, got {value!r:.40}")


# ----------------------------------------------------------------------------- row parsers


def _hh_turns(text: str, source: str) -> list[Message]:
    if text.startswith(HH_HUMAN.strip()):
        text = "\n\n" + text
    parts = re.split(r"\n\n(Human|Assistant):", text)
    if parts[0].strip():
        raise DataFormatError(source, "chosen", "HH-RLHF text must start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def parse_hh(chosen: str, rejected: str, source: str) -> tuple[list[Message], str, str]:
    """Anthropic HH-RLHF: the shared text up to the last '\\n\\nAssistant:' is the prompt."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataFormatError(source, "prompt", "no prompt column and the chosen text has no '\\n\\nAssistant:' "
                              "turn (not HH-RLHF text). Accepted formats: " + "; ".join(PAIR_FORMATS))
    prefix = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prefix):
        raise DataFormatError(source, "rejected", "HH-RLHF text: rejected does not share the chosen conversation "
                              "up to its last '\\n\\nAssistant:'")
    prompt = _check_prompt(_hh_turns(chosen[:cut], source), source, "chosen")
    answers = [response_text(text[len(prefix):].strip(), prompt, source, name)
               for text, name in ((chosen, "chosen"), (rejected, "rejected"))]
    return prompt, answers[0], answers[1]


def _implicit_prompt(row: Row, source: str) -> tuple[list[Message], str, str]:
    chosen = to_messages(row["chosen"], source, "chosen")
    rejected = to_messages(row["rejected"], source, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = _check_prompt(chosen[:shared], source, "chosen")
    return (prompt, response_text(chosen[shared:], [], source, "chosen"),
            response_text(rejected[shared:], [], source, "rejected"))


def _prompt_field(row: Row) -> str | None:
    return next((name for name in ("prompt", "query") if _has(row, name)), None)


def parse_pair(row: Row, source: str) -> list[PreferenceExample]:
    """One row of any `PAIR_FORMATS` layout as a `PreferenceExample`."""
    prompt_name = _prompt_field(row)
    if _has(row, "messages"):
        prompt, chosen = _split_conversation(row["messages"], source, "messages")
        rejected_name = "rejected_response" if _has(row, "rejected_response") else "rejected"
        if not _has(row, rejected_name):
            raise _missing(row, "rejected_response", source, PAIR_FORMATS)
        rejected = response_text(row[rejected_name], prompt, source, rejected_name)
    elif prompt_name is not None:
        prompt = build_prompt(row, prompt_name, source)
        names = [next((n for n in aliases if _has(row, n)), aliases[0])
                 for aliases in (("chosen", "response"), ("rejected", "rejected_response"))]
        for name in names:
            if not _has(row, name):
                raise _missing(row, name, source, PAIR_FORMATS)
        chosen, rejected = (response_text(row[name], prompt, source, name) for name in names)
    elif _has(row, "chosen") and _has(row, "rejected"):
        if isinstance(row["chosen"], list):
            prompt, chosen, rejected = _implicit_prompt(row, source)
        else:
            for name in ("chosen", "rejected"):
                response_text(row[name], [], source, name)  # type and emptiness first
            prompt, chosen, rejected = parse_hh(row["chosen"], row["rejected"], source)
    else:
        raise _missing(row, "prompt", source, PAIR_FORMATS)
    return [PreferenceExample(prompt, chosen, rejected, source, margin=_margin(row, source))]


def parse_kto(row: Row, source: str) -> list[KTOExample]:
    """One row of any `KTO_FORMATS` layout; a pair row gives two examples."""
    if not _has(row, "label"):
        if _has(row, "rejected") or _has(row, "rejected_response"):
            return pairs_to_kto(parse_pair(row, source))
        raise _missing(row, "label", source, KTO_FORMATS)
    label = parse_label(row["label"], source)
    if _has(row, "messages"):
        prompt, completion = _split_conversation(row["messages"], source, "messages")
        return [KTOExample(prompt, completion, label, source)]
    prompt_name = _prompt_field(row)
    if prompt_name is None:
        raise _missing(row, "prompt", source, KTO_FORMATS)
    prompt = build_prompt(row, prompt_name, source)
    name = next((n for n in ("completion", "response") if _has(row, n)), None)
    if name is None:
        raise _missing(row, "completion", source, KTO_FORMATS)
    return [KTOExample(prompt, response_text(row[name], prompt, source, name), label, source)]


def parse_sft(row: Row, source: str) -> list[SFTExample]:
    """One row of any `SFT_FORMATS` layout."""
    if _has(row, "messages") and not (_has(row, "rejected_response") or _has(row, "rejected")):
        prompt, response = _split_conversation(row["messages"], source, "messages")
        return [SFTExample(prompt, response, source)]
    if _has(row, "rejected") or _has(row, "rejected_response"):
        return [SFTExample(p.prompt, p.chosen, p.source) for p in parse_pair(row, source)]
    prompt_name = _prompt_field(row)
    if prompt_name is None:
        raise _missing(row, "prompt", source, SFT_FORMATS)
    prompt = build_prompt(row, prompt_name, source)
    name = next((n for n in ("response", "completion", "chosen") if _has(row, n)), None)
    if name is None:
        raise _missing(row, "response", source, SFT_FORMATS)
    return [SFTExample(prompt, response_text(row[name], prompt, source, name), source)]


def _conversation_prompt(value: Any, source: str) -> tuple[list[Message], int]:
    """A `messages` conversation as a prompt: a final assistant turn is its response, dropped."""
    messages = to_messages(value, source, "messages")
    if messages and messages[-1]["role"] == "assistant":
        return _split_conversation(value, source, "messages")[0], 1
    return _check_prompt(messages, source, "messages"), 0


def parse_prompt(row: Row, source: str) -> tuple[PromptExample, int]:
    """One row of any `PROMPT_FORMATS` layout, and how many responses it carried (dropped).

    A row with responses is parsed by the pair or SFT parser (which also reads KTO rows: the label
    is ignored), so its prompt, history and system included, is built exactly as for those kinds.
    """
    if _has(row, "rejected") or _has(row, "rejected_response"):
        return PromptExample(parse_pair(row, source)[0].prompt, source), 2
    if _has(row, "messages"):
        prompt, num_dropped = _conversation_prompt(row["messages"], source)
        return PromptExample(prompt, source), num_dropped
    prompt_name = _prompt_field(row)
    if prompt_name is None:
        raise _missing(row, "prompt", source, PROMPT_FORMATS)
    if any(_has(row, name) for name in ("response", "completion", "chosen")):
        return PromptExample(parse_sft(row, source)[0].prompt, source), 1
    return PromptExample(build_prompt(row, prompt_name, source), source), 0


PARSERS: dict[str, Callable[[Row, str], list]] = {"pair": parse_pair, "kto": parse_kto, "sft": parse_sft}
KINDS = (*PARSERS, "prompt")


# ----------------------------------------------------------------------------- public API


def _load_builtin(path: str, kind: str) -> list:
    from hpalign.data.builtin import builtin_dataset

    split = path.split(":", 1)[1] if ":" in path else "train"
    return builtin_dataset(kind, split)


def _parse_row(row: Row, source: str, kind: str, report: LoadReport) -> list:
    if kind != "prompt":
        return PARSERS[kind](row, source)
    example, num_dropped = parse_prompt(row, source)
    report.num_dropped_responses += num_dropped  # only once the row is known good
    return [example]


def load_examples(paths: list[str], *, kind: str, skip_bad_rows: bool = False,
                  report: LoadReport | None = None) -> list:
    """Load and validate every row of `paths` (concatenated) as `kind` examples.

    kind: "pair" -> PreferenceExample, "kto" -> KTOExample, "sft" -> SFTExample, "prompt" ->
    PromptExample (responses dropped, counted in `report.num_dropped_responses`). `"builtin-emoji"`
    (or "builtin-emoji:test") names the built-in set. A bad row raises `DataFormatError` naming
    its file, line/row and field, unless `skip_bad_rows`, which counts it in `report` instead.
    """
    from hpalign.data.builtin import BUILTIN_NAME

    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(KINDS)}")
    if not paths:
        raise ValueError("no data set given: pass --dataset with local files (or builtin-emoji)")
    report = report if report is not None else LoadReport()
    examples: list = []
    for path in paths:
        if path.split(":", 1)[0] == BUILTIN_NAME and not os.path.exists(path):
            loaded = _load_builtin(path, kind)
            report.num_rows += len(loaded)
            examples += loaded
            continue
        for source, row in read_rows(path):
            report.num_rows += 1
            try:
                if isinstance(row, DataFormatError):
                    raise row
                examples += _parse_row(row, source, kind, report)
            except DataFormatError as err:
                if not skip_bad_rows:
                    raise DataFormatError(err.source, err.field_name,
                                          f"{err.problem} (fix the row or pass --skip_bad_rows)") from None
                report.num_skipped += 1
                report.skipped.append(str(err))
    if not examples:
        raise ValueError(f"no usable {kind} examples in {paths}: {report.num_rows} rows read, "
                         f"{report.num_skipped} skipped (first: {report.skipped[:3]})")
    return examples


def split_examples(examples: list, *, ratio: float, seed: int) -> tuple[list, list]:
    """Deterministic (train, held_out) split; held-out size round(ratio * n), at least 1 when
    ratio > 0 and n > 1, at most n - 1. Both parts keep the input order."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"split ratio must be in [0, 1), got {ratio}")
    n = len(examples)
    num_held = 0 if ratio == 0 or n < 2 else min(n - 1, max(1, round(ratio * n)))
    held = set(random.Random(seed).sample(range(n), num_held))
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])
