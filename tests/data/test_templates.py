"""Chat templates: token-consistency with the tokenizer's own template, the chatml fallback,
loss masks on multi-turn prompts, truncation counting, and the prompt budget of PPO's prompts."""

from __future__ import annotations

import json
import logging

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hpalign.config import Config
from hpalign.data.builtin import builtin_dataset
from hpalign.data.collate import pad_batch
from hpalign.data.templates import (
    MIN_PROMPT_TOKENS,
    resolve_template,
    tokenize_examples,
    truncate_example,
)
from hpalign.data.types import (
    KTOExample,
    LoadReport,
    PreferenceExample,
    PromptExample,
    SFTExample,
    TokenizedExample,
)
from hpalign.tiny_model import build_byte_tokenizer
from hpalign.train.datasets import prepare_data

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
    {"role": "user", "content": "And 4+4?"},
]
# SmolLM2-135M-Instruct's template: injects a default system prompt when the first turn is not system.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (  # no end-of-turn special token: the eos id is appended to every response
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def markerless_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes plus only an eos token: chatml markers become plain text."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token=None)


def with_template(template: str) -> PreTrainedTokenizerFast:
    tokenizer = build_byte_tokenizer(with_chat_template=False)
    tokenizer.chat_template = template
    return tokenizer


# ----------------------------------------------------------------------------- resolution


def test_auto_picks_own_template_else_chatml(caplog):
    with caplog.at_level(logging.INFO, logger="hpalign"):
        assert resolve_template(build_byte_tokenizer()).name == "tokenizer"
        assert resolve_template(build_byte_tokenizer(with_chat_template=False)).name == "chatml"
    assert "chat template: tokenizer (the tokenizer's own)" in caplog.text
    assert "chat template: chatml (tokenizer has none)" in caplog.text
    assert resolve_template(build_byte_tokenizer(), "chatml").name == "chatml"


def test_tokenizer_name_requires_own_template_and_unknown_name_fails():
    with pytest.raises(ValueError, match="has no chat template.*--template chatml"):
        resolve_template(build_byte_tokenizer(with_chat_template=False), "tokenizer")
    with pytest.raises(ValueError, match="unknown chat template 'llama9'"):
        resolve_template(build_byte_tokenizer(), "llama9")


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("tokenizer", [build_byte_tokenizer(), with_template(SMOLLM2_TEMPLATE),
                                       with_template(PLAIN_TEMPLATE)], ids=["chatml", "smollm2", "plain"])
@pytest.mark.parametrize("messages", [MULTI_TURN, MULTI_TURN[1:]], ids=["system", "no-system"])
def test_own_template_matches_whole_conversation(tokenizer, messages):
    template = resolve_template(tokenizer, "tokenizer")
    answer = "8. 🎉"
    ids = template.encode_prompt(messages) + template.encode_response(answer)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    full = tokenizer.encode(full_text, add_special_tokens=False)
    body = ids[:-1] if template.suffix_extra_ids else ids  # an appended eos is not in the rendering
    assert full[: len(body)] == body
    assert tokenizer.decode(full[len(body):]).strip() == ""  # only the template's trailing whitespace
    assert ids[-1] in template.stop_token_ids


def test_smollm2_default_system_prompt_rendered_in_prompt():
    tokenizer = with_template(SMOLLM2_TEMPLATE)
    prompt = tokenizer.decode(resolve_template(tokenizer).encode_prompt(MULTI_TURN[1:]))
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_plain_template_appends_eos():
    tokenizer = with_template(PLAIN_TEMPLATE)
    template = resolve_template(tokenizer)
    assert template.encode_response("Hi") == tokenizer.encode("Hi\n\n", add_special_tokens=False) + [
        tokenizer.eos_token_id]
    assert template.stop_token_ids == [tokenizer.eos_token_id]


def test_chatml_fallback_text_and_stop_ids():
    tokenizer = build_byte_tokenizer(with_chat_template=False)
    template = resolve_template(tokenizer)
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in MULTI_TURN)
    assert tokenizer.decode(template.encode_prompt(MULTI_TURN)) == expected + "<|im_start|>assistant\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert template.encode_response("ok") == tokenizer.encode("ok", add_special_tokens=False) + [im_end]
    assert template.stop_token_ids == [im_end, tokenizer.eos_token_id]
    assert template.stop_strings == ["<|im_end|>"]


