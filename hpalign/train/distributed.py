"""Process-group set-up and the few collectives the loop needs.

One code path serves a plain `python`/`hpalign rlhf` process (world size 1, no launcher) and
`deepspeed --num_gpus N launch/train.py` (gloo on CPU, NCCL on GPU): DeepSpeed's engine always needs
an initialised process group, so a launcher-less run gets a one-process group on a free local port.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> torch.device:
    """Initialise torch.distributed once (via DeepSpeed) and return this rank's device."""
    import deepspeed

    if "RANK" not in os.environ:  # plain single process: make a one-rank group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; the input is not modified)."""
    reduced = values.detach().clone()
    if world_size() > 1:
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(value):
    """Rank 0's value on every rank."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
