"""What the forward passes hand the objectives: per-sequence statistics of a micro-batch, and the
step's global counts that every loss is divided by (see `hpalign.algorithms`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceStats:
    """Per-sequence sums over response tokens for one micro-batch, reshaped example-major."""

    logps_ER: torch.Tensor  # [E, R] summed log p(response token), R = responses per example
    num_tokens_ER: torch.Tensor  # [E, R] response token counts (float)
    labels_E: torch.Tensor | None = None  # [E] bool, KTO: True = desirable
    margins_E: torch.Tensor | None = None  # [E] float, RM: optional per-pair margin
    rewards_ER: torch.Tensor | None = None  # [E, R] scalar rewards of a reward model (RM)

    @property
    def mean_logps_ER(self) -> torch.Tensor:
        return self.logps_ER / self.num_tokens_ER.clamp(min=1)


@dataclass
class StepCounts:
    """Global counts of one optimizer step (all micro-batches, all ranks)."""

    num_examples: float
    num_tokens: float  # response tokens of every response
    num_chosen_tokens: float  # response tokens of response 0 (the chosen answer)
    num_desirable: float = 0.0  # KTO
    num_undesirable: float = 0.0  # KTO
    kl_reference_point: float = 0.0  # KTO's z0, estimated over the step's global batch


@dataclass
class TokenStats:
    """Per-token statistics of a micro-batch's response tokens, flat in row-major order (the
    tokens that carry a label); `as_matrix` turns any of them into PPO's [S, T] response matrices."""

    seq_ids_M: torch.Tensor  # [M] sequence id of each response token
    offsets_M: torch.Tensor  # [M] its index within its response (0 = first response token)
    num_sequences: int
    logps_M: torch.Tensor | None = None  # [M] log p(token), differentiable
    entropy_M: torch.Tensor | None = None  # [M] entropy of the predicted distribution (no grad)
    values_M: torch.Tensor | None = None  # [M] value estimates, differentiable

    def as_matrix(self, values_M: torch.Tensor, width: int) -> torch.Tensor:
        """[S, width] response matrix of per-token `values_M` (0 past each response's end)."""
        from hpalign.ops.segments import segments_to_padded

        return segments_to_padded(values_M, self.seq_ids_M, self.offsets_M, self.num_sequences, width)
