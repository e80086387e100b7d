"""The fused CUDA token log-prob op (csrc/): loading, fake kernels, autograd and the Python API.

The kernels are registered from C++ (``TORCH_LIBRARY(hpalign, m)`` in ``csrc/logprobs_binding.cpp``)
as ``torch.ops.hpalign.token_logprobs_fwd`` and friends, CUDA only. This module loads them (an
ahead-of-time built ``hpalign._C`` first, else a JIT build with ninja + nvcc), then registers from
Python what composes them with the rest of torch: fake (meta) kernels for ``torch.compile`` and the
autograd formula. On a machine without CUDA nothing is ever built: ``cuda_available()`` is False and
``require_extension()`` raises a ``RuntimeError`` that says what is missing.

Public API: ``cuda_available``, ``load_extension``, ``require_extension``, ``cuda_token_logprobs``,
``cuda_token_logprobs_with_entropy``. The pure-torch path and the ``impl="auto|cuda|torch"`` choice
live in ``hpalign.ops.logprobs``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

NAMESPACE = "hpalign"
IGNORE_INDEX = -100
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
JIT_NAME = "hpalign_logprobs"
JIT_SOURCES = ("logprobs_binding.cpp", "logprobs_kernel.cu")
# sm_80 cubins also run on sm_86/sm_89; the compute_90 PTX lets newer GPUs JIT the kernel.
# --use_fast_math is deliberately absent: the kernel picks __expf where it is accurate enough and
# keeps an exact logf for the final lse.
JIT_CUDA_ARCH_FLAGS = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)

# Must match the m.def(...) strings of csrc/logprobs_binding.cpp (tests/ops/test_cuda_ext.py checks).
OP_SCHEMAS: dict[str, str] = {
    "token_logprobs_fwd": "token_logprobs_fwd(Tensor logits, Tensor labels) -> (Tensor logps, Tensor lse)",
    "token_logprobs_entropy_fwd": (
        "token_logprobs_entropy_fwd(Tensor logits, Tensor labels) -> (Tensor logps, Tensor lse, Tensor entropy)"
    ),
    "token_logprobs_bwd": (
        "token_logprobs_bwd(Tensor grad_logps, Tensor logits, Tensor labels, Tensor lse, "
        "Tensor? grad_entropy=None, Tensor? entropy=None) -> Tensor"
    ),
    "token_logprobs_bwd_inplace": (
        "token_logprobs_bwd_inplace(Tensor grad_logps, Tensor(a!) logits, Tensor labels, Tensor lse, "
        "Tensor? grad_entropy=None, Tensor? entropy=None) -> ()"
    ),
}

_loaded = False
_build_error: str | None = None  # set once a build / load failed in this process
_registered_namespaces: set[str] = set()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where JIT builds go: ``$HPALIGN_CACHE/torch_extensions`` (default ``~/.cache/hpalign``)."""
    root = os.environ.get("HPALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hpalign")
    return Path(root) / "torch_extensions"


def _missing_device() -> str | None:
    """Why no CUDA kernel can run here at all (cheap checks, never builds), or None."""
    if torch.version.cuda is None:
        return (
            f"this torch build has no CUDA support (torch {torch.__version__}); install a CUDA build of "
            "torch on a machine with an NVIDIA GPU, or use impl='torch'"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False); use impl='torch'"
    return None


