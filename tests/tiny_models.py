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


CUSTOM_MODEL_TYPE = "hpalign_custom_llama"
_CUSTOM_CONFIG_CODE = f'''from transformers import LlamaConfig


class CustomLlamaConfig(LlamaConfig):
    model_type = "{CUSTOM_MODEL_TYPE}"
'''
_CUSTOM_MODELING_CODE = '''from torch import nn
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel

from .configuration_custom import CustomLlamaConfig


class CustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = CustomLlamaConfig


class CustomLlamaForSequenceClassification(LlamaForSequenceClassification):
    config_class = CustomLlamaConfig

    def __init__(self, config):  # the generic one builds its backbone with AutoModel, which knows no custom type
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()
'''
_CUSTOM_AUTO_MAP = {"AutoConfig": "configuration_custom.CustomLlamaConfig",
                    "AutoModelForCausalLM": "modeling_custom.CustomLlamaForCausalLM",
                    "AutoModelForSequenceClassification": "modeling_custom.CustomLlamaForSequenceClassification"}


def tiny_custom_code_models(tmp_path: Path) -> tuple[Path, Path]:
    """`tiny_policy_and_reward`'s two models as an architecture transformers does not ship: model_type
    `hpalign_custom_llama`, with its own configuration_custom.py / modeling_custom.py (Llama subclasses,
    so the weights and outputs are tiny-random-llama's) named by `auto_map`: loading either runs that
    code. The directories' names are unique to this helper (transformers caches the code by name)."""
    import json

    policy, reward = tiny_policy_and_reward(tmp_path)
    renamed = []
    for directory, architecture in ((policy, "CustomLlamaForCausalLM"),
                                    (reward, "CustomLlamaForSequenceClassification")):
        target = directory.rename(directory.with_name(f"hpalign_custom_{directory.name}"))
        config = json.loads((target / "config.json").read_text())
        config.update(model_type=CUSTOM_MODEL_TYPE, architectures=[architecture], auto_map=_CUSTOM_AUTO_MAP)
        (target / "config.json").write_text(json.dumps(config, indent=2))
        (target / "configuration_custom.py").write_text(_CUSTOM_CONFIG_CODE)
        (target / "modeling_custom.py").write_text(_CUSTOM_MODELING_CODE)
        renamed.append(target)
    return renamed[0], renamed[1]
