"""The training forward's log-prob path: the fused op at every size, --logprob_impl reaching it,
and the ZeRO-3 route through the head's own forward."""

from types import SimpleNamespace

import pytest
import torch

from hpalign.data.collate import pack_batch, pad_batch
from hpalign.data.types import TokenizedExample
from hpalign.tiny_model import build_tiny_llama
from hpalign.train import forward


def _batch():
    examples = [TokenizedExample([1, 2, 3, 4], [[5, 6, 7], [8, 9]], "a"),
                TokenizedExample([10, 11], [[12, 13, 14, 15], [16]], "b")]
    return pack_batch(examples, pad_id=0, share_prompt=True)


def _naive_logps(model, batch):
    """Per-sequence sums from the full logits of an unpacked forward of each sequence."""
    out = torch.zeros(batch.num_sequences)
    flat_ids, flat_seq = batch.input_ids.flatten(), batch.seq_index.flatten()
    logits = model(input_ids=batch.input_ids, use_cache=False,
                   **forward.backbone_kwargs(batch, packed=True)).logits.flatten(0, 1)
    logp = torch.log_softmax(logits.double(), -1)
    labels = batch.labels.flatten()
    for n in range(flat_ids.numel()):
        if labels[n] != -100:
            out[flat_seq[n]] += logp[n, labels[n]].float()
    return out.view(batch.num_examples, batch.num_responses)


@pytest.mark.parametrize("keep_bytes", [512 * 2**20, 0])  # one kept matmul, or chunks recomputed
def test_sequence_stats_equal_full_logits_on_both_memory_modes(monkeypatch, keep_bytes):
    from hpalign.ops import linear_logprobs
    from hpalign.ops.attention import enable_varlen_attention

    monkeypatch.setattr(linear_logprobs, "KEEP_LOGITS_BYTES", keep_bytes)
    model, _ = build_tiny_llama(seed=0)
    enable_varlen_attention(model)
    batch = _batch()
    stats = forward.sequence_stats(model, batch, packed=True, logprob_impl="torch")
    torch.testing.assert_close(stats.logps_ER, _naive_logps(model, batch), atol=1e-4, rtol=1e-4)
    stats.logps_ER.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_logprob_impl_reaches_the_op(monkeypatch):
    """--logprob_impl travels session -> sequence_stats -> the fused op; `cuda` on this CPU machine
    reaches the op's own clear error."""
    from hpalign.ops import linear_logprobs
    from hpalign.train.session import stats_functions

    seen = []
    real = linear_logprobs.linear_token_logprobs
    monkeypatch.setattr(linear_logprobs, "linear_token_logprobs",
                        lambda *a, **kw: seen.append(kw["impl"]) or real(*a, **kw))
    model, _ = build_tiny_llama(seed=0)
    session = SimpleNamespace(engine=SimpleNamespace(module=model), packed=False, reference=model,
                              algorithm=SimpleNamespace(forward="logps", needs_reference=True),
                              cfg=SimpleNamespace(algorithm=SimpleNamespace(logprob_impl="torch")))
    policy_stats, reference_stats = stats_functions(session)
    padded = pad_batch([TokenizedExample([1, 2], [[3, 4]], "x")], pad_id=0)
    policy_stats(padded)
    reference_stats(padded)
    assert seen == ["torch", "torch"]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="impl='cuda'"):
            forward.sequence_stats(model, padded, packed=False, logprob_impl="cuda")


def test_run_as_forward_goes_through_the_module_hooks_and_restores_forward():
    head = torch.nn.Linear(4, 6, bias=False)
    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    head.register_forward_hook(lambda module, args, out: calls.append("post"))
    from hpalign.ops.linear_logprobs import run_as_forward

    out = run_as_forward(head, lambda h: h.sum(-1) * 2, torch.ones(3, 4))
    assert calls == ["pre", "post"] and out.tolist() == [8.0, 8.0, 8.0]
    assert "forward" not in head.__dict__ and head(torch.ones(1, 4)).shape == (1, 6)
