#!/usr/bin/env python
"""Thin entry that the deepspeed launcher runs: `deepspeed launch/train.py --rlhf_type dpo ...`.

Takes the flags of `hpalign rlhf` (no subcommand), drops the `--local_rank` the launcher appends,
and follows the same path: parse_config -> resolve_defaults -> validate -> hpalign.train.run.
Works from a plain checkout: the repository root goes on sys.path.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from hpalign.cli import launch_main  # noqa: E402 - needs the sys.path line above

if __name__ == "__main__":
    raise SystemExit(launch_main(sys.argv[1:]))
