"""Packed (varlen) attention: sequences packed back to back in a row never attend to each other.

Why: with transformers' sdpa/eager paths, restarting `position_ids` only fixes RoPE. With a 2D
`attention_mask`, or with the default `use_cache=True`, the causal mask spans the whole row, so
every packed sequence attends to the ones before it (max |logit| error 17 measured on SmolLM2).
Only without a mask and with `use_cache=False` does transformers detect packing from
`position_ids`, and then it builds a dense [R, 1, L, L] block mask that makes SDPA quadratic in the
row length (34 s/step vs 9.5 s/step per-sequence on a CPU DPO step; 10.5 s vs 3.1 s for a
forward+backward of tiny-random-llama on one 4096-token row of 32 sequences).

How: an attention function registered with transformers' `AttentionInterface`. Given the packing
info that `packed_forward_kwargs` adds to the forward kwargs (transformers hands them down to
every attention call), it runs
  - "flash_varlen": `flash_attn_varlen_func` on the flattened rows (CUDA, flash-attn installed), or
  - "sdpa_per_sequence": causal SDPA on each sequence slice of each row (no mask at all).
Without packing info it is exactly transformers' sdpa attention (padding mask included).

    backend = enable_varlen_attention(model)            # once, after loading (peft-wrapped is fine)
    out = model(input_ids=batch.input_ids, use_cache=False, **packed_forward_kwargs(batch))  # no attention_mask

Segments are flat [start, end) ranges over the R*L positions of the batch, one per sequence and one
per run of end-of-row padding (padding output is zeros on the SDPA path and ignored by the loss).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("hpalign")

SDPA_IMPL = "hpalign_varlen"
# No "flash" in the name: transformers treats any such name as a request for its own FA kernels.
FLASH_IMPL = "hpalign_varlen_fa"
BACKEND_IMPLS = {"sdpa_per_sequence": SDPA_IMPL, "flash_varlen": FLASH_IMPL}
SEGMENTS_KWARG = "hpalign_segments"


@dataclass(frozen=True, eq=False)
class PackedSegments:
    """How the R*L flattened positions of a packed batch split into attention segments; computed
    once per forward on the host.

    bounds: one (row, start, end, is_real) per segment in row-major order; start/end are columns
        of that row, the segments tile every row exactly, `is_real` is False for padding runs.
    row_len: L, the row length.
    prefix_lengths: per segment, how many context tokens its queries attend to before its own: the
        first tokens of another segment of the same row. Non-zero only for the branches of a shared
        prompt (`hpalign.data.collate`, share_prompt): a rejected answer attends to the prompt that
        was laid out once, before the chosen answer. Empty tuple = no prefixes at all.
    key_index: when some segment has a prefix, [sum of key lengths] long: the flat positions of
        every segment's keys (its prefix, then itself), in segment order; else None.
    """

    bounds: tuple[tuple[int, int, int, bool], ...]
    row_len: int
    prefix_lengths: tuple[int, ...] = ()
    key_index: torch.Tensor | None = None

    @property
    def query_lengths(self) -> list[int]:
        return [end - start for _, start, end, _ in self.bounds]

    @property
    def key_lengths(self) -> list[int]:
        if not self.prefix_lengths:
            return self.query_lengths
        return [n + p for n, p in zip(self.query_lengths, self.prefix_lengths, strict=True)]


def _field(batch_like: Any, name: str) -> Any:
    if isinstance(batch_like, Mapping):
        return batch_like.get(name)
    return getattr(batch_like, name, None)


def _runs(seq_index_RL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(run_starts, run_ends) over the flattened [R*L] positions; runs break at rows and id changes."""
    num_rows, row_len = seq_index_RL.shape
    new_run_RL = torch.ones_like(seq_index_RL, dtype=torch.bool)
    new_run_RL[:, 1:] = seq_index_RL[:, 1:] != seq_index_RL[:, :-1]
    starts = new_run_RL.flatten().nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([num_rows * row_len])])
    return starts, ends


