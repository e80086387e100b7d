"""Chunked per-token log-probs against the float64 log_softmax().gather() reference."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hpalign.ops import logprobs as lp
from hpalign.ops.logprobs import token_logprobs, token_logprobs_and_entropy

IGNORE = -100


def reference(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps_N, entropy_N) in float64; 0 at ignored rows."""
    logp_NV = F.log_softmax(logits_NV.double(), -1)
    valid = labels_N != IGNORE
    logps = logp_NV.gather(1, labels_N.clamp_min(0)[:, None]).squeeze(1)
    entropy = -(logp_NV.exp() * logp_NV).sum(-1)
    return torch.where(valid, logps, 0.0), torch.where(valid, entropy, 0.0)


def make_inputs(num_rows: int, vocab: int, dtype: torch.dtype, seed: int = 0, ignore_frac: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (num_rows,), generator=gen)
    labels[torch.rand(num_rows, generator=gen) < ignore_frac] = IGNORE
    return logits.requires_grad_(), labels


SHAPES = [(1, 1), (5, 7), (37, 1001), (64, 50), (130, 259)]
TOLS = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows,vocab", SHAPES)
@pytest.mark.parametrize("chunk_rows", [1, 16, 2048])
def test_token_logprobs_matches_reference(num_rows, vocab, dtype, chunk_rows):
    logits, labels = make_inputs(num_rows, vocab, dtype, seed=num_rows + vocab)
    grad_out = torch.randn(num_rows, generator=torch.Generator().manual_seed(1))
    logps = token_logprobs(logits, labels, impl="torch", chunk_rows=chunk_rows)
    assert logps.dtype == torch.float32 and logps.shape == (num_rows,)
    (grad,) = torch.autograd.grad(logps, logits, grad_out)

    ref_logits = logits.detach().double().requires_grad_()  # the same (rounded) values, in float64
    ref_logps, _ = reference(ref_logits, labels)
    (ref_grad,) = torch.autograd.grad(ref_logps, ref_logits, grad_out.double())
    torch.testing.assert_close(logps.double(), ref_logps.detach(), **TOLS[dtype])
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, **TOLS[dtype])
    assert (logps[labels == IGNORE] == 0).all()
    assert (grad[labels == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows,vocab", [(1, 1), (37, 1001), (130, 259)])
def test_entropy_matches_reference(num_rows, vocab, dtype):
    logits, labels = make_inputs(num_rows, vocab, dtype, seed=3)
    gen = torch.Generator().manual_seed(2)
    g_logp, g_ent = torch.randn(num_rows, generator=gen), torch.randn(num_rows, generator=gen)
    logps, entropy = token_logprobs_and_entropy(logits, labels, chunk_rows=16)
    (grad,) = torch.autograd.grad((logps, entropy), logits, (g_logp, g_ent), retain_graph=True)
    (grad_ent_only,) = torch.autograd.grad(entropy, logits, g_ent)

    ref_logits = logits.detach().double().requires_grad_()
    ref_logps, ref_entropy = reference(ref_logits, labels)
    (ref_grad,) = torch.autograd.grad((ref_logps, ref_entropy), ref_logits, (g_logp.double(), g_ent.double()),
                                      retain_graph=True)
    (ref_grad_ent,) = torch.autograd.grad(ref_entropy, ref_logits, g_ent.double())
    torch.testing.assert_close(logps.double(), ref_logps.detach(), **TOLS[dtype])
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **TOLS[dtype])
    torch.testing.assert_close(grad.double(), ref_grad, **TOLS[dtype])
    torch.testing.assert_close(grad_ent_only.double(), ref_grad_ent, **TOLS[dtype])
    assert (entropy[labels == IGNORE] == 0).all()


def test_logprobs_accept_non_contiguous_logits_and_do_not_modify_them():
    logits_full, labels = make_inputs(40, 33, torch.float32)
    logits = logits_full.detach()[:, 1:].clone().requires_grad_()  # [40, 32]
    strided = logits.t().contiguous().t()  # same values, column-major strides
    before = strided.detach().clone()
    labels = labels.clamp(max=31)
    logps = token_logprobs(strided, labels, impl="torch", chunk_rows=7)
    torch.testing.assert_close(logps.double(), reference(logits.detach(), labels)[0], atol=1e-6, rtol=1e-6)
    logps.sum().backward()
    assert torch.equal(strided.detach(), before)
    assert logits.grad is not None


def test_token_logprobs_saves_no_new_full_size_tensor():
    """The naive path saves its N x V fp32 log-softmax; the chunked one only the caller's logits."""
    num_rows, vocab = 64, 512
    logits, labels = make_inputs(num_rows, vocab, torch.bfloat16)

    def saved_tensors(fn) -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        return saved

    naive = saved_tensors(lambda: F.log_softmax(logits.float(), -1).gather(1, labels.clamp_min(0)[:, None]))
    assert any(t.numel() == num_rows * vocab and t.dtype == torch.float32 for t in naive)
    ours = saved_tensors(lambda: token_logprobs(logits, labels, impl="torch", chunk_rows=16))
    big = [t for t in ours if t.numel() >= num_rows * vocab]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr() and big[0].dtype == torch.bfloat16
    assert sum(t.numel() for t in ours) - logits.numel() <= 4 * num_rows


def test_impl_cuda_without_extension_says_how_to_build():
    logits, labels = make_inputs(4, 9, torch.float32)
    with pytest.raises(RuntimeError, match="(?s)impl=.cuda.*To build it.*load_extension"):
        token_logprobs(logits, labels, impl="cuda")


def test_impl_auto_on_cpu_uses_torch_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(lp, "_logged_choices", set())
    logits, labels = make_inputs(6, 11, torch.float32)
    with caplog.at_level(logging.INFO, logger="hpalign"):
        assert lp.select_logprobs_impl("auto", logits) == "torch"
        out = token_logprobs(logits, labels)  # impl="auto"
        token_logprobs(logits, labels)
    torch.testing.assert_close(out.double(), reference(logits.detach(), labels)[0], atol=1e-6, rtol=1e-6)
    assert caplog.text.count("using the torch path") == 1


def test_bad_arguments_raise_value_error():
    logits, labels = make_inputs(6, 11, torch.float32)
    with pytest.raises(ValueError, match="impl"):
        token_logprobs(logits, labels, impl="triton")
    with pytest.raises(ValueError, match="flatten"):
        token_logprobs(logits[None], labels)
    with pytest.raises(ValueError, match="chunk_rows"):
        token_logprobs(logits, labels, chunk_rows=0)


def test_default_chunk_rows_follows_the_byte_budget():
    assert lp.default_chunk_rows(2048, 128256) == lp.CHUNK_BYTES // (4 * 128256)  # 130 rows, 64 MiB
    assert lp.default_chunk_rows(512, 49152) == 128  # a quarter of the rows: 24 MiB of 96
    assert lp.default_chunk_rows(64, 1000) >= 64  # small inputs: one chunk
    assert lp.default_chunk_rows(0, 10) >= 1 and lp.default_chunk_rows(10**6, 10**7) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_chunking_matches_reference(monkeypatch, dtype):
    """chunk_rows=None with a tiny byte budget: many chunks and a ragged last one, still exact."""
    monkeypatch.setattr(lp, "CHUNK_BYTES", 7 * 259 * 4)
    monkeypatch.setattr(lp, "MIN_CHUNK_BYTES", 0)
    assert lp.default_chunk_rows(130, 259) == 7
    logits, labels = make_inputs(130, 259, dtype, seed=5)
    grad_out = torch.randn(130, generator=torch.Generator().manual_seed(6))
    logps, entropy = token_logprobs_and_entropy(logits, labels)
    (grad,) = torch.autograd.grad(token_logprobs(logits, labels), logits, grad_out)
    ref_logits = logits.detach().double().requires_grad_()
    ref_logps, ref_entropy = reference(ref_logits, labels)
    (ref_grad,) = torch.autograd.grad(ref_logps, ref_logits, grad_out.double())
    torch.testing.assert_close(logps.double(), ref_logps.detach(), **TOLS[dtype])
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **TOLS[dtype])
    torch.testing.assert_close(grad.double(), ref_grad, **TOLS[dtype])
