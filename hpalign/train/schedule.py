"""Which examples each rank sees in each micro-batch: a pure function of (seed, epoch, step).

Every optimizer step consumes one global batch of `micro_batch_size x accumulation x world_size`
examples from a per-epoch permutation. Rank r takes its contiguous share of the global batch and
splits it into micro-batches. Because the order depends only on the seed and the epoch, resuming
from `global_step` needs no sampler state, and micro-batch 1 x accumulation 4 sees exactly the same
examples per step as micro-batch 4 x accumulation 1.

When the data set is not a multiple of the global batch, the last step of an epoch wraps around to
the start of the same permutation; `num_wrapped_per_epoch` reports how many examples that repeats.

The permutation of an epoch is drawn once per process and kept (`epoch_order`), not once per rank
per step: the loop asks for every rank's share (`all_step_indices`, for the global counts) and its
own micro-batches on every step, and a randperm of a million examples costs milliseconds each time.
"""

from __future__ import annotations

import array
import functools
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
    """The order of the examples in `epoch`: a randperm seeded by (seed, epoch) alone."""
    return list(epoch_order(num_examples, seed=seed, epoch=epoch))


@functools.lru_cache(maxsize=2)  # the training epoch's, and one other plan's without thrashing
def epoch_order(num_examples: int, *, seed: int, epoch: int) -> array.array:
    """`epoch_permutation`, drawn once per (num_examples, seed, epoch) and kept: 8 bytes an
    example, indexing gives Python ints. Shared: read it, never modify it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = array.array("q")
    order.frombytes(torch.randperm(num_examples, generator=generator).numpy().tobytes())
    return order


def total_steps(plan: BatchPlan, *, num_train_epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_train_epochs * plan.steps_per_epoch))


def _positions(plan: BatchPlan, global_step: int, *, seed: int, start: int, count: int) -> list[int]:
    """Example indices at positions start .. start + count of the step's global batch."""
    epoch, step_in_epoch = divmod(global_step, plan.steps_per_epoch)
    order = epoch_order(plan.num_examples, seed=seed, epoch=epoch)
    first = step_in_epoch * plan.global_batch + start
    return [order[p % plan.num_examples] for p in range(first, first + count)]


def micro_batches_for_step(plan: BatchPlan, global_step: int, *, seed: int, rank: int) -> list[list[int]]:
    """Example indices of each of this rank's micro-batches for optimizer step `global_step` (0-based)."""
    per_rank = plan.micro_batch_size * plan.accumulation
    indices = _positions(plan, global_step, seed=seed, start=rank * per_rank, count=per_rank)
    size = plan.micro_batch_size
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def all_step_indices(plan: BatchPlan, global_step: int, *, seed: int) -> list[int]:
    """Every example index of the global batch of `global_step` (all ranks, rank 0's first), for
    global counts: the concatenation of every rank's `micro_batches_for_step`."""
    return _positions(plan, global_step, seed=seed, start=0, count=plan.global_batch)