def _run_prefixes(batch_like: Any, run_ids: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                  row_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix length, flat start of the prefix) per run, from the batch's optional `context_seq` /
    `context_len` [S] (sequence s also attends to the first context_len[s] tokens of sequence
    context_seq[s]); zeros when the batch has none. ValueError when a context is not in the same row
    or is longer than the sequence it is taken from."""
    lengths = torch.zeros_like(starts)
    prefix_starts = torch.zeros_like(starts)
    context_seq, context_len = _field(batch_like, "context_seq"), _field(batch_like, "context_len")
    if context_seq is None or context_len is None:
        return lengths, prefix_starts
    context_seq, context_len = context_seq.detach().cpu().long(), context_len.detach().cpu().long()
    run_of = {int(sid): run for run, sid in enumerate(run_ids.tolist()) if sid >= 0}
    for run, sid in enumerate(run_ids.tolist()):
        if sid < 0 or context_len[sid] <= 0:
            continue
        source = run_of.get(int(context_seq[sid]))
        if source is None or starts[source] // row_len != starts[run] // row_len:
            raise ValueError(f"sequence {sid} attends to a context in sequence {int(context_seq[sid])}, "
                             "which is not in the same packed row")
        if context_len[sid] > ends[source] - starts[source]:
            raise ValueError(f"sequence {sid} has a context of {int(context_len[sid])} tokens but its source "
                             f"sequence {int(context_seq[sid])} has only {int(ends[source] - starts[source])}")
        lengths[run], prefix_starts[run] = context_len[sid], starts[source]
    return lengths, prefix_starts


def _check_packing(
    seq_index_RL: torch.Tensor, position_ids_RL: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
    prefix_lengths: torch.Tensor, cu_seqlens: torch.Tensor | None,
) -> None:
    """ValueError unless seq_index, position_ids and cu_seqlens describe the same packing."""
    flat_ids = seq_index_RL.flatten()
    real = flat_ids[starts] >= 0
    real_ids = flat_ids[starts][real]
    if real_ids.unique().numel() != real_ids.numel():
        raise ValueError("a sequence id appears in two separate runs of seq_index; each packed sequence "
                         "must be contiguous within one row")
    # Each real token's position is its offset from the start of its run, plus the run's context
    # length: 0-based for a plain sequence, continuing after the shared prompt for a branch.
    lengths = ends - starts
    run_start_T = torch.repeat_interleave(starts - prefix_lengths, lengths)
    expected_T = torch.arange(flat_ids.numel()) - run_start_T
    is_real_T = flat_ids >= 0
    if not torch.equal(position_ids_RL.flatten()[is_real_T].long(), expected_T[is_real_T]):
        raise ValueError("position_ids must restart at 0 and count up within every packed sequence "
                         "(a sequence with a shared context starts at the context's length)")
    if cu_seqlens is not None:
        real_lengths = lengths[real]
        if not torch.equal(cu_seqlens.detach().cpu().long().diff(), real_lengths):
            raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} disagrees with the sequence runs of "
                             f"seq_index (lengths {real_lengths.tolist()})")


def _key_index(starts: torch.Tensor, ends: torch.Tensor, prefix_lengths: torch.Tensor,
               prefix_starts: torch.Tensor) -> torch.Tensor:
    """Flat key positions of every run: its prefix positions, then its own."""
    pieces = []
    for start, end, length, prefix_start in zip(starts.tolist(), ends.tolist(), prefix_lengths.tolist(),
                                                prefix_starts.tolist(), strict=True):
        if length:
            pieces.append(torch.arange(prefix_start, prefix_start + length))
        pieces.append(torch.arange(start, end))
    return torch.cat(pieces)


def packed_forward_kwargs(batch_like: Any) -> dict[str, Any]:
    """Forward kwargs that make a packed batch attend per sequence under `enable_varlen_attention`.

    Args:
        batch_like: object or mapping with `position_ids` [R, L] (restarting at 0 per sequence) and
            `seq_index` [R, L] (sequence id per token, -1 = padding); `cu_seqlens` [S+1], when
            present, is checked against them. Optional `context_seq` / `context_len` [S]: sequence s
            also attends to the first context_len[s] tokens of sequence context_seq[s] (a shared
            prompt), and its positions start at context_len[s].

    Returns:
        {"position_ids": [R, L], "cu_seq_lens_q"/"cu_seq_lens_k": int32 [G+1] flat bounds of all G
        segments (sequences and padding runs) over the R*L query positions and over the keys (the
        same tensor when no sequence has a context; else bounds in the gathered key buffer of
        `PackedSegments.key_index`), "max_length_q"/"max_length_k": int, "hpalign_segments":
        PackedSegments}. The cu_seq_lens_* names are transformers' own, so its flash_attention_2
        path reads them the same way. Pass these to `model(input_ids=..., use_cache=False, **kwargs)`
        (or to the backbone) without `attention_mask`: a 2D mask would make transformers build a
        dense [R, 1, L, L] mask that is then ignored, and a packed forward has no use for a KV
        cache. The bounds are computed on the host: free for CPU tensors, one device-to-host copy for
        CUDA ones; call it once per micro-batch (policy and reference forwards can share the result).
    """
    position_ids, seq_index = _field(batch_like, "position_ids"), _field(batch_like, "seq_index")
    if position_ids is None or seq_index is None:
        raise ValueError("packed_forward_kwargs needs `position_ids` and `seq_index` [R, L] on the batch")
    if position_ids.shape != seq_index.shape or seq_index.dim() != 2 or seq_index.numel() == 0:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} and seq_index {tuple(seq_index.shape)} "
                         "must both be [R, L], non-empty")
    seq_index_RL = seq_index.detach().cpu()
    row_len = seq_index_RL.shape[1]
    starts, ends = _runs(seq_index_RL)
    run_ids = seq_index_RL.flatten()[starts]
    prefix_lengths, prefix_starts = _run_prefixes(batch_like, run_ids, starts, ends, row_len)
    _check_packing(seq_index_RL, position_ids.detach().cpu(), starts, ends, prefix_lengths,
                   _field(batch_like, "cu_seqlens"))
    is_real = (run_ids >= 0).tolist()
    bounds = tuple(
        (s // row_len, s % row_len, e - (s // row_len) * row_len, r)
        for s, e, r in zip(starts.tolist(), ends.tolist(), is_real, strict=True)
    )
    device = seq_index.device
    cu_seq_lens_q = torch.cat([starts, ends[-1:]]).to(device=device, dtype=torch.int32)
    max_length_q = int((ends - starts).max())
    cu_seq_lens_k, max_length_k, segments = cu_seq_lens_q, max_length_q, PackedSegments(bounds, row_len)
    if bool(prefix_lengths.any()):
        key_lengths = ends - starts + prefix_lengths
        cu_seq_lens_k = torch.cat([torch.zeros(1, dtype=torch.long), key_lengths.cumsum(0)])
        cu_seq_lens_k = cu_seq_lens_k.to(device=device, dtype=torch.int32)
        max_length_k = int(key_lengths.max())
        key_index = _key_index(starts, ends, prefix_lengths, prefix_starts).to(device)
        segments = PackedSegments(bounds, row_len, tuple(prefix_lengths.tolist()), key_index)
    return {
        "position_ids": position_ids,
        "cu_seq_lens_q": cu_seq_lens_q,
        "cu_seq_lens_k": cu_seq_lens_k,
        "max_length_q": max_length_q,
        "max_length_k": max_length_k,
        SEGMENTS_KWARG: segments,
    }


_cu_cache: list[Any] = [None, None]  # [cu_seq_lens tensor (strong ref, so `is` is safe), PackedSegments]


def _segments_from_cu(cu_seq_lens: torch.Tensor, num_rows: int, row_len: int) -> PackedSegments:
    """Segments from transformers-style cu_seq_lens alone (no `hpalign_segments`), cached per tensor."""
    if _cu_cache[0] is cu_seq_lens:
        return _cu_cache[1]
    cu = cu_seq_lens.tolist()
    if cu[0] != 0 or cu[-1] != num_rows * row_len:
        raise ValueError(f"cu_seq_lens_q must tile the {num_rows}x{row_len} flattened rows (padding included), "
                         f"got bounds from {cu[0]} to {cu[-1]}; build the kwargs with packed_forward_kwargs")
    bounds = []
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        row = s // row_len
        if (e - 1) // row_len != row:
            raise ValueError(f"segment [{s}, {e}) of cu_seq_lens_q crosses a row boundary (row length {row_len})")
        bounds.append((row, s - row * row_len, e - row * row_len, True))
    segments = PackedSegments(bounds=tuple(bounds), row_len=row_len)
    _cu_cache[0], _cu_cache[1] = cu_seq_lens, segments
    return segments


def _packing(query: torch.Tensor, kwargs: dict[str, Any]) -> PackedSegments | None:
    segments = kwargs.get(SEGMENTS_KWARG)
    if segments is None and kwargs.get("cu_seq_lens_q") is not None:
        segments = _segments_from_cu(kwargs["cu_seq_lens_q"], query.shape[0], query.shape[2])
    if segments is not None and segments.row_len != query.shape[2]:
        raise ValueError(f"packing info is for rows of {segments.row_len} tokens but the query has "
                         f"{query.shape[2]}: packed attention does not support a KV cache")
    return segments


def _check_unsupported(kwargs: dict[str, Any]) -> None:
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError("varlen attention supports neither logit softcapping nor sliding windows; "
                         "use the model's own attention implementation for this architecture")


def _tokens_first(x_BHLD: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B*L, H, D] (a free view for transformers' projections, which are [B, L, H, D]
    transposed)."""
    return x_BHLD.transpose(1, 2).reshape(-1, x_BHLD.shape[1], x_BHLD.shape[3])


