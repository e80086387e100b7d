import pytest
import torch

from hpalign.algorithms import ALGORITHMS, get_algorithm
from hpalign.hyperparams import DPOParams
from hpalign.stats import SequenceStats, StepCounts


def test_every_algorithm_has_an_objective_and_a_data_kind():
    for algorithm in ALGORITHMS.values():
        assert callable(algorithm.objective) and algorithm.data_kind in ("pair", "kto", "sft")


def test_ppo_points_to_the_rollout_loop():
    with pytest.raises(ValueError, match="rollout loop"):
        get_algorithm("ppo")


def test_dpo_objective_splits_into_global_shares():
    """Two micro-batches, each divided by the step's global counts, sum to the one-batch loss."""
    cfg = DPOParams(beta=0.1, rpo_alpha=0.5)
    policy = SequenceStats(logps_ER=torch.tensor([[-3.0, -5.0], [-4.0, -2.0]]), num_tokens_ER=torch.ones(2, 2) * 3)
    reference = SequenceStats(logps_ER=torch.tensor([[-4.0, -4.0], [-4.0, -4.0]]), num_tokens_ER=torch.ones(2, 2) * 3)
    counts = StepCounts(num_examples=2.0, num_tokens=12.0, num_chosen_tokens=6.0)
    whole, _ = get_algorithm("dpo").objective(policy, reference, counts, cfg)
    parts = [get_algorithm("dpo").objective(
        SequenceStats(policy.logps_ER[i:i + 1], policy.num_tokens_ER[i:i + 1]),
        SequenceStats(reference.logps_ER[i:i + 1], reference.num_tokens_ER[i:i + 1]), counts, cfg)[0]
        for i in range(2)]
    torch.testing.assert_close(whole, parts[0] + parts[1])
    # by hand: h = (pc - pr) - (rc - rr) = 2 and -2; sigmoid loss -log sigmoid(0.1 h); NLL = 7 / 6 tokens
    expected = (-torch.nn.functional.logsigmoid(torch.tensor(0.2)) - torch.nn.functional.logsigmoid(torch.tensor(-0.2))) / 2
    torch.testing.assert_close(whole, expected + 0.5 * 7.0 / 6.0)
