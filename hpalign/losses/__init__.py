"""Pure loss maths, one small module per algorithm; imports only torch.

Contract with the training loop (normalise once per optimizer step by GLOBAL counts):
every loss returns `(losses_B, metrics)` UNREDUCED. `losses_B` has one entry per example or pair
([B]); token-level terms (SFT / NLL, PPO) are per-sequence SUMS over tokens. `metrics` maps names
to detached per-example tensors [B]. The loop sums losses and metrics over all micro-batches and
ranks of one optimizer step and divides once by the global count (pairs, examples or tokens),
so micro-batch x accumulation x ranks equals one big batch. Averaging inside a micro-batch would
not: micro-batches of unequal size or token count would get equal weight. GRPO's token losses
(`clipped_token_losses`) are sums of WEIGHTED tokens whose weights (`token_loss_weights`) already
divide by the global counts: the loop only sums them.

Inputs are per-sequence log-prob SUMS over response tokens (`*_logps_B`) unless a name says
MEAN (`*_mean_logps_B`: sum / response tokens; ORPO and SimPO).
"""

from hpalign.losses.cpo import cpo_losses
from hpalign.losses.dpo import DPO_LOSS_TYPES, dpo_losses
from hpalign.losses.grpo import (
    clipped_token_losses,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    token_loss_weights,
)
from hpalign.losses.kto import (
    kto_kl_estimate,
    kto_losses,
    kto_weight_ratio,
    mismatched_completion_index,
    suggest_kto_weights,
)
from hpalign.losses.orpo import log1mexp, log_odds, orpo_losses
from hpalign.losses.pairwise import check_per_example, pair_metrics, smoothed_sigmoid_losses
from hpalign.losses.ppo import (
    gae_advantages,
    kl_estimate,
    kl_penalised_rewards,
    ppo_policy_losses,
    ppo_value_losses,
    whiten,
)
from hpalign.losses.reward import reward_losses
from hpalign.losses.sft import nll_sum, rpo_nll_sum, sft_losses
from hpalign.losses.simpo import simpo_losses

__all__ = [
    "DPO_LOSS_TYPES",
    "check_per_example",
    "clipped_token_losses",
    "cpo_losses",
    "dpo_losses",
    "gae_advantages",
    "group_advantages",
    "kl_penalised_rewards",
    "kto_kl_estimate",
    "kto_losses",
    "kto_weight_ratio",
    "log1mexp",
    "log_odds",
    "mismatched_completion_index",
    "nll_sum",
    "orpo_losses",
    "pair_metrics",
    "kl_estimate",
    "ppo_policy_losses",
    "ppo_value_losses",
    "reinforce_pp_advantages",
    "reward_losses",
    "rloo_advantages",
    "rpo_nll_sum",
    "sft_losses",
    "simpo_losses",
    "smoothed_sigmoid_losses",
    "suggest_kto_weights",
    "token_loss_weights",
    "whiten",
]
