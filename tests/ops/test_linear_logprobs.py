"""linear_token_logprobs and hidden_logprobs: hidden states x LM head -> log-probs, the fused op per chunk."""

from __future__ import annotations

import math

import pytest
import torch

from hpalign.ops import linear_logprobs as lp
from hpalign.ops.linear_logprobs import hidden_logprobs
from tests.ops.test_logprobs import IGNORE, reference


class CountingHead(torch.nn.Linear):
    """An LM head that records the row count of every call (forward and recompute)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__(hidden, vocab, bias=False)
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return super().forward(x)


@pytest.mark.parametrize("num_rows,vocab,chunk_rows", [(50, 1001, 8), (33, 7, 1024), (20, 1, 3)])
def test_hidden_logprobs_matches_reference(num_rows, vocab, chunk_rows):
    torch.manual_seed(0)
    hidden_size = 16
    head = CountingHead(hidden_size, vocab)
    hidden = torch.randn(num_rows, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (num_rows,))
    labels[::3] = IGNORE
    grad_out = torch.randn(num_rows)

    logps = hidden_logprobs(hidden, head, labels, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(logps, (hidden, head.weight), grad_out)

    ref_hidden = hidden.detach().double().requires_grad_()
    ref_weight = head.weight.detach().double().requires_grad_()
    ref_logps, _ = reference(ref_hidden @ ref_weight.t(), labels)
    ref_grads = torch.autograd.grad(ref_logps, (ref_hidden, ref_weight), grad_out.double())
    torch.testing.assert_close(logps.double(), ref_logps.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (logps[labels == IGNORE] == 0).all() and (grads[0][labels == IGNORE] == 0).all()
    # Only kept rows are projected, chunk by chunk, once in the forward and once in the recompute.
    num_kept = int((labels != IGNORE).sum())
    assert max(head.calls) <= chunk_rows and sum(head.calls) == 2 * num_kept


def test_hidden_logprobs_never_saves_full_logits():
    num_rows, hidden_size, vocab = 256, 8, 300
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(num_rows, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (num_rows,))
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = hidden_logprobs(hidden, head, labels, chunk_rows=32)
    assert saved, "the hook saw nothing: the test would prove nothing"
    assert max(s.numel() for s in saved) < num_rows * vocab
    assert all(s.numel() <= max(num_rows * hidden_size, 32 * vocab) for s in saved)
    logps.sum().backward()
    assert head.weight.grad is not None and hidden.grad is not None


def test_hidden_logprobs_without_grad_and_bf16():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 40, bias=False).to(torch.bfloat16)
    hidden = torch.randn(10, 8).to(torch.bfloat16)
    labels = torch.randint(0, 40, (10,))
    with torch.no_grad():
        logps = hidden_logprobs(hidden, head, labels, chunk_rows=4)
    want = reference(head(hidden).float(), labels)[0]
    torch.testing.assert_close(logps.double(), want, atol=1e-5, rtol=1e-5)
    assert logps.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs: hidden states x LM-head weight -> log-probs, the fused op per chunk
# ---------------------------------------------------------------------------------------------

LINEAR_TOLS = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_linear_inputs(num_rows: int, hidden_size: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """(hidden, weight, bias, labels): leaves that require grad, a third of the labels -100."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (num_rows,), generator=gen)
    labels[::3] = IGNORE
    return hidden, weight, bias, labels


