"""ZeRO-3 loading (`hpalign.models.partitioned_loading`): on 2 CPU ranks a model read from a
directory, its frozen reference and the in-memory tiny-random-llama are created partitioned (every
parameter a ZeRO-3 parameter with no local elements, each rank holding half) before any
deepspeed.initialize, the gathered weights are the checkpoint's, and LoRA over it trains."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hpalign.tiny_model import build_tiny_llama
from tests.train.conftest import two_rank_worker_reports

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    out = tmp_path_factory.mktemp("partitioned")
    model, tokenizer = build_tiny_llama(seed=0, tie_word_embeddings=True)  # tied, as SmolLM2
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return two_rank_worker_reports(Path(__file__).with_name("partitioned_worker.py"), out, port=29771)


def _assert_half_each(reports: list[dict], *, full_numel: int) -> None:
    for report in reports:
        assert report["all_partitioned"], report
        assert report["full_numel"] == full_numel
        # each rank keeps its half (ZeRO pads each parameter to a multiple of the world size)
        assert full_numel / 2 <= report["local_numel"] <= full_numel / 2 + report["num_params"]


def test_directory_model_is_loaded_partitioned_with_the_checkpoint_weights(ranks):
    assert [r["world"] for r in ranks] == [2, 2]
    _assert_half_each([r["policy"] for r in ranks], full_numel=ranks[0]["saved_numel"])
    for rank in ranks:
        assert rank["tied"]  # the tied LM head is still the embedding, one partitioned parameter
        assert rank["policy_max_diff"] == 0.0
        # the HfDeepSpeedConfig lives only for the load: later generate() calls are unaffected
        assert rank["zero3_flag_left_on"] is False


def test_full_fine_tune_reference_is_loaded_partitioned_and_frozen(ranks):
    _assert_half_each([r["reference"] for r in ranks], full_numel=ranks[0]["saved_numel"])
    assert all(r["reference"]["frozen"] for r in ranks)


def test_in_memory_tiny_model_is_partitioned_with_its_seeded_weights(ranks):
    full = sum(p.numel() for p in build_tiny_llama(seed=0)[0].parameters())
    _assert_half_each([r["tiny"] for r in ranks], full_numel=full)
    assert all(r["tiny_max_diff"] == 0.0 for r in ranks)


def test_lora_over_a_partitioned_model_trains(ranks):
    for rank in ranks:
        lora = rank["lora"]
        assert lora["adapter_plain"] and lora["base_partitioned"]  # peft added plain adapters to a zero.Init model
        assert lora["loss_gap"] < 1e-5, lora  # B = 0: the adapted model is the loaded one
        assert lora["loss_after"] < lora["loss_before"], lora
