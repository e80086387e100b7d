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
