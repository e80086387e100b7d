"""The rollout interface's HF backend: sampler log-probs, stop tokens, seeding, chunk invariance."""

from __future__ import annotations

import pytest
import torch

from hpalign.rl.rollout import HFGenerateRollouts, SamplingParams, cut_at_stop, left_padded
from hpalign.tiny_model import build_tiny_llama

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [3, 4]]


@pytest.fixture(scope="module")
def model():
    model, _ = build_tiny_llama(seed=0)
    return model.eval()


def test_cut_at_stop_keeps_the_stop_token():
    assert cut_at_stop([4, 5, 9, 7], (9,)) == (3, True)
    assert cut_at_stop([4, 5, 7], (9,)) == (3, False)
    assert cut_at_stop([4, 5], ()) == (2, False)


def test_left_padded():
    ids, mask = left_padded([[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]


def test_sampler_logps_are_the_tempered_log_probs_of_the_sampled_tokens(model):
    rollout = HFGenerateRollouts(model, pad_id=0, batch_size=2).generate(
        PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.7), seeds=[1, 2, 3])
    assert [len(r) for r in rollout.response_ids] == [6, 6, 6] and rollout.stopped == [False] * 3
    for prompt, response, logps in zip(PROMPTS, rollout.response_ids, rollout.sampler_logps, strict=True):
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(logps), expected, atol=1e-4, rtol=1e-4)


def test_stop_ids_end_responses(model):
    engine = HFGenerateRollouts(model, pad_id=0, batch_size=3)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0), seeds=[1, 2, 3])
    stop = free.response_ids[0][2]  # a token the first row samples third: with the same seed it stops there
    stopped = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, stop_ids=(stop,)),
                              seeds=[1, 2, 3])
    first = free.response_ids[0].index(stop) + 1
    assert stopped.response_ids[0] == free.response_ids[0][:first] and stopped.stopped[0]
    for row, free_row in zip(stopped.response_ids, free.response_ids, strict=True):
        assert stop not in row[:-1] and free_row[:len(row)] == row  # cut after the first stop, else as sampled


def test_seeded_per_prompt_so_chunking_does_not_change_samples(model):
    sampling = SamplingParams(max_new_tokens=5, temperature=1.0)
    one_by_one = HFGenerateRollouts(model, pad_id=0, batch_size=1).generate(PROMPTS, sampling, seeds=[7, 8, 9])
    again = HFGenerateRollouts(model, pad_id=0, batch_size=1).generate(PROMPTS, sampling, seeds=[7, 8, 9])
    assert one_by_one.response_ids == again.response_ids
    alone = HFGenerateRollouts(model, pad_id=0, batch_size=1).generate(PROMPTS[1:], sampling, seeds=[8, 9])
    assert alone.response_ids == one_by_one.response_ids[1:]  # another rank holding prompts 1, 2 samples the same
    other = HFGenerateRollouts(model, pad_id=0, batch_size=1).generate(PROMPTS, sampling, seeds=[1, 8, 9])
    assert other.response_ids[0] != one_by_one.response_ids[0]


def test_generation_leaves_the_global_rng_alone(model):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    HFGenerateRollouts(model, pad_id=0, batch_size=2).generate(PROMPTS, SamplingParams(4, 1.0), seeds=[1, 2, 3])
    torch.testing.assert_close(torch.rand(3), expected)


def assert_sampler_logps_match_a_forward(model, rollout, temperature):
    for prompt, response, logps in zip(PROMPTS, rollout.response_ids, rollout.sampler_logps, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1] / temperature
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(logps), expected, atol=1e-4, rtol=1e-4)


def test_the_models_generation_config_does_not_change_the_sampling_distribution():
    model, _ = build_tiny_llama(seed=0)
    model.eval().generation_config.repetition_penalty = 5.0  # would reshape every step's distribution
    model.generation_config.no_repeat_ngram_size = 1
    rollout = HFGenerateRollouts(model, pad_id=0, batch_size=3).generate(
        PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0), seeds=[1, 2, 3])
    assert_sampler_logps_match_a_forward(model, rollout, 1.0)
    assert any(len(set(r)) < len(r) for r in rollout.response_ids)  # tokens repeat: no n-gram ban applied
    assert model.generation_config.repetition_penalty == 5.0  # set back


def lora_policy(seed=0):
    from hpalign.models import apply_lora

    model, _ = build_tiny_llama(seed=seed)
    peft_model = apply_lora(model, targets=["ALL"], rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return peft_model.eval()


def test_lora_merged_computes_the_adapter_and_restores_the_base_weights_bit_for_bit():
    from hpalign.models.lora import lora_merged, merged_lora_bytes

    policy = lora_policy()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    grads = {n: p.requires_grad for n, p in policy.named_parameters()}
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        adapter_logits = policy(ids).logits
        with lora_merged(policy) as merged:
            merged_logits = policy(ids).logits
            changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    from peft.tuners.lora import Linear as LoraLinear

    assert merged == sum(isinstance(m, LoraLinear) for m in policy.modules()) > 0 and merged_lora_bytes(policy) > 0
    assert changed and all("base_layer" in n for n in changed)  # inside: base weights hold W + BA
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == grads
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, adapter_logits, atol=0, rtol=0)  # adapter branch back on


def test_lora_rollouts_sample_through_merged_weights_the_same_distribution(caplog):
    from hpalign.rl.rollout import merge_lora_decision

    policy = lora_policy()
    assert merge_lora_decision(policy, torch.device("cpu"))[0]
    assert not merge_lora_decision(build_tiny_llama(seed=0)[0], torch.device("cpu"))[0]  # no adapter
    with caplog.at_level("INFO", logger="hpalign"):
        rollout = HFGenerateRollouts(policy, pad_id=0, batch_size=2).generate(
            PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.7), seeds=[1, 2, 3])
    assert "rollouts: LoRA merged" in caplog.text
    assert_sampler_logps_match_a_forward(policy, rollout, 0.7)  # the adapter path's distribution
