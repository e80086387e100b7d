"""`tiny-random-llama`: a few-million-parameter Llama with random weights and an offline byte-level
tokenizer, built from code so tests and benchmarks need no download and start in well under a second."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_byte_tokenizer(*, with_chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: the 256 bytes plus chat special tokens, no merges (vocab 260).

    `with_chat_template=False` gives a "base model" tokenizer with no template, which hpalign
    then serves with chatml, as the swift document prescribes for base models.
    """
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>" if with_chat_template else "<|endoftext|>",
        pad_token="<pad>",
        unk_token=None,
    )
    if with_chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """About 3M parameters: 4 layers, hidden 256, 4 heads (2 KV heads), untied LM head."""
    settings = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_llama(*, seed: int = 0, with_chat_template: bool = True, **config_overrides):
    """(model, tokenizer) with deterministic random weights."""
    tokenizer = build_byte_tokenizer(with_chat_template=with_chat_template)
    config = tiny_llama_config(len(tokenizer), **config_overrides)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer
