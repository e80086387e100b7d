"""Each algorithm's own hyper-parameters with their defaults: the one source of names and defaults.

The command line keeps the seed document's flat flags (`--beta`, `--rpo_alpha`, ...): they are the
fields of `config.AlgorithmConfig`, unset (None) unless the user gives them. `resolve_defaults`
fills what the chosen algorithm reads from its dataclass here; a flag it does not read, set by the
user, is a warning (`unused_flag_warnings`). Objectives get an instance of their own dataclass.
Torch-free, so the config layer can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DPOParams:
    """DPO (arXiv 2305.18290) with RPO's chosen-answer NLL (arXiv 2404.19733)."""

    beta: float = 0.1
    rpo_alpha: float = 1.0
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class CPOParams:
    """CPO (arXiv 2401.08417)."""

    beta: float = 0.1
    cpo_alpha: float = 1.0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class SimPOParams:
    """SimPO (arXiv 2405.14734); cpo_alpha > 0 adds CPO's NLL term, as TRL's CPOTrainer does."""

    beta: float = 2.0
    simpo_gamma: float = 1.0
    cpo_alpha: float = 1.0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class ORPOParams:
    """ORPO (arXiv 2403.07691): `beta` is its lambda."""

    beta: float = 0.1


@dataclass(frozen=True)
class KTOParams:
    """KTO (arXiv 2402.01306)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass(frozen=True)
class RMParams:
    """Bradley-Terry reward modelling (arXiv 2203.02155), optional centring (arXiv 2312.09244)."""

    center_rewards_coefficient: float = 0.0


@dataclass(frozen=True)
class SFTParams:
    """Supervised fine-tuning: no hyper-parameters of its own."""


@dataclass(frozen=True)
class PPOParams:
    """PPO: its hyper-parameters are the `ppo` section of the config (`config.PPOConfig`)."""


@dataclass(frozen=True)
class GRPOParams:
    """GRPO (arXiv 2402.03300) with DAPO's clip-higher and token mean (arXiv 2503.14476) and Dr. GRPO's
    unscaled advantages and constant normaliser (arXiv 2503.20783); TRL's GRPOTrainer names. `beta`
    weighs the k3 KL to the reference in the loss (0: no reference forward at all)."""

    beta: float = 0.04
    num_generations: int = 8
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    scale_rewards: str = "group"
    loss_type: str = "grpo"
    mask_truncated_completions: bool = False
    num_iterations: int = 1


@dataclass(frozen=True)
class RLOOParams(GRPOParams):
    """RLOO (arXiv 2402.14740): leave-one-out baseline; `beta` weighs the sequence KL in the reward."""

    beta: float = 0.05
    num_generations: int = 4


@dataclass(frozen=True)
class ReinforcePPParams(GRPOParams):
    """REINFORCE++ (arXiv 2501.03262): per-token KL in the reward (`beta`), returns whitened over the
    global batch, no groups needed (num_generations 1 is allowed)."""

    beta: float = 0.01
    num_generations: int = 4


HYPERPARAMS: dict[str, type] = {"dpo": DPOParams, "kto": KTOParams, "cpo": CPOParams, "orpo": ORPOParams,
                                "simpo": SimPOParams, "rm": RMParams, "ppo": PPOParams, "grpo": GRPOParams,
                                "rloo": RLOOParams, "reinforce_pp": ReinforcePPParams, "sft": SFTParams}
# The algorithms of the rollout loop (hpalign/rl/): they sample their own responses to prompts.
ROLLOUT_TYPES: tuple[str, ...] = ("ppo", "grpo", "rloo", "reinforce_pp")
CRITIC_FREE_TYPES: tuple[str, ...] = ("grpo", "rloo", "reinforce_pp")


def param_names(rlhf_type: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(HYPERPARAMS[rlhf_type]))


def all_param_names() -> set[str]:
    """Every algorithm-specific flag name (the union over the table)."""
    return {name for rlhf_type in HYPERPARAMS for name in param_names(rlhf_type)}


def default_params(rlhf_type: str):
    """The algorithm's hyper-parameters at their defaults."""
    return HYPERPARAMS[rlhf_type]()


def make_params(rlhf_type: str, values):
    """The algorithm's hyper-parameters from an object carrying them as attributes (a resolved
    `AlgorithmConfig`); attributes left None take the dataclass default."""
    cls = HYPERPARAMS[rlhf_type]
    given = {f.name: getattr(values, f.name) for f in fields(cls) if getattr(values, f.name, None) is not None}
    return cls(**given)
