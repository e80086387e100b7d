"""A reward model: a causal LM's backbone plus a scalar value head on the last response token.

Used by reward modelling (`--rlhf_type rm`) and, later, as PPO's reward and value models. The head is
saved as `value_head.safetensors` beside the (LoRA or full) model weights, as the swift document says.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hpalign.models.access import hidden_size
from hpalign.models.value_head import ValueHead, load_value_head


class RewardModel(nn.Module):
    """`lm` (a causal LM, possibly LoRA-wrapped) and `value_head` (Linear(hidden, 1))."""

    def __init__(self, lm: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = value_head

    @classmethod
    def with_new_head(cls, lm: nn.Module, *, seed: int = 0) -> RewardModel:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        head = ValueHead(hidden_size(lm))
        torch.random.set_rng_state(state)
        return cls(lm, head.to(next(lm.parameters()).dtype))


def is_reward_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, "module", model), RewardModel)


def split_reward_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(language-model part, value-head part) of a RewardModel state dict, prefixes removed."""
    lm = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")}
    head = {k[len("value_head."):]: v for k, v in state_dict.items() if k.startswith("value_head.")}
    return lm, head


def load_reward_model(lm: nn.Module, directory: str | Path) -> RewardModel:
    """Attach the value head saved in `directory` to an already loaded (and adapted) `lm`."""
    return RewardModel(lm, load_value_head(directory, hidden_size(lm)))
