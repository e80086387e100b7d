"""The scalar head of reward and value models, stored as `value_head.safetensors`.

File format: two tensors, `v_head.summary.weight` [1, hidden] and `v_head.summary.bias` [1], the
keys ms-swift and TRL write (ms-swift skips any other key without a word). `load_value_head` also
reads the bare `summary.*` keys earlier hpalign versions wrote, and `value_head.bin` (a torch
pickle of the same dict) as written by older tools.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_SAFETENSORS = "value_head.safetensors"
VALUE_HEAD_BIN = "value_head.bin"
_TRL_PREFIX = "v_head."


class ValueHead(nn.Module):
    """hidden state -> scalar: Linear(hidden, 1) after an optional dropout.

    The weight starts at N(0, 1/(hidden+1)) and the bias at 0, so initial values are small.
    """

    def __init__(self, hidden_size: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_size < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"ValueHead needs hidden_size >= 1 and 0 <= dropout < 1; got {hidden_size}, {dropout}.")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_BTH: torch.Tensor) -> torch.Tensor:
        """hidden states [..., H] -> values [...] in the head's dtype."""
        hidden_BTH = hidden_BTH.to(self.summary.weight.dtype)
        return self.summary(self.dropout(hidden_BTH)).squeeze(-1)


def save_value_head(head: ValueHead, directory: str | Path) -> Path:
    """Write `directory/value_head.safetensors` (keys `v_head.summary.weight`, `v_head.summary.bias`)."""
    from safetensors.torch import save_file

    path = Path(directory) / VALUE_HEAD_SAFETENSORS
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{_TRL_PREFIX}summary.{name}": t.detach().cpu().contiguous() for name, t in head.summary.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def load_value_head(directory: str | Path, hidden_size: int, *, dropout: float = 0.0) -> ValueHead:
    """Read `value_head.safetensors` (preferred) or `value_head.bin` from `directory`."""
    state = _read_state(Path(directory))
    state = {k.removeprefix(_TRL_PREFIX): v for k, v in state.items()}
    expected = {"summary.weight": (1, hidden_size), "summary.bias": (1,)}
    found = {k: tuple(v.shape) for k, v in state.items() if k in expected}
    if found != expected:
        raise ValueError(
            f"The value head in {directory} does not fit hidden size {hidden_size}: expected {expected}, "
            f"found {found}. Was it trained on a different base model?"
        )
    head = ValueHead(hidden_size, dropout=dropout)
    head.load_state_dict({k: state[k] for k in expected})
    return head


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / VALUE_HEAD_SAFETENSORS).is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / VALUE_HEAD_SAFETENSORS))
    if (directory / VALUE_HEAD_BIN).is_file():
        return torch.load(directory / VALUE_HEAD_BIN, map_location="cpu", weights_only=True)
    raise ValueError(
        f"No {VALUE_HEAD_SAFETENSORS} or {VALUE_HEAD_BIN} in {directory}: pass the output directory "
        "of a reward-model (RM) run."
    )
