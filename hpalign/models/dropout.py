"""Switch dropout off in a model: `--disable_dropout`.

Why: with dropout on, two forwards of the same tokens differ. The reference of a LoRA policy is the
policy itself with the adapter off, run in train mode, so its log-probs would be noisy; and the
shared-prompt layout (one pass over a pair's prompt for both answers) is exact only when a second
pass over the prompt would give the same hidden states. TRL switches dropout off for the same
reason (`disable_dropout=True` in its DPO and KTO configs).
"""

from __future__ import annotations

from torch import nn


def disable_dropout(model: nn.Module) -> int:
    """Set p = 0 in every `nn.Dropout` (LoRA's included) and zero the float `attention_dropout`
    that attention modules and their configs carry (HF attention applies it in train mode without
    a module). Returns how many places had a non-zero probability."""
    num_changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            num_changed += 1
        for holder in (module, getattr(module, "config", None)):
            rate = getattr(holder, "attention_dropout", None)
            if isinstance(rate, float) and rate > 0:
                holder.attention_dropout = 0.0
                num_changed += holder is module
    return num_changed
