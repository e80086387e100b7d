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


def _ppo_batch():
    examples = [TokenizedExample([1, 2, 3, 4], [[5, 6, 7]], "a"), TokenizedExample([10, 11], [[12, 13, 14, 15, 16]], "b"),
                TokenizedExample([20, 21, 22], [[23]], "c")]
    return pack_batch(examples, pad_id=0), pad_batch(examples, pad_id=0)


def _naive_token_matrix(model, batch, temperature):
    """[S, T] tempered log-probs and entropies of each response token, from full logits."""
    logits = model(input_ids=batch.input_ids, use_cache=False,
                   **forward.backbone_kwargs(batch, packed=True)).logits.flatten(0, 1).double() / temperature
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    labels, seqs = batch.labels.flatten(), batch.seq_index.flatten()
    logps, entropies = torch.zeros(batch.num_sequences, 5), torch.zeros(batch.num_sequences, 5)
    filled = [0] * batch.num_sequences
    for n in range(labels.numel()):
        if labels[n] != -100:
            s = int(seqs[n])
            logps[s, filled[s]], entropies[s, filled[s]] = logp[n, labels[n]].float(), entropy[n].float()
            filled[s] += 1
    return logps, entropies


def test_token_stats_equal_full_logits_with_temperature_packed_and_padded():
    from hpalign.ops.attention import enable_varlen_attention

    model, _ = build_tiny_llama(seed=0)
    enable_varlen_attention(model)
    packed, padded = _ppo_batch()
    expected_logps, expected_entropy = _naive_token_matrix(model, padded, temperature=0.7)
    for batch, is_packed in ((packed, True), (padded, False)):
        stats = forward.token_stats(model, batch, packed=is_packed, logprob_impl="torch", temperature=0.7,
                                    with_entropy=True)
        torch.testing.assert_close(stats.as_matrix(stats.logps_M, 5), expected_logps, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(stats.as_matrix(stats.entropy_M, 5), expected_entropy, atol=1e-4, rtol=1e-4)
    stats.logps_M.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_token_values_read_the_state_before_each_response_token():
    from hpalign.models import RewardModel

    model, _ = build_tiny_llama(seed=0)
    value_model = RewardModel.with_new_head(model, seed=1)
    packed, padded = _ppo_batch()
    hidden = model.model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).last_hidden_state
    expected = torch.zeros(3, 5)
    for s, (prompt_len, length) in enumerate(((4, 3), (2, 5), (3, 1))):
        expected[s, :length] = value_model.value_head(hidden[s, prompt_len - 1:prompt_len - 1 + length])
    stats = forward.token_values(value_model, padded, packed=False)
    torch.testing.assert_close(stats.as_matrix(stats.values_M, 5), expected, atol=1e-5, rtol=1e-5)