def _keys_and_values(key, value, segments: PackedSegments) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-major keys/values of every segment back to back: the positions themselves, or gathered
    through `key_index` when some segments also see a shared prefix (one gather per layer)."""
    key_TnD, value_TnD = _tokens_first(key), _tokens_first(value)
    if segments.key_index is None:
        return key_TnD, value_TnD
    index = segments.key_index.to(key.device)
    return key_TnD.index_select(0, index), value_TnD.index_select(0, index)


def _lower_right_causal_mask(num_queries: int, num_keys: int, device) -> torch.Tensor:
    """Query i (the last num_queries of the keys' positions) sees keys up to num_keys - num_queries + i."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(num_keys - num_queries)


def _sdpa_per_sequence(query, key, value, segments: PackedSegments, scaling, dropout, is_causal):
    """Causal SDPA on each sequence; query [B, H, L, D], key/value [B, Hkv, L, D] -> [B, L, H, Dv].

    The tensors are split once into segments (not sliced per segment: every slice's backward would
    write a zero-filled gradient the size of the whole tensor, measured as 35 % of the backward)."""
    num_rows, num_heads, row_len, _ = query.shape
    head_dim_v = value.shape[-1]
    gqa = key.shape[1] != num_heads
    key_TnD, value_TnD = _keys_and_values(key, value, segments)
    queries = _tokens_first(query).split(segments.query_lengths)
    keys, values = key_TnD.split(segments.key_lengths), value_TnD.split(segments.key_lengths)
    pieces = []  # [n, H, Dv] per segment, in flattened row-major order
    for (_, start, end, is_real), q, k, v in zip(segments.bounds, queries, keys, values, strict=True):
        if not is_real:
            pieces.append(query.new_zeros(end - start, num_heads, head_dim_v))
            continue
        has_prefix = k.shape[0] != q.shape[0]
        mask = _lower_right_causal_mask(q.shape[0], k.shape[0], q.device) if has_prefix and is_causal else None
        out_1HnD = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=is_causal and not has_prefix,
            enable_gqa=gqa,
        )
        pieces.append(out_1HnD[0].transpose(0, 1))
    return torch.cat(pieces).view(num_rows, row_len, num_heads, head_dim_v)


