"""Chat templates: prompt and response token ids, with the response's end-of-turn tokens.

Two kinds. "tokenizer": the tokenizer's own Jinja template, rendered by transformers. "chatml":
hpalign's built-in chatml (`<|im_start|>role\\ncontent<|im_end|>\\n`), the default for base models
(swift document: a base model trained on history needs a multi-turn template). Where the
tokenizer lacks the `<|im_start|>`/`<|im_end|>` special tokens, the markers are plain text (several
tokens each) and the eos token is appended after `<|im_end|>` so that generation still stops.

A response is encoded as its text plus what the template writes after an assistant message, cut
right after the first end-of-turn (special) token: chatml's `<|im_end|>\\n` becomes `<|im_end|>`,
since generation stops there, the newline after it is never predicted. So
`encode_prompt(msgs) + encode_response(r)` is a token-for-token prefix of the whole conversation
`msgs + [assistant r]` rendered by the template; what follows is only the template's whitespace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from hpalign.data.types import (
    KTOExample,
    LoadReport,
    Message,
    PreferenceExample,
    PromptExample,
    SFTExample,
    TokenizedExample,
)

logger = logging.getLogger("hpalign")

TEMPLATE_NAMES = ("auto", "chatml", "tokenizer")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MIN_PROMPT_TOKENS = 8  # a response is cut only where it would leave fewer prompt tokens than this
ENCODE_BATCH_SIZE = 1_000  # examples per tokenizer call: parallel enough, the texts of a batch stay small
_SENTINEL = "\x00HPALIGN-RESPONSE\x00"
_PROBE: list[Message] = [{"role": "user", "content": "Hi"}]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`_encode` of each text in one tokenizer call: a fast tokenizer encodes the batch on all cores
    (transformers sends a single `encode` through the same `encode_batch`, one text at a time)."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids if isinstance(ids, list) else list(ids) for ids in encoded]


def _special_tokens(tokenizer: Any) -> list[str]:
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True)


def _token_id(tokenizer: Any, token: str) -> int | None:
    ids = _encode(tokenizer, token)
    return ids[0] if len(ids) == 1 else None


@dataclass
class ChatTemplate:
    """Renders chat messages into token ids; build it with `resolve_template`.

    `stop_token_ids`: ids that end a generated answer (end-of-turn and eos). `stop_strings`: the
    end-of-turn text, for engines that stop on strings.
    """

    tokenizer: Any
    name: str  # "tokenizer" or "chatml"
    response_prefix: str  # text the template writes before an assistant answer after the prompt (often "")
    response_suffix: str  # text after the answer, up to and including the end-of-turn marker
    suffix_extra_ids: list[int]  # eos appended when the end-of-turn marker is plain text
    bos_ids: list[int]  # chatml only: the BOS the tokenizer would add itself
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)

    def render_prompt(self, messages: list[Message]) -> str:
        """The whole conversation as text, ending with the assistant header (generation prompt)."""
        if self.name == "tokenizer":
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return f"{turns}{IM_START}assistant\n"

    def encode_prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of system, history and last user turn plus the assistant header."""
        return self.bos_ids + _encode(self.tokenizer, self.render_prompt(messages))

    def encode_response(self, text: str) -> list[int]:
        """Token ids of the answer and its end-of-turn marker; the last id stops generation."""
        body = f"{self.response_prefix}{text}{self.response_suffix}"
        return _encode(self.tokenizer, body) + self.suffix_extra_ids

    def encode_prompts(self, conversations: list[list[Message]]) -> list[list[int]]:
        """`encode_prompt` of each conversation, in one tokenizer call."""
        texts = [self.render_prompt(messages) for messages in conversations]
        return [self.bos_ids + ids for ids in _encode_all(self.tokenizer, texts)]

    def encode_responses(self, texts: list[str]) -> list[list[int]]:
        """`encode_response` of each text, in one tokenizer call."""
        bodies = [f"{self.response_prefix}{text}{self.response_suffix}" for text in texts]
        return [ids + self.suffix_extra_ids for ids in _encode_all(self.tokenizer, bodies)]


def _cut_after_stop(tail: str, specials: list[str]) -> tuple[str, str | None]:
    """(tail up to and including its first special token, that token), or (tail, None)."""
    hits = [(tail.find(s), s) for s in specials if s and s in tail]
    if not hits:
        return tail, None
    position, token = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
    return tail[: position + len(token)], token


