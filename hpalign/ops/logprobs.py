"""Per-token log-probabilities without a full fp32 log-softmax.

`log_softmax(logits.float()).gather(...)` materialises an N x V fp32 tensor and autograd saves it:
for V = 150k and N = 16k tokens that is 10 GB, and its backward adds two more N x V tensors. The
paths here never hold more than one chunk of rows in fp32 beyond the gradient they return (the
torch path's chunk size: `default_chunk_rows`, at most 64 MiB):

- `token_logprobs(logits_NV, labels_N, impl=...)`: from logits the caller already holds. The path
  is `auto | cuda | torch` (`auto` logs its choice the first time); `torch` is the chunked
  reference, also the test oracle for the CUDA op in `hpalign.ops.cuda_ext`.
- `token_logprobs_and_entropy(...)`: the same plus the entropy of each row.
- From hidden states and the LM head (the logits never exist for all rows at once):
  `hpalign.ops.linear_logprobs`.

Rows whose label is -100 give log-prob 0 (and entropy 0) and a zero gradient. Outputs are fp32.
"""

from __future__ import annotations

import logging

import torch
from torch.autograd.function import once_differentiable

logger = logging.getLogger("hpalign")

IGNORE_INDEX = -100
IMPLS = ("auto", "cuda", "torch")
_logged_choices: set[str] = set()

CUDA_BUILD_HINT = (
    "To build it: on a machine with an NVIDIA GPU, a CUDA build of torch, nvcc and ninja, the csrc/ "
    "kernels are JIT-built on first use (run `python -c \"from hpalign.ops import cuda_ext; "
    "cuda_ext.load_extension(verbose=True)\"` to build and see errors), or install an ahead-of-time "
    "built hpalign._C; otherwise pass impl='torch' (or 'auto') for the chunked torch path."
)


# The torch path's fp32 working set per chunk: small enough to bound memory (a 128k vocabulary gives
# 130-row chunks), large enough that per-chunk dispatch and thread wake-ups stay negligible. Above
# MIN_CHUNK_BYTES a chunk is also at most 1/MIN_CHUNKS of the rows, so that the working set stays a
# small share of the N x V logits when N is small; below it, memory is too small to matter.
CHUNK_BYTES = 64 * 2**20
MIN_CHUNK_BYTES = 8 * 2**20
MIN_CHUNKS = 4


