"""Score responses with a trained reward model: `hpalign score --checkpoint DIR --dataset FILE`.

A checkpoint of `--rlhf_type rm` holds the LM weights (a LoRA adapter, or full `model.safetensors`),
the tokenizer, `value_head.safetensors` and `trainer_state.json` (the base `--model` and the chat
template). `load_reward_model` rebuilds the trained module from them; `score` / `score_pairs`
tokenize exactly as training does (`templates.tokenize_examples`, same truncation rule) and reuse
the training forward (`train.forward.reward_stats`), so a reward here is the reward the run logged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpalign.data import collate, templates
from hpalign.data.types import LoadReport, Message, PreferenceExample, SFTExample, TokenizedExample
from hpalign.models import (
    RewardModel,
    directory_source,
    load_policy,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from hpalign.models.reward_model import load_reward_model as attach_value_head
from hpalign.models.source import RemoteCodeRefused
from hpalign.models.value_head import VALUE_HEAD_BIN, VALUE_HEAD_SAFETENSORS

STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"
FULL_WEIGHTS_FILE = "model.safetensors"
DEFAULT_MAX_LENGTH = 1024  # the training default of --max_length


class _FromTrainerState:
    def __repr__(self) -> str:
        return "<model spec from trainer_state.json>"


FROM_TRAINER_STATE: Any = _FromTrainerState()  # `model=None` already means the embedded SmolLM2


@dataclass
class PairScores:
    """Rewards of N preference pairs."""

    chosen_N: torch.Tensor  # [N] float32
    rejected_N: torch.Tensor  # [N] float32

    @property
    def margins_N(self) -> torch.Tensor:
        return self.chosen_N - self.rejected_N

    @property
    def accuracy(self) -> float:
        """Share of pairs whose chosen answer scores higher; a tie counts one half (as in training eval)."""
        margins = self.margins_N
        return ((margins > 0).double() + 0.5 * (margins == 0).double()).mean().item()


# ----------------------------------------------------------------------------- loading


def _check_checkpoint_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {str(directory)!r} does not exist: pass a "
                         "run_dir/checkpoint-<step> folder of a reward-model run.")
    if not any((directory / name).is_file() for name in (VALUE_HEAD_SAFETENSORS, VALUE_HEAD_BIN)):
        nested = sorted(p.name for p in directory.glob("checkpoint-*") if p.is_dir())
        hint = (f" It looks like a run directory: pass one of its checkpoints ({', '.join(nested)})."
                if nested else "")
        raise ValueError(f"{directory} is not a reward-model checkpoint (no {VALUE_HEAD_SAFETENSORS}): "
                         f"train with --rlhf_type rm.{hint}")


def _trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _has_full_weights(directory: Path) -> bool:
    return (directory / FULL_WEIGHTS_FILE).is_file() and (directory / "config.json").is_file()


def _base_spec(directory: Path, model: Any, state: dict[str, Any]) -> str | None:
    """The base `--model`: given, else recorded in trainer_state.json; a full checkpoint is its own."""
    if model is not FROM_TRAINER_STATE:
        return model
    if "model" not in state:
        if _has_full_weights(directory):
            return str(directory)
        raise ValueError(f"{directory} has no {STATE_FILE} naming the base model: pass --model "
                         "(the --model the reward model was trained from).")
    return state["model"]


def _load_lm(directory: Path, spec: str | None, dtype: torch.dtype, *, trust_remote_code: bool) -> torch.nn.Module:
    """The trained LM: full weights from `directory`, or the base model plus the saved LoRA adapter."""
    if _has_full_weights(directory):
        return load_policy(directory_source(directory, trust_remote_code=trust_remote_code), dtype=dtype)
    if not (directory / ADAPTER_FILE).is_file():
        raise ValueError(f"{directory} holds neither a LoRA adapter ({ADAPTER_FILE}) nor full weights "
                         f"({FULL_WEIGHTS_FILE} + config.json): is the checkpoint complete?")
    from peft import PeftModel

    try:
        base = load_policy(resolve_model(spec, trust_remote_code=trust_remote_code), dtype=dtype)
    except ValueError as err:  # a refused remote-code directory is the right base: no hint to pass another
        hint = "" if isinstance(err, RemoteCodeRefused) else " Pass --model with the base model the adapter was trained on."
        raise ValueError(f"cannot rebuild the base model {spec!r} of {directory}: {err}{hint}") from None
    return PeftModel.from_pretrained(base, str(directory))


def _load_checkpoint_tokenizer(directory: Path, spec: str | None, *, trust_remote_code: bool):
    """The tokenizer saved with the checkpoint (what training used), else the base model's."""
    if (directory / "tokenizer_config.json").is_file():
        return load_tokenizer(directory_source(directory, trust_remote_code=trust_remote_code))
    return load_tokenizer(resolve_model(spec, trust_remote_code=trust_remote_code))


