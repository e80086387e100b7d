"""The fused CUDA token log-prob op: loader, Python glue, and the kernel against a float64 reference.

CPU tests always run: the loader never builds without CUDA and explains why; the schemas in
csrc/logprobs_binding.cpp match OP_SCHEMAS; and the fake kernels + autograd of cuda_ext.py, bound to
CPU stand-ins of the four ops (namespace ``hpalign_cputest``), pass opcheck, match the reference
gradients and compose with torch.compile. GPU tests (marked ``gpu``) check the kernel itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hpalign.ops import cuda_ext

IGNORE = cuda_ext.IGNORE_INDEX
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a CUDA device")


def make_inputs(
    num_rows: int, vocab: int, dtype: torch.dtype, device: str, *, seed: int = 0, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels with ~25% ignored rows and both ends of the vocabulary labelled."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, (num_rows,), generator=gen)
    labels[torch.rand(num_rows, generator=gen) < 0.25] = IGNORE
    labels[0], labels[-1] = 0, vocab - 1
    return logits.to(device), labels.to(device)


def reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, entropy) in float64, differentiable in the logits; 0 on ignored rows."""
    logp_all = logits.double().log_softmax(-1)
    keep = labels != IGNORE
    picked = logp_all.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = picked.new_zeros(())
    return torch.where(keep, picked, zero), torch.where(keep, entropy, zero)


# ---------------------------------------------------------------------------------------------
# CPU stand-ins of the four CUDA ops, so the Python side is tested on any machine
# ---------------------------------------------------------------------------------------------

CPU_NS = "hpalign_cputest"


def _cpu_fwd_all(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = logits.double()
    keep = labels != IGNORE
    lse = x.logsumexp(-1)
    logps = x.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) - lse
    entropy = lse - (x.softmax(-1) * x).sum(-1)
    zero = x.new_zeros(())
    return tuple(torch.where(keep, t, zero).float() for t in (logps, lse, entropy))


