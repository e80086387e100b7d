"""Per-token log-probs straight from final hidden states and the LM head, the fused op per chunk.

- `linear_token_logprobs(hidden_MH, weight_VH, labels_M)`: one autograd function: per chunk of
  rows, logits = h @ W.T in the weight's dtype, then the fused log-prob op (the CUDA kernel or its
  chunk-level torch twin) and its in-place backward. Either one matmul's logits are kept for the
  backward (small M x V: no recompute), or only hidden, labels and lse are saved and each chunk is
  recomputed, so the logits never exist for all rows at once (the Cut-Cross-Entropy idea).
- `hidden_logprobs(hidden_NH, lm_head, labels_N)`: from a head module; ignored rows are never
  projected; a plain nn.Linear goes through `linear_token_logprobs`, any other module (a LoRA-wrapped
  head) through per-chunk checkpointing of module + the fused `token_logprobs`.

The weight is saved for the backward as the Parameter itself, as torch's Linear and DeepSpeed's
ZeRO-3 linear do: under ZeRO-3 the caller runs this inside the head module's forward
(`hpalign.train.forward`), so DeepSpeed gathers the weight for the forward and again for the
backward, and no gathered copy is pinned in between.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from hpalign.ops.logprobs import IGNORE_INDEX, select_logprobs_impl, token_logprobs

# linear_token_logprobs keeps one matmul's logits for the backward when they take at most this many
# bytes as fp32 (M x V x 4): no recompute, measured 1.4-1.8x faster on CPU than recomputing chunks.
KEEP_LOGITS_BYTES = 512 * 2**20
# Its rows per chunk: LINEAR_CHUNK_BYTES of fp32-sized logits (261 rows for V = 128256), raised to
# MIN_LINEAR_CHUNK_ROWS for matmul efficiency as long as that stays within twice the budget.
LINEAR_CHUNK_BYTES = 128 * 2**20
MIN_LINEAR_CHUNK_ROWS = 256


def default_linear_chunk_rows(num_rows: int, vocab: int) -> int:
    """Rows per chunk of `linear_token_logprobs` (>= 1, never more than num_rows when num_rows > 0).

    max(LINEAR_CHUNK_BYTES / 4V, min(MIN_LINEAR_CHUNK_ROWS, 2 LINEAR_CHUNK_BYTES / 4V)): 261 rows
    (128 MiB) for V = 128256, 256 rows (250 MiB) for V = 256000, 1048 rows for V = 32000.
    """
    row_bytes = 4 * max(vocab, 1)
    rows = max(LINEAR_CHUNK_BYTES // row_bytes, min(MIN_LINEAR_CHUNK_ROWS, 2 * LINEAR_CHUNK_BYTES // row_bytes))
    return max(1, min(rows, num_rows))


def _torch_chunk_fwd(logits_CV: torch.Tensor, labels_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps_C, lse_C), fp32, from one fused fp32 log_softmax over the chunk; logp 0 at ignored rows."""
    valid_C = labels_C != IGNORE_INDEX
    safe_C1 = torch.where(valid_C, labels_C, 0)[:, None]
    logp_C = torch.log_softmax(logits_CV, dim=-1, dtype=torch.float32).gather(1, safe_C1).squeeze(1)
    # lse = x_y - log p_y, read off the same pass (a linear head's logits are finite).
    lse_C = logits_CV.gather(1, safe_C1).squeeze(1).float() - logp_C
    return torch.where(valid_C, logp_C, 0.0), lse_C


def _torch_chunk_bwd_inplace(
    grad_logps_C: torch.Tensor, logits_CV: torch.Tensor, labels_C: torch.Tensor, lse_C: torch.Tensor
) -> None:
    """Overwrite logits_CV with g * (onehot - exp(x - lse)), computed in fp32; 0 at ignored rows."""
    valid_C = labels_C != IGNORE_INDEX
    g_C1 = torch.where(valid_C, grad_logps_C.float(), 0.0)[:, None]
    safe_C1 = torch.where(valid_C, labels_C, 0)[:, None]
    work_CV = logits_CV if logits_CV.dtype == torch.float32 else logits_CV.float()
    work_CV.sub_(lse_C[:, None]).exp_().mul_(-g_C1).scatter_add_(1, safe_C1, g_C1)
    if work_CV is not logits_CV:
        logits_CV.copy_(work_CV)