def load_reward_model(checkpoint_dir: str | Path, *, model: str | None = FROM_TRAINER_STATE,
                      dtype: str = "float32", trust_remote_code: bool = False,
                      ) -> tuple[RewardModel, Any, templates.ChatTemplate]:
    """(reward model in eval mode, tokenizer, chat template) of an `--rlhf_type rm` checkpoint.

    `model`: the base model spec the LoRA adapter applies to; by default the `--model` recorded in
    the checkpoint's trainer_state.json (a full fine-tune ignores it: its weights are in the folder).
    `trust_remote_code`: run code the model directories ship (`hpalign.models.source.directory_source`).
    """
    directory = Path(checkpoint_dir).expanduser()
    _check_checkpoint_dir(directory)
    state = _trainer_state(directory)
    spec = _base_spec(directory, model, state)
    torch_dtype = resolve_dtype(dtype)
    lm = _load_lm(directory, spec, torch_dtype, trust_remote_code=trust_remote_code)
    reward_model = attach_value_head(lm, directory)
    reward_model.value_head.to(torch_dtype)  # training keeps the head in the LM's dtype
    reward_model.eval().requires_grad_(False)
    tokenizer = _load_checkpoint_tokenizer(directory, spec, trust_remote_code=trust_remote_code)
    template = templates.resolve_template(tokenizer, state.get("template", "auto"))
    return reward_model, tokenizer, template


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_tokenized(reward_model: RewardModel, examples: list[TokenizedExample], *, pad_id: int,
                    batch_size: int = 8) -> torch.Tensor:
    """Rewards [E, R] of tokenized examples (R responses each), padded batches of similar length."""
    from hpalign.train.forward import reward_stats

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(reward_model.parameters()).device
    lengths = collate.example_lengths(examples)
    order = sorted(range(len(examples)), key=lambda i: lengths[i])  # less padding per batch
    rewards: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = collate.pad_batch([examples[i] for i in indices], pad_id=pad_id).to(device)
        rewards_ER = reward_stats(reward_model, batch, packed=False).rewards_ER.cpu()
        rewards.update(zip(indices, rewards_ER, strict=True))
    return torch.stack([rewards[i] for i in range(len(examples))])


