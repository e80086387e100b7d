"""The scoring passes of a PPO step: from sampled responses to advantages and returns.

No-grad, packed forwards over the rollout batch in chunks of --local_rollout_forward_batch_size
sequences: the policy's log-probs (old log-probs, of the tempered distribution the sampler drew
from; skipped when the sampler's own are used, --old_logprobs), the reference's, the value
model's estimates and the score (reward model and/or rule rewards; minus --missing_eos_penalty
for a response cut by --response_length). Then the per-token rewards (score on the last token,
KL penalty on every token), GAE and whitened advantages, as
TRL's PPOv2 computes them (maths in `hpalign.losses.ppo`), whitening over every rank's rollouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpalign import distributed, losses
from hpalign.data.collate import SequenceBatch
from hpalign.data.types import Message, TokenizedExample
from hpalign.stats import TokenStats


@dataclass
class ScoringPasses:
    """The no-grad forwards of the scoring phase, each over a packed batch of rollout sequences."""

    policy: Callable[[SequenceBatch], TokenStats] | None  # tempered log-probs; None: the sampler's are used
    reference: Callable[[SequenceBatch], TokenStats]
    values: Callable[[SequenceBatch], TokenStats]
    # (batch, prompts, response texts) -> [S] scores: reward model plus rule rewards, and metrics
    scores: Callable[[SequenceBatch, list[list[Message]], list[str]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class RolloutBatch:
    """This rank's rollouts of one PPO step, scored; [B, T] tensors over response tokens."""

    examples: list[TokenizedExample]  # prompt_ids + [response_ids]
    prompts: list[list[Message]]
    texts: list[str]
    mask_BT: torch.Tensor  # bool
    sampler_logps_BT: torch.Tensor
    old_logps_BT: torch.Tensor
    ref_logps_BT: torch.Tensor
    values_BT: torch.Tensor
    scores_B: torch.Tensor
    stopped_B: torch.Tensor  # bool: ended with a stop token
    kl_BT: torch.Tensor | None = None
    rewards_BT: torch.Tensor | None = None
    advantages_BT: torch.Tensor | None = None
    returns_BT: torch.Tensor | None = None
    score_metrics: dict[str, float] | None = None

    @property
    def width(self) -> int:
        return self.mask_BT.shape[1]


def response_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def padded_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


@torch.no_grad()
def run_scoring_passes(passes: ScoringPasses, examples: list[TokenizedExample], prompts: list[list[Message]],
                       texts: list[str], *, collate: Callable[[list[TokenizedExample]], SequenceBatch],
                       chunk_size: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """{old_logps (unless `passes.policy` is None), ref_logps, values: [B, width], scores: [B]} on
    `device`, chunk by chunk; the score metrics (rule rewards' means) under "metrics", weighted by
    chunk size."""
    parts: dict[str, list[torch.Tensor]] = {"ref_logps": [], "values": [], "scores": []}
    if passes.policy is not None:
        parts["old_logps"] = []
    metric_parts = []
    for start in range(0, len(examples), chunk_size):
        stop = start + chunk_size
        batch = collate(examples[start:stop]).to(device)
        if passes.policy is not None:
            policy = passes.policy(batch)
            parts["old_logps"].append(policy.as_matrix(policy.logps_M, width))
        reference, values = passes.reference(batch), passes.values(batch)
        parts["ref_logps"].append(reference.as_matrix(reference.logps_M, width))
        parts["values"].append(values.as_matrix(values.values_M, width))
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


def add_advantages(rollouts: RolloutBatch, *, kl_coef: float, kl_estimator: str, whiten_rewards: bool,
                   gamma: float, lam: float) -> None:
    """Per-token rewards, GAE advantages (whitened over all ranks' tokens) and returns, as PPOv2."""
    mask = rollouts.mask_BT
    kl_BT = losses.kl_estimate(rollouts.old_logps_BT, rollouts.ref_logps_BT, kl_estimator) * mask
    rewards_BT = losses.kl_penalised_rewards(rollouts.scores_B, kl_BT, mask, kl_coef=kl_coef)
    if whiten_rewards:
        rewards_BT = losses.whiten(rewards_BT, mask, shift_mean=False, sum_over_ranks=global_sum)
    advantages_BT, returns_BT = losses.gae_advantages(rewards_BT, rollouts.values_BT, mask, gamma=gamma, lam=lam)
    rollouts.kl_BT, rollouts.rewards_BT, rollouts.returns_BT = kl_BT, rewards_BT, returns_BT
    rollouts.advantages_BT = losses.whiten(advantages_BT, mask, sum_over_ranks=global_sum)