def _cuda_fwd(logits_CV: torch.Tensor, labels_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.hpalign.token_logprobs_fwd(logits_CV, labels_C)


def _cuda_bwd_inplace(
    grad_logps_C: torch.Tensor, logits_CV: torch.Tensor, labels_C: torch.Tensor, lse_C: torch.Tensor
) -> None:
    torch.ops.hpalign.token_logprobs_bwd_inplace(grad_logps_C, logits_CV, labels_C, lse_C)


ChunkFns = tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], Callable[..., None]]


def _chunk_fns(choice: str) -> ChunkFns:
    """(forward, in-place backward) of the fused op for a resolved impl, looked up at call time."""
    return (_cuda_fwd, _cuda_bwd_inplace) if choice == "cuda" else (_torch_chunk_fwd, _torch_chunk_bwd_inplace)


def _linear(hidden_CH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None) -> torch.Tensor:
    if bias_V is None:
        return torch.mm(hidden_CH, weight_VH.t())
    return torch.addmm(bias_V, hidden_CH, weight_VH.t())


def _chunk_entropy(logits_CV: torch.Tensor, lse_C: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p log p of softmax(logits) per row, fp32, from the chunk's logits and lse (every term
    >= 0: no cancellation, unlike lse - sum p x)."""
    logp_CV = logits_CV.float() - lse_C[:, None]
    return -(logp_CV.exp() * logp_CV).sum(-1)


def _forward_chunks(
    hidden_MH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None, labels_M: torch.Tensor,
    fwd: Callable[..., tuple[torch.Tensor, torch.Tensor]], chunk_rows: int, logits_MV: torch.Tensor | None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logps_M, lse_M, entropy_M or None): each chunk's logits are rows of logits_MV if given, else
    computed and dropped; the entropy (a metric, no gradient) is read off the same logits, so it
    costs an elementwise pass instead of a second LM-head matmul."""
    logps_M = torch.empty(hidden_MH.shape[0], dtype=torch.float32, device=hidden_MH.device)
    lse_M = torch.empty_like(logps_M)
    entropy_M = torch.empty_like(logps_M) if with_entropy else None
    for start in range(0, hidden_MH.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits_CV = _linear(hidden_MH[rows], weight_VH, bias_V) if logits_MV is None else logits_MV[rows]
        logps_M[rows], lse_M[rows] = fwd(logits_CV, labels_M[rows])
        if entropy_M is not None:
            entropy_M[rows] = _chunk_entropy(logits_CV, lse_M[rows])
    return logps_M, lse_M, entropy_M


class _LinearTokenLogprobs(torch.autograd.Function):
    """logps_M of logits = hidden_MH @ weight_VH.T (+ bias_V), the fused log-prob op on each chunk.

    keep_logits: one matmul; its logits are saved and the backward overwrites them, chunk by chunk,
    with their gradient, then two matmuls give grad_hidden and grad_weight. Otherwise the forward
    drops each chunk's logits and the backward recomputes them one chunk at a time, accumulating
    grad_weight with addmm in the weight's dtype (as Liger's fused linear cross-entropy does).
    The weight and bias are saved as they are (no alias of their storage): under ZeRO-3 DeepSpeed
    empties the Parameter after the head's forward and gathers it again before its backward.
    """

    @staticmethod
    def forward(ctx, hidden_MH, weight_VH, bias_V, labels_M, chunk_fns, chunk_rows: int, keep_logits: bool,  # type: ignore[override]
                with_entropy: bool):
        h_MH = hidden_MH.to(weight_VH.dtype)  # logits in the weight's dtype, as an nn.Linear computes them
        logits_MV = _linear(h_MH, weight_VH, bias_V) if keep_logits else None
        logps_M, lse_M, entropy_M = _forward_chunks(h_MH, weight_VH, bias_V, labels_M, chunk_fns[0], chunk_rows,
                                                    logits_MV, with_entropy)
        ctx.save_for_backward(h_MH, weight_VH, bias_V, labels_M, lse_M, logits_MV)
        ctx.chunk_fns, ctx.chunk_rows, ctx.hidden_dtype = chunk_fns, chunk_rows, hidden_MH.dtype
        entropy_M = logps_M.new_empty(0) if entropy_M is None else entropy_M
        ctx.mark_non_differentiable(entropy_M)  # a metric
        return logps_M, entropy_M

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps_M, _grad_entropy_M):  # type: ignore[override]
        h_MH, weight_VH, bias_V, labels_M, lse_M, logits_MV = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        bwd_inplace, chunk_rows = ctx.chunk_fns[1], ctx.chunk_rows
        grad_logps_M = grad_logps_M.float().contiguous()
        grad_h = torch.empty_like(h_MH) if need_h else None
        grad_w = torch.zeros_like(weight_VH) if need_w else None
        grad_b = torch.zeros_like(bias_V) if need_b else None
        for start in range(0, h_MH.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            if logits_MV is not None:  # keep mode: the gradient replaces the saved logits
                bwd_inplace(grad_logps_M[rows], logits_MV[rows], labels_M[rows], lse_M[rows])
                continue
            grad_CV = _linear(h_MH[rows], weight_VH, bias_V)  # recompute, then overwrite with its gradient
            bwd_inplace(grad_logps_M[rows], grad_CV, labels_M[rows], lse_M[rows])
            _accumulate(grad_CV, h_MH[rows], weight_VH, grad_h[rows] if need_h else None, grad_w, grad_b)
            del grad_CV  # at most one chunk of logits alive
        if logits_MV is not None:
            torch.autograd.graph.increment_version(logits_MV)  # it now holds gradients: fail loudly on reuse
            _accumulate(logits_MV, h_MH, weight_VH, grad_h, grad_w, grad_b)
        grad_h = None if grad_h is None else grad_h.to(ctx.hidden_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _accumulate(
    grad_CV: torch.Tensor, h_CH: torch.Tensor, weight_VH: torch.Tensor, grad_h_CH: torch.Tensor | None,
    grad_w_VH: torch.Tensor | None, grad_b_V: torch.Tensor | None,
) -> None:
    """grad_h_CH = grad_CV @ W; grad_w_VH += grad_CV.T @ h_CH; grad_b_V += grad_CV.sum(0) (each if asked)."""
    if grad_h_CH is not None:
        torch.mm(grad_CV, weight_VH, out=grad_h_CH)
    if grad_w_VH is not None:
        grad_w_VH.addmm_(grad_CV.t(), h_CH)
    if grad_b_V is not None:
        grad_b_V.add_(grad_CV.sum(0))


def _check_linear_inputs(
    hidden_MH: torch.Tensor, weight_VH: torch.Tensor, labels_M: torch.Tensor, bias_V: torch.Tensor | None
) -> None:
    if hidden_MH.dim() != 2 or labels_M.shape != hidden_MH.shape[:1] or labels_M.dtype.is_floating_point:
        raise ValueError(f"expected hidden [M, H] and integer labels [M], got {tuple(hidden_MH.shape)} and "
                         f"{tuple(labels_M.shape)} {labels_M.dtype}")
    if weight_VH.dim() != 2 or weight_VH.shape[1] != hidden_MH.shape[1]:
        raise ValueError(f"expected weight [V, H] with H = {hidden_MH.shape[1]}, got {tuple(weight_VH.shape)}; "
                         "under ZeRO-3 call this inside the head module's forward, where DeepSpeed has "
                         "gathered the weight (hpalign.train.forward.response_logprobs)")
    if bias_V is not None and bias_V.shape != weight_VH.shape[:1]:
        raise ValueError(f"expected bias [V] with V = {weight_VH.shape[0]}, got {tuple(bias_V.shape)}")


def linear_token_logprobs(
    hidden_MH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_M: torch.Tensor,
    *,
    bias_V: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
    keep_logits: bool | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """logps[m] = log softmax(hidden_MH[m] @ weight_VH.T + bias_V)[labels_M[m]], the fused op per chunk.

    The logits are computed in the weight's dtype (as an nn.Linear computes them); the log-softmax
    and its gradient in fp32 by the fused op, `impl` = "auto" | "cuda" | "torch" (see
    `select_logprobs_impl`), on `chunk_rows` rows at a time; its in-place backward turns each
    chunk's logits into their gradient, so no second [rows, V] buffer is allocated.

    Memory: keep_logits=True saves one [M, V] logits tensor (no recompute, the fast path for small
    M x V); False saves hidden, labels and lse only, and the backward recomputes one chunk of logits
    at a time. None keeps them when M x V x 4 <= KEEP_LOGITS_BYTES (512 MiB). Under torch.no_grad()
    (or when nothing requires grad) nothing is saved and at most one chunk of logits exists.

    The weight (and bias) is saved for the backward as the Parameter itself: under DeepSpeed ZeRO-3
    call this inside the head module's forward, so that DeepSpeed gathers it for the forward and
    again for the backward (`hpalign.train.forward.response_logprobs` does).

    Args:
        hidden_MH: [M, H] final hidden states (usually only rows that carry a label), any float dtype.
        weight_VH: [V, H] LM-head weight. Its gradient (an addmm per chunk) is computed only when it
            requires grad: a frozen head (LoRA) costs no grad_weight matmul.
        labels_M: [M] int target ids; -100 = ignored (logp 0, zero gradient).
        bias_V: optional [V] bias.
        impl: "auto" | "cuda" | "torch"; "cuda" raises if the extension is not built.
        chunk_rows: rows per chunk; None = `default_linear_chunk_rows` (about 128 MiB of fp32-sized
            logits, at least 256 rows where V allows, never more than M).
        keep_logits: True | False | None (see Memory).
        with_entropy: also return the entropy of every row's softmax (fp32, no gradient: a metric),
            read off the same logits chunk by chunk.

    Returns:
        logps_M: [M] fp32; differentiable w.r.t. hidden_MH (gradient in its dtype), weight_VH and bias_V;
        with `with_entropy`, (logps_M, entropy_M).
    """
    _check_linear_inputs(hidden_MH, weight_VH, labels_M, bias_V)
    num_rows, vocab = hidden_MH.shape[0], weight_VH.shape[0]
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 (or None for the default), got {chunk_rows}")
    chunk_rows = default_linear_chunk_rows(num_rows, vocab) if chunk_rows is None else max(1, min(chunk_rows, num_rows))
    if keep_logits is None:
        keep_logits = num_rows * vocab * 4 <= KEEP_LOGITS_BYTES
    chunk_fns = _chunk_fns(select_logprobs_impl(impl, hidden_MH))
    labels_M = labels_M.long().contiguous()
    inputs = (hidden_MH, weight_VH, bias_V)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        h_MH = hidden_MH.to(weight_VH.dtype)
        logps_M, _, entropy_M = _forward_chunks(h_MH, weight_VH, bias_V, labels_M, chunk_fns[0], chunk_rows, None,
                                                with_entropy)
    else:
        logps_M, entropy_M = _LinearTokenLogprobs.apply(hidden_MH, weight_VH, bias_V, labels_M, chunk_fns,
                                                        chunk_rows, keep_logits, with_entropy)
    return (logps_M, entropy_M) if with_entropy else logps_M


def is_plain_linear(module: torch.nn.Module) -> bool:
    """An nn.Linear whose forward is Linear's own: its output is hidden @ weight.T + bias, so
    `linear_token_logprobs` may compute it. A peft LoRA layer overrides forward (and wraps
    `base_layer`), so it is not."""
    if not isinstance(module, torch.nn.Linear) or type(module).forward is not torch.nn.Linear.forward:
        return False
    return not (hasattr(module, "base_layer") or hasattr(module, "lora_A"))


def _module_chunk_logps(
    hidden_CH: torch.Tensor, labels_C: torch.Tensor, lm_head: torch.nn.Module, impl: str
) -> torch.Tensor:
    return token_logprobs(lm_head(hidden_CH), labels_C, impl=impl)


def _module_logprobs(
    hidden_MH: torch.Tensor, lm_head: torch.nn.Module, labels_M: torch.Tensor, chunk_rows: int, impl: str
) -> torch.Tensor:
    """lm_head(chunk) then `token_logprobs` per chunk, each chunk under non-reentrant checkpointing."""
    pieces = []
    for start in range(0, hidden_MH.shape[0], chunk_rows):
        args = (hidden_MH[start : start + chunk_rows], labels_M[start : start + chunk_rows], lm_head, impl)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_module_chunk_logps, *args, use_reentrant=False))
        else:  # e.g. the reference model: nothing is saved anyway
            pieces.append(_module_chunk_logps(*args))
    return torch.cat(pieces) if pieces else hidden_MH.new_zeros(0, dtype=torch.float32)


# Rows per chunk of the module path (a head with its own forward) when the caller names none.
MODULE_CHUNK_ROWS = 1024


def run_as_forward(module: torch.nn.Module, fn, *args):
    """`fn(*args)` called as `module`'s forward, so the hooks on the module apply to it. DeepSpeed
    ZeRO-3's hooks then gather the module's parameters for the call, and again before the result's
    backward, then release them: how the fused op reads a partitioned head weight without pinning
    a gathered copy between forward and backward."""
    module.forward = fn
    try:
        return module(*args)
    finally:
        del module.forward


def hidden_logprobs(
    hidden_NH: torch.Tensor,
    lm_head: torch.nn.Module,
    labels_N: torch.Tensor,
    *,
    chunk_rows: int | None = 1024,
    impl: str = "auto",
    keep_logits: bool | None = False,
    through_module: bool = False,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs straight from final hidden states: logps[n] = log softmax(lm_head(h_n))[y_n].

    Only rows with labels_N != -100 are projected:
    - a plain `nn.Linear` head (or a subclass that keeps Linear's forward) goes through
      `linear_token_logprobs` with its weight and bias (`chunk_rows`, `keep_logits` as there; the
      defaults keep at most one [chunk_rows, V] block of logits, the backward recomputing each
      chunk). With `through_module` the op runs as the head's own forward (`run_as_forward`), so
      the module's hooks see it (ZeRO-3 gathers the weight once per forward); otherwise the module
      and its hooks are not called;
    - any other module (a peft LoRA-wrapped head, a ZeRO-3 head whose weight is not gathered) is
      called per chunk (`chunk_rows`, or MODULE_CHUNK_ROWS for None), followed by the fused
      `token_logprobs`, under non-reentrant activation checkpointing: the backward re-runs the
      module on each chunk.

    Args:
        hidden_NH: [N, H] final hidden states (after the final norm), any float dtype.
        lm_head: module mapping [C, H] -> [C, V] (e.g. `model.lm_head` or `model.get_output_embeddings()`).
        labels_N: [N] int target ids; -100 = ignored.
        chunk_rows: rows per chunk; None = `linear_token_logprobs`' default (MODULE_CHUNK_ROWS on
            the module path).
        impl: "auto" | "cuda" | "torch" for the fused log-prob op (see `select_logprobs_impl`).
        keep_logits: the linear path's memory mode (see `linear_token_logprobs`; None: by size).
        through_module: run the linear path inside the head's forward, for the module's hooks.
        with_entropy: also the entropy of softmax(lm_head(h_n)) [N] (fp32, 0 at ignored rows, no
            gradient): on the linear path read off the op's own logits, on the module path from a
            no-grad pass of the head per chunk.

    Returns:
        logps_N: [N] fp32, 0 at ignored rows; differentiable w.r.t. hidden_NH and lm_head's parameters;
        with `with_entropy`, (logps_N, entropy_N).
    """
    if hidden_NH.dim() != 2 or labels_N.shape != hidden_NH.shape[:1]:
        raise ValueError(
            f"expected hidden [N, H] and labels [N], got {tuple(hidden_NH.shape)} and {tuple(labels_N.shape)}"
        )
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    kept_M = (labels_N != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync: sizes the chunks
    hidden_MH = hidden_NH.index_select(0, kept_M)
    labels_M = labels_N.index_select(0, kept_M)
    full_weight = getattr(lm_head, "weight", None) is not None and lm_head.weight.shape[-1:] == hidden_NH.shape[1:]
    entropy_M = None
    if is_plain_linear(lm_head) and (through_module or full_weight):  # (an ungathered ZeRO-3 weight is empty)
        def logps_of(hidden: torch.Tensor):
            return linear_token_logprobs(hidden, lm_head.weight, labels_M, bias_V=lm_head.bias, impl=impl,
                                         chunk_rows=chunk_rows, keep_logits=keep_logits, with_entropy=with_entropy)

        result = run_as_forward(lm_head, logps_of, hidden_MH) if through_module else logps_of(hidden_MH)
        logps_M, entropy_M = result if with_entropy else (result, None)
    else:
        rows = chunk_rows or MODULE_CHUNK_ROWS
        logps_M = _module_logprobs(hidden_MH, lm_head, labels_M, rows, select_logprobs_impl(impl, hidden_MH))
        if with_entropy:
            entropy_M = _module_entropy(hidden_MH.detach(), lm_head, rows)
    logps_N = torch.zeros(labels_N.shape[0], dtype=torch.float32, device=hidden_NH.device)
    logps_N = logps_N.index_copy(0, kept_M, logps_M)
    if not with_entropy:
        return logps_N
    return logps_N, torch.zeros_like(logps_N).index_copy(0, kept_M, entropy_M)


@torch.no_grad()
def _module_entropy(hidden_MH: torch.Tensor, lm_head: torch.nn.Module, chunk_rows: int) -> torch.Tensor:
    """Entropy [M] of softmax(lm_head(hidden)) per chunk through the module (its hooks apply)."""
    pieces = []
    for chunk in hidden_MH.split(chunk_rows):
        logits_CV = lm_head(chunk).float()
        pieces.append(_chunk_entropy(logits_CV, torch.logsumexp(logits_CV, dim=-1)))
    return torch.cat(pieces) if pieces else hidden_MH.new_zeros(0, dtype=torch.float32)
