"""The scoring phase of a rollout step: from sampled responses to a scored `RolloutBatch`.

No-grad, packed forwards over the rollout batch in chunks of --local_rollout_forward_batch_size
sequences, each pass only where the algorithm reads it: the policy's log-probs (old log-probs, of
the tempered distribution the sampler drew from; skipped when the sampler's own are used,
--old_logprobs, or when the update is on-policy), the reference's (skipped when no KL is taken),
the value model's estimates (PPO's critic) and the score (reward model and/or rule rewards).
Advantages are the algorithm's own (`rl/ppo.py`, `rl/critic_free.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpalign import distributed
from hpalign.data.collate import SequenceBatch
from hpalign.data.types import Message, TokenizedExample
from hpalign.stats import TokenStats

TokenPass = Callable[[SequenceBatch], TokenStats]


@dataclass
class ScoringPasses:
    """The no-grad forwards of the scoring phase, each over a packed batch of rollout sequences;
    a pass the algorithm does not read is None."""

    policy: TokenPass | None  # tempered log-probs; None: the sampler's are used, or none are needed
    reference: TokenPass | None  # None: no KL to the reference
    values: TokenPass | None  # None: no critic
    # (batch, prompts, response texts) -> [S] scores: reward model plus rule rewards, and metrics
    scores: Callable[[SequenceBatch, list[list[Message]], list[str]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class RolloutBatch:
    """This rank's rollouts of one step, scored; [B, T] tensors over response tokens. A group's
    `num_generations` responses to one prompt are consecutive rows."""

    examples: list[TokenizedExample]  # prompt_ids + [response_ids]
    prompts: list[list[Message]]
    texts: list[str]
    mask_BT: torch.Tensor  # bool
    sampler_logps_BT: torch.Tensor
    old_logps_BT: torch.Tensor | None  # None: on-policy update, the ratio's denominator is pi itself
    ref_logps_BT: torch.Tensor | None
    values_BT: torch.Tensor | None
    scores_B: torch.Tensor
    stopped_B: torch.Tensor  # bool: ended with a stop token
    kl_BT: torch.Tensor | None = None
    rewards_BT: torch.Tensor | None = None
    advantages_BT: torch.Tensor | None = None
    returns_BT: torch.Tensor | None = None
    score_metrics: dict[str, float] | None = None
    loss_mask_BT: torch.Tensor | None = None  # the tokens the loss reads; default: mask_BT

    def __post_init__(self) -> None:
        if self.loss_mask_BT is None:
            self.loss_mask_BT = self.mask_BT

    @property
    def width(self) -> int:
        return self.mask_BT.shape[1]

    @property
    def policy_logps_BT(self) -> torch.Tensor:
        """The policy's log-probs of the sampled tokens at sampling time: recomputed, else the sampler's."""
        return self.sampler_logps_BT if self.old_logps_BT is None else self.old_logps_BT


def response_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def padded_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


TOKEN_PASSES = (("old_logps", "policy", "logps_M"), ("ref_logps", "reference", "logps_M"),
                ("values", "values", "values_M"))


@torch.no_grad()
def run_scoring_passes(passes: ScoringPasses, examples: list[TokenizedExample], prompts: list[list[Message]],
                       texts: list[str], *, collate: Callable[[list[TokenizedExample]], SequenceBatch],
                       chunk_size: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """{old_logps, ref_logps, values: [B, width] (each only when its pass is set), scores: [B]} on
    `device`, chunk by chunk; the score metrics (rule rewards' means) under "metrics", weighted by
    chunk size."""
    active = [(name, getattr(passes, field), attr) for name, field, attr in TOKEN_PASSES
              if getattr(passes, field) is not None]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in active}
    parts["scores"] = []
    metric_parts = []
    for start in range(0, len(examples), chunk_size):
        stop = start + chunk_size
        batch = collate(examples[start:stop]).to(device)
        for name, forward, attr in active:
            stats = forward(batch)
            parts[name].append(stats.as_matrix(getattr(stats, attr), width))
        scores, metrics = passes.scores(batch, prompts[start:stop], texts[start:stop])
        parts["scores"].append(scores.float().reshape(-1))
        metric_parts.append((len(examples[start:stop]), metrics))
    out = {name: torch.cat(tensors) for name, tensors in parts.items()}
    total = sum(weight for weight, _ in metric_parts)
    names = {name for _, metrics in metric_parts for name in metrics}
    out["metrics"] = {name: sum(w * m.get(name, 0.0) for w, m in metric_parts) / max(total, 1) for name in names}
    return out


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `tensor` over data-parallel ranks (one all-reduce)."""
    if distributed.layout().data_parallel_size == 1:
        return tensor
    return torch.tensor(distributed.sum_over_ranks(tensor.double()), dtype=tensor.dtype,
                        device=tensor.device).reshape(tensor.shape)
