"""Export a reward-model checkpoint for the ecosystem: `hpalign export --checkpoint DIR --seq_cls --output OUT`.

The output is an HF `<Family>ForSequenceClassification` checkpoint with `num_labels=1` (what TRL,
OpenRLHF and `AutoModelForSequenceClassification` read): the backbone with any LoRA adapter merged
in, `score.weight` = the value head's weight, the tokenizer and the chat template training used.
HF scores the last token that is not `pad_token_id`, hpalign the last token of the sequence, so on
right-padded batches of the same token ids both give the same number, under two checks made here:

- The bias. HF's Llama-family `score` has none; the value head has one. Under the Bradley-Terry loss
  alone it gets no gradient (d/db of r_w - r_l is 0) and stays at its initial 0, so the export is
  exact; `--center_rewards_coefficient` > 0 trains it. A non-zero bias is an error unless
  `drop_bias`: then the scores are hpalign's minus the bias (recorded in config.json as
  `hpalign_reward_offset`, with a warning); rankings and margins are unchanged.
- The pad token. If it is the token a response ends with (eos used as pad, as many tokenizers do),
  HF would skip the real last token as padding: that is an error unless `pad_token` names another
  token of the vocabulary, which the exported tokenizer and config then use for padding.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpalign.data import templates
from hpalign.models import ValueHead, base_causal_lm, decoder_of, is_peft_model, resolve_dtype
from hpalign.models.reward_model import REWARD_OFFSET_KEY
from hpalign.score import FROM_TRAINER_STATE, add_trust_remote_code_argument, load_reward_model

logger = logging.getLogger(__name__)


def export_seq_cls(checkpoint_dir: str | Path, output_dir: str | Path, *, dtype: str = "float32",
                   drop_bias: bool = False, pad_token: str | None = None,
                   model: str | None = FROM_TRAINER_STATE, trust_remote_code: bool = False) -> Path:
    """Write the `--rlhf_type rm` checkpoint `checkpoint_dir` as an HF seq-cls model in `output_dir`.

    `dtype`: the saved weights' dtype (merging happens in float32). `drop_bias`: accept a non-zero
    value-head bias (scores then shift by it). `pad_token`: the padding token of the export, needed
    when the tokenizer pads with the token responses end with. `model`, `trust_remote_code`: as in
    `load_reward_model`.
    """
    output = Path(output_dir).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"output {str(output)!r} exists and is not an empty directory: choose a new --output.")
    torch_dtype = resolve_dtype(dtype)
    reward_model, tokenizer, template = load_reward_model(checkpoint_dir, model=model, dtype="float32",
                                                          trust_remote_code=trust_remote_code)
    offset = _checked_bias(reward_model.value_head, checkpoint_dir, drop_bias=drop_bias)
    pad_id = _export_pad_id(tokenizer, template, pad_token=pad_token, checkpoint_dir=checkpoint_dir)
    seq_cls = build_seq_cls_model(_merged_lm(reward_model.lm), reward_model.value_head, pad_token_id=pad_id,
                                  trust_remote_code=trust_remote_code)
    if offset:
        setattr(seq_cls.config, REWARD_OFFSET_KEY, offset)
    seq_cls.to(torch_dtype)
    seq_cls.save_pretrained(output)
    _attach_chat_template(tokenizer, template)
    tokenizer.save_pretrained(output)
    logger.info("exported %s as %s to %s", checkpoint_dir, type(seq_cls).__name__, output)
    return output


def _checked_bias(head: ValueHead, checkpoint_dir: str | Path, *, drop_bias: bool) -> float:
    """The value-head bias the export drops: 0.0, or (with `drop_bias`) the non-zero bias, warned."""
    bias = float(head.summary.bias.item())
    if bias == 0.0:
        return 0.0
    if not drop_bias:
        raise ValueError(
            f"{checkpoint_dir}: the value head has bias {bias:.6g}, but an HF sequence-classification `score` "
            "layer has none, so the export could not score identically. (The bias is 0 after the Bradley-Terry "
            "loss alone, which gives it no gradient; --center_rewards_coefficient trains it.) Pass --drop_bias "
            f"to export anyway: scores are then {bias:.6g} lower (recorded as {REWARD_OFFSET_KEY} in config.json); "
            "rankings and margins are unchanged.")
    logger.warning("dropping the value-head bias %.6g of %s: the exported model's scores are hpalign's minus "
                   "%.6g (config.json %s); rankings and margins are unchanged.", bias, checkpoint_dir, bias,
                   REWARD_OFFSET_KEY)
    return bias


def _response_end_ids(tokenizer: Any, template: templates.ChatTemplate) -> set[int]:
    """Ids a scored sequence can end with: the last id of a response, the stop ids, eos."""
    ids = {template.encode_response("x")[-1], *template.stop_token_ids, tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def _export_pad_id(tokenizer: Any, template: templates.ChatTemplate, *, pad_token: str | None,
                   checkpoint_dir: str | Path) -> int:
    """The pad id of the export (set on `tokenizer`), never a token that ends a response."""
    end_ids = _response_end_ids(tokenizer, template)
    if pad_token is not None:
        pad_id = tokenizer.convert_tokens_to_ids(pad_token)
        if pad_id is None or (pad_id == tokenizer.unk_token_id and pad_token != tokenizer.unk_token):
            raise ValueError(f"--pad_token {pad_token!r} is not a token of the tokenizer's vocabulary "
                             f"of {checkpoint_dir}; pass one token, e.g. a special token.")
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token_id in end_ids:
        candidates = _pad_candidates(tokenizer, end_ids)
        raise ValueError(
            f"{checkpoint_dir}: the pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}) is the token "
            "responses end with, so an HF sequence-classification model would skip the real last token as "
            "padding and score another one. Pass --pad_token with a token that never ends a response"
            + (f", e.g. one of {candidates}." if candidates else "."))
    return int(tokenizer.pad_token_id)


def _pad_candidates(tokenizer: Any, end_ids: set[int], *, limit: int = 4) -> list[str]:
    """Up to `limit` special tokens that neither end a response nor start one (bos), unk first."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= set(tokenizer.all_special_tokens)
    avoid = end_ids | {tokenizer.bos_token_id}
    safe = [t for t in specials if tokenizer.convert_tokens_to_ids(t) not in avoid]
    return sorted(safe, key=lambda t: (t != tokenizer.unk_token, t))[:limit]