def linear_reference(hidden, weight, bias, labels, grad_out):
    """(logps, (grad_hidden, grad_weight, grad_bias)) of log_softmax(h @ W.T + b).gather in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].t() + leaves[2]
    logps, _ = reference(logits, labels)
    return logps.detach(), torch.autograd.grad(logps, leaves, grad_out.double())


class OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op name, output shape) of every aten op run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.ops.append((func.overloadpacket.__name__, tuple(t.shape)))
        return out


def saved_tensors_of(fn) -> tuple[object, list[torch.Tensor]]:
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_logits", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 7, 37, 1000])
def test_linear_token_logprobs_matches_reference(dtype, keep_logits, chunk_rows):
    hidden, weight, bias, labels = make_linear_inputs(37, 16, 101, dtype, seed=chunk_rows)
    grad_out = torch.randn(37, generator=torch.Generator().manual_seed(1))
    logps = lp.linear_token_logprobs(hidden, weight, labels, bias_V=bias, impl="torch", chunk_rows=chunk_rows,
                                     keep_logits=keep_logits)
    grads = torch.autograd.grad(logps, (hidden, weight, bias), grad_out)

    ref_logps, ref_grads = linear_reference(hidden, weight, bias, labels, grad_out)
    assert logps.dtype == torch.float32 and logps.shape == (37,)
    torch.testing.assert_close(logps.double(), ref_logps, **LINEAR_TOLS[dtype])
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **LINEAR_TOLS[dtype])
    assert (logps[labels == IGNORE] == 0).all() and (grads[0][labels == IGNORE] == 0).all()


def test_linear_token_logprobs_without_bias_and_mixed_dtypes():
    """fp32 hidden into a bf16 head: logits in bf16 (as nn.Linear would), grad_hidden back in fp32."""
    hidden, weight, _, labels = make_linear_inputs(20, 8, 50, torch.float32, seed=3)
    weight_bf16 = weight.detach().bfloat16().requires_grad_()
    grad_out = torch.randn(20)
    logps = lp.linear_token_logprobs(hidden, weight_bf16, labels, impl="torch", chunk_rows=6, keep_logits=False)
    grad_hidden, grad_weight = torch.autograd.grad(logps, (hidden, weight_bf16), grad_out)
    assert grad_hidden.dtype == torch.float32 and grad_weight.dtype == torch.bfloat16
    ref_logps, ref_grads = linear_reference(hidden.bfloat16(), weight_bf16, torch.zeros(50), labels, grad_out)
    torch.testing.assert_close(logps.double(), ref_logps, **LINEAR_TOLS[torch.bfloat16])
    torch.testing.assert_close(grad_hidden.double(), ref_grads[0], **LINEAR_TOLS[torch.bfloat16])


@pytest.mark.parametrize("keep_logits", [True, False])
def test_linear_token_logprobs_with_no_rows(keep_logits):
    hidden, weight, bias, _ = make_linear_inputs(0, 8, 30, torch.float32)
    logps = lp.linear_token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), bias_V=bias,
                                     keep_logits=keep_logits)
    assert logps.shape == (0,) and logps.dtype == torch.float32
    grad_hidden, grad_weight, grad_bias = torch.autograd.grad(logps.sum(), (hidden, weight, bias))
    assert grad_hidden.shape == (0, 8) and not grad_weight.any() and not grad_bias.any()


@pytest.mark.parametrize("keep_logits", [True, False])
def test_frozen_weight_costs_no_grad_weight_matmul(keep_logits):
    """A frozen head (LoRA): no [V, H] matmul in the backward, and weight.grad stays None."""
    num_rows, hidden_size, vocab = 24, 8, 40
    hidden, weight, _, labels = make_linear_inputs(num_rows, hidden_size, vocab, torch.float32)
    weight.requires_grad_(False)

    def weight_sized_matmuls(w: torch.Tensor) -> list[str]:
        logps = lp.linear_token_logprobs(hidden, w, labels, impl="torch", chunk_rows=5, keep_logits=keep_logits)
        with OpRecorder() as rec:
            logps.sum().backward()
        return [name for name, shape in rec.ops if name in ("mm", "addmm", "addmm_") and shape == (vocab, hidden_size)]

    assert weight_sized_matmuls(weight) == [] and weight.grad is None and hidden.grad is not None
    trainable = weight.detach().clone().requires_grad_()
    assert weight_sized_matmuls(trainable) and trainable.grad is not None  # the spy does see them


@pytest.mark.parametrize("keep_logits", [True, False])
def test_zero3_lifecycle_the_weight_is_released_between_forward_and_backward(keep_logits):
    """ZeRO-3 empties the Parameter after the head's forward and gathers it again before its
    backward. The op must read it then (no gathered copy pinned from the forward), and the
    gradient must reach `.grad` through a plain loss.backward()."""
    hidden, weight, bias, labels = make_linear_inputs(30, 8, 60, torch.float32, seed=4)
    param, bias_param = torch.nn.Parameter(weight.detach().clone()), torch.nn.Parameter(bias.detach().clone())
    grad_out = torch.randn(30)

    def forward():
        return lp.linear_token_logprobs(hidden, param, labels, bias_V=bias_param, impl="torch", chunk_rows=7,
                                        keep_logits=keep_logits)

    def release():
        param.data, bias_param.data = torch.empty(0), torch.empty(0)

    def gather():
        param.data, bias_param.data = weight.detach().clone(), bias.detach().clone()

    logps = forward()
    release()
    with pytest.raises(RuntimeError):  # nothing pinned: the released weight is what backward sees
        logps.backward(grad_out)
    gather()
    hidden.grad = param.grad = bias_param.grad = None
    logps = forward()
    release()
    gather()  # DeepSpeed's pre-backward hook
    logps.backward(grad_out)
    ref_logps, ref_grads = linear_reference(hidden, weight, bias, labels, grad_out)
    torch.testing.assert_close(logps.double(), ref_logps, **LINEAR_TOLS[torch.float32])
    for got, want in zip((hidden.grad, param.grad, bias_param.grad), ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **LINEAR_TOLS[torch.float32])


def test_recompute_mode_saves_no_logits_and_keep_mode_saves_one_copy():
    num_rows, hidden_size, vocab, chunk_rows = 64, 8, 300, 16
    hidden, weight, _, labels = make_linear_inputs(num_rows, hidden_size, vocab, torch.bfloat16)

    def run(keep_logits: bool | None) -> list[torch.Tensor]:
        logps, saved = saved_tensors_of(lambda: lp.linear_token_logprobs(
            hidden, weight, labels, impl="torch", chunk_rows=chunk_rows, keep_logits=keep_logits))
        with OpRecorder() as rec:
            logps.sum().backward()
        if keep_logits is False:  # the backward never builds more than one chunk of logits at a time
            assert max(math.prod(shape) for _, shape in rec.ops) <= max(chunk_rows * vocab, vocab * hidden_size)
        return saved

    recompute = run(False)
    assert recompute, "the hook saw nothing: the test would prove nothing"
    assert all(t.numel() < num_rows * vocab for t in recompute)
    assert sum(t.numel() for t in recompute) <= (num_rows + vocab) * hidden_size + 2 * num_rows
    keep = run(True)
    assert [t.shape for t in keep if t.numel() >= num_rows * vocab] == [(num_rows, vocab)]
    assert any(t.numel() >= num_rows * vocab for t in run(None))  # 19 KiB of logits: kept by default


def test_keep_logits_default_follows_the_byte_threshold(monkeypatch):
    hidden, weight, _, labels = make_linear_inputs(10, 4, 20, torch.float32)
    monkeypatch.setattr(lp, "KEEP_LOGITS_BYTES", 10 * 20 * 4 - 1)
    _, saved = saved_tensors_of(lambda: lp.linear_token_logprobs(hidden, weight, labels, chunk_rows=3))
    assert all(t.numel() < 10 * 20 for t in saved)
    monkeypatch.setattr(lp, "KEEP_LOGITS_BYTES", 10 * 20 * 4)
    _, saved = saved_tensors_of(lambda: lp.linear_token_logprobs(hidden, weight, labels, chunk_rows=3))
    assert any(t.shape == (10, 20) for t in saved)


def test_no_grad_runs_chunks_and_saves_nothing():
    hidden, weight, bias, labels = make_linear_inputs(40, 8, 50, torch.float32, seed=5)
    with torch.no_grad(), OpRecorder() as rec:
        logps, saved = saved_tensors_of(lambda: lp.linear_token_logprobs(
            hidden, weight, labels, bias_V=bias, chunk_rows=9, keep_logits=True))
    assert saved == [] and logps.grad_fn is None
    assert max(math.prod(shape) for _, shape in rec.ops) <= max(9 * 50, 40 * 8)
    ref_logps, _ = linear_reference(hidden, weight, bias, labels, torch.zeros(40))
    torch.testing.assert_close(logps.double(), ref_logps, **LINEAR_TOLS[torch.float32])


@pytest.mark.parametrize("keep_logits", [True, False])
def test_cuda_branch_calls_the_kernel_entry_points_per_chunk(monkeypatch, keep_logits):
    """No GPU here: the two CUDA ops are replaced by fakes that check the kernel's input contract."""
    calls = {"fwd": 0, "bwd": 0}

    def check_kernel_inputs(logits: torch.Tensor, labels: torch.Tensor, *rows: torch.Tensor) -> None:
        assert logits.is_contiguous() and logits.dim() == 2 and logits.shape[1] > 0
        assert labels.dtype == torch.int64 and labels.shape == logits.shape[:1]
        assert all(t.dtype == torch.float32 and t.shape == labels.shape for t in rows)

    def fake_fwd(logits, labels):
        check_kernel_inputs(logits, labels)
        calls["fwd"] += 1
        return lp._torch_chunk_fwd(logits, labels)

    def fake_bwd_inplace(grad_logps, logits, labels, lse):
        check_kernel_inputs(logits, labels, grad_logps, lse)
        calls["bwd"] += 1
        lp._torch_chunk_bwd_inplace(grad_logps, logits, labels, lse)

    monkeypatch.setattr(lp, "_cuda_fwd", fake_fwd)
    monkeypatch.setattr(lp, "_cuda_bwd_inplace", fake_bwd_inplace)
    hidden, weight, bias, labels = make_linear_inputs(23, 8, 40, torch.bfloat16, seed=6)
    grad_out = torch.randn(23)

    def run(impl: str):
        logps = lp.linear_token_logprobs(hidden, weight, labels.int(), bias_V=bias, impl=impl, chunk_rows=5,
                                         keep_logits=keep_logits)
        return logps, torch.autograd.grad(logps, (hidden, weight, bias), grad_out)

    want_logps, want_grads = run("torch")
    assert calls == {"fwd": 0, "bwd": 0}
    monkeypatch.setattr(lp, "select_logprobs_impl", lambda impl, tensor: "cuda")
    got_logps, got_grads = run("cuda")
    assert calls == {"fwd": 5, "bwd": 5}  # ceil(23 / 5) chunks, once each way
    torch.testing.assert_close(got_logps, want_logps, atol=0, rtol=0)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_linear_impl_cuda_without_extension_says_how_to_build():
    hidden, weight, _, labels = make_linear_inputs(4, 8, 9, torch.float32)
    with pytest.raises(RuntimeError, match="(?s)impl=.cuda.*To build it.*load_extension"):
        lp.linear_token_logprobs(hidden, weight, labels, impl="cuda")


