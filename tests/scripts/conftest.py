"""Loading scripts/gpu_check.py and its sibling gpu_check_results.py as `python scripts/gpu_check.py`
does: with scripts/ on sys.path, so that both tests and script share one gpu_check_results module."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def gc():
    sys.path.insert(0, str(SCRIPTS))  # what running it as a script puts first; gone once it has loaded
    try:
        return load("gpu_check", SCRIPTS / "gpu_check.py")
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="session")
def results(gc):
    return importlib.import_module("gpu_check_results")  # the very module gpu_check imported


def make_ctx(gc, tmp_path: Path, *, smollm2: bool = False):
    return gc.Context(out=tmp_path / "out", work=tmp_path / "work", python="/py/bin/python3", smollm2_installed=smollm2)
