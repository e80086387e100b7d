"""Tiny models saved as directories, for tests that run the command on them."""

from __future__ import annotations

from pathlib import Path

import torch

from hpalign.tiny_model import build_tiny_llama


def tiny_policy_and_reward(tmp_path: Path) -> tuple[Path, Path]:
    """tiny-random-llama (with its tokenizer) and a seq-cls reward model of its shape with seeded
    random weights: scores that differ from response to response."""
    from transformers import LlamaForSequenceClassification

    model, tokenizer = build_tiny_llama(seed=0)
    policy = tmp_path / "policy"
    model.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    config = model.config.__class__.from_dict({**model.config.to_dict(), "num_labels": 1, "id2label": None,
                                               "label2id": None})
    state = torch.random.get_rng_state()
    torch.manual_seed(1)
    reward = tmp_path / "reward"
    LlamaForSequenceClassification(config).save_pretrained(reward)
    torch.random.set_rng_state(state)
    return policy, reward