def test_linear_token_logprobs_bad_arguments_raise_value_error():
    hidden, weight, bias, labels = make_linear_inputs(6, 8, 11, torch.float32)
    with pytest.raises(ValueError, match="head module's forward"):
        lp.linear_token_logprobs(hidden, torch.empty(0), labels)  # a ZeRO-3 weight outside its gather
    with pytest.raises(ValueError, match="labels"):
        lp.linear_token_logprobs(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="bias"):
        lp.linear_token_logprobs(hidden, weight, labels, bias_V=bias[:3])
    with pytest.raises(ValueError, match="chunk_rows"):
        lp.linear_token_logprobs(hidden, weight, labels, chunk_rows=0)


def test_default_linear_chunk_rows():
    assert lp.default_linear_chunk_rows(10**5, 128256) == 261  # 128 MiB of fp32 logits
    assert lp.default_linear_chunk_rows(10**5, 256000) == 256  # at least 256 rows while <= 256 MiB
    assert lp.default_linear_chunk_rows(10**5, 32000) == 1048
    assert lp.default_linear_chunk_rows(100, 128256) == 100  # never more rows than there are
    assert lp.default_linear_chunk_rows(0, 10) == 1 and lp.default_linear_chunk_rows(10, 10**9) == 1


class FakeLoraHead(torch.nn.Module):
    """Shaped like a peft LoRA layer around a frozen head: base_layer(x) + lora_B(lora_A(x))."""

    def __init__(self, hidden_size: int, vocab: int, rank: int = 2):
        super().__init__()
        self.base_layer = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
        self.lora_A = torch.nn.Linear(hidden_size, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, vocab, bias=False)
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_hidden_logprobs_routes_plain_linear_heads_to_the_fused_linear_op(monkeypatch):
    seen: list[dict] = []
    real = lp.linear_token_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lp, "linear_token_logprobs", spy)
    torch.manual_seed(2)
    hidden, labels = torch.randn(12, 8), torch.randint(0, 30, (12,))
    labels[:4] = IGNORE

    class PlainSubclass(torch.nn.Linear):  # keeps Linear.forward: fused path
        pass

    for head in (torch.nn.Linear(8, 30), PlainSubclass(8, 30)):
        logps = hidden_logprobs(hidden, head, labels, chunk_rows=3, impl="torch")
        assert seen.pop()["keep_logits"] is False  # hidden_logprobs keeps its bounded-memory contract
        torch.testing.assert_close(logps.double(), reference(head(hidden).detach(), labels)[0], atol=1e-5, rtol=1e-5)
    for head in (CountingHead(8, 30), FakeLoraHead(8, 30)):  # forward overridden: module path
        hidden_logprobs(hidden, head, labels, chunk_rows=3, impl="torch")
        assert not seen and sum(head.calls) == 8