def _merged_lm(lm: nn.Module) -> nn.Module:
    """The HF causal LM with a LoRA adapter merged into its weights (peft `merge_and_unload`)."""
    if is_peft_model(lm):
        lm = lm.merge_and_unload()
    return base_causal_lm(lm)


def build_seq_cls_model(causal_lm: nn.Module, head: ValueHead, *, pad_token_id: int,
                        trust_remote_code: bool = False) -> nn.Module:
    """`<Family>ForSequenceClassification` (num_labels=1) sharing `causal_lm`'s backbone, `score` = the
    head's weight. The shell is built on the meta device, so no second copy of the weights is made."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.architectures = None  # save_pretrained records the seq-cls class
    try:
        with torch.device("meta"):
            seq_cls = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise ValueError(f"transformers has no sequence-classification class for the {config.model_type!r} "
                         f"family of this reward model, so it cannot be exported with --seq_cls: {err}") from None
    score = getattr(seq_cls, "score", None)
    if not isinstance(score, nn.Linear) or score.bias is not None:
        raise ValueError(f"{type(seq_cls).__name__} has no bias-free `score` Linear head, which the export "
                         "writes; this family is not supported by --seq_cls.")
    setattr(seq_cls, seq_cls.base_model_prefix, decoder_of(causal_lm))
    seq_cls.score = nn.Linear(score.in_features, 1, bias=False, dtype=head.summary.weight.dtype)
    with torch.no_grad():
        seq_cls.score.weight.copy_(head.summary.weight)
    left_on_meta = [name for name, t in [*seq_cls.named_parameters(), *seq_cls.named_buffers()] if t.is_meta]
    assert not left_on_meta, f"export left tensors unset: {left_on_meta[:5]}"
    return seq_cls.eval()


def _attach_chat_template(tokenizer: Any, template: templates.ChatTemplate) -> None:
    """Give the exported tokenizer the template training used: hpalign's chatml, if that was it."""
    if template.name != "chatml":
        return  # the tokenizer's own template, saved with it
    bos = "{{ bos_token }}" if template.bos_ids else ""
    tokenizer.chat_template = (
        bos + "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ----------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpalign export", description="Export a reward-model checkpoint (--rlhf_type rm) as an HF "
        "AutoModelForSequenceClassification checkpoint (num_labels=1) that scores identically.")
    parser.add_argument("--checkpoint", required=True, help="run_dir/checkpoint-<step> of an RM run")
    parser.add_argument("--output", required=True, help="new (or empty) directory to write")
    parser.add_argument("--seq_cls", action="store_true",
                        help="write an HF sequence-classification model (the one export format so far)")
    parser.add_argument("--dtype", default="float32", help="saved weights: float32, bfloat16, float16 or auto")
    parser.add_argument("--drop_bias", action="store_true",
                        help="accept a non-zero value-head bias: scores shift down by it (recorded in config.json)")
    parser.add_argument("--pad_token", help="padding token of the export, when the tokenizer pads with the "
                        "token responses end with (e.g. eos)")
    parser.add_argument("--model", default=FROM_TRAINER_STATE,
                        help="base model of a LoRA checkpoint (default: the one in trainer_state.json)")
    add_trust_remote_code_argument(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`hpalign export` flags -> the output directory on stdout; user errors raise ValueError."""
    args = build_parser().parse_args(list(argv))
    if not args.seq_cls:
        raise ValueError("choose an export format: --seq_cls (an HF sequence-classification model) is the one "
                         "supported so far.")
    output = export_seq_cls(args.checkpoint, args.output, dtype=args.dtype, drop_bias=args.drop_bias,
                            pad_token=args.pad_token, model=args.model, trust_remote_code=args.trust_remote_code)
    print(f"exported {args.checkpoint} -> {output} (AutoModelForSequenceClassification, num_labels=1)")
    sys.stdout.flush()
    return 0
