"""Training metrics of a logging window: kept on the rank's device, reduced once per log line.

A step adds three kinds of value:
- `sums`: this rank's share of a step's global value (losses are already divided by the step's
  global counts, token counts are this rank's): summed over ranks, then averaged over the window;
- `shared`: values every rank already holds in full (DeepSpeed's global gradient norm): averaged
  over the window, not summed over ranks;
- `host`: floats this process measured (seconds, tokens/s, learning rate), averaged over the window,
  except the learning rate and the epoch, which are the latest.
The device values never leave the device until `reduce`: one all-reduce of one flat tensor and one
copy to the host per logging step, whatever the number of steps and metrics in between.
"""

from __future__ import annotations

import torch

from hpalign import distributed

LATEST = ("train/learning_rate", "train/epoch", "train/gpu_peak_memory_mib")


class MetricWindow:
    """Accumulates steps' metrics until `reduce` turns them into one log line."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.shared: dict[str, torch.Tensor] = {}
        self.host: dict[str, list[float]] = {}
        self.num_steps = 0

    def add_step(self, *, sums: dict[str, torch.Tensor], shared: dict[str, torch.Tensor],
                 host: dict[str, float]) -> None:
        for target, values in ((self.sums, sums), (self.shared, shared)):
            for name, value in values.items():
                value = torch.as_tensor(value).detach().double().reshape(())
                target[name] = target[name] + value if name in target else value
        for name, value in host.items():
            self.host.setdefault(name, []).append(float(value))
        self.num_steps += 1

    def reduce(self) -> dict[str, float]:
        """Window means of every metric (one collective), and reset the window."""
        if not self.num_steps:
            return {}
        sum_names, shared_names = sorted(self.sums), sorted(self.shared)
        # Counts known on the host and sums made on the GPU meet on the communication device.
        device = distributed.collectives().device
        values = [self.sums[n].to(device) for n in sum_names] + [self.shared[n].to(device) for n in shared_names]
        totals = distributed.sum_over_ranks(torch.stack(values)) if values else []
        world = distributed.layout().data_parallel_size
        metrics = {name: total / self.num_steps for name, total in zip(sum_names, totals, strict=False)}
        for name, total in zip(shared_names, totals[len(sum_names):], strict=True):
            metrics[name] = total / (self.num_steps * world)  # each rank added the same value
        for name, history in self.host.items():
            metrics[name] = history[-1] if name in LATEST else sum(history) / len(history)
        self.__init__()
        return metrics
