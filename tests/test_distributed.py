"""Where collective inputs live: the decision, the seam's check, and a whole run against a fake NCCL.

A CPU machine cannot make CUDA tensors, so the fake backend communicates on the `meta` device: a
stand-in for "not the CPU". Any metric, count or tally handed to a collective without being moved to
the communication device first fails there, exactly as a CPU tensor fails under NCCL."""

import subprocess
import sys
import textwrap

import pytest
import torch

from hpalign import distributed
from hpalign.distributed import Collectives, ProcessLayout, communication_device
from hpalign.train.metrics import MetricWindow
from tests.train.conftest import REPO, TINY_FLAGS


def test_communication_device_follows_the_backend():
    assert communication_device("nccl", torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert communication_device("gloo", torch.device("cuda", 1)) == torch.device("cpu")
    assert communication_device("gloo", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="NCCL backend needs a CUDA device"):
        communication_device("nccl", torch.device("cpu"))


def test_the_seam_refuses_tensors_off_the_communication_device():
    seam = Collectives(ProcessLayout(communication_device=torch.device("meta")))
    with pytest.raises(RuntimeError, match="communicates on meta"):
        seam.all_reduce_sum(torch.ones(2))
    assert seam.all_reduce_sum(torch.ones(2, device="meta")).device.type == "meta"


class SumOfTwoRanks:
    """A fake 2-rank backend on the CPU: every rank contributed the same values."""

    device = torch.device("cpu")

    def all_reduce_sum(self, tensor):
        return tensor * 2


def test_metric_window_reduces_once_and_averages(monkeypatch):
    calls = []
    seam = SumOfTwoRanks()
    monkeypatch.setattr(seam, "all_reduce_sum", lambda t: calls.append(t.clone()) or t * 2, raising=False)
    distributed.set_layout(ProcessLayout(world_size=2), seam)
    try:
        window = MetricWindow()
        for step in range(3):
            window.add_step(sums={"train/loss": torch.tensor(0.5 * step)},
                            shared={"train/grad_norm": torch.tensor(2.0)},
                            host={"train/step_seconds": step, "train/learning_rate": 0.1 * step})
        metrics = window.reduce()
    finally:
        distributed.set_layout(ProcessLayout())
    assert len(calls) == 1 and calls[0].numel() == 2  # one flat tensor for the whole window
    assert metrics["train/loss"] == pytest.approx(2 * (0 + 0.5 + 1.0) / 3)  # summed over ranks, mean over steps
    assert metrics["train/grad_norm"] == pytest.approx(2.0)  # already global: not summed over ranks
    assert metrics["train/step_seconds"] == pytest.approx(1.0)
    assert metrics["train/learning_rate"] == pytest.approx(0.2)  # the latest
    assert window.num_steps == 0 and window.reduce() == {}


class FakeNcclOnMeta:
    """Communicates on `meta`, as NCCL does on the GPU; returns zeros (values are not the point)."""

    device = torch.device("meta")

    def all_reduce_sum(self, tensor):
        if tensor.device != self.device:
            raise RuntimeError(f"a collective was handed a tensor on {tensor.device}")
        return torch.zeros(tensor.shape, dtype=tensor.dtype)


def test_metric_window_gathers_host_counts_and_device_sums_on_the_communication_device():
    """On a GPU the losses are CUDA tensors and the token counts CPU ones: one flat tensor of both."""
    distributed.set_layout(ProcessLayout(communication_device=torch.device("meta")), FakeNcclOnMeta())
    try:
        window = MetricWindow()
        window.add_step(sums={"train/loss": torch.tensor(1.0, device="meta"), "train/num_computed_tokens": torch.tensor(7.0)},
                        shared={"train/grad_norm": torch.tensor(2.0, device="meta")}, host={})
        assert set(window.reduce()) == {"train/loss", "train/num_computed_tokens", "train/grad_norm"}
    finally:
        distributed.set_layout(ProcessLayout())


DRIVER = textwrap.dedent('''
    import dataclasses, sys, traceback
    import torch
    from hpalign.cli import build_config
    from hpalign import distributed
    from hpalign.train import run

    class FakeNccl:
        """Communicates on `meta` (a stand-in for CUDA); refuses anything else, as NCCL refuses CPU tensors."""
        device = torch.device("meta")
        callers = set()

        def all_reduce_sum(self, tensor):
            if tensor.device != self.device:
                raise RuntimeError(f"fake NCCL: a collective was handed a tensor on {tensor.device}")
            self.callers.update(frame.name for frame in traceback.extract_stack())
            return torch.zeros(tensor.shape, dtype=tensor.dtype)  # one rank of zeros: values unused

        all_reduce_max = all_reduce_sum  # the non-finite guard's flags: zeros, every update applied

        def barrier(self):
            pass

        def broadcast_object(self, value):
            return value

    real_init = distributed.init_distributed

    def init_with_fake_nccl(**kwargs):
        layout = dataclasses.replace(real_init(**kwargs), world_size=1, communication_device=torch.device("meta"))
        distributed.set_layout(layout, FakeNccl())
        return layout

    distributed.init_distributed = init_with_fake_nccl
    code = run(build_config(sys.argv[1:]))
    print("CALLERS", sorted(FakeNccl.callers & {"reduce", "kl_reference_point", "preference_eval",
                                                  "label_eval", "generation_eval", "_guarded_step",
                                                  "weights_are_finite"}))
    sys.exit(code)
''')


@pytest.mark.slow
def test_a_run_hands_every_collective_a_tensor_on_the_communication_device(tmp_path):
    """Training steps (metric window, KTO's z0, the non-finite guard's flag and the finite-weights check
    before the checkpoint), held-out evaluation (pairs and KTO labels) and the
    generation metric, on a backend that communicates somewhere other than where the model runs.
    KTO's run goes through every call site DPO's does, and more."""
    expected = ["_guarded_step", "generation_eval", "kl_reference_point", "label_eval", "preference_eval", "reduce",
                "weights_are_finite"]
    flags = ["--rlhf_type", "kto", *TINY_FLAGS, "--max_steps", "1", "--batch_size", "2", "--eval_before_train", "false",
             "--output_dir", str(tmp_path), "--run_name", "fake-nccl"]
    result = subprocess.run([sys.executable, "-c", DRIVER, *flags], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                              "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-6000:]
    assert f"CALLERS {expected}" in result.stdout, result.stdout[-2000:]


class RecordingBarrier(Collectives):
    def __init__(self, layout, events):
        super().__init__(layout)
        self.events = events

    def barrier(self):
        self.events.append("barrier")


@pytest.mark.parametrize("rank, local_rank, barriers_before", [(0, 0, 0), (4, 0, 1), (1, 1, 2), (5, 1, 2)])
def test_run_main_first_orders_global_main_then_node_mains_then_the_rest(rank, local_rank, barriers_before):
    events = []
    layout = ProcessLayout(rank=rank, world_size=8, local_rank=local_rank)
    distributed.set_layout(layout, RecordingBarrier(layout, events))
    try:
        assert distributed.run_main_first(lambda: events.append("work") or 42) == 42
    finally:
        distributed.set_layout(ProcessLayout())
    assert events == ["barrier"] * barriers_before + ["work"] + ["barrier"] * (3 - barriers_before)


def test_run_main_first_passes_every_barrier_before_raising():
    events = []
    layout = ProcessLayout(rank=0, world_size=2)
    distributed.set_layout(layout, RecordingBarrier(layout, events))

    def work():
        events.append("work")
        raise OSError("disk full")

    try:
        with pytest.raises(OSError, match="disk full"):
            distributed.run_main_first(work)
    finally:
        distributed.set_layout(ProcessLayout())
    assert events == ["work", "barrier", "barrier", "barrier"]  # rank 1 is not left waiting


def test_ddp_timeout_reaches_the_process_group(monkeypatch):
    """--ddp_timeout is the process group's timeout: how long ranks wait in `run_main_first`'s barriers
    while rank 0 tokenizes a large data set for the first time."""
    import datetime

    import deepspeed

    from hpalign.cli import build_config

    seen = {}

    class Stop(Exception):
        pass

    def fake_init_distributed(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(deepspeed, "init_distributed", fake_init_distributed)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(Stop):
        distributed.init_distributed(timeout_seconds=7200)
    assert seen["timeout"] == datetime.timedelta(seconds=7200)
    assert build_config(["--model", "tiny-random-llama"]).train.ddp_timeout == 1800
    with pytest.raises(ValueError, match="ddp_timeout"):
        build_config(["--model", "tiny-random-llama", "--ddp_timeout", "0"])


def test_a_ranks_shm_segment_is_released_by_name(tmp_path, monkeypatch):
    """DeepSpeed's CPU all-reduce segment name (uid, MASTER_ADDR, MASTER_PORT, rank): this rank's goes,
    another rank's or another run's stays."""
    import os

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    uid = os.getuid()
    mine, theirs, other_run = (tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{port}_{rank}"
                               for port, rank in ((29555, 1), (29555, 0), (29556, 1)))
    for path in (mine, theirs, other_run):
        path.write_bytes(b"x")
    assert distributed.shm_segment_path(rank=1, shm_dir=tmp_path) == mine
    assert distributed.release_shm_segment(rank=1, shm_dir=tmp_path)
    assert not mine.exists() and theirs.exists() and other_run.exists()
    assert not distributed.release_shm_segment(rank=1, shm_dir=tmp_path)  # already gone: nothing to do
