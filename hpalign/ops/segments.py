"""Per-sequence reductions over packed tokens.

A packed batch holds several sequences back to back in each row; `seq_index` [R, L] names the
sequence of every token (-1 = padding). These turn per-token values (log-probs, losses) into
per-sequence sums and token counts without a Python loop and without a host sync.
"""

from __future__ import annotations

import torch


def _flat_ids(segment_ids: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_T clamped to >= 0, valid_T) for the flattened segment ids."""
    if num_segments < 0:
        raise ValueError(f"num_segments must be >= 0, got {num_segments}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    ids_T = segment_ids.reshape(-1).long()
    valid_T = ids_T >= 0
    return ids_T.clamp_min(0), valid_T


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of `values` per segment: out[s] = sum over tokens t with segment_ids[t] == s of values[t].

    Args:
        values: [R, L] or [N] per-token values (any float dtype; differentiable).
        segment_ids: same shape as `values`, integer segment of each token; -1 = ignored (padding).
        num_segments: S, the number of segments; ids must lie in [-1, S).

    Returns:
        out_S: [S] in the dtype of `values`; segments with no tokens give 0. The gradient w.r.t.
        `values` is out_grad[segment_ids[t]] at kept tokens and 0 at ignored ones.
    """
    if values.shape != segment_ids.shape:
        raise ValueError(
            f"values {tuple(values.shape)} and segment_ids {tuple(segment_ids.shape)} must have the same shape"
        )
    ids_T, valid_T = _flat_ids(segment_ids, num_segments)
    values_T = values.reshape(-1)
    # where (not multiply): padding may hold inf/nan, and 0 * inf would poison the sum of segment 0.
    kept_T = torch.where(valid_T, values_T, torch.zeros((), dtype=values.dtype, device=values.device))
    out_S = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    return out_S.index_add(0, ids_T, kept_T)


def segment_count(
    segment_ids: torch.Tensor, mask: torch.Tensor | None, num_segments: int
) -> torch.Tensor:
    """Number of tokens per segment where `mask` is true (e.g. `labels != -100`).

    Args:
        segment_ids: [R, L] or [N] integer segment of each token; -1 = ignored (padding).
        mask: same shape, bool (or 0/1) tokens to count; None counts every non-padding token.
        num_segments: S.

    Returns:
        counts_S: [S] int64.
    """
    ids_T, valid_T = _flat_ids(segment_ids, num_segments)
    if mask is not None:
        if mask.shape != segment_ids.shape:
            raise ValueError(
                f"mask {tuple(mask.shape)} and segment_ids {tuple(segment_ids.shape)} must have the same shape"
            )
        valid_T = valid_T & mask.reshape(-1).bool()
    counts_S = torch.zeros(num_segments, dtype=torch.long, device=segment_ids.device)
    return counts_S.index_add(0, ids_T, valid_T.long())


def segment_offsets(segment_ids_N: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[N] the index of each token within its segment (0, 1, ...), for tokens whose segment ids are
    contiguous and in order per segment (the labelled tokens of packed sequences); -1 on ignored ones."""
    ids_N, valid_N = _flat_ids(segment_ids_N, num_segments)
    positions_N = torch.arange(ids_N.numel(), device=ids_N.device)
    big = torch.full((num_segments,), ids_N.numel(), dtype=torch.long, device=ids_N.device)
    first_S = big.scatter_reduce(0, ids_N[valid_N], positions_N[valid_N], reduce="amin")
    return torch.where(valid_N, positions_N - first_S[ids_N], torch.full_like(positions_N, -1))


def segments_to_padded(values_N: torch.Tensor, segment_ids_N: torch.Tensor, offsets_N: torch.Tensor,
                       num_segments: int, width: int) -> torch.Tensor:
    """[S, width] with row s holding segment s's values in order (`segment_offsets`), 0 elsewhere:
    the conversion from flat packed tokens to the [B, T] response matrices of PPO's maths.
    Differentiable in `values_N`."""
    valid_N = (segment_ids_N >= 0) & (offsets_N >= 0)
    if bool((offsets_N[valid_N] >= width).any()):
        raise ValueError(f"a segment has more than width={width} tokens")
    flat_N = segment_ids_N[valid_N] * width + offsets_N[valid_N]
    out = torch.zeros(num_segments * width, dtype=values_N.dtype, device=values_N.device)
    return out.index_put((flat_N,), values_N[valid_N]).view(num_segments, width)
