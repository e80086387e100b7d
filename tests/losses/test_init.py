"""The losses package: re-exports resolve and importing it pulls in torch only."""

from __future__ import annotations

import subprocess
import sys

import hpalign.losses as losses


def test_all_names_resolve() -> None:
    for name in losses.__all__:
        assert callable(getattr(losses, name)) or name == "DPO_LOSS_TYPES", name
    assert set(losses.DPO_LOSS_TYPES) == {"sigmoid", "ipo", "hinge"}


def test_import_pulls_no_heavy_dependency() -> None:
    code = (
        "import sys, hpalign.losses\n"
        "heavy = {'deepspeed', 'transformers', 'peft', 'vllm', 'flash_attn', 'datasets'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