def lora_head_inputs(num_rows: int, seed: int):
    """(a FakeLoraHead 8 -> 30 with a random B, hidden [num_rows, 8] requiring grad, labels, every 4th -100)."""
    torch.manual_seed(seed)
    head = FakeLoraHead(8, 30)
    torch.nn.init.normal_(head.lora_B.weight)
    hidden = torch.randn(num_rows, 8, requires_grad=True)
    labels = torch.randint(0, 30, (num_rows,))
    labels[::4] = IGNORE
    return head, hidden, labels


def test_hidden_logprobs_with_a_lora_wrapped_head_matches_reference():
    head, hidden, labels = lora_head_inputs(20, seed=3)
    grad_out = torch.randn(20)
    logps = hidden_logprobs(hidden, head, labels, chunk_rows=6)
    params = (hidden, head.lora_A.weight, head.lora_B.weight)
    grads = torch.autograd.grad(logps, params, grad_out)
    assert head.base_layer.weight.grad is None

    ref = [t.detach().double().requires_grad_() for t in params]
    logits = head.base_layer.weight.detach().double() @ ref[0].t()
    ref_logps, _ = reference((logits + ref[2] @ (ref[1] @ ref[0].t())).t(), labels)
    ref_grads = torch.autograd.grad(ref_logps, ref, grad_out.double())
    torch.testing.assert_close(logps.double(), ref_logps.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    num_kept = int((labels != IGNORE).sum())
    assert max(head.calls) <= 6 and sum(head.calls) == 2 * num_kept  # forward + checkpoint recompute


def _entropy_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return torch.where(labels != IGNORE, -(logp.exp() * logp).sum(-1), 0.0)


@pytest.mark.parametrize("keep_logits", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_entropy_is_read_off_the_ops_own_logits(keep_logits, grad):
    """with_entropy: the entropy of every kept row (0 at ignored ones) at no second head matmul, and
    the log-probs and their gradients exactly as without it."""
    hidden, weight, bias, labels = make_linear_inputs(13, 8, 37, torch.float32)
    head = torch.nn.Linear(8, 37)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    grad_out = torch.randn(13)
    with torch.set_grad_enabled(grad):
        recorder = OpRecorder()
        with recorder:
            logps, entropy = hidden_logprobs(hidden, head, labels, chunk_rows=5, keep_logits=keep_logits,
                                             with_entropy=True)
        plain = hidden_logprobs(hidden, head, labels, chunk_rows=5, keep_logits=keep_logits)
    logits = hidden.detach() @ weight.detach().t() + bias.detach()
    torch.testing.assert_close(entropy.double(), _entropy_reference(logits, labels), atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad and torch.equal(logps, plain)
    forward_matmuls = [shape for name, shape in recorder.ops if name in ("mm", "addmm")]
    kept = int((labels != IGNORE).sum())  # each kept row projected once, by the log-prob op itself
    assert all(shape[1] == 37 for shape in forward_matmuls) and sum(s[0] for s in forward_matmuls) == kept
    if grad:
        got = torch.autograd.grad(logps, hidden, grad_out)[0]
        want = torch.autograd.grad(plain, hidden, grad_out)[0]
        torch.testing.assert_close(got, want)


def test_entropy_through_a_lora_wrapped_head():
    head, hidden, labels = lora_head_inputs(11, seed=4)
    logps, entropy = hidden_logprobs(hidden, head, labels, chunk_rows=4, with_entropy=True)
    torch.testing.assert_close(logps, hidden_logprobs(hidden, head, labels, chunk_rows=4))
    with torch.no_grad():
        want = _entropy_reference(head(hidden), labels)
    torch.testing.assert_close(entropy.double(), want, atol=1e-5, rtol=1e-5)