def _cpu_fwd(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logps, lse, _ = _cpu_fwd_all(logits, labels)
    return logps, lse


def _cpu_entropy_fwd(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _cpu_fwd_all(logits, labels)


def _cpu_grad(
    grad_logps: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel's formula: g * (onehot - p) - g_H * p * (x - lse + H), zero on ignored rows."""
    x = logits.double()
    g = grad_logps.double()[:, None]
    shift = -lse.double()[:, None]
    p = (x + shift).exp()
    coeff = g.expand_as(x)
    if grad_entropy is not None and entropy is not None:
        coeff = coeff + grad_entropy.double()[:, None] * (x + shift + entropy.double()[:, None])
    grad = (-p * coeff).scatter_add(-1, labels.clamp(min=0)[:, None], g)
    return torch.where((labels != IGNORE)[:, None], grad, grad.new_zeros(())).to(logits.dtype)


def _cpu_bwd_inplace(
    grad_logps: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> None:
    logits.copy_(_cpu_grad(grad_logps, logits, labels, lse, grad_entropy, entropy))


_CPU_LIB = torch.library.Library(CPU_NS, "DEF")
for _name, _schema in cuda_ext.OP_SCHEMAS.items():
    _CPU_LIB.define(_schema)
for _name, _fn in (
    ("token_logprobs_fwd", _cpu_fwd),
    ("token_logprobs_entropy_fwd", _cpu_entropy_fwd),
    ("token_logprobs_bwd", _cpu_grad),
    ("token_logprobs_bwd_inplace", _cpu_bwd_inplace),
):
    _CPU_LIB.impl(_name, _fn, "CPU")
cuda_ext.register_python_side(CPU_NS)
CPU_OPS = getattr(torch.ops, CPU_NS)


# ---------------------------------------------------------------------------------------------
# Loader (CPU)
# ---------------------------------------------------------------------------------------------


@no_cuda
def test_cuda_not_available_without_a_device() -> None:
    assert cuda_ext.cuda_available() is False


@no_cuda
def test_require_extension_says_what_is_missing() -> None:
    with pytest.raises(RuntimeError, match="CUDA") as info:
        cuda_ext.require_extension()
    assert "impl='torch'" in str(info.value)


@no_cuda
def test_never_builds_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPALIGN_CACHE", str(tmp_path))
    assert cuda_ext.load_extension() is False
    assert not (tmp_path / "torch_extensions").exists()


@no_cuda
def test_public_api_fails_loudly_without_cuda() -> None:
    logits, labels = make_inputs(4, 11, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="not available"):
        cuda_ext.cuda_token_logprobs(logits, labels)
    with pytest.raises(RuntimeError, match="not available"):
        cuda_ext.cuda_token_logprobs_with_entropy(logits, labels)


def test_cache_dir_follows_hpalign_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPALIGN_CACHE", str(tmp_path))
    assert cuda_ext.cache_dir() == tmp_path / "torch_extensions"


def test_schemas_match_the_cpp_registration() -> None:
    source = (cuda_ext.CSRC_DIR / "logprobs_binding.cpp").read_text()
    defs = re.findall(r"m\.def\((.*?)\);", source, flags=re.DOTALL)
    schemas = {"".join(re.findall(r'"([^"]*)"', d)) for d in defs}
    assert schemas == set(cuda_ext.OP_SCHEMAS.values())
    for name in cuda_ext.OP_SCHEMAS:
        assert f'm.impl("{name}"' in source


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_kernel_compiles_with_nvcc(tmp_path: Path) -> None:
    kernel = cuda_ext.CSRC_DIR / "logprobs_kernel.cu"
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", f"-I{cuda_ext.CSRC_DIR}", "-c", str(kernel)]
    done = subprocess.run([*cmd, "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Python glue on the CPU stand-ins: fake kernels, autograd, in-place backward, torch.compile
# ---------------------------------------------------------------------------------------------


def _opcheck_all(ops: object, logits: torch.Tensor, labels: torch.Tensor) -> None:
    logps, lse, entropy = ops.token_logprobs_entropy_fwd(logits, labels)
    grad = torch.randn_like(logps)
    leaf = logits.detach().requires_grad_()
    torch.library.opcheck(ops.token_logprobs_fwd, (leaf, labels))
    torch.library.opcheck(ops.token_logprobs_entropy_fwd, (leaf, labels))
    torch.library.opcheck(ops.token_logprobs_bwd, (grad, logits, labels, lse))
    torch.library.opcheck(ops.token_logprobs_bwd, (grad, logits, labels, lse, torch.randn_like(lse), entropy))
    torch.library.opcheck(ops.token_logprobs_bwd_inplace, (grad, logits.clone(), labels, lse))


def test_opcheck_on_cpu_stand_ins() -> None:
    _opcheck_all(CPU_OPS, *make_inputs(6, 13, torch.float32, "cpu"))


def test_glue_gradients_match_reference() -> None:
    logits, labels = make_inputs(8, 37, torch.float32, "cpu")
    leaf = logits.requires_grad_()
    g_logps, g_ent = torch.randn(8), torch.randn(8)
    logps, entropy = cuda_ext._token_logprobs_with_entropy(leaf, labels, namespace=CPU_NS)
    (grad,) = torch.autograd.grad((logps * g_logps).sum() + (entropy * g_ent).sum(), leaf)
    ref_logps, ref_entropy = reference(leaf, labels)
    (ref_grad,) = torch.autograd.grad((ref_logps * g_logps).sum() + (ref_entropy * g_ent).sum(), leaf)
    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-6)
    assert torch.all(grad[labels == IGNORE] == 0)


def test_glue_inplace_backward_reuses_the_logits_buffer() -> None:
    logits, labels = make_inputs(8, 37, torch.float32, "cpu")
    hidden = logits.clone().requires_grad_()
    g = torch.randn(8)
    expected = torch.autograd.grad((reference(hidden, labels)[0] * g).sum(), hidden)[0].float()
    inner = hidden * 1.0  # a non-leaf, as lm_head outputs are
    logps = cuda_ext._token_logprobs(inner, labels, inplace_backward=True, namespace=CPU_NS)
    (logps * g).sum().backward()
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(inner.detach(), expected, rtol=1e-4, atol=1e-6)  # overwritten


def test_glue_inplace_backward_fails_loudly_when_logits_are_shared() -> None:
    logits, labels = make_inputs(8, 37, torch.float32, "cpu")
    inner = logits.clone().requires_grad_() * 1.0
    other = inner.pow(2).sum()  # saves the logits, and runs after the log-prob backward
    logps = cuda_ext._token_logprobs(inner, labels, inplace_backward=True, namespace=CPU_NS)
    with pytest.raises(RuntimeError, match="inplace"):
        (other + logps.sum()).backward()


def test_glue_composes_with_torch_compile() -> None:
    logits, labels = make_inputs(8, 37, torch.float32, "cpu")

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logps, entropy = cuda_ext._token_logprobs_with_entropy(x, y, namespace=CPU_NS)
        return (
            logps.sum()
            + 0.1 * entropy.sum()
            + cuda_ext._token_logprobs(x, y, inplace_backward=False, namespace=CPU_NS).sum()
        )

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    eager_x, compiled_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_fn(eager_x, labels).backward()
    compiled(compiled_x, labels).backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


# ---------------------------------------------------------------------------------------------
# The CUDA kernel (GPU)
# ---------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [1001, 49152, 128256]


def _tolerances(dtype: torch.dtype) -> dict[str, float]:
    # fp32: rel 1e-6 plus an absolute floor for logps near 0, where lse - logit cancels.
    return {"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


def _grad_tolerances(dtype: torch.dtype) -> dict[str, float]:
    # p = exp(x - lse) uses __expf (a few ulp); bf16/fp16 gradients are rounded to the logits' dtype.
    return {"rtol": 2e-5, "atol": 1e-8} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-6}


@pytest.fixture
def cuda_op() -> None:
    cuda_ext.require_extension()  # on a CUDA machine a failed build is an error, not a skip


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_forward_matches_float64_reference(dtype: torch.dtype, vocab: int) -> None:
    logits, labels = make_inputs(33, vocab, dtype, "cuda")
    logps = cuda_ext.cuda_token_logprobs(logits, labels)
    logps_e, entropy = cuda_ext.cuda_token_logprobs_with_entropy(logits, labels)
    ref_logps, ref_entropy = reference(logits, labels)
    assert logps.dtype == torch.float32 and logps.shape == (33,)
    torch.testing.assert_close(logps.double(), ref_logps, **_tolerances(dtype))
    torch.testing.assert_close(logps_e, logps, rtol=0, atol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-4)
    assert torch.all(logps[labels == IGNORE] == 0) and torch.all(entropy[labels == IGNORE] == 0)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_backward_matches_float64_reference(dtype: torch.dtype, vocab: int) -> None:
    logits, labels = make_inputs(33, vocab, dtype, "cuda", seed=1)
    leaf = logits.requires_grad_()
    g = torch.randn(33, device="cuda")
    (grad,) = torch.autograd.grad((cuda_ext.cuda_token_logprobs(leaf, labels) * g).sum(), leaf)
    (ref,) = torch.autograd.grad((reference(leaf, labels)[0] * g).sum(), leaf)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref.double(), **_grad_tolerances(dtype))
    assert torch.all(grad[labels == IGNORE] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_entropy_backward_matches_float64_reference(dtype: torch.dtype) -> None:
    logits, labels = make_inputs(17, 49152, dtype, "cuda", seed=2)
    leaf = logits.requires_grad_()
    g_logps, g_ent = torch.randn(17, device="cuda"), torch.randn(17, device="cuda")
    logps, entropy = cuda_ext.cuda_token_logprobs_with_entropy(leaf, labels)
    (grad,) = torch.autograd.grad((logps * g_logps + entropy * g_ent).sum(), leaf)
    ref_logps, ref_entropy = reference(leaf, labels)
    (ref,) = torch.autograd.grad((ref_logps * g_logps + ref_entropy * g_ent).sum(), leaf)
    tol = {"rtol": 1e-4, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-5}
    torch.testing.assert_close(grad.double(), ref.double(), **tol)


@pytest.mark.parametrize("vocab", [1001, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_misaligned_rows(dtype: torch.dtype, vocab: int) -> None:
    """Logits starting 3 elements into their storage: scalar heads, and a fresh output whose
    alignment differs from the input's (the backward's all-scalar path)."""
    logits, labels = make_inputs(9, vocab, dtype, "cuda", seed=3)
    storage = torch.empty(9 * vocab + 3, dtype=dtype, device="cuda")
    shifted = storage[3:].view(9, vocab).copy_(logits).requires_grad_()
    g = torch.randn(9, device="cuda")
    logps = cuda_ext.cuda_token_logprobs(shifted, labels)
    (grad,) = torch.autograd.grad((logps * g).sum(), shifted)
    ref_logps = reference(shifted, labels)[0]
    (ref,) = torch.autograd.grad((ref_logps * g).sum(), shifted)
    torch.testing.assert_close(logps.double(), ref_logps, **_tolerances(dtype))
    torch.testing.assert_close(grad.double(), ref.double(), **_grad_tolerances(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_inplace_backward_matches_functional(dtype: torch.dtype) -> None:
    logits, labels = make_inputs(16, 49152, dtype, "cuda", seed=4)
    g = torch.randn(16, device="cuda")
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        inner = leaf * 1
        (cuda_ext.cuda_token_logprobs(inner, labels, inplace_backward=inplace) * g).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert torch.equal(inner.detach(), grads[1])  # the buffer now holds the gradient


@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_all_ignored_and_empty_inputs() -> None:
    logits, _ = make_inputs(5, 1001, torch.bfloat16, "cuda")
    labels = torch.full((5,), IGNORE, device="cuda")
    leaf = logits.requires_grad_()
    logps = cuda_ext.cuda_token_logprobs(leaf, labels)
    logps.sum().backward()
    assert torch.all(logps == 0) and torch.all(leaf.grad == 0)
    empty = torch.empty(0, 1001, device="cuda")
    assert cuda_ext.cuda_token_logprobs(empty, torch.empty(0, dtype=torch.long, device="cuda")).shape == (0,)


@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_rejects_bad_inputs() -> None:
    logits, labels = make_inputs(4, 1001, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="int64"):
        cuda_ext.cuda_token_logprobs(logits, labels.int())
    with pytest.raises(RuntimeError, match="labels must be"):
        cuda_ext.cuda_token_logprobs(logits, labels[:3])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cuda_ext.cuda_token_logprobs(logits.double(), labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_opcheck_cuda(dtype: torch.dtype) -> None:
    _opcheck_all(torch.ops.hpalign, *make_inputs(6, 1001, dtype, "cuda"))


@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_bf16_backward_allocates_no_fp32_buffer() -> None:
    num_rows, vocab, width = 4096, 49152, 64
    hidden = torch.randn(num_rows, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(width, vocab, device="cuda", dtype=torch.bfloat16) / width**0.5
    labels = make_inputs(num_rows, 8, torch.float32, "cpu")[1].cuda()
    for inplace, budget in ((False, num_rows * vocab * 4), (True, num_rows * vocab * 2 // 4)):
        logits = hidden @ weight  # [N, V] bf16, like an lm_head output
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        cuda_ext.cuda_token_logprobs(logits, labels, inplace_backward=inplace).sum().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        assert peak < budget, f"inplace={inplace}: backward peak {peak / 2**20:.0f} MiB"
        hidden.grad = None
        del logits


@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_torch_compile_matches_eager() -> None:
    logits, labels = make_inputs(32, 49152, torch.bfloat16, "cuda", seed=5)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logps, entropy = cuda_ext.cuda_token_logprobs_with_entropy(x, y)
        return logps.sum() - 0.01 * entropy.sum()

    eager_x, compiled_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_fn(eager_x, labels).backward()
    torch.compile(loss_fn, fullgraph=True)(compiled_x, labels).backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


@pytest.mark.usefixtures("cuda_op")
@pytest.mark.gpu
@requires_cuda
def test_matches_the_torch_impl() -> None:
    logprobs = pytest.importorskip("hpalign.ops.logprobs")
    logits, labels = make_inputs(64, 49152, torch.bfloat16, "cuda", seed=6)
    expected = logprobs.token_logprobs(logits, labels, impl="torch")
    actual = cuda_ext.cuda_token_logprobs(logits, labels)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-2, atol=1e-2)
