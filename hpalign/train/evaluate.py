"""Held-out evaluation: preference accuracy from implicit rewards, and a program-checked task metric
on greedy generations. Work is sharded over ranks; every rank runs the same number of forwards
(ZeRO-3 gathers parameters collectively), padding its share with zero-weight repeats."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from hpalign import distributed
from hpalign.stats import SequenceStats
from hpalign.train.kto import kl_reference_point


def shard_for_rank(num_items: int, *, batch_size: int) -> list[tuple[list[int], list[float]]]:
    """This rank's batches of item indices with weights (0 for padding repeats), equal count on all ranks."""
    world, rank = distributed.layout().data_parallel_size, distributed.layout().data_parallel_rank
    chunk = batch_size * world
    batches = []
    for start in range(0, num_items, chunk):
        mine = list(range(start + rank * batch_size, min(start + (rank + 1) * batch_size, num_items)))
        weights = [1.0] * len(mine)
        if not mine:  # this rank has nothing left in the last chunk: repeat item 0 with weight 0
            mine, weights = [0], [0.0]
        batches.append((mine, weights))
    return batches


def implicit_rewards_ER(policy: SequenceStats, reference: SequenceStats | None, *, beta: float,
                        length_normalised: bool) -> torch.Tensor:
    """beta * log(pi/ref) with a reference (DPO's implicit reward), else beta * (mean) log pi."""
    if reference is not None:
        return beta * (policy.logps_ER - reference.logps_ER)
    return beta * (policy.mean_logps_ER if length_normalised else policy.logps_ER)


@torch.no_grad()
def win_share(margin_B: torch.Tensor) -> torch.Tensor:
    """1 where the margin is positive, 1/2 on a tie, 0 otherwise."""
    return (margin_B > 0).double() + 0.5 * (margin_B == 0).double()


@torch.no_grad()
def preference_eval(policy_stats_fn: Callable, reference_stats_fn: Callable | None, make_batch: Callable,
                    num_items: int, *, batch_size: int, beta: float, length_normalised: bool) -> dict[str, float]:
    """Share of held-out pairs whose chosen answer gets the higher reward (implicit, or a reward
    model's; ties count 1/2), the mean reward margin, and for generative policies the share where
    the policy's own log-prob prefers the chosen answer."""
    totals = torch.zeros(4, dtype=torch.float64)  # weight, reward-accuracy, margin, logp-accuracy
    scored_by_head = False
    for indices, weights in shard_for_rank(num_items, batch_size=batch_size):
        batch = make_batch(indices)
        policy = policy_stats_fn(batch)
        reference = reference_stats_fn(batch) if reference_stats_fn else None
        scored_by_head = policy.rewards_ER is not None
        rewards_ER = policy.rewards_ER if scored_by_head else implicit_rewards_ER(
            policy, reference, beta=beta, length_normalised=length_normalised)
        margin_B = (rewards_ER[:, 0] - rewards_ER[:, 1]).double().cpu()
        logp_margin_B = (policy.logps_ER[:, 0] - policy.logps_ER[:, 1]).double().cpu()
        weight_B = torch.tensor(weights, dtype=torch.float64)
        totals += torch.stack([weight_B.sum(), (weight_B * win_share(margin_B)).sum(),
                               (weight_B * margin_B).sum(), (weight_B * win_share(logp_margin_B)).sum()])
    totals = distributed.sum_over_ranks(totals)
    count = max(totals[0], 1.0)
    metrics = {"eval/rewards/accuracies": totals[1] / count, "eval/rewards/margins": totals[2] / count}
    if not scored_by_head:  # a reward model has no log-probs of its own
        metrics["eval/logps/accuracies"] = totals[3] / count
    return metrics