def default_chunk_rows(num_rows: int, vocab: int) -> int:
    """Rows per fp32 block on the torch path (>= 1).

    min(CHUNK_BYTES / 4V, max(ceil(N / MIN_CHUNKS), MIN_CHUNK_BYTES / 4V)): e.g. 130 rows for
    N = 2048, V = 128256 (64 MiB); 128 rows for N = 512, V = 49152 (24 MiB); all rows for small N x V.
    """
    row_bytes = 4 * max(vocab, 1)
    by_share = max(-(-num_rows // MIN_CHUNKS), MIN_CHUNK_BYTES // row_bytes)
    return max(1, min(CHUNK_BYTES // row_bytes, by_share))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """logps_N (and entropy_N) from logits_NV, `chunk_rows` rows at a time in fp32.

    Saves only the caller's logits (no copy), labels_N and entropy_N. Each chunk is one fused
    `log_softmax` (forward) or `softmax` (backward) written into a preallocated fp32
    [chunk_rows, V] buffer, reading bf16/fp16 logits without an upcast copy; the backward then
    writes grad = g_logp * (onehot - p) - g_ent * p * (log p + entropy) into the gradient with one
    more pass (for fp32 logits without entropy, softmax writes straight into the gradient, all rows
    at once, since that needs no buffer at all). Few,
    large passes per chunk also matter on CPU: every op is an OpenMP region whose threads must all
    wake, which is what makes many small ops slow on a busy machine.
    """

    @staticmethod
    def forward(ctx, logits_NV, labels_N, chunk_rows: int, with_entropy: bool):  # type: ignore[override]
        num_rows, vocab = logits_NV.shape
        chunk_rows = max(1, min(chunk_rows, num_rows))
        valid_N = labels_N != IGNORE_INDEX
        safe_labels_N = torch.where(valid_N, labels_N, 0)
        target_N = torch.empty(num_rows, dtype=torch.float32, device=logits_NV.device)
        entropy_N = torch.zeros_like(target_N)
        buf_CV = logits_NV.new_empty((chunk_rows, vocab), dtype=torch.float32)
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            num = min(chunk_rows, num_rows - start)
            logp_CV = torch.log_softmax(logits_NV[rows], dim=-1, dtype=torch.float32, out=buf_CV[:num])
            target_N[rows] = logp_CV.gather(1, safe_labels_N[rows, None]).squeeze(1)
            if with_entropy:
                # -sum p * log p: all terms >= 0, no cancellation (unlike lse - sum p * x).
                entropy_N[rows] = -logp_CV.exp().mul_(logp_CV).sum(-1)
        zero = torch.zeros((), dtype=torch.float32, device=logits_NV.device)
        logps_N = torch.where(valid_N, target_N, zero)
        entropy_N = torch.where(valid_N, entropy_N, zero)
        ctx.save_for_backward(logits_NV, labels_N, entropy_N)
        ctx.chunk_rows = chunk_rows
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy_N)
        return logps_N, entropy_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps_N, grad_entropy_N):  # type: ignore[override]
        logits_NV, labels_N, entropy_N = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy_N = None
        if grad_logps_N is None and grad_entropy_N is None:
            return None, None, None, None
        (num_rows, vocab), chunk_rows = logits_NV.shape, ctx.chunk_rows
        valid_N = labels_N != IGNORE_INDEX
        safe_labels_N = torch.where(valid_N, labels_N, 0)
        zero = torch.zeros((), dtype=torch.float32, device=logits_NV.device)
        # Ignored rows get a zero gradient whatever the caller sends for them.
        neg_g_N = torch.zeros_like(entropy_N) if grad_logps_N is None else torch.where(valid_N, -grad_logps_N.float(), zero)
        g_ent_N = None if grad_entropy_N is None else torch.where(valid_N, grad_entropy_N.float(), zero)
        grad_NV = torch.empty_like(logits_NV, memory_format=torch.contiguous_format)
        direct = grad_NV.dtype == torch.float32 and g_ent_N is None
        if direct:  # softmax writes into the gradient itself: no buffer, so no need to chunk
            chunk_rows = max(num_rows, 1)
        buf_CV = None if direct else logits_NV.new_empty((chunk_rows, vocab), dtype=torch.float32)
        ent_CV = None if g_ent_N is None else torch.empty_like(buf_CV)
        minus_one = torch.full((chunk_rows, 1), -1.0, device=logits_NV.device)
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            num = min(chunk_rows, num_rows - start)
            labels_C1, x_CV = safe_labels_N[rows, None], logits_NV[rows]
            if ent_CV is None:
                p_CV = grad_NV[rows] if direct else buf_CV[:num]
                torch.softmax(x_CV, dim=-1, dtype=torch.float32, out=p_CV)
                # g * (onehot - p) = -g * (p - onehot); the cast to the logits dtype happens once, last.
                p_CV.scatter_add_(1, labels_C1, minus_one[:num])
                torch.mul(p_CV, neg_g_N[rows, None], out=grad_NV[rows])
                continue
            # dH/dx = -p * (log p + H), times the incoming gradient.
            logp_CV = torch.log_softmax(x_CV, dim=-1, dtype=torch.float32, out=ent_CV[:num])
            p_CV = torch.exp(logp_CV, out=buf_CV[:num])
            ent_term_CV = logp_CV.add_(entropy_N[rows, None]).mul_(p_CV).mul_(-g_ent_N[rows, None])
            p_CV.scatter_add_(1, labels_C1, minus_one[:num]).mul_(neg_g_N[rows, None])
            torch.add(p_CV, ent_term_CV, out=grad_NV[rows])
        return grad_NV, None, None, None


def _check_inputs(logits_NV: torch.Tensor, labels_N: torch.Tensor, chunk_rows: int | None) -> int:
    """Validate the arguments; return the torch path's rows per chunk."""
    if logits_NV.dim() != 2 or labels_N.dim() != 1 or labels_N.shape[0] != logits_NV.shape[0]:
        raise ValueError(
            f"expected logits [N, V] and labels [N], got {tuple(logits_NV.shape)} and {tuple(labels_N.shape)}; "
            "flatten batch and time first (logits.flatten(0, -2), labels.flatten())"
        )
    if labels_N.dtype.is_floating_point:
        raise ValueError(f"labels must be integer token ids, got {labels_N.dtype}")
    if chunk_rows is None:
        return default_chunk_rows(logits_NV.shape[0], logits_NV.shape[1])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 (or None for the default), got {chunk_rows}")
    return chunk_rows


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA op is loaded (building it on first use if needed), else why not."""
    try:
        from hpalign.ops import cuda_ext
    except ImportError as err:
        return f"hpalign.ops.cuda_ext cannot be imported ({err})"
    try:
        cuda_ext.require_extension()
    except RuntimeError as err:
        return str(err)
    return None


def _log_choice_once(choice: str, why: str) -> None:
    if choice not in _logged_choices:
        _logged_choices.add(choice)
        logger.info("token_logprobs: using the %s path (%s)", choice, why)


def select_logprobs_impl(impl: str, logits_NV: torch.Tensor) -> str:
    """Resolve `impl` ("auto" | "cuda" | "torch") to "cuda" or "torch" for these logits.

    "cuda" raises RuntimeError (saying how to build the extension) when it cannot run; "auto"
    takes the CUDA op for CUDA tensors when it is built, else the torch path, and logs the choice
    the first time it is made. CPU tensors never trigger a build of the extension.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"token_logprobs(impl='cuda'): {reason}. {CUDA_BUILD_HINT}")
        if not logits_NV.is_cuda:
            raise RuntimeError("token_logprobs(impl='cuda') needs CUDA tensors, got logits on "
                               f"{logits_NV.device}; use impl='auto' or 'torch' for CPU tensors")
        return "cuda"
    reason = "logits are not on a CUDA device" if not logits_NV.is_cuda else cuda_unavailable_reason()
    choice = "torch" if reason is not None else "cuda"
    _log_choice_once(choice, reason or "extension loaded, CUDA tensors")
    return choice


def token_logprobs(
    logits_NV: torch.Tensor, labels_N: torch.Tensor, *, impl: str = "auto", chunk_rows: int | None = None
) -> torch.Tensor:
    """log softmax(logits_NV)[n, labels_N[n]] per row, without an N x V fp32 buffer.

    Args:
        logits_NV: [N, V] logits in any float dtype (fp32, bf16, fp16); not modified.
        labels_N: [N] int target ids; -100 = ignored (gives 0 and no gradient).
        impl: "auto" | "cuda" | "torch" (see `select_logprobs_impl`).
        chunk_rows: rows per fp32 block on the torch path; None = `default_chunk_rows` (at most
            CHUNK_BYTES = 64 MiB of fp32, and at most 1/4 of the rows for large inputs). The torch
            path's memory beyond the inputs and the returned gradient is one such block.

    Returns:
        logps_N: [N] fp32, differentiable w.r.t. `logits_NV`; the gradient has the logits' dtype.
    """
    chunk_rows = _check_inputs(logits_NV, labels_N, chunk_rows)
    if select_logprobs_impl(impl, logits_NV) == "cuda":
        from hpalign.ops.cuda_ext import cuda_token_logprobs

        return cuda_token_logprobs(logits_NV, labels_N.long())
    logps_N, _ = _ChunkedTokenLogprobs.apply(logits_NV, labels_N, chunk_rows, False)
    return logps_N


def token_logprobs_and_entropy(
    logits_NV: torch.Tensor, labels_N: torch.Tensor, *, impl: str = "auto", chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps_N, entropy_N): `token_logprobs` plus H[n] = -sum_v p log p of softmax(logits_NV[n]).

    Same arguments, paths and memory bound as `token_logprobs`. Both outputs are fp32, 0 at ignored
    rows, and differentiable. On the torch path the backward is analytic, dH/dx = -p * (x - E_p[x]),
    computed chunk by chunk together with the log-prob gradient (no autograd recompute).
    """
    chunk_rows = _check_inputs(logits_NV, labels_N, chunk_rows)
    if select_logprobs_impl(impl, logits_NV) == "cuda":
        from hpalign.ops.cuda_ext import cuda_token_logprobs_with_entropy

        return cuda_token_logprobs_with_entropy(logits_NV, labels_N.long())
    return _ChunkedTokenLogprobs.apply(logits_NV, labels_N, chunk_rows, True)
