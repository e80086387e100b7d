"""`hpalign` console entry: `hpalign rlhf|sft|config [flags]` and `python -m hpalign`.

`hpalign rlhf` is the seed document's `swift rlhf`: the same flags, the same env-var DDP style
(`NPROC_PER_NODE`, `MASTER_PORT`), which re-launches through the deepspeed launcher running
`launch/train.py`. Both paths end in `build_config` -> `hpalign.train.run`.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hpalign
from hpalign.cli_args import parse_config, strip_local_rank
from hpalign.config import Config, dump_config, resolve_defaults, validate

USAGE = """\
usage: hpalign <command> [flags]

commands:
  rlhf     train: --rlhf_type dpo|kto|cpo|orpo|simpo|rm|sft|ppo|grpo|rloo|reinforce_pp and the `swift rlhf` flags
  sft      supervised fine-tuning (= hpalign rlhf --rlhf_type sft)
  config   --show [flags]: print the resolved configuration as YAML
  score    --checkpoint DIR --dataset FILE: a reward model's accuracy and mean rewards on pairs
  export   --checkpoint DIR --seq_cls --output OUT: a reward model as an HF sequence-classification model

`hpalign <command> --help` lists every flag. Set HPALIGN_DEBUG=1 for tracebacks on errors."""

DEFAULT_MASTER_PORT = "29500"


def build_config(argv: Sequence[str], *, prog: str = "hpalign rlhf",
                 forced: Mapping[str, Any] | None = None) -> Config:
    """Flags -> resolved, validated Config (the one code path of `hpalign rlhf` and launch/train.py)."""
    cfg = resolve_defaults(parse_config(argv, prog=prog, forced=forced))
    validate(cfg)
    return cfg


def run_training(cfg: Config) -> int:
    """Hand a resolved, validated Config to the trainer; its None means success."""
    from hpalign.train import run  # heavy (torch, deepspeed): imported only when training

    code = run(cfg)
    return 0 if code is None else int(code)


def launch_entry() -> Path:
    """launch/train.py beside the package (present in a source checkout / editable install)."""
    return Path(hpalign.__file__).resolve().parents[1] / "launch" / "train.py"


def _nproc(env: Mapping[str, str]) -> int:
    raw = env.get("NPROC_PER_NODE", "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"NPROC_PER_NODE={raw!r} must be a positive integer (processes on this node).")
    return int(raw)


def _device_selection(nproc: int, env: Mapping[str, str]) -> list[str]:
    # The deepspeed launcher ignores CUDA_VISIBLE_DEVICES once --num_gpus is given, so the
    # document's CUDA_VISIBLE_DEVICES=... NPROC_PER_NODE=N becomes --include localhost:<first N>.
    visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return ["--num_gpus", str(nproc)]
    if nproc > len(visible):
        raise ValueError(f"NPROC_PER_NODE={nproc} but CUDA_VISIBLE_DEVICES lists only {len(visible)} "
                         f"device(s) ({','.join(visible)}); lower NPROC_PER_NODE or list more devices.")
    return ["--include", "localhost:" + ",".join(visible[:nproc])]


def ddp_relaunch_command(argv: Sequence[str], env: Mapping[str, str], *,
                         entry: Path | None = None) -> list[str] | None:
    """The deepspeed launcher command that runs `argv` on NPROC_PER_NODE processes, or None.

    None when NPROC_PER_NODE is unset or 1, or when already under a launcher (LOCAL_RANK or RANK
    set). `argv` is the flags only (no subcommand); `entry` defaults to `launch_entry()`.
    """
    nproc = _nproc(env)
    if nproc <= 1 or "LOCAL_RANK" in env or "RANK" in env:
        return None
    entry = launch_entry() if entry is None else entry
    if not entry.is_file():
        raise ValueError(f"NPROC_PER_NODE={nproc} re-launches through {entry}, which is missing (a non-editable "
                         "install?). Install from a checkout with `pip install -e .`, or run "
                         "`deepspeed launch/train.py <flags>` from the repository.")
    port = env.get("MASTER_PORT", "").strip() or DEFAULT_MASTER_PORT
    return ["deepspeed", *_device_selection(nproc, env), "--master_port", port, str(entry), *argv]


def _relaunch(command: list[str]) -> int:
    print(f"hpalign: launching {' '.join(command)}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(command, check=False).returncode
    except FileNotFoundError:
        raise ValueError("NPROC_PER_NODE needs the `deepspeed` launcher on PATH; "
                         "`pip install deepspeed` or activate the environment that has it.") from None


def _train_command(argv: list[str], *, prog: str, forced: Mapping[str, Any] | None = None) -> int:
    cfg = build_config(argv, prog=prog, forced=forced)
    forced_flags = [token for name, value in (forced or {}).items() for token in (f"--{name}", str(value))]
    command = ddp_relaunch_command([*forced_flags, *argv], os.environ)
    return _relaunch(command) if command else run_training(cfg)


def cmd_rlhf(argv: list[str]) -> int:
    return _train_command(argv, prog="hpalign rlhf")


def cmd_sft(argv: list[str]) -> int:
    return _train_command(argv, prog="hpalign sft", forced={"rlhf_type": "sft"})


def cmd_config(argv: list[str]) -> int:
    """Print the resolved, validated configuration as YAML (`--show` is accepted and optional)."""
    cfg = build_config([a for a in argv if a != "--show"], prog="hpalign config --show")
    sys.stdout.write(dump_config(cfg))
    return 0


def cmd_score(argv: list[str]) -> int:
    """Score preference pairs with a reward-model checkpoint (see `hpalign.score`)."""
    from hpalign import score  # heavy (torch, transformers): imported only when scoring

    return score.main(argv)


def cmd_export(argv: list[str]) -> int:
    """Export a reward-model checkpoint for other tools (see `hpalign.export`)."""
    from hpalign import export  # heavy (torch, transformers, peft): imported only when exporting

    return export.main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"rlhf": cmd_rlhf, "sft": cmd_sft, "config": cmd_config,
                                                   "score": cmd_score, "export": cmd_export}


def _guarded(name: str, fn: Callable[[], int]) -> int:
    """Run `fn`; a user error (ValueError) prints one line and returns 2, argparse exits return their code."""
    try:
        return fn()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except ValueError as exc:
        if os.environ.get("HPALIGN_DEBUG"):
            raise
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """`hpalign <command> [flags]`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"hpalign {hpalign.__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean `hpalign {close[0]}`?" if close else ""
        print(f"hpalign: error: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    return _guarded(f"hpalign {command}", lambda: COMMANDS[command](rest))


def launch_main(argv: Sequence[str] | None = None) -> int:
    """Entry of `deepspeed launch/train.py <flags>`: drop --local_rank, then train (no re-launch)."""
    args = list(sys.argv[1:] if argv is None else argv)

    def train() -> int:
        flags, local_rank = strip_local_rank(args)
        if local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(local_rank))
        return run_training(build_config(flags, prog="launch/train.py"))

    return _guarded("launch/train.py", train)