def test_chatml_without_marker_tokens_uses_text_markers_and_eos():
    tokenizer = markerless_tokenizer()
    template = resolve_template(tokenizer)
    assert template.name == "chatml"
    response = template.encode_response("ok")
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == "ok<|im_end|>"
    assert len(tokenizer.encode("<|im_end|>", add_special_tokens=False)) == len("<|im_end|>")
    assert template.stop_token_ids == [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("with_chat_template", [True, False], ids=["own", "chatml-fallback"])
def test_multi_turn_masks_cover_only_responses(with_chat_template):
    tokenizer = build_byte_tokenizer(with_chat_template=with_chat_template)
    template = resolve_template(tokenizer)
    pair = PreferenceExample(MULTI_TURN, "8. 🎉", "eight", "s")
    [tokenized] = tokenize_examples([pair], template, max_length=512, report=LoadReport())
    prompt_text = tokenizer.decode(tokenized.prompt_ids)
    assert prompt_text.count("<|im_start|>") == len(MULTI_TURN) + 1
    assert prompt_text.endswith("<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n")
    batch = pad_batch([tokenized], pad_id=tokenizer.pad_token_id)
    for row, answer in enumerate(["8. 🎉", "eight"]):
        predicted = batch.labels[row][batch.labels[row] != -100].tolist()
        assert tokenizer.decode(predicted) == answer + "<|im_end|>"
        assert predicted == tokenized.responses[row]


def test_kto_and_sft_tokenization_and_margin():
    template = resolve_template(build_byte_tokenizer())
    prompt = MULTI_TURN[1:2]
    examples = [KTOExample(prompt, "yes", False, "k"), SFTExample(prompt, "4", "s"),
                PreferenceExample(prompt, "a", "b", "p", margin=2.0)]
    kto, sft, pair = tokenize_examples(examples, template, max_length=256, report=LoadReport())
    assert (len(kto.responses), kto.label, kto.margin) == (1, False, None)
    assert (len(sft.responses), sft.label) == (1, None)
    assert (len(pair.responses), pair.margin, pair.source) == (2, 2.0, "p")
    assert kto.prompt_ids == sft.prompt_ids == pair.prompt_ids


# ----------------------------------------------------------------------------- truncation


def test_truncate_prompt_from_left_keeps_response_whole():
    prompt, responses, prompt_cut, response_cut = truncate_example(list(range(20)), [[100] * 5, [101] * 3], 15)
    assert (prompt, responses, prompt_cut, response_cut) == (list(range(10, 20)), [[100] * 5, [101] * 3], True, False)


def test_truncate_long_response_keeps_min_prompt_share():
    prompt, responses, prompt_cut, response_cut = truncate_example(list(range(20)), [[100] * 30, [101] * 3], 20)
    assert prompt == list(range(20 - MIN_PROMPT_TOKENS, 20))
    assert responses == [[100] * (20 - MIN_PROMPT_TOKENS), [101] * 3]
    assert (prompt_cut, response_cut) == (True, True)
    short_prompt = truncate_example([1, 2], [[100] * 30], 20)
    assert short_prompt == ([1, 2], [[100] * 18], False, True)


def test_tokenize_counts_truncation():
    tokenizer = build_byte_tokenizer()
    template = resolve_template(tokenizer)
    long_prompt = [{"role": "user", "content": "x" * 100}]
    examples = [PreferenceExample(long_prompt, "a", "b", "cut-prompt"),
                PreferenceExample([{"role": "user", "content": "hi"}], "y" * 200, "b", "cut-response"),
                PreferenceExample([{"role": "user", "content": "hi"}], "a", "b", "fits")]
    report = LoadReport()
    tokenized = tokenize_examples(examples, template, max_length=64, report=report)
    assert (report.num_truncated, report.num_truncated_response) == (2, 1)
    assert [ex.truncated for ex in tokenized] == [True, True, False]
    for ex in tokenized:
        assert len(ex.prompt_ids) + max(len(r) for r in ex.responses) <= 64
    assert tokenized[0].responses == [template.encode_response("a"), template.encode_response("b")]
    assert len(tokenized[1].prompt_ids) == MIN_PROMPT_TOKENS
    with pytest.raises(ValueError, match="max_length must exceed"):
        tokenize_examples(examples, template, max_length=MIN_PROMPT_TOKENS, report=report)


# ----------------------------------------------------------------------------- prompts (PPO)


def test_prompt_examples_have_no_responses_and_lose_tokens_from_the_left():
    template = resolve_template(build_byte_tokenizer())
    short = PromptExample(MULTI_TURN[1:2], "short")
    long = PromptExample([{"role": "user", "content": "x" * 100}], "long")
    report = LoadReport()
    fits, cut = tokenize_examples([short, long], template, max_length=48, report=report)
    assert fits == TokenizedExample(template.encode_prompt(MULTI_TURN[1:2]), [], "short")
    whole = template.encode_prompt(long.prompt)
    assert len(whole) > 48
    assert (cut.prompt_ids, cut.responses, cut.truncated) == (whole[-48:], [], True)  # the LEFT is dropped
    assert template.tokenizer.decode(cut.prompt_ids).endswith("<|im_start|>assistant\n")
    assert (report.num_truncated, report.num_truncated_response) == (1, 0)
    assert truncate_example(list(range(10)), [], 6) == ([4, 5, 6, 7, 8, 9], [], True, False)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_prepare_data_prompt_budget_is_max_length_less_response_length(tmp_path, caplog):
    template = resolve_template(build_byte_tokenizer())
    long_prompt, hi = [{"role": "user", "content": "x" * 300}], [{"role": "user", "content": "Hi"}]
    cfg = Config()
    cfg.data.dataset = [write_jsonl(tmp_path / "t.jsonl", [{"prompt": "x" * 300, "chosen": "A", "rejected": "B"},
                                                           {"prompt": "Hi"}])]
    cfg.data.val_dataset = [write_jsonl(tmp_path / "v.jsonl", [{"messages": hi + [{"role": "assistant",
                                                                                     "content": "Hello"}]}])]
    cfg.data.max_length, cfg.ppo.response_length = 128, 40
    with caplog.at_level(logging.INFO, logger="hpalign"):
        data = prepare_data(cfg, "prompt", template)
    cut, short = data.train
    assert len(cut.prompt_ids) == 128 - 40  # room left for the sampled response
    assert cut.prompt_ids == template.encode_prompt(long_prompt)[-(128 - 40):]
    assert short.prompt_ids == data.val[0].prompt_ids == template.encode_prompt(hi)
    assert all(ex.responses == [] for ex in data.train + data.val)
    assert (data.report.num_truncated, data.report.num_dropped_responses) == (1, 3)
    assert "dropped 3 responses" in caplog.text
    assert data.val_prompts == [hi]
    assert (data.val_pairs, data.builtin) == ([], False)


def test_prepare_data_builtin_prompts_keep_the_pairs_for_evaluation():
    template = resolve_template(build_byte_tokenizer())
    cfg = Config()
    cfg.data.max_length, cfg.ppo.response_length, cfg.data.num_eval_generations = 80, 50, 5
    data = prepare_data(cfg, "prompt", template)
    assert data.builtin and (len(data.train), len(data.val)) == (400, 64)
    assert max(len(ex.prompt_ids) for ex in data.train + data.val) == 30  # the longest are cut to the budget
    assert data.report.num_truncated > 0
    assert data.val_prompts == [ex.prompt for ex in builtin_dataset("prompt", "test")[:5]]
    assert len(data.val_pairs) == 64 and all(len(ex.responses) == 2 for ex in data.val_pairs)


@pytest.mark.parametrize("template_name", ["tokenizer", "chatml"])
def test_batched_encoding_equals_one_call_per_text(template_name):
    template = resolve_template(build_byte_tokenizer(), template_name)
    pairs = builtin_dataset("pair", "test")
    conversations = [pair.prompt for pair in pairs] + [MULTI_TURN]
    answers = [text for pair in pairs for text in (pair.chosen, pair.rejected)] + ["", " spaced ", "é 😊"]
    assert template.encode_prompts(conversations) == [template.encode_prompt(m) for m in conversations]
    assert template.encode_responses(answers) == [template.encode_response(t) for t in answers]
    report = LoadReport()
    tokenized = tokenize_examples(pairs, template, max_length=40, report=report)
    expected = [truncate_example(template.encode_prompt(p.prompt),
                                 [template.encode_response(p.chosen), template.encode_response(p.rejected)], 40)
                for p in pairs]
    assert [(ex.prompt_ids, ex.responses) for ex in tokenized] == [(e[0], e[1]) for e in expected]
    assert report.num_truncated == sum(e[2] for e in expected) > 0