@torch.no_grad()
def label_eval(policy_stats_fn: Callable, reference_stats_fn: Callable, make_batch: Callable, num_items: int,
               *, batch_size: int) -> dict[str, float]:
    """KTO data: share of held-out examples on the right side of KTO's own boundary: the log-ratio
    log(pi/ref) above the KL reference point z0 for desirable examples, below it for undesirable
    ones (equal counts one half). Each held-out example carries two responses: its own completion
    and another example's (the mismatched pair), so one forward per batch and model serves both
    the log-ratios and z0 = max(0, mean mismatched log-ratio), estimated as in training."""
    ratios, labels, weights, kl_policy, kl_reference = [], [], [], [], []
    for indices, batch_weights in shard_for_rank(num_items, batch_size=batch_size):
        batch = make_batch(indices)
        policy, reference = policy_stats_fn(batch), reference_stats_fn(batch)
        weight_B = torch.tensor(batch_weights, dtype=torch.float64)
        ratios.append((policy.logps_ER - reference.logps_ER)[:, 0].double().cpu())
        labels.append(policy.labels_E.cpu())
        weights.append(weight_B)
        real_B = weight_B > 0  # padding repeats (weight 0) stay out of z0
        kl_policy.append(policy.logps_ER[real_B, 1])
        kl_reference.append(reference.logps_ER[real_B, 1])
    z0 = kl_reference_point(kl_policy, kl_reference)
    ratio_B, weight_B = torch.cat(ratios) - z0, torch.cat(weights)
    signed_B = torch.where(torch.cat(labels), ratio_B, -ratio_B)
    weight, wins = distributed.sum_over_ranks(torch.stack([weight_B.sum(), (weight_B * win_share(signed_B)).sum()]))
    return {"eval/kto/label_accuracy": wins / max(weight, 1.0), "eval/kto/kl": z0}


@torch.no_grad()
def generate_greedy(model, prompt_ids: Sequence[list[int]], *, pad_id: int, stop_ids: list[int],
                    max_new_tokens: int, synced: bool) -> list[list[int]]:
    """Greedy continuations of left-padded prompts; returns only the new tokens, cut at a stop id."""
    width = max(len(p) for p in prompt_ids)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, use_cache=True,
                            pad_token_id=pad_id, synced_gpus=synced)
    continuations = []
    for row in output[:, width:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        continuations.append(row[:cut])
    return continuations


@dataclass
class GreedyBatch:
    """One batch of this rank's share of the held-out prompts, answered greedily."""

    indices: list[int]  # into the prompts
    weights: list[float]  # 0 for the repeats that even out the ranks
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]


def greedy_batches(model, tokenizer, prompts: list, encode_prompt: Callable, *, pad_id: int, stop_ids: list[int],
                   max_new_tokens: int, batch_size: int, synced: bool) -> Iterator[GreedyBatch]:
    """This rank's share of `prompts`, batch by batch, with greedy responses (the model in eval
    mode meanwhile); every rank yields the same number of batches."""
    was_training = model.training
    model.eval()
    try:
        for indices, weights in shard_for_rank(len(prompts), batch_size=batch_size):
            encoded = [encode_prompt(prompts[i]) for i in indices]
            outputs = generate_greedy(model, encoded, pad_id=pad_id, stop_ids=stop_ids,
                                      max_new_tokens=max_new_tokens, synced=synced)
            texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
            yield GreedyBatch(indices, weights, encoded, outputs, texts)
    finally:
        model.train(was_training)


def generation_eval(model, tokenizer, prompts: list, encode_prompt: Callable, task_metric: Callable, *,
                    pad_id: int, stop_ids: list[int], max_new_tokens: int, batch_size: int,
                    synced: bool) -> tuple[dict[str, float], list[dict[str, str]]]:
    """The program-checked task metric on greedy generations, and a few samples to show."""
    totals = torch.zeros(2, dtype=torch.float64)
    samples: list[dict[str, str]] = []
    for batch in greedy_batches(model, tokenizer, prompts, encode_prompt, pad_id=pad_id, stop_ids=stop_ids,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, synced=synced):
        for i, text, weight in zip(batch.indices, batch.texts, batch.weights, strict=True):
            totals += torch.tensor([weight, weight * task_metric([prompts[i]], [text])], dtype=torch.float64)
            if weight and len(samples) < 4:
                samples.append({"prompt": prompts[i][-1]["content"], "generation": text})
    weight, score = distributed.sum_over_ranks(totals)
    return {"eval/task_metric": score / max(weight, 1.0)}, samples