def score(reward_model: RewardModel, tokenizer: Any, template: templates.ChatTemplate,
          prompts: list[list[Message]], responses: list[str], *, batch_size: int = 8,
          max_length: int = DEFAULT_MAX_LENGTH) -> torch.Tensor:
    """Rewards [N] of `responses[i]` to the chat `prompts[i]` (messages ending with a user turn)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return torch.zeros(0)
    examples = [SFTExample(prompt, response, f"item {i}")
                for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True))]
    tokenized = templates.tokenize_examples(examples, template, max_length=max_length, report=LoadReport())
    return score_tokenized(reward_model, tokenized, pad_id=tokenizer.pad_token_id, batch_size=batch_size)[:, 0]


def score_pairs(reward_model: RewardModel, tokenizer: Any, template: templates.ChatTemplate,
                pairs: list[PreferenceExample], *, batch_size: int = 8,
                max_length: int = DEFAULT_MAX_LENGTH) -> PairScores:
    """Chosen and rejected rewards of preference pairs, tokenized as pairs exactly as in training
    (the prompt is cut to fit the longer answer of its pair)."""
    if not pairs:
        raise ValueError("score_pairs needs at least one preference pair")
    tokenized = templates.tokenize_examples(pairs, template, max_length=max_length, report=LoadReport())
    rewards_N2 = score_tokenized(reward_model, tokenized, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    return PairScores(chosen_N=rewards_N2[:, 0], rejected_N=rewards_N2[:, 1])


# ----------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpalign score", description="Score held-out preference pairs with a reward-model checkpoint "
        "(--rlhf_type rm): pairs, accuracy (chosen scored higher; ties count 1/2), mean rewards.")
    parser.add_argument("--checkpoint", required=True, help="run_dir/checkpoint-<step> of an RM run")
    parser.add_argument("--dataset", required=True, nargs="+",
                        help="preference files (the training formats) or builtin-emoji:test")
    parser.add_argument("--model", default=FROM_TRAINER_STATE,
                        help="base model of a LoRA checkpoint (default: the one in trainer_state.json)")
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH,
                        help="token limit per prompt + answer, truncated as in training (default 1024)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--torch_dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--output", help="write one JSON line per pair here")
    add_trust_remote_code_argument(parser)
    return parser


def add_trust_remote_code_argument(parser: argparse.ArgumentParser) -> None:
    """`--trust_remote_code` of the commands that load a checkpoint (train's flag, same meaning)."""
    from hpalign.cli_args import parse_bool

    parser.add_argument("--trust_remote_code", nargs="?", const=True, default=False, type=parse_bool,
                        help="true (or the bare flag): run the Python code a model directory ships for its "
                        "architecture or tokenizer (default false: such a directory is refused with the reason)")


def format_table(checkpoint: str, scores: PairScores) -> str:
    rows = [("checkpoint", checkpoint), ("pairs", str(len(scores.chosen_N))),
            ("accuracy", f"{scores.accuracy:.4f}"),
            ("mean chosen reward", f"{scores.chosen_N.mean().item():.4f}"),
            ("mean rejected reward", f"{scores.rejected_N.mean().item():.4f}"),
            ("mean margin", f"{scores.margins_N.mean().item():.4f}")]
    return "\n".join(f"{name:<22}{value}" for name, value in rows)


def write_scores(path: str | Path, pairs: list[PreferenceExample], scores: PairScores) -> None:
    with open(path, "w", encoding="utf-8") as out:
        rewards = zip(pairs, scores.chosen_N.tolist(), scores.rejected_N.tolist(), strict=True)
        for pair, chosen, rejected in rewards:
            record = {"source": pair.source, "chosen_reward": chosen, "rejected_reward": rejected,
                      "margin": chosen - rejected}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: Sequence[str]) -> int:
    """`hpalign score` flags -> the table on stdout (and --output); user errors raise ValueError."""
    from hpalign.data.formats import load_examples

    args = build_parser().parse_args(list(argv))
    reward_model, tokenizer, template = load_reward_model(args.checkpoint, model=args.model, dtype=args.torch_dtype,
                                                          trust_remote_code=args.trust_remote_code)
    pairs = load_examples(args.dataset, kind="pair")
    scores = score_pairs(reward_model, tokenizer, template, pairs, batch_size=args.batch_size,
                         max_length=args.max_length)
    print(format_table(args.checkpoint, scores))
    if args.output:
        write_scores(args.output, pairs, scores)
        print(f"{'scores':<22}{args.output}")
    sys.stdout.flush()
    return 0
