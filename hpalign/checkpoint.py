"""Checkpoints: HF-loadable weights + full trainer state, written atomically.

Layout of `run_dir/checkpoint-<step>/`:
  adapter_model.safetensors + adapter_config.json   (LoRA)   or   model.safetensors + config.json (full)
  tokenizer files, value_head.safetensors (RM / PPO value model)
  trainer_state.json   global step, epoch, data position, config digest
  rng_state_<rank>.pt  python / torch RNG per rank
  deepspeed/           DeepSpeed's own optimizer + scheduler + (partitioned) model state, for resume

Everything is written into `run_dir/.tmp-checkpoint-<step>` and renamed into place only when complete,
so a run killed mid-save leaves the previous checkpoint intact (and at most a .tmp folder that the
next save removes). `save_total_limit` keeps the newest N. Multi-node runs need `output_dir` on a
shared file system, as DeepSpeed itself does.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from hpalign import distributed

STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if _CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def resolve_resume_path(spec: str, run_dir: Path | None = None) -> Path:
    """`latest` -> the newest complete checkpoint of run_dir; otherwise the given directory."""
    if spec == "latest":
        found = list_checkpoints(run_dir) if run_dir else []
        if not found:
            raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint in {run_dir}")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"--resume_from_checkpoint {spec}: not a complete hpalign checkpoint "
                         f"(no {STATE_FILE}); pass a run_dir/checkpoint-<step> folder or `latest`")
    return path


def _consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full (unpartitioned) state dict on rank 0 under ZeRO-3; None means 'use the module's own'."""
    if engine.zero_optimization_stage() != 3:
        return None
    return engine._zero3_consolidated_16bit_state_dict()  # collective: every rank must call it


def save_checkpoint(engine, *, run_dir: Path, step: int, tokenizer, trainer_state: dict[str, Any],
                    save_total_limit: int | None, extra_engines: dict[str, Any] | None = None) -> Path:
    """Write checkpoint-<step> atomically (a collective: every rank calls it). `extra_engines`
    (PPO's value model) go to sub-folders of the same name: weights and DeepSpeed state each."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    for directory, each in [(tmp, engine), *((tmp / name, extra) for name, extra in (extra_engines or {}).items())]:
        each.save_checkpoint(str(directory / "deepspeed"), tag="state")
        state_dict = _consolidated_state_dict(each)
        if distributed.is_main():
            save_model_weights(each.module, directory, state_dict=state_dict, tokenizer=tokenizer)
    torch.save(_rng_state(), tmp / f"rng_state_{distributed.rank()}.pt")
    if distributed.is_main():
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _rotate(run_dir, save_total_limit)
    distributed.barrier()
    return final


def save_model_weights(module, directory: Path, *, state_dict: dict | None, tokenizer) -> None:
    """HF-loadable weights; a reward model also writes `value_head.safetensors` beside them."""
    from hpalign.models import (
        ValueHead,
        is_reward_model,
        save_pretrained_weights,
        save_value_head,
        split_reward_state_dict,
    )

    if not is_reward_model(module):
        save_pretrained_weights(module, directory, state_dict=state_dict, tokenizer=tokenizer)
        return
    lm_state, head_state = split_reward_state_dict(state_dict) if state_dict is not None else (None, None)
    save_pretrained_weights(module.lm, directory, state_dict=lm_state, tokenizer=tokenizer)
    head = module.value_head
    if head_state is not None:  # ZeRO-3: the module's own head is partitioned; use the gathered copy
        head = ValueHead(head_state["summary.weight"].shape[1])
        head.load_state_dict(head_state)
    save_value_head(head, directory)


def _rotate(run_dir: Path, save_total_limit: int | None) -> None:
    if not save_total_limit or save_total_limit < 1:
        return
    for old in list_checkpoints(run_dir)[:-save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, path: Path, *, extra_engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore model, optimizer, scheduler (of `engine` and each of `extra_engines`, from the
    sub-folders `save_checkpoint` wrote) and this rank's RNG; return the trainer state."""
    for directory, each in [(path, engine), *((path / name, extra) for name, extra in (extra_engines or {}).items())]:
        load_path, _ = each.load_checkpoint(str(directory / "deepspeed"), tag="state",
                                            load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load the state in {directory / 'deepspeed'}")
    rng_file = path / f"rng_state_{distributed.rank()}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
