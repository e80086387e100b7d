"""A reward model: a causal LM's backbone plus a scalar value head on the last response token.

Used by reward modelling (`--rlhf_type rm`) and, later, as PPO's reward and value models. The head is
saved as `value_head.safetensors` beside the (LoRA or full) model weights, as the swift document says.
`load_seq_cls_reward_model` reads the other common form, an HF `...ForSequenceClassification`
checkpoint with one label (what `hpalign export --seq_cls` writes), into the same RewardModel.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from hpalign.models.access import hidden_size
from hpalign.models.loading import resolve_attn_impl, resolve_dtype
from hpalign.models.source import directory_source
from hpalign.models.value_head import VALUE_HEAD_SAFETENSORS, ValueHead, load_value_head

logger = logging.getLogger(__name__)

SEQ_CLS_SUFFIX = "ForSequenceClassification"
# config.json key written by `hpalign export --seq_cls --drop_bias`: the value-head bias the export
# dropped, so hpalign's reward = the exported model's score + this offset.
REWARD_OFFSET_KEY = "hpalign_reward_offset"


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


def load_seq_cls_reward_model(path: str | Path, *, dtype: torch.dtype | str, attn_impl: str = "sdpa",
                              trust_remote_code: bool = False) -> RewardModel:
    """An HF sequence-classification checkpoint with one label as a frozen RewardModel (eval mode).

    `lm` is the seq-cls model itself (`decoder_of` finds its backbone); `value_head` holds its
    `score` weight (and its bias where the family has one, else 0), so `train.forward.reward_stats`
    scores what `AutoModelForSequenceClassification` scores at the last non-pad token.
    `trust_remote_code`: as `hpalign.models.source.directory_source` (the directory is checked there).
    """
    from transformers import AutoModelForSequenceClassification

    directory = Path(path).expanduser()
    _check_seq_cls_dir(directory)
    directory_source(directory, trust_remote_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    lm = AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=torch_dtype, attn_implementation=resolve_attn_impl(attn_impl, dtype=torch_dtype),
        trust_remote_code=trust_remote_code)
    score = getattr(lm, "score", None)
    if not isinstance(score, nn.Linear) or score.out_features != 1:
        raise ValueError(f"{directory}: {type(lm).__name__} has no `score` Linear(hidden, 1) head; hpalign reads "
                         "decoder-only sequence-classification models (Llama, Qwen2, Mistral, ...).")
    head = ValueHead(hidden_size(lm))
    with torch.no_grad():
        head.summary.weight.copy_(score.weight)
        head.summary.bias.copy_(score.bias if score.bias is not None else torch.zeros(1))
    offset = getattr(lm.config, REWARD_OFFSET_KEY, None)
    if offset:
        logger.warning("%s was exported with --drop_bias: its scores are the original reward model's minus %g "
                       "(%s in config.json); rankings and margins are unchanged.", directory, offset,
                       REWARD_OFFSET_KEY)
    reward_model = RewardModel(lm, head.to(torch_dtype))
    reward_model.eval().requires_grad_(False)
    return reward_model


def declares_seq_cls(config: dict) -> bool:
    """Whether an HF config (config.json's dict) names a <Family>ForSequenceClassification architecture."""
    return any(name.endswith(SEQ_CLS_SUFFIX) for name in config.get("architectures") or [])


def is_seq_cls_checkpoint(directory: Path) -> bool:
    """Whether `directory` holds an HF sequence-classification checkpoint (by its config.json)."""
    config_file = directory / "config.json"
    return config_file.is_file() and declares_seq_cls(json.loads(config_file.read_text()))


def _check_seq_cls_dir(directory: Path) -> None:
    """Raise a ValueError naming `directory` unless it holds a one-label seq-cls config."""
    if not directory.is_dir():
        raise ValueError(f"reward model {str(directory)!r} does not exist: pass a local directory holding an HF "
                         "sequence-classification checkpoint (hpalign downloads nothing).")
    config_file = directory / "config.json"
    if not config_file.is_file():
        hint = (" It is an hpalign reward-model checkpoint: convert it with `hpalign export --checkpoint "
                f"{directory} --seq_cls --output DIR`." if (directory / VALUE_HEAD_SAFETENSORS).is_file() else "")
        raise ValueError(f"{directory} has no config.json, so it is not an HF model directory.{hint}")
    config = json.loads(config_file.read_text())
    if not declares_seq_cls(config):
        raise ValueError(f"{directory} is not a sequence-classification checkpoint (architectures "
                         f"{config.get('architectures') or []}): a reward model needs a <Family>{SEQ_CLS_SUFFIX} with one label, e.g. "
                         "one written by `hpalign export --seq_cls`.")
    num_labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)
    if num_labels != 1:
        raise ValueError(f"{directory} has num_labels={num_labels}; a reward model has exactly one label "
                         "(one scalar score per sequence).")
