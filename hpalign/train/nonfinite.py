"""Updates whose loss or gradient is not finite are skipped on the device, counted, and stop the run.

Where the check sits: around the torch optimizer's `step`, which every DeepSpeed wrapper (ZeRO-0
plain, ZeRO-1/2/3, bf16) calls with the all-reduced fp32 gradients it is about to apply (under ZeRO
each rank holds its partition, so the flag is max-reduced over ranks: one scalar collective).
One flag is computed on the device: the step's loss (handed in by the loop, `note_loss`) or any
gradient element not finite. torch's fused AdamW takes it as `found_inf` (the path torch.amp's
GradScaler uses) and leaves the weights, both moments and its step count untouched when it is 1;
an unfused optimizer reads the flag on the host instead (one sync per step, named in the log).

DeepSpeed's ZeRO and bf16 optimizers already skip a step whose gradient norm is not finite (their
own host check), before reaching ours: `end_step` counts those from `engine.was_step_applied()`
(fp16 runs excepted: there a skipped step is the dynamic loss scale's normal overflow handling).

The counters (skipped steps, the current streak, where it began, and how many of its steps had a
non-finite loss) live on the device; `reading` copies them to the host without waiting (CUDA: a
non-blocking copy read once its event has completed, one step late at worst), `reading(wait=True)`
before a checkpoint. `max_in_a_row` skipped updates in a row stop the run with `NonFiniteError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hpalign import distributed

logger = logging.getLogger("hpalign")

# Device counters, in this order.
NUM_SKIPPED, STREAK, STREAK_START, STREAK_BAD_LOSS = range(4)


class NonFiniteError(RuntimeError):
    """The run stopped: too many updates in a row had a non-finite loss or gradient."""


@dataclass(frozen=True)
class GuardReading:
    num_skipped: int
    streak: int  # skipped updates in a row, ending at the latest step read
    streak_start: int  # the 1-based step where that streak began
    streak_bad_loss: int  # steps of the streak whose loss was not finite (the others: the gradient)


def non_finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1.0 on the tensors' device when any element is NaN or infinite, else 0.0: no host sync.
    The max-abs norm is finite exactly when every element is (an L2 norm of large finite values
    could overflow to inf and raise a false alarm)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, float("inf"))
    return (~torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all()).float()


class NonFiniteGuard:
    """Skips and counts the non-finite updates of one DeepSpeed engine's optimizer (see the module
    docstring). The loop brackets each of its steps with `begin_step` / `end_step`."""

    def __init__(self, engine, optimizer: torch.optim.Optimizer, *, count_deepspeed_skips: bool) -> None:
        self.engine, self.optimizer = engine, optimizer
        self.device = engine.device
        self.count_deepspeed_skips = count_deepspeed_skips
        self.counters = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.pending_loss_flag = torch.zeros((), device=self.device)
        self.step = 0
        self.deepspeed_skips_seen = self._deepspeed_skips()
        self.fused = bool(optimizer.defaults.get("fused"))
        self._host = torch.zeros(4, dtype=torch.float64, pin_memory=self.device.type == "cuda")
        self._event = None
        self._reading = GuardReading(0, 0, 0, 0)
        self._optimizer_step = optimizer.step
        optimizer.step = self._guarded_step
        if not self.fused:
            logger.info("non-finite guard: the optimizer is not fused; its flag is read on the host each step")

    def begin_step(self, step: int) -> None:
        """The updates until `end_step` belong to the loop's 1-based `step`."""
        self.step = step

    def note_loss(self, loss: torch.Tensor) -> None:
        """Record a micro-batch's loss; the next update is skipped if any loss noted before it is not finite."""
        flag = (~torch.isfinite(loss.detach())).any().float().to(self.device)
        self.pending_loss_flag = torch.maximum(self.pending_loss_flag, flag)

    def end_step(self) -> None:
        """Count the updates DeepSpeed skipped itself during the step, and drop a loss flag no update used."""
        skipped = self._deepspeed_skips() - self.deepspeed_skips_seen
        self.deepspeed_skips_seen += skipped
        if self.count_deepspeed_skips:
            for _ in range(skipped):
                self._count(torch.ones((), device=self.device), self.pending_loss_flag)
        self.pending_loss_flag = torch.zeros((), device=self.device)
        self._copy_to_host()

    def _deepspeed_skips(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0))

    def _guarded_step(self, *args, **kwargs):
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        flag = torch.maximum(non_finite_flag(grads).to(self.device), self.pending_loss_flag)
        # A ZeRO rank sees only its partition of the gradients: every rank must take the same decision.
        flags = distributed.max_over_ranks(torch.stack([flag, self.pending_loss_flag]))
        self._count(flags[0], flags[1])
        self.pending_loss_flag = torch.zeros((), device=self.device)
        if self.fused:
            self.optimizer.found_inf = flags[0].float()
            return self._optimizer_step(*args, **kwargs)
        if float(flags[0]) == 0.0:  # unfused torch optimizers take no found_inf: skip on the host
            return self._optimizer_step(*args, **kwargs)
        return None

    def _count(self, flag: torch.Tensor, loss_flag: torch.Tensor) -> None:
        flag, loss_flag, counters = flag.double(), loss_flag.double(), self.counters
        starts = (counters[STREAK] == 0) & (flag > 0)
        counters[STREAK_START] = torch.where(starts, float(self.step), counters[STREAK_START])
        counters[STREAK_BAD_LOSS] = (counters[STREAK_BAD_LOSS] + loss_flag * flag) * flag
        counters[STREAK] = (counters[STREAK] + 1) * flag
        counters[NUM_SKIPPED] += flag

    def _copy_to_host(self) -> None:
        if self.device.type == "cuda":
            self._host.copy_(self.counters, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host.copy_(self.counters)

    def reading(self, *, wait: bool = False) -> GuardReading:
        """The counters as of the latest step whose copy has arrived (all steps with `wait`)."""
        if self._event is not None:
            if not wait and not self._event.query():
                return self._reading
            self._event.synchronize()
        self._reading = GuardReading(*(int(v) for v in self._host.tolist()))
        return self._reading


def stop_if_failing(guards: dict[str, NonFiniteGuard], *, max_in_a_row: int, run_dir: Path,
                    wait: bool = False) -> dict[str, GuardReading]:
    """Every guard's reading (`wait`: up to the latest step); `NonFiniteError` when one of them has
    skipped `max_in_a_row` updates in a row."""
    readings = {name: guard.reading(wait=wait) for name, guard in guards.items()}
    check_streak(readings, max_in_a_row=max_in_a_row, run_dir=run_dir)
    return readings


def check_before_save(guards: dict[str, NonFiniteGuard], modules: dict[str, torch.nn.Module], *,
                      max_in_a_row: int, run_dir: Path, step: int) -> None:
    """A checkpoint is never written from non-finite weights (a collective: every rank calls it)."""
    stop_if_failing(guards, max_in_a_row=max_in_a_row, run_dir=run_dir, wait=True)
    bad = [name for name, module in modules.items() if not weights_are_finite(module)]
    if bad:
        raise NonFiniteError(f"step {step}: the {' and '.join(bad)} weights are not finite; checkpoint-{step} "
                             f"was not written ({_last_checkpoint(run_dir, step + 1)})")


def _last_checkpoint(run_dir: Path, before_step: int) -> str:
    from hpalign.checkpoint import list_checkpoints

    earlier = [path for path in list_checkpoints(run_dir) if int(path.name.split("-")[-1]) < before_step]
    return f"the last checkpoint before it is {earlier[-1]}" if earlier else "no checkpoint was written before it"


def check_streak(readings: dict[str, GuardReading], *, max_in_a_row: int, run_dir: Path) -> None:
    """Raise `NonFiniteError` when an engine's streak of skipped updates reached `max_in_a_row`."""
    for name, reading in readings.items():
        if reading.streak < max(max_in_a_row, 1):
            continue
        metric = ("loss" if reading.streak_bad_loss == reading.streak else
                  "gradient" if reading.streak_bad_loss == 0 else
                  f"loss ({reading.streak_bad_loss} of them) or gradient")
        raise NonFiniteError(
            f"{name}: {reading.streak} updates in a row had a non-finite {metric} (from step "
            f"{reading.streak_start}; each was skipped, {reading.num_skipped} in all); stopping "
            f"(--max_nonfinite_steps {max_in_a_row}). The skipped updates left the weights as they were "
            f"before them; {_last_checkpoint(run_dir, reading.streak_start)}. Lower --learning_rate, "
            "check the data near that step, or use --dtype float32")


def weights_are_finite(module: torch.nn.Module) -> bool:
    """Whether every trainable parameter of `module` is finite, on every rank (ZeRO-3: each rank
    checks its partition). One host sync: called before a checkpoint is written."""
    tensors = [getattr(p, "ds_tensor", p).detach() for p in module.parameters() if p.requires_grad]
    return float(distributed.max_over_ranks(non_finite_flag(tensors).reshape(1))[0]) == 0.0

