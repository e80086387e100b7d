"""The algorithm table: name -> objective, data kind, whether it needs a reference model, defaults.

An objective turns per-sequence statistics of one micro-batch into (loss, metrics). Both are
contributions already divided by the GLOBAL count of the optimizer step (examples or tokens, summed
over micro-batches and ranks: `StepCounts`), so summing them over micro-batches and ranks gives
exactly the big-batch value (STYLE.md: normalise once per optimizer step). The maths lives in
`hpalign.losses`; this file only wires tensors to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpalign import hyperparams as hp
from hpalign import losses
from hpalign.stats import SequenceStats, StepCounts

Metrics = dict[str, torch.Tensor]
# (policy stats, reference stats or None, the step's global counts, the algorithm's hyper-parameters:
# an instance of its dataclass in hpalign.hyperparams) -> (loss, metrics)
Objective = Callable[[SequenceStats, "SequenceStats | None", StepCounts, object], tuple[torch.Tensor, Metrics]]


def _per_example(metrics_B: Metrics, counts: StepCounts) -> Metrics:
    return {name: values.sum() / counts.num_examples for name, values in metrics_B.items()}


def _with_chosen_nll(loss: torch.Tensor, metrics: Metrics, policy: SequenceStats, counts: StepCounts,
                     weight: float) -> tuple[torch.Tensor, Metrics]:
    """Add weight * token-mean NLL of the chosen answers (DPO's rpo_alpha, CPO/SimPO/ORPO's NLL)."""
    nll = losses.rpo_nll_sum(policy.logps_ER[:, 0]).sum() / counts.num_chosen_tokens
    metrics["nll_loss"] = nll.detach()
    return (loss + weight * nll if weight else loss), metrics


def dpo_objective(policy, reference, counts, params):
    losses_B, metrics_B = losses.dpo_losses(
        policy.logps_ER[:, 0], policy.logps_ER[:, 1], reference.logps_ER[:, 0], reference.logps_ER[:, 1],
        beta=params.beta, loss_type=params.loss_type, label_smoothing=params.label_smoothing)
    loss = losses_B.sum() / counts.num_examples
    return _with_chosen_nll(loss, _per_example(metrics_B, counts), policy, counts, params.rpo_alpha)


def cpo_objective(policy, reference, counts, params):
    losses_B, metrics_B = losses.cpo_losses(
        policy.logps_ER[:, 0], policy.logps_ER[:, 1], beta=params.beta, label_smoothing=params.label_smoothing)
    loss = losses_B.sum() / counts.num_examples
    return _with_chosen_nll(loss, _per_example(metrics_B, counts), policy, counts, params.cpo_alpha)


def simpo_objective(policy, reference, counts, params):
    mean_ER = policy.mean_logps_ER
    losses_B, metrics_B = losses.simpo_losses(
        mean_ER[:, 0], mean_ER[:, 1], beta=params.beta, gamma=params.simpo_gamma,
        label_smoothing=params.label_smoothing)
    loss = losses_B.sum() / counts.num_examples
    return _with_chosen_nll(loss, _per_example(metrics_B, counts), policy, counts, params.cpo_alpha)


def orpo_objective(policy, reference, counts, params):
    mean_ER = policy.mean_logps_ER
    losses_B, metrics_B = losses.orpo_losses(mean_ER[:, 0], mean_ER[:, 1], beta=params.beta)
    loss = losses_B.sum() / counts.num_examples
    return _with_chosen_nll(loss, _per_example(metrics_B, counts), policy, counts, 1.0)


def kto_objective(policy, reference, counts, params):
    losses_B, metrics_B = losses.kto_losses(
        policy.logps_ER[:, 0], reference.logps_ER[:, 0], counts.kl_reference_point, policy.labels_E,
        beta=params.beta, desirable_weight=params.desirable_weight, undesirable_weight=params.undesirable_weight)
    loss = losses_B.sum() / counts.num_examples
    per_label = {"chosen": max(counts.num_desirable, 1.0), "rejected": max(counts.num_undesirable, 1.0)}
    metrics = {}
    for name, values in metrics_B.items():
        if name.startswith("count/"):
            continue
        label = name.rsplit("/", 1)[-1]
        denominator = per_label.get(label, counts.num_examples)  # "kl" is averaged over every example
        metrics[name] = values.sum() / denominator
    return loss, metrics


def reward_objective(policy, reference, counts, params):
    rewards_ER = policy.rewards_ER
    losses_B, metrics_B = losses.reward_losses(
        rewards_ER[:, 0], rewards_ER[:, 1], margins_B=policy.margins_E,
        center_rewards_coefficient=params.center_rewards_coefficient)
    return losses_B.sum() / counts.num_examples, _per_example(metrics_B, counts)


def sft_objective(policy, reference, counts, params):
    nll = -policy.logps_ER.sum() / counts.num_tokens
    return nll, {"nll_loss": nll.detach()}


@dataclass(frozen=True)
class Algorithm:
    name: str
    objective: Objective
    data_kind: str  # "pair" | "kto" | "sft"
    needs_reference: bool
    paper: str
    forward: str = "logps"  # "logps": response log-probs; "reward": value-head score of the last token
    estimates_kl: bool = False  # KTO: z0 from mismatched (prompt, completion) pairs of the global batch
    generates: bool = True  # the held-out task metric needs a generative model

    @property
    def params(self) -> type:
        """Its hyper-parameters' dataclass (hpalign.hyperparams): their names and defaults."""
        return hp.HYPERPARAMS[self.name]


ALGORITHMS: dict[str, Algorithm] = {
    "dpo": Algorithm("dpo", dpo_objective, "pair", True, "arXiv 2305.18290"),
    "cpo": Algorithm("cpo", cpo_objective, "pair", False, "arXiv 2401.08417"),
    "simpo": Algorithm("simpo", simpo_objective, "pair", False, "arXiv 2405.14734"),
    "orpo": Algorithm("orpo", orpo_objective, "pair", False, "arXiv 2403.07691"),
    "sft": Algorithm("sft", sft_objective, "sft", False, "supervised fine-tuning"),
    "kto": Algorithm("kto", kto_objective, "kto", True, "arXiv 2402.01306", estimates_kl=True),
    "rm": Algorithm("rm", reward_objective, "pair", False, "arXiv 2203.02155",
                    forward="reward", generates=False),
}


def get_algorithm(name: str) -> Algorithm:
    if name in hp.ROLLOUT_TYPES:
        raise ValueError(f"--rlhf_type {name} is not an offline algorithm of this table: it runs in the rollout "
                         f"loop (hpalign.rl.runner.run_rollouts), which `hpalign rlhf --rlhf_type {name}` starts")
    if name not in ALGORITHMS:
        raise ValueError(f"--rlhf_type {name!r} is unknown; available: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
