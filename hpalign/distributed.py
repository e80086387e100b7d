"""How this run's processes are arranged, and the few collectives the loop needs, behind one seam.

One code path serves a plain `python`/`hpalign rlhf` process (world size 1, no launcher) and
`deepspeed --num_gpus N launch/train.py` (gloo on CPU, NCCL on GPU): DeepSpeed's engine always needs
an initialised process group, so a launcher-less run gets a one-process group on a free local port.

Where tensors live is decided here, once: `ProcessLayout.device` is the rank's compute device (every
model and batch goes there) and `ProcessLayout.communication_device` is where the backend reads
collective inputs (NCCL only takes CUDA tensors; gloo is given CPU tensors). `Collectives` refuses a
tensor on any other device, on every backend, as NCCL would: a CPU run therefore fails on the same
mistake a GPU run would, and tests can swap the seam (`set_layout(layout, collectives)`) for one
that checks more.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessLayout:
    """This process's place in the run. Data parallelism only for now: every rank is a data shard
    (`data_parallel_*` is what the schedule, evaluation sharding and global counts ask)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "gloo"
    device: torch.device = torch.device("cpu")
    communication_device: torch.device = torch.device("cpu")

    @property
    def data_parallel_size(self) -> int:
        return self.world_size

    @property
    def data_parallel_rank(self) -> int:
        return self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def communication_device(backend: str, device: torch.device) -> torch.device:
    """The device collective inputs must be on: the rank's CUDA device for NCCL (it rejects CPU
    tensors), the CPU for gloo (which would otherwise stage CUDA tensors through the host anyway)."""
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError(f"the NCCL backend needs a CUDA device for this rank, got {device}")
        return device
    if backend == "gloo":
        return torch.device("cpu")
    return device  # e.g. hccl / ccl: the accelerator's own device


def rank_device(*, cuda_available: bool, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if cuda_available else torch.device("cpu")


class Collectives:
    """The collectives the loop uses, over torch.distributed. Inputs must already be on `device`."""

    def __init__(self, layout: ProcessLayout) -> None:
        self.layout = layout
        self.device = layout.communication_device

    def check_device(self, tensor: torch.Tensor, what: str) -> None:
        if tensor.device != self.device:
            raise RuntimeError(f"{what}: tensor on {tensor.device}, but the {self.layout.backend} process "
                               f"group communicates on {self.device}; move it there first")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks (a new tensor on `device`; the input is not modified)."""
        return self._all_reduce(tensor, "SUM")

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise max of `tensor` over ranks (a new tensor on `device`; the input is not modified)."""
        return self._all_reduce(tensor, "MAX")

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        self.check_device(tensor, "all_reduce")
        reduced = tensor.detach().clone()
        if self.layout.world_size > 1:
            dist.all_reduce(reduced, op=getattr(dist.ReduceOp, op))
        return reduced

    def barrier(self) -> None:
        if self.layout.world_size > 1:
            dist.barrier()

    def broadcast_object(self, value):
        """Rank 0's value on every rank."""
        if self.layout.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0, device=self.device)
        return holder[0]


_layout = ProcessLayout()
_collectives = Collectives(_layout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(*, timeout_seconds: int = 1800) -> ProcessLayout:
    """Initialise torch.distributed once (via DeepSpeed) and record this process's layout.
    `timeout_seconds` (--ddp_timeout): how long any collective may wait, the barriers of
    `run_main_first` (ranks waiting for rank 0's first tokenization) included."""
    import datetime

    import deepspeed

    if "RANK" not in os.environ:  # plain single process: make a one-rank group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(cuda_available=cuda, local_rank=local_rank)
    if device.type == "cuda":  # before the group exists: NCCL binds each rank to the current device
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                   timeout=datetime.timedelta(seconds=timeout_seconds))
    backend = dist.get_backend()
    set_layout(ProcessLayout(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                             backend=backend, device=device,
                             communication_device=communication_device(backend, device)))
    if _layout.world_size > 1 and device.type == "cpu":
        barrier()  # every rank has mapped every segment (DeepSpeed's shm init returns only then)
        release_shm_segment(rank=_layout.rank)
    return _layout


SHM_DIR = Path("/dev/shm")


def shm_segment_path(*, rank: int, shm_dir: Path = SHM_DIR) -> Path:
    """DeepSpeed's CPU all-reduce segment of `rank` (csrc/cpu/comm/shm.cpp: `deepspeed_allreduce_buffer_
    <uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return shm_dir / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_segment(*, rank: int, shm_dir: Path = SHM_DIR) -> bool:
    """Unlink this rank's all-reduce segment once every rank has mapped it. DeepSpeed's CPU shm
    all-reduce (used when all ranks share a machine) creates one segment per rank and never unlinks
    it: every multi-rank CPU run would leave them in /dev/shm, i.e. in RAM, for good (measured: 20
    segments, 3.9 GB, after a test session). The mappings stay valid after the unlink; the memory
    returns when the ranks exit, however they exit. Returns whether there was one to remove."""
    path = shm_segment_path(rank=rank, shm_dir=shm_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def set_layout(layout: ProcessLayout, collectives=None) -> None:
    """Record this process's layout; `collectives` replaces the torch.distributed seam (tests)."""
    global _layout, _collectives
    _layout, _collectives = layout, collectives or Collectives(layout)


def layout() -> ProcessLayout:
    return _layout


def collectives() -> Collectives:
    return _collectives


def rank() -> int:
    return _layout.rank


def world_size() -> int:
    return _layout.world_size


def processes_on_this_machine() -> int:
    """How many of the run's processes share this machine's cores and memory: deepspeed's launcher
    exports LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE; without either, every process of the run."""
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
    return int(local) if local else world_size()


def is_main() -> bool:
    return _layout.is_main


def sum_over_ranks(values: torch.Tensor | Sequence[float]) -> list[float]:
    """Elementwise sum over ranks of a flat vector, as floats: moved to the communication device,
    one all-reduce, one copy back to the host."""
    seam = collectives()
    flat = torch.as_tensor(values, dtype=torch.float64 if not torch.is_tensor(values) else None)
    flat = flat.detach().reshape(-1).to(seam.device)
    return seam.all_reduce_sum(flat).tolist()


def max_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks, on the tensor's own device (through the communication device,
    without a host sync)."""
    seam = collectives()
    return seam.all_reduce_max(tensor.detach().to(seam.device)).to(tensor.device)


def barrier() -> None:
    collectives().barrier()


T = TypeVar("T")


def run_main_first(work: Callable[[], T]) -> T:
    """`work()` on global rank 0 first, then on each node's local rank 0, then on every other rank
    (TRL's `global_then_local_main_first`): work that fills a cache runs once per cache the ranks
    can read (once on a shared disk, once per node on node-local disks); the later ranks find it.

    Every rank passes the same three barriers even when its `work` raises (the error is re-raised
    after them), so a failure on rank 0 cannot leave the others waiting: they run `work` themselves
    and fail with the same message. One rank: just `work()`.
    """
    place = _layout
    turn = 0 if place.rank == 0 else 1 if place.local_rank == 0 else 2
    result, error = None, None
    for phase in range(3):
        if phase == turn:
            try:
                result = work()
            except Exception as err:  # re-raised after the barriers
                error = err
        barrier()
    if error is not None:
        raise error
    return result


def broadcast_object(value):
    return collectives().broadcast_object(value)