def _stop_ids(tokenizer: Any, marker: str | None) -> list[int]:
    ids = [_token_id(tokenizer, marker)] if marker else []
    ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(i for i in ids if i is not None))


def _tokenizer_template(tokenizer: Any) -> ChatTemplate:
    render = tokenizer.apply_chat_template
    prompt_text = render(_PROBE, tokenize=False, add_generation_prompt=True)
    full_text = render(_PROBE + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
    start = full_text.find(_SENTINEL)
    if start < 0 or not full_text.startswith(prompt_text) or start < len(prompt_text):
        raise ValueError("the tokenizer's chat template renders the prompt differently inside a whole "
                         "conversation, so response tokens cannot be located; pass --template chatml")
    suffix, marker = _cut_after_stop(full_text[start + len(_SENTINEL):], _special_tokens(tokenizer))
    extra = [] if marker else [tokenizer.eos_token_id]
    template = ChatTemplate(tokenizer, "tokenizer", full_text[len(prompt_text):start], suffix,
                            [i for i in extra if i is not None], [])
    template.stop_token_ids = _stop_ids(tokenizer, marker)
    template.stop_strings = [marker or tokenizer.eos_token]
    return template


def _chatml_template(tokenizer: Any) -> ChatTemplate:
    marker_is_token = _token_id(tokenizer, IM_END) is not None and _token_id(tokenizer, IM_START) is not None
    extra = [] if marker_is_token else [tokenizer.eos_token_id]
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    bos = tokenizer.bos_token_id
    bos_ids = [bos] if bos is not None and with_special[:1] == [bos] and _encode(tokenizer, "a")[:1] != [bos] else []
    template = ChatTemplate(tokenizer, "chatml", "", IM_END, [i for i in extra if i is not None], bos_ids)
    template.stop_token_ids = _stop_ids(tokenizer, IM_END if marker_is_token else None)
    template.stop_strings = [IM_END]
    if not template.stop_token_ids:
        raise ValueError("chatml needs an eos token or an <|im_end|> special token to stop generation; "
                         "the tokenizer has neither: set tokenizer.eos_token")
    return template


def resolve_template(tokenizer: Any, name: str = "auto", model_type: str | None = None) -> ChatTemplate:
    """Pick the chat template: "auto" (the tokenizer's own when it has one, else chatml),
    "chatml" (forced) or "tokenizer" (the tokenizer's own, an error if it has none).

    `model_type` (the swift `--model_type` hint) is only logged: a model's own template comes
    with its tokenizer, and chatml is the multi-turn default for base models.
    """
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {TEMPLATE_NAMES}")
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if name == "tokenizer" and not has_own:
        raise ValueError("--template tokenizer, but the tokenizer has no chat template (a base model?); "
                         "use --template chatml or auto")
    use_own = has_own and name != "chatml"
    template = _tokenizer_template(tokenizer) if use_own else _chatml_template(tokenizer)
    reason = "forced" if name == "chatml" else ("the tokenizer's own" if use_own else "tokenizer has none")
    logger.info("chat template: %s (%s%s); stop ids %s", template.name, reason,
                f", model_type {model_type}" if model_type else "", template.stop_token_ids)
    return template


# ----------------------------------------------------------------------------- tokenization


def truncate_example(prompt_ids: list[int], responses: list[list[int]], max_length: int
                     ) -> tuple[list[int], list[list[int]], bool, bool]:
    """Fit len(prompt) + len(longest response) into `max_length`.

    Rule: first drop prompt tokens from the LEFT, keeping every response whole; only a response
    that alone leaves fewer than k = min(len(prompt), MIN_PROMPT_TOKENS) prompt tokens is cut
    from the RIGHT to max_length - k tokens (it then loses its end-of-turn token). With no
    responses (a prompt example) the prompt alone is fitted into `max_length`.
    Returns (prompt_ids, responses, prompt_cut, response_cut).
    """
    keep = min(len(prompt_ids), MIN_PROMPT_TOKENS)
    budget = max_length - keep
    response_cut = any(len(r) > budget for r in responses)
    responses = [r[:budget] for r in responses]
    prompt_budget = max_length - max((len(r) for r in responses), default=0)
    prompt_cut = len(prompt_ids) > prompt_budget
    if prompt_cut:
        prompt_ids = prompt_ids[len(prompt_ids) - prompt_budget:]
    return prompt_ids, responses, prompt_cut, response_cut


def example_texts(example: PreferenceExample | KTOExample | SFTExample | PromptExample
                  ) -> tuple[list[str], bool | None, float | None]:
    """(response texts in tokenized order, KTO label, RM margin) of an example."""
    if isinstance(example, PreferenceExample):
        return [example.chosen, example.rejected], None, example.margin
    if isinstance(example, KTOExample):
        return [example.completion], example.label, None
    if isinstance(example, SFTExample):
        return [example.response], None, None
    if isinstance(example, PromptExample):
        return [], None, None
    raise TypeError(f"cannot tokenize a {type(example).__name__}")


Encoded = tuple[list[int], list[list[int]], bool, bool]  # prompt ids, responses, prompt cut, response cut


def encode_examples(examples: list, template: ChatTemplate, *, max_length: int) -> list[Encoded]:
    """Each example's templated token ids after `truncate_example`, and what the truncation cut;
    all prompts in one tokenizer call, all responses in another."""
    texts = [example_texts(example)[0] for example in examples]
    prompts = template.encode_prompts([example.prompt for example in examples])
    responses = iter(template.encode_responses([text for answers in texts for text in answers]))
    return [truncate_example(prompt_ids, [next(responses) for _ in answers], max_length)
            for prompt_ids, answers in zip(prompts, texts, strict=True)]


def tokenized_example(example: PreferenceExample | KTOExample | SFTExample | PromptExample, encoded: Encoded,
                      report: LoadReport) -> TokenizedExample:
    """The `TokenizedExample` of `example` from its `encode_examples` entry, truncations counted."""
    prompt_ids, responses, prompt_cut, response_cut = encoded
    _, label, margin = example_texts(example)
    report.num_truncated += int(prompt_cut)
    report.num_truncated_response += int(response_cut)
    return TokenizedExample(prompt_ids, responses, example.source, label=label, margin=margin,
                            truncated=prompt_cut or response_cut)


def check_max_length(max_length: int) -> None:
    """A budget must leave room for `MIN_PROMPT_TOKENS` prompt tokens and some response."""
    if max_length <= MIN_PROMPT_TOKENS:
        raise ValueError(f"max_length must exceed {MIN_PROMPT_TOKENS} tokens, got {max_length}")


def tokenize_examples(examples: list, template: ChatTemplate, *, max_length: int,
                      report: LoadReport) -> list[TokenizedExample]:
    """Template and tokenize pairs (responses [chosen, rejected]), KTO ([completion], label), SFT
    ([response]) and prompt ([]) examples; truncate by `truncate_example`, counting into `report`
    (`num_truncated`: prompt cut, `num_truncated_response`: a response cut). For prompt examples
    `max_length` is the prompt budget (the caller leaves room for the sampled response).
    In memory; `token_cache.tokenize_cached` gives the same through a cached `datasets.map`."""
    check_max_length(max_length)
    tokenized = []
    for start in range(0, len(examples), ENCODE_BATCH_SIZE):
        chunk = examples[start: start + ENCODE_BATCH_SIZE]
        encoded = encode_examples(chunk, template, max_length=max_length)
        tokenized += [tokenized_example(example, entry, report)
                      for example, entry in zip(chunk, encoded, strict=True)]
    return tokenized


def drop_identical_pairs(examples: list[TokenizedExample], report: LoadReport) -> list[TokenizedExample]:
    """Drop the pairs whose chosen and rejected tokens are identical, counted in
    `report.num_identical_pairs` and named in `report.identical_pairs` ("path:LINE").

    Identical tokens mean the same answer twice, or answers that differ only past the cut to
    --max_length. Such a pair carries no preference: every pairwise objective (DPO and its IPO and
    hinge forms, CPO, SimPO, ORPO's odds ratio, the RM's Bradley-Terry) is a function of
    chosen-minus-rejected, which is then 0 whatever the weights, so its gradient is exactly zero and
    the pair only dilutes the per-pair mean (and counts as a miss in held-out preference accuracy).
    The whole example goes, so its NLL/SFT term (DPO's --rpo_alpha, CPO/SimPO's --cpo_alpha, ORPO's
    NLL, the RM's reward centring) goes with it: the objectives average both terms over the same
    pairs, and a row with two identical answers is usually a data error whose "chosen" answer is no
    better attested than the pair (train on it with --rlhf_type sft if it is wanted).
    """
    kept = []
    for example in examples:
        if len(example.responses) == 2 and example.responses[0] == example.responses[1]:
            report.num_identical_pairs += 1
            report.identical_pairs.append(example.source)
        else:
            kept.append(example)
    return kept
