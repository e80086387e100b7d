"""segment_sum / segment_count against Python loops."""

from __future__ import annotations

import pytest
import torch

from hpalign.ops.segments import segment_count, segment_sum


def packed_ids(seed: int = 0) -> tuple[torch.Tensor, int]:
    """[3, 12] seq_index of a packed batch: sequences back to back, -1 padding at row ends."""
    ids = torch.full((3, 12), -1)
    ids[0, :4], ids[0, 4:11] = 0, 1
    ids[1, :12] = 2
    ids[2, :2], ids[2, 2:5], ids[2, 5:9] = 3, 4, 6  # segment 5 has no tokens
    return ids, 7


def loop_sum(values, ids, num_segments):
    out = [0.0] * num_segments
    for v, s in zip(values.flatten().tolist(), ids.flatten().tolist(), strict=True):
        if s >= 0:
            out[s] += v
    return torch.tensor(out, dtype=torch.float64)


def test_segment_sum_matches_loop_2d_and_1d():
    ids, num_segments = packed_ids()
    values = torch.randn(ids.shape, dtype=torch.float64)
    values[ids < 0] = float("inf")  # padding garbage must not leak into any segment
    want = loop_sum(values, ids, num_segments)
    torch.testing.assert_close(segment_sum(values, ids, num_segments), want)
    torch.testing.assert_close(segment_sum(values.flatten(), ids.flatten(), num_segments), want)
    assert segment_sum(values, ids, num_segments)[5] == 0


def test_segment_sum_gradient():
    ids, num_segments = packed_ids()
    values = torch.randn(ids.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: segment_sum(v, ids, num_segments), (values,))
    grad_out = torch.arange(num_segments, dtype=torch.float64) + 1
    (grad,) = torch.autograd.grad(segment_sum(values, ids, num_segments), values, grad_out)
    want = torch.where(ids >= 0, grad_out[ids.clamp_min(0)], 0.0)
    torch.testing.assert_close(grad, want)


def test_segment_sum_keeps_dtype():
    ids, num_segments = packed_ids()
    out = segment_sum(torch.ones(ids.shape, dtype=torch.bfloat16), ids, num_segments)
    assert out.dtype == torch.bfloat16 and out.tolist() == [4, 7, 12, 2, 3, 0, 4]


def test_segment_count_matches_loop():
    ids, num_segments = packed_ids()
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.6
    want = [0] * num_segments
    for s, m in zip(ids.flatten().tolist(), mask.flatten().tolist(), strict=True):
        if s >= 0 and m:
            want[s] += 1
    counts = segment_count(ids, mask, num_segments)
    assert counts.dtype == torch.long and counts.tolist() == want
    assert segment_count(ids, None, num_segments).tolist() == [4, 7, 12, 2, 3, 0, 4]
    labels = torch.where(mask, 5, -100)
    assert segment_count(ids, labels != -100, num_segments).tolist() == want


def test_packed_logps_to_sequence_sums_and_means():
    """The use: per-token log-probs of a packed batch -> per-sequence sums and mean log-probs."""
    ids, num_segments = packed_ids()
    logps = -torch.rand(ids.shape, dtype=torch.float64)
    loss_mask = (ids >= 0) & (torch.arange(12) % 3 != 0)  # e.g. prompt tokens excluded
    sums = segment_sum(torch.where(loss_mask, logps, 0.0), ids, num_segments)
    counts = segment_count(ids, loss_mask, num_segments)
    for s in range(num_segments):
        sel = (ids == s) & loss_mask
        assert counts[s] == int(sel.sum())
        torch.testing.assert_close(sums[s], logps[sel].sum())


def test_bad_arguments():
    ids, num_segments = packed_ids()
    with pytest.raises(ValueError, match="same shape"):
        segment_sum(torch.zeros(3, 11), ids, num_segments)
    with pytest.raises(ValueError, match="integer"):
        segment_sum(torch.zeros(3, 12), ids.float(), num_segments)
    with pytest.raises(ValueError, match="same shape"):
        segment_count(ids, torch.ones(5, dtype=torch.bool), num_segments)


def test_segment_offsets_and_padded_layout():
    from hpalign.ops.segments import segment_offsets, segments_to_padded

    ids = torch.tensor([1, 1, -1, 0, 0, 0, 2, -1])  # segments need not come in id order
    offsets = segment_offsets(ids, 3)
    assert offsets.tolist() == [0, 1, -1, 0, 1, 2, 0, -1]
    values = torch.arange(8, dtype=torch.float32, requires_grad=True)
    padded = segments_to_padded(values, ids, offsets, 3, width=4)
    torch.testing.assert_close(padded, torch.tensor([[3.0, 4, 5, 0], [0, 1, 0, 0], [6, 0, 0, 0]]))
    padded.sum().backward()
    assert values.grad.tolist() == [1, 1, 0, 1, 1, 1, 1, 0]  # padding tokens get no gradient
    with pytest.raises(ValueError, match="more than width=2"):
        segments_to_padded(values, ids, offsets, 3, width=2)
