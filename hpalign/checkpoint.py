"""Checkpoints: HF-loadable weights + full trainer state, written atomically.

Layout of `run_dir/checkpoint-<step>/`:
  adapter_model.safetensors + adapter_config.json   (LoRA)   or   model.safetensors + config.json (full)
  tokenizer files, value_head.safetensors (RM / PPO value model)
  trainer_state.json   global step, epoch, data position, config digest
  rng_state_<rank>.safetensors  python (JSON metadata) / torch / CUDA RNG per rank: no pickle
  deepspeed/           DeepSpeed's own optimizer + scheduler + (partitioned) model state, for resume:
                       trainable parameters only (a LoRA run's frozen base is --model's, reloaded)

Everything is written into `run_dir/.tmp-checkpoint-<step>` and renamed into place only when complete,
so a run killed mid-save leaves the previous checkpoint intact (and at most a .tmp folder that the
next save removes). `save_total_limit` keeps the newest N. Multi-node runs need `output_dir` on a
shared file system, as DeepSpeed itself does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hpalign import distributed

logger = logging.getLogger("hpalign")

STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if _CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=checkpoint_step)


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


def checkpoint_step(path: Path) -> int:
    return int(_CHECKPOINT_RE.match(path.name).group(1))


def latest_run_dir(output_dir: Path, rlhf_type: str) -> Path:
    """For `--resume_from_checkpoint latest` without `--run_name` (whose default name is a new time
    stamp): the run directory under `output_dir`, among runs of `rlhf_type`, whose newest complete
    checkpoint was written last."""
    candidates = []
    for run in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        found = list_checkpoints(run) if run.is_dir() else []
        if found and json.loads((found[-1] / STATE_FILE).read_text()).get("rlhf_type") == rlhf_type:
            candidates.append(((found[-1] / STATE_FILE).stat().st_mtime, run))
    if not candidates:
        raise ValueError(f"--resume_from_checkpoint latest: no run directory under {output_dir} holds a complete "
                         f"{rlhf_type} checkpoint; pass --run_name, or a checkpoint folder")
    return max(candidates)[1]


def set_aside_later_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Resuming from checkpoint-<step> abandons the checkpoints written after it (they belong to the
    run's previous continuation): they move to `run_dir/superseded/<name>`, so that `latest` and
    `save_total_limit` see only this continuation's (rotation would otherwise delete the new
    checkpoints first and keep the stale later ones). Main process only."""
    later = [path for path in list_checkpoints(run_dir) if checkpoint_step(path) > step]
    for path in later:
        target = run_dir / "superseded" / path.name
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
    return later


# What decides each step's examples: resuming with other values would silently change the data order.
PLAN_KEYS = ("num_examples", "micro_batch_size", "accumulation", "world_size", "seed")


def plan_state(plan, seed: int) -> dict[str, Any]:
    """What a checkpoint records of the run's batch plan (a `train.schedule.BatchPlan`) and data seed."""
    return {**dataclasses.asdict(plan), "seed": seed}


