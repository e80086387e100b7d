"""Which examples each rank sees in each micro-batch: a pure function of (seed, epoch, step).

Every optimizer step consumes one global batch of `micro_batch_size x accumulation x world_size`
examples from a per-epoch permutation. Rank r takes its contiguous share of the global batch and
splits it into micro-batches. Because the order depends only on the seed and the epoch, resuming
from `global_step` needs no sampler state, and micro-batch 1 x accumulation 4 sees exactly the same
examples per step as micro-batch 4 x accumulation 1.

When the data set is not a multiple of the global batch, the last step of an epoch wraps around to
the start of the same permutation; `num_wrapped_per_epoch` reports how many examples that repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    micro_batch_size: int
    accumulation: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_examples / self.global_batch))

    @property
    def num_wrapped_per_epoch(self) -> int:
        return self.steps_per_epoch * self.global_batch - self.num_examples


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def total_steps(plan: BatchPlan, *, num_train_epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_train_epochs * plan.steps_per_epoch))


def micro_batches_for_step(plan: BatchPlan, global_step: int, *, seed: int, rank: int) -> list[list[int]]:
    """Example indices of each of this rank's micro-batches for optimizer step `global_step` (0-based)."""
    epoch, step_in_epoch = divmod(global_step, plan.steps_per_epoch)
    order = epoch_permutation(plan.num_examples, seed=seed, epoch=epoch)
    start = step_in_epoch * plan.global_batch + rank * plan.micro_batch_size * plan.accumulation
    positions = range(start, start + plan.micro_batch_size * plan.accumulation)
    indices = [order[p % plan.num_examples] for p in positions]
    size = plan.micro_batch_size
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def all_step_indices(plan: BatchPlan, global_step: int, *, seed: int) -> list[int]:
    """Every example index of the global batch of `global_step` (all ranks), for global counts."""
    return [i for r in range(plan.world_size)
            for mb in micro_batches_for_step(plan, global_step, seed=seed, rank=r) for i in mb]
