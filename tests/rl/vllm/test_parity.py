"""vLLM samples from the trainer's weights: after a training update and a weight sync, its greedy
continuations equal HF generate's token for token, and its sampling log-probs equal the trainer's
own forward (fp32, CPU), for full weights and for LoRA (sent merged). The model ties its LM head to
its input embedding, as SmolLM2 does (the untied layout is tested under ZeRO-3 in test_zero3.py and
end to end in test_e2e.py). One engine serves every test of the module (an in-process engine per
test would cost its start-up each time)."""

from __future__ import annotations

import copy

import pytest
import torch

from hpalign.data.types import TokenizedExample
from hpalign.models import apply_lora
from hpalign.rl.rollout import HFGenerateRollouts, SamplingParams
from hpalign.tiny_model import build_tiny_llama
from hpalign.train.forward import token_stats
from hpalign.train.session import make_collate

PROMPTS = [[5, 6, 7, 8], [40, 41], [100, 101, 102, 103, 104, 105], [200]]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def base_model():
    return build_tiny_llama(seed=0, tie_word_embeddings=True)[0].eval()


@pytest.fixture(scope="module")
def engine(base_model):
    from hpalign.rl.vllm_engine import VLLMRollouts, VLLMSettings

    return VLLMRollouts(base_model, VLLMSettings(max_model_len=512, max_num_seqs=8, bucket_bytes=1 << 20),
                        torch.device("cpu"))


def train_update(model: torch.nn.Module, *, seed: int, lr: float) -> None:
    """One AdamW step on the NLL of random tokens: every trainable weight moves."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (2, 32), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def hf_greedy(model) -> list[list[int]]:
    rollout = HFGenerateRollouts(model, pad_id=0, batch_size=1).generate(
        PROMPTS, SamplingParams(NEW_TOKENS, 0.0), [0] * len(PROMPTS))
    return rollout.response_ids


def vllm_greedy(engine) -> list[list[int]]:
    return engine.generate(PROMPTS, SamplingParams(NEW_TOKENS, 0.0), list(range(len(PROMPTS)))).response_ids


def trainer_logps(model, prompts, responses, temperature: float) -> list[list[float]]:
    examples = [TokenizedExample(p, [r], "x") for p, r in zip(prompts, responses, strict=True)]
    batch = make_collate(pad_id=0, packed=True, max_tokens=None)(examples)
    with torch.no_grad():
        stats = token_stats(model, batch, packed=True, logprob_impl="torch", temperature=temperature)
    matrix = stats.as_matrix(stats.logps_M, max(len(r) for r in responses))
    return [row[:len(r)].tolist() for row, r in zip(matrix, responses, strict=True)]


def assert_sampling_matches(engine, model) -> None:
    sampling = SamplingParams(NEW_TOKENS, 0.8)
    rollout = engine.generate(PROMPTS, sampling, [11, 12, 13, 14])
    expected = trainer_logps(model, PROMPTS, rollout.response_ids, 0.8)
    for got, want in zip(rollout.sampler_logps, expected, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-3, rtol=0)


def test_greedy_and_log_probs_equal_hf_after_an_update_and_a_sync(engine, base_model):
    model = copy.deepcopy(base_model)
    engine.policy_engine = model
    engine.sync_weights()
    before = vllm_greedy(engine)
    assert before == hf_greedy(model)
    train_update(model, seed=0, lr=3e-3)
    report = engine.sync_weights()
    after = vllm_greedy(engine)
    assert after == hf_greedy(model)
    assert after != before  # the update changed the continuations, and vLLM followed
    assert report["weight_sync/bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert report["weight_sync/buckets"] > 1  # 1 MiB buckets over ~12 MiB of weights
    assert_sampling_matches(engine, model)


def test_lora_update_reaches_vllm_merged(engine, base_model):
    model = apply_lora(copy.deepcopy(base_model), targets=["ALL"], rank=4, alpha=16, dropout=0.0)
    torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight, std=0.5)
    engine.policy_engine = model
    engine.sync_weights()
    before = vllm_greedy(engine)
    train_update(model, seed=1, lr=3e-2)
    engine.sync_weights()
    after = vllm_greedy(engine)
    assert after == hf_greedy(model) and after != before
    assert_sampling_matches(engine, model)
    base_weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(base_weight, base_model.model.layers[0].self_attn.q_proj.weight)  # never merged in place


def test_prompts_cached_before_a_sync_are_recomputed_after_it(engine, base_model):
    """Prompts longer than a KV block (128 tokens on a CPU) are prefix-cached; after a sync the cached
    keys and values of the old weights must not be reused."""
    model = copy.deepcopy(base_model)
    engine.policy_engine = model
    engine.sync_weights()
    long_prompts = [list(range(10, 250)), list(range(10, 250)) + [7, 8]]
    greedy = SamplingParams(16, 0.0)
    engine.generate(long_prompts, greedy, [0, 1])  # fills the prefix cache with the old weights' blocks
    train_update(model, seed=2, lr=3e-3)
    engine.sync_weights()
    expected = HFGenerateRollouts(model, pad_id=0, batch_size=1).generate(long_prompts, greedy, [0, 1]).response_ids
    assert engine.generate(long_prompts, greedy, [0, 1]).response_ids == expected


def test_the_trainer_keeps_control_of_its_threads(engine):
    """vLLM's CPU worker replaces torch.set_num_threads with a no-op; the engine puts it back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