def check_same_plan(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """ValueError naming every value of the batch plan that differs from the checkpoint's."""
    changed = [f"{key} {saved[key]} -> {current[key]}" for key in PLAN_KEYS
               if key in saved and key in current and saved[key] != current[key]]
    if changed:
        raise ValueError(
            f"--resume_from_checkpoint {path}: the data schedule changed ({', '.join(changed)}; world_size counts "
            "data-parallel ranks, micro_batch_size is --batch_size, accumulation --gradient_accumulation_steps). "
            "Each step's examples and their order follow from these, so the run would not continue where it "
            "stopped: resume with the checkpoint's values, or start a new run from its weights")


def drop_records_after(path: Path, step: int) -> int:
    """Keep the JSON lines of `path` whose `step` is at most `step` (a run resumed from checkpoint-<step>
    logs the later steps again); returns how many were dropped."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


# Files a run appends one JSON line per logged step to: rewound to the checkpoint on resume.
STEP_LOGS = ("metrics.jsonl", "samples.jsonl")


def prepare_resume(spec: str, run_dir: Path, plan: dict[str, Any]) -> Path:
    """The checkpoint `--resume_from_checkpoint spec` names, once it is known that this run can
    continue it exactly (same batch `plan`, see `check_same_plan`); the run directory is rewound to it
    (later checkpoints set aside, later log lines dropped). A collective: every rank calls it."""
    path = resolve_resume_path(spec, run_dir)
    state = json.loads((path / STATE_FILE).read_text())
    check_same_plan(path, state.get("plan", {}), plan)
    if distributed.is_main():
        step = int(state["global_step"])
        moved = set_aside_later_checkpoints(path.parent, step)
        if moved:
            logger.warning("resuming from %s: the later %s moved to %s (they belong to the run's previous "
                           "continuation)", path.name, ", ".join(p.name for p in moved), path.parent / "superseded")
        for name in STEP_LOGS:
            dropped = drop_records_after(path.parent / name, step)
            if dropped:
                logger.info("resuming from %s: dropped %d lines of %s logged after step %d", path.name, dropped,
                            name, step)
    distributed.barrier()
    return path


def _consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3, what the HF weights are written from, on rank 0 (a collective: every rank
    calls it): a LoRA model's trainable parameters alone (adapter, value head), gathered in one
    go, the frozen base never; a full model's state dict, gathered one layer at a time. None
    (other stages) means 'use the module's own'."""
    if engine.zero_optimization_stage() != 3:
        return None
    if not _has_adapter(engine.module):
        return engine._zero3_consolidated_16bit_state_dict()
    import deepspeed

    trainable = [(name, param) for name, param in engine.module.named_parameters() if param.requires_grad]
    with deepspeed.zero.GatheredParameters([param for _, param in trainable], modifier_rank=None):
        if not distributed.is_main():
            return None
        # clone: the gathered tensors are freed when the context exits
        return {name: param.detach().to("cpu", copy=True) for name, param in trainable}


def _has_adapter(module: torch.nn.Module) -> bool:
    """A LoRA policy, or a reward / value model whose LM carries a LoRA adapter."""
    from hpalign.models import is_peft_model, is_reward_model

    return is_peft_model(module.lm if is_reward_model(module) else module)


@contextlib.contextmanager
def _frozen_parameters_left_out(module: torch.nn.Module) -> Iterator[None]:
    """While inside, `module.state_dict()` holds no frozen parameter. DeepSpeed's
    `exclude_frozen_parameters` drops a frozen parameter by its first name only, so a tied alias
    (SmolLM2's `lm_head.weight`, the embedding matrix) would still carry the frozen tensor."""
    frozen = {name for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad}

    def drop_frozen(_module, state_dict, prefix, _local_metadata) -> None:
        for name in frozen:
            state_dict.pop(prefix + name, None)

    handle = module.register_state_dict_post_hook(drop_frozen)
    try:
        yield
    finally:
        handle.remove()


def _load_trainable_state(*, src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's `custom_load_fn` for a state saved without frozen parameters (they are
    `--model`'s own, rebuilt as they were): every other key must be there, and nothing else."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {name for name, param in dst.named_parameters(remove_duplicate=False) if not param.requires_grad}
    missing = [key for key in result.missing_keys if key not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(f"the checkpoint's DeepSpeed state does not fit this model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}; resume with the --model, --sft_type and "
                         "LoRA flags the checkpoint was trained with")


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
        # Frozen parameters never change: they are left out of DeepSpeed's state (a LoRA run's base
        # model) and rebuilt from --model on resume.
        with _frozen_parameters_left_out(each.module):
            each.save_checkpoint(str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        state_dict = _consolidated_state_dict(each)
        if distributed.is_main():
            save_model_weights(each.module, directory, state_dict=state_dict, tokenizer=tokenizer)
    save_rng_state(rng_file(tmp, distributed.rank()))
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
    rng_path = rng_file(path, distributed.rank())
    if not rng_path.exists() and not rng_path.with_suffix(".pt").exists():  # a file lost in a copy
        raise ValueError(f"--resume_from_checkpoint {path}: {rng_path.name} is missing, so rank "
                         f"{distributed.rank()} cannot continue the run's random streams (dropout, sampling) "
                         "exactly; resume with the world size the checkpoint was written with, or copy the file")
    for directory, each in [(path, engine), *((path / name, extra) for name, extra in (extra_engines or {}).items())]:
        load_path, _ = each.load_checkpoint(str(directory / "deepspeed"), tag="state",
                                            load_optimizer_states=True, load_lr_scheduler_states=True,
                                            custom_load_fn=_load_trainable_state)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load the state in {directory / 'deepspeed'}")
    load_rng_state(rng_path)
    return json.loads((path / STATE_FILE).read_text())


def rng_file(directory: Path, rank: int) -> Path:
    return directory / f"rng_state_{rank}.safetensors"


def save_rng_state(path: Path) -> None:
    """This process's python and torch (and CUDA) generators: tensors in safetensors, python's
    state as JSON in its metadata. No pickle: loading it cannot run code."""
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path), metadata={"python": json.dumps(random.getstate())})


def load_rng_state(path: Path) -> None:
    from safetensors import safe_open

    if not path.exists():  # written by hpalign before 2026-12: a torch.save of plain containers
        state = torch.load(path.with_suffix(".pt"), weights_only=True)
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        return
    with safe_open(str(path), framework="pt") as handle:
        python_state = json.loads(handle.metadata()["python"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
