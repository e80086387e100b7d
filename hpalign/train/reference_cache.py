"""`--precompute_ref_log_probs`: run the frozen reference once over the training data and cache it.

The reference's summed response log-probs depend only on the reference weights and the tokenized
examples, so one pass before training replaces a reference forward on every step (a third of a
DPO step's compute with a full reference). The cache is a safetensors file holding `logps_ER`
[E, R] (E examples in data order, R responses each) with a key in its metadata; the key hashes
what the numbers depend on, so a changed model, template, data set or truncation is never served
stale numbers: `load_reference_cache` returns None and says why.

Distributed: `precompute_reference_logps` runs on every rank over ALL examples (each rank then
holds the whole [E, R] table and indexes it with its own micro-batches' example ids). That costs
each rank one full pass instead of 1/world of it, but needs no gather, no agreement on a sharding
and no collective that could hang; rank 0 alone should write the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hpalign.data.collate import SequenceBatch
from hpalign.data.types import TokenizedExample
from hpalign.stats import SequenceStats

logger = logging.getLogger("hpalign")

CACHE_FORMAT = "hpalign-reference-logps-v1"
TENSOR_NAME = "logps_ER"
NUM_FINGERPRINT_TENSORS = 4  # first, two middle and last parameters: catches any load or edit


def _update_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Feed dtype, shape and raw bytes of `tensor` (any dtype, e.g. bf16) into `digest`."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{flat.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of the reference's weights: sha256 of the config JSON, the parameter names
    and shapes, and the bytes of a few parameters (first, middle, last).

    Cheap means it reads a handful of tensors, not all of them: two checkpoints of one model that
    differ only in untouched tensors would collide, which is why the model spec (path) goes into
    the cache key too. Under ZeRO-3 call it before partitioning (parameters are empty after).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    named = list(model.named_parameters())
    for name, param in named:
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    if named:
        last = len(named) - 1
        picks = sorted({0, last // 3, 2 * last // 3, last})[:NUM_FINGERPRINT_TENSORS]
        for i in picks:
            _update_tensor(digest, named[i][1])
    return digest.hexdigest()


def reference_cache_key(*, model_spec: str, model_fingerprint: str, template_name: str,
                        examples: list[TokenizedExample], max_length: int) -> str:
    """sha256 over the reference's identity, the chat template and every example's token ids.

    Token ids already reflect the template and the truncation; `max_length` is kept explicitly so
    the key also changes when truncation would have but happened not to cut anything here.
    """
    digest = hashlib.sha256()
    header = {"format": CACHE_FORMAT, "model_spec": model_spec, "model_fingerprint": model_fingerprint,
              "template": template_name, "max_length": max_length, "num_examples": len(examples)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for ex in examples:
        # Lengths delimit the lists, so [1, 2] + [3] and [1] + [2, 3] hash differently.
        parts = [ex.prompt_ids, *ex.responses]
        digest.update(json.dumps([[len(p) for p in parts], parts]).encode())
    return digest.hexdigest()


@torch.no_grad()
def precompute_reference_logps(reference_stats_fn: Callable[[SequenceBatch], SequenceStats],
                               make_batch: Callable[[list[int]], SequenceBatch], num_examples: int, *,
                               batch_size: int, show_progress: bool = True) -> torch.Tensor:
    """The reference's summed response log-probs of every example, in example order.

    Args:
        reference_stats_fn: batch -> SequenceStats of the reference (e.g. the adapter-off policy).
        make_batch: example indices -> SequenceBatch of those examples, in that order (padded or packed).
        num_examples: E; examples 0..E-1 are visited in consecutive batches of `batch_size`.
        batch_size: examples per forward pass.
        show_progress: a tqdm bar (disable on non-zero ranks).

    Returns:
        logps_ER: [E, R] fp32 on CPU, R responses per example, no grad.
    """
    if batch_size < 1 or num_examples < 1:
        raise ValueError(f"need batch_size >= 1 and num_examples >= 1, got {batch_size} and {num_examples}")
    from tqdm.auto import tqdm

    pieces = []
    with tqdm(total=num_examples, desc="reference log-probs", unit="ex", disable=not show_progress) as bar:
        for start in range(0, num_examples, batch_size):
            indices = list(range(start, min(start + batch_size, num_examples)))
            logps_BR = reference_stats_fn(make_batch(indices)).logps_ER
            if logps_BR.shape[0] != len(indices):
                raise ValueError(f"reference stats gave {logps_BR.shape[0]} rows for {len(indices)} examples")
            pieces.append(logps_BR.detach().float().cpu())
            bar.update(len(indices))
    return torch.cat(pieces)


def save_reference_cache(path: str | Path, logps_ER: torch.Tensor, key: str) -> None:
    """Write `logps_ER` [E, R] and `key` to a safetensors file, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({TENSOR_NAME: logps_ER.detach().float().cpu().contiguous()}, str(tmp),
              metadata={"key": key, "format": CACHE_FORMAT})
    tmp.replace(path)


def load_reference_cache(path: str | Path, key: str) -> torch.Tensor | None:
    """The cached [E, R] log-probs, or None (logged with the reason) when the file is missing,
    unreadable, of another format, or was made for another key (model, template or data)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        logger.info("reference cache %s: not found, computing the reference log-probs", path)
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CACHE_FORMAT or TENSOR_NAME not in handle.keys():
                logger.warning("reference cache %s: not a %s file, ignoring it", path, CACHE_FORMAT)
                return None
            if metadata.get("key") != key:
                logger.warning("reference cache %s: made for another model, template or data set (key %s..., "
                               "expected %s...), recomputing", path, str(metadata.get("key"))[:12], key[:12])
                return None
            return handle.get_tensor(TENSOR_NAME)
    except (SafetensorError, OSError) as err:
        logger.warning("reference cache %s: unreadable (%s), recomputing", path, err)
        return None