def _missing_build_tools() -> str | None:
    """Why a JIT build cannot start (no nvcc, no ninja, no sources), or None."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH) to JIT-build the hpalign CUDA op"
    if not cpp_extension.is_ninja_available():
        return "ninja is missing (pip install ninja); it is needed to JIT-build the hpalign CUDA op"
    missing = [name for name in JIT_SOURCES if not (CSRC_DIR / name).is_file()]
    if missing:
        return (
            f"the CUDA sources {missing} are not under {CSRC_DIR}: JIT builds need a source checkout "
            "(pip install -e .), or build hpalign._C ahead of time (see csrc/README.md)"
        )
    return None


def _ops_registered() -> bool:
    try:
        getattr(torch.ops, NAMESPACE).token_logprobs_fwd  # noqa: B018 - raises if absent
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_aot() -> bool:
    """Load the ahead-of-time built ``hpalign._C`` if one is installed; False if there is none."""
    spec = importlib.util.find_spec("hpalign._C")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(spec.origin)
    logger.info("hpalign: loaded the ahead-of-time CUDA op from %s", spec.origin)
    return True


def _load_jit(verbose: bool) -> None:
    from torch.utils import cpp_extension

    build_dir = cache_dir() / JIT_NAME
    build_dir.mkdir(parents=True, exist_ok=True)
    # TORCH_CUDA_ARCH_LIST, when set, wins over the default architectures.
    arch_flags = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else list(JIT_CUDA_ARCH_FLAGS)
    try:
        cpp_extension.load(
            name=JIT_NAME,
            sources=[str(CSRC_DIR / name) for name in JIT_SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", *arch_flags],
            extra_include_paths=[str(CSRC_DIR)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # the build raises RuntimeError / CalledProcessError / OSError
        log_path = build_dir / "build_error.log"
        log_path.write_text(f"{type(exc).__name__}: {exc}\n")
        raise RuntimeError(f"the JIT build of the hpalign CUDA op failed; its log is {log_path}") from exc
    logger.info("hpalign: JIT-built the CUDA op in %s", build_dir)


def load_extension(verbose: bool = False) -> bool:
    """Load the CUDA op (AOT ``hpalign._C``, else a JIT build); True when it can be used.

    Without a CUDA device nothing is built and this returns False; ``require_extension()`` says
    why. A failed build is not retried in the same process.
    """
    global _loaded, _build_error
    if _loaded:
        return True
    if _missing_device() is not None or _build_error is not None:
        return False
    try:
        if not _ops_registered() and not _load_aot():
            missing = _missing_build_tools()
            if missing is not None:
                _build_error = missing
                return False
            _load_jit(verbose)
    except (RuntimeError, OSError) as exc:
        _build_error = str(exc)
        logger.warning("hpalign: CUDA op unavailable: %s", exc)
        return False
    register_python_side(NAMESPACE)
    _loaded = True
    return True


def cuda_available() -> bool:
    """True only when a CUDA device is visible and the hpalign CUDA op is loaded (building it if needed)."""
    return load_extension()


def require_extension() -> None:
    """Load the CUDA op or raise a ``RuntimeError`` that says what is missing."""
    if load_extension():
        return
    reason = _missing_device() or _build_error or "unknown reason"
    raise RuntimeError(f"the hpalign CUDA token log-prob op is not available: {reason}")


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd (registered for a namespace, so tests can bind them to CPU stand-ins)
# ---------------------------------------------------------------------------------------------


def _check_fake_inputs(logits: torch.Tensor, labels: torch.Tensor) -> None:
    torch._check(logits.dim() == 2, lambda: f"logits must be [N, V], got {tuple(logits.shape)}")
    torch._check(labels.dim() == 1, lambda: f"labels must be [N], got {tuple(labels.shape)}")
    torch._check(labels.shape[0] == logits.shape[0], lambda: "labels and logits disagree on N")
    torch._check(labels.dtype == torch.int64, lambda: f"labels must be int64, got {labels.dtype}")


def _row_outputs(logits: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    return tuple(logits.new_empty((logits.shape[0],), dtype=torch.float32) for _ in range(count))


def _fwd_fake(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_fake_inputs(logits, labels)
    logps_N, lse_N = _row_outputs(logits, 2)
    return logps_N, lse_N


def _entropy_fwd_fake(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_fake_inputs(logits, labels)
    logps_N, lse_N, entropy_N = _row_outputs(logits, 3)
    return logps_N, lse_N, entropy_N


def _bwd_fake(
    grad_logps: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_fake_inputs(logits, labels)
    return logits.new_empty(logits.shape)  # contiguous, logits' dtype, like the CUDA kernel


def _bwd_inplace_fake(
    grad_logps: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> None:
    _check_fake_inputs(logits, labels)


def _ops(namespace: str) -> Any:
    return getattr(torch.ops, namespace)


def _make_autograd(namespace: str, *, with_entropy: bool) -> tuple[Any, Any]:
    """setup_context / backward for ``token_logprobs_fwd`` (or the entropy variant) in ``namespace``."""

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        logits, labels = inputs
        ctx.save_for_backward(logits, labels, *output[1:])  # lse (and entropy)
        ctx.mark_non_differentiable(output[1])  # lse is saved for the backward, not a loss input

    def backward(ctx: Any, grad_logps: torch.Tensor | None, *rest: torch.Tensor | None) -> tuple[Any, None]:
        logits, labels, lse, *entropy = ctx.saved_tensors
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        grad_entropy = rest[1] if with_entropy else None
        if grad_entropy is None:
            grad = _ops(namespace).token_logprobs_bwd(grad_logps, logits, labels, lse)
        else:
            grad = _ops(namespace).token_logprobs_bwd(
                grad_logps, logits, labels, lse, grad_entropy, entropy[0]
            )
        return grad, None

    return setup_context, backward


def register_python_side(namespace: str) -> None:
    """Register fake kernels and autograd for the ops of ``namespace`` (once per namespace)."""
    if namespace in _registered_namespaces:
        return
    torch.library.register_fake(f"{namespace}::token_logprobs_fwd")(_fwd_fake)
    torch.library.register_fake(f"{namespace}::token_logprobs_entropy_fwd")(_entropy_fwd_fake)
    torch.library.register_fake(f"{namespace}::token_logprobs_bwd")(_bwd_fake)
    torch.library.register_fake(f"{namespace}::token_logprobs_bwd_inplace")(_bwd_inplace_fake)
    for name, with_entropy in (("token_logprobs_fwd", False), ("token_logprobs_entropy_fwd", True)):
        setup_context, backward = _make_autograd(namespace, with_entropy=with_entropy)
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup_context)
    _registered_namespaces.add(namespace)


class _InplaceBackward(torch.autograd.Function):
    """Log-probs whose backward overwrites the logits buffer with its gradient (no new N x V tensor)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, namespace: str) -> torch.Tensor:
        logps, lse = _ops(namespace).token_logprobs_fwd(logits, labels)
        ctx.save_for_backward(logits, labels, lse)
        ctx.namespace = namespace
        return logps

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, labels, lse = ctx.saved_tensors
        _ops(ctx.namespace).token_logprobs_bwd_inplace(grad_logps, logits, labels, lse)
        # Anything else that saved these logits now fails loudly instead of reading gradients.
        torch.autograd.graph.increment_version(logits)
        return logits, None, None