def _flash_varlen(query, key, value, kwargs: dict[str, Any], segments: PackedSegments, scaling, dropout,
                  is_causal):
    """flash_attn_varlen_func over the flattened rows; same shapes as `_sdpa_per_sequence`. With
    shared prefixes the keys are gathered so each segment's keys are contiguous; flash-attn aligns
    the causal mask bottom-right when a segment has more keys than queries (flash-attn >= 2.1)."""
    from flash_attn import flash_attn_varlen_func

    num_rows, num_heads, row_len, _ = query.shape
    key_TnD, value_TnD = _keys_and_values(key, value, segments)
    cu_q = kwargs["cu_seq_lens_q"].to(device=query.device, dtype=torch.int32)
    cu_k = kwargs["cu_seq_lens_k"].to(device=query.device, dtype=torch.int32)
    out_TnD = flash_attn_varlen_func(
        _tokens_first(query), key_TnD, value_TnD, cu_q, cu_k, int(kwargs["max_length_q"]),
        int(kwargs["max_length_k"]), dropout_p=dropout, softmax_scale=scaling, causal=is_causal,
    )
    return out_TnD.view(num_rows, row_len, num_heads, value.shape[-1])


def _attention(backend, module, query, key, value, attention_mask, scaling, dropout, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = _packing(query, kwargs)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    _check_unsupported(kwargs)
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if backend == "flash_varlen" and kwargs.get("cu_seq_lens_q") is not None:
        return _flash_varlen(query, key, value, kwargs, segments, scaling, dropout, is_causal), None
    return _sdpa_per_sequence(query, key, value, segments, scaling, dropout, is_causal), None


def sdpa_varlen_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` function "hpalign_varlen": query [B, H, L, D], key/value [B, Hkv, L, D]
    -> ([B, L, H, Dv], None); per-sequence causal SDPA when packing info is in kwargs, else sdpa."""
    return _attention("sdpa_per_sequence", module, query, key, value, attention_mask, scaling, dropout, kwargs)


def flash_varlen_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` function "hpalign_varlen_fa": as above with flash_attn_varlen_func."""
    return _attention("flash_varlen", module, query, key, value, attention_mask, scaling, dropout, kwargs)


def _varlen_mask(*, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask builder for our implementations: sdpa's mask when a 2D padding mask is given, else None
    (pure causal, or packed, where the attention function ignores the mask anyway)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> None:
    """Register "hpalign_varlen" and "hpalign_varlen_fa" with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in ((SDPA_IMPL, sdpa_varlen_attention_forward), (FLASH_IMPL, flash_varlen_attention_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _varlen_mask)


def _flash_unavailable_reason(dtype: torch.dtype) -> str | None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16/bf16 weights, the model is {dtype}"
    return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside peft / DeepSpeed / DDP wrappers."""
    while True:
        if hasattr(model, "get_base_model"):  # peft PeftModel
            inner = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DeepSpeedEngine, DDP
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner


VARLEN_BACKEND_OF_ATTN_IMPL = {"auto": "auto", "sdpa": "sdpa_per_sequence", "flash_attention_2": "flash_varlen"}


def varlen_backend(attn_impl: str) -> str:
    """The packed-attention backend that honours `--attn_impl` (eager has no per-sequence form)."""
    if attn_impl not in VARLEN_BACKEND_OF_ATTN_IMPL:
        raise ValueError(f"--attn_impl {attn_impl!r} cannot run packed rows; use one of "
                         f"{', '.join(VARLEN_BACKEND_OF_ATTN_IMPL)}, or --packing false")
    return VARLEN_BACKEND_OF_ATTN_IMPL[attn_impl]


def enable_varlen_attention(model: torch.nn.Module, *, backend: str = "auto") -> str:
    """Switch `model` (a transformers model, possibly peft- or DeepSpeed-wrapped) to varlen attention.

    Args:
        model: the model; its attention implementation is changed in place.
        backend: "auto" (flash_varlen when flash-attn is installed, CUDA is present and the weights
            are fp16/bf16, else sdpa_per_sequence), "flash_varlen" (raises if it cannot run) or
            "sdpa_per_sequence".

    Returns:
        The backend chosen, "flash_varlen" | "sdpa_per_sequence" (also logged).
    """
    if backend not in ("auto", *BACKEND_IMPLS):
        raise ValueError(f"backend must be 'auto' or one of {tuple(BACKEND_IMPLS)}, got {backend!r}")
    target = _unwrap(model)
    if not hasattr(target, "set_attn_implementation"):
        raise ValueError(f"{type(target).__name__} is not a transformers PreTrainedModel")
    reason = _flash_unavailable_reason(target.dtype)
    if backend == "flash_varlen" and reason is not None:
        raise RuntimeError(f"varlen attention backend 'flash_varlen' cannot run: {reason}. "
                           "Install flash-attn (`pip install flash-attn --no-build-isolation`) on a CUDA "
                           "machine, or use backend='auto' / 'sdpa_per_sequence'.")
    chosen = backend if backend != "auto" else ("flash_varlen" if reason is None else "sdpa_per_sequence")
    register_varlen_attention()
    target.set_attn_implementation(BACKEND_IMPLS[chosen])
    if target.config._attn_implementation != BACKEND_IMPLS[chosen]:
        raise ValueError(f"{type(target).__name__} did not accept attn_implementation="
                         f"{BACKEND_IMPLS[chosen]!r}: it does not dispatch through AttentionInterface")
    why = "flash-attn on CUDA" if chosen == "flash_varlen" else (reason or "requested")
    logger.info("varlen attention for %s: %s (%s)", type(target).__name__, chosen, why)
    return chosen
