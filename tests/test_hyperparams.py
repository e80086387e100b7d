"""The per-algorithm hyper-parameter dataclasses: one source of names and defaults, flags that exist,
and a warning for every flag the chosen algorithm does not read."""

import dataclasses

import pytest

from hpalign.algorithms import ALGORITHMS
from hpalign.cli import build_config
from hpalign.config import RLHF_TYPES, AlgorithmConfig, unused_flag_warnings
from hpalign.hyperparams import HYPERPARAMS, ROLLOUT_TYPES, DPOParams, make_params, param_names


def test_every_algorithm_of_the_table_owns_a_dataclass_whose_fields_are_flags():
    flags = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    assert set(ALGORITHMS) | set(ROLLOUT_TYPES) == set(HYPERPARAMS) == set(RLHF_TYPES)
    assert not set(ALGORITHMS) & set(ROLLOUT_TYPES)  # the offline table and the rollout loop do not overlap
    for name, algorithm in ALGORITHMS.items():
        assert algorithm.params is HYPERPARAMS[name]
        assert set(param_names(name)) <= flags, name


@pytest.mark.parametrize(("rlhf_type", "expected"), [
    ("dpo", {"beta": 0.1, "rpo_alpha": 1.0, "loss_type": "sigmoid", "label_smoothing": 0.0, "cpo_alpha": None}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 1.0, "rpo_alpha": None}),
    ("kto", {"beta": 0.1, "desirable_weight": 1.0, "label_smoothing": None}),
    ("rm", {"beta": None, "center_rewards_coefficient": 0.0}),
])
def test_resolved_flags_carry_only_the_algorithms_own_defaults(rlhf_type, expected):
    cfg = build_config(["--rlhf_type", rlhf_type])
    assert {name: getattr(cfg.algorithm, name) for name in expected} == expected
    assert make_params(rlhf_type, cfg.algorithm) == HYPERPARAMS[rlhf_type]()


def test_a_given_value_reaches_the_algorithms_params():
    cfg = build_config(["--rlhf_type", "dpo", "--beta", "0.3", "--loss_type", "ipo"])
    assert make_params("dpo", cfg.algorithm) == DPOParams(beta=0.3, loss_type="ipo")


@pytest.mark.parametrize(("argv", "needs_reference", "flagged"), [
    (["--rlhf_type", "cpo", "--loss_type", "hinge"], False, ["loss_type"]),
    (["--rlhf_type", "kto", "--label_smoothing", "0.1"], True, ["label_smoothing"]),
    (["--rlhf_type", "dpo", "--kl_coef", "0.1", "--cliprange", "0.3"], True, ["cliprange", "kl_coef"]),
    (["--rlhf_type", "orpo", "--precompute_ref_log_probs", "true"], False, ["precompute_ref_log_probs"]),
    (["--rlhf_type", "dpo", "--beta", "0.2", "--rpo_alpha", "0", "--precompute_ref_log_probs", "true"], True, []),
    (["--rlhf_type", "simpo", "--cpo_alpha", "0", "--simpo_gamma", "0.5"], False, []),
    (["--rlhf_type", "grpo", "--kl_coef", "0.1", "--num_ppo_epochs", "2", "--kl_estimator", "k3"], True,
     ["kl_coef", "kl_estimator", "num_ppo_epochs"]),  # GRPO's counterparts: --beta, --num_iterations; k3 always
    (["--rlhf_type", "rloo", "--kl_estimator", "k3", "--num_iterations", "2", "--temperature", "1.0"], True, []),
    (["--rlhf_type", "ppo", "--num_generations", "4", "--epsilon", "0.3"], True, ["epsilon", "num_generations"]),
    (["--rlhf_type", "dpo", "--num_generations", "4", "--rollout_engine", "vllm"], True,
     ["num_generations", "rollout_engine"]),
])
def test_a_flag_the_algorithm_does_not_read_is_named_in_a_warning(argv, needs_reference, flagged):
    warnings = unused_flag_warnings(build_config(argv), needs_reference=needs_reference)
    assert [w.split()[0][2:] for w in warnings] == flagged
    for warning in warnings:
        assert f"--rlhf_type {argv[1]} does not use it" in warning
