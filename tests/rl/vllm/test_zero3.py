"""Under 2-rank ZeRO-3 the weight sync gathers one bucket at a time and every rank's vLLM engine
then samples what HF generate samples from the gathered policy (see zero3_parity_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import two_rank_worker_reports

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_two_rank_zero3_lora_sync_gives_hf_greedy_continuations(tmp_path):
    ranks = two_rank_worker_reports(Path(__file__).with_name("zero3_parity_worker.py"), tmp_path, port=29763,
                                    timeout=900)
    for rank in ranks:
        assert rank["world"] == 2
        assert rank["vllm"] == rank["hf"]
        assert rank["sync"]["weight_sync/buckets"] > 1  # 256 KiB buckets: gathered piecewise
    assert ranks[0]["vllm"] == ranks[1]["vllm"]  # both ranks hold the same updated policy
