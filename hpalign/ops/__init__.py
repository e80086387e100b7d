"""Fast paths behind one API each; the pure-torch version is both the CPU fallback and the oracle.

Importing this package needs torch only: transformers is imported when varlen attention is used,
flash-attn and the CUDA extension only when their path is chosen.
"""

from hpalign.ops.attention import PackedSegments, enable_varlen_attention, packed_forward_kwargs
from hpalign.ops.linear_logprobs import hidden_logprobs, linear_token_logprobs
from hpalign.ops.logprobs import token_logprobs, token_logprobs_and_entropy
from hpalign.ops.segments import segment_count, segment_sum

__all__ = [
    "PackedSegments",
    "enable_varlen_attention",
    "hidden_logprobs",
    "linear_token_logprobs",
    "packed_forward_kwargs",
    "segment_count",
    "segment_sum",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
