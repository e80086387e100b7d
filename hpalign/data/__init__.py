"""Data: formats and validation, built-in emoji set, chat templates, tokenization (cached
`datasets.map` at scale), padded and packed batches.

Never imports deepspeed, peft or vllm.
"""

from hpalign.data.builtin import BUILTIN_NAME, builtin_dataset, has_emoji, task_metric
from hpalign.data.collate import SequenceBatch, pack_batch, pad_batch, plan_micro_batches, plan_rows
from hpalign.data.formats import load_examples, split_examples
from hpalign.data.templates import ChatTemplate, drop_identical_pairs, resolve_template, tokenize_examples
from hpalign.data.token_cache import tokenize_cached
from hpalign.data.types import (
    DataFormatError,
    KTOExample,
    LoadReport,
    Message,
    PreferenceExample,
    SFTExample,
    TokenizedExample,
    pairs_to_kto,
)

__all__ = [
    "BUILTIN_NAME", "ChatTemplate", "DataFormatError", "KTOExample", "LoadReport", "Message",
    "PreferenceExample", "SFTExample", "SequenceBatch", "TokenizedExample", "builtin_dataset", "drop_identical_pairs",
    "has_emoji", "load_examples", "pack_batch", "pad_batch", "pairs_to_kto", "plan_micro_batches", "plan_rows",
    "resolve_template", "split_examples", "task_metric", "tokenize_cached", "tokenize_examples",
]