def _token_logprobs(
    logits_NV: torch.Tensor, labels_N: torch.Tensor, *, inplace_backward: bool, namespace: str
) -> torch.Tensor:
    logits_NV = logits_NV.contiguous()
    if inplace_backward and torch.is_grad_enabled() and logits_NV.requires_grad:
        return _InplaceBackward.apply(logits_NV, labels_N, namespace)
    logps_N, _ = _ops(namespace).token_logprobs_fwd(logits_NV, labels_N)
    return logps_N


def _token_logprobs_with_entropy(
    logits_NV: torch.Tensor, labels_N: torch.Tensor, *, namespace: str
) -> tuple[torch.Tensor, torch.Tensor]:
    logps_N, _, entropy_N = _ops(namespace).token_logprobs_entropy_fwd(logits_NV.contiguous(), labels_N)
    return logps_N, entropy_N


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_public_inputs(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> None:
    require_extension()
    if not logits_NV.is_cuda or not labels_N.is_cuda:
        raise ValueError(
            f"the CUDA token log-prob op needs CUDA tensors, got logits on {logits_NV.device} and labels "
            f"on {labels_N.device}; use hpalign.ops.logprobs.token_logprobs(impl='torch') on CPU"
        )


def cuda_token_logprobs(
    logits_NV: torch.Tensor, labels_N: torch.Tensor, *, inplace_backward: bool = False
) -> torch.Tensor:
    """Per-token log-probabilities ``logps_N[n] = log softmax(logits_NV[n])[labels_N[n]]`` (fp32).

    logits_NV: [N, V] float32 / bfloat16 / float16 on CUDA (made contiguous if it is not).
    labels_N: [N] int64; ``-100`` marks ignored rows, which get ``logps = 0`` and zero gradient.
    A label outside [0, V) that is not -100 gives NaN.

    One pass over each row (online log-sum-exp); the backward reads the logits once more and writes
    a gradient in the logits' dtype. With ``inplace_backward=True`` the gradient is written into the
    logits buffer itself: pass it only when nothing else needs these logits after the forward (the
    usual case for ``lm_head`` outputs); autograd then raises if something else saved them.
    """
    _check_public_inputs(logits_NV, labels_N)
    return _token_logprobs(logits_NV, labels_N, inplace_backward=inplace_backward, namespace=NAMESPACE)


def cuda_token_logprobs_with_entropy(
    logits_NV: torch.Tensor, labels_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps_N, entropy_N)``, both fp32, from the same single pass over the logits.

    entropy_N[n] = -sum_v p[n, v] log p[n, v] with p = softmax(logits_NV[n]); 0 on ignored rows.
    Both outputs are differentiable. Shapes and dtypes as in ``cuda_token_logprobs``.
    """
    _check_public_inputs(logits_NV, labels_N)
    return _token_logprobs_with_entropy(logits_NV, labels_N, namespace=NAMESPACE)
