"""Tokenization at scale: `datasets.map` over the examples, written once to an Arrow file and read back.

The file is named by a key that hashes everything the tokens depend on: the examples' text (so a
changed data file, split or built-in set is a new key; a file renamed or moved is not), the chat
template, the tokenizer (datasets' `Hasher`, as TRL's cached `map` relies on: vocabulary, merges,
special tokens, chat template), --max_length and `CACHE_VERSION`. A second run, and every rank but
the first, reads the file instead of tokenizing (`train.datasets` orders the ranks: rank 0 first).

The cache holds token ids and truncation flags only; sources, labels and margins come from the
examples, which every rank still parses (so a bad row stops every rank with the same message), and
the `LoadReport` truncation counts are summed from the stored flags, the same hit or miss.

Below `MIN_CACHED_EXAMPLES` examples the in-memory path (`templates.tokenize_examples`) runs instead:
measured on the built-in set, map + Arrow write + read back cost more than tokenizing (see README).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpalign.data.templates import (
    ENCODE_BATCH_SIZE,
    MIN_PROMPT_TOKENS,
    ChatTemplate,
    check_max_length,
    encode_examples,
    example_texts,
    tokenize_examples,
    tokenized_example,
)
from hpalign.data.types import LoadReport, TokenizedExample

logger = logging.getLogger("hpalign")

CACHE_VERSION = 1  # bump when templating or truncation changes the tokens an example gets
MIN_CACHED_EXAMPLES = 2_000


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """datasets' hash of the pickled tokenizer (stable across processes), and its chat template."""
    from datasets.fingerprint import Hasher

    return Hasher.hash((tokenizer, getattr(tokenizer, "chat_template", None)))


def cache_key(examples: list, template: ChatTemplate, *, max_length: int) -> str:
    """sha256 over what the tokens of `examples` depend on (see the module docstring)."""
    digest = hashlib.sha256()
    settings = (CACHE_VERSION, MIN_PROMPT_TOKENS, max_length, template.name, template.response_prefix,
                template.response_suffix, template.suffix_extra_ids, template.bos_ids)
    digest.update(repr(settings).encode())
    digest.update(tokenizer_fingerprint(template.tokenizer).encode())
    for example in examples:  # the source is not hashed: renaming a file keeps its cache
        digest.update(repr((type(example).__name__, example.prompt, example_texts(example)[0])).encode())
    return digest.hexdigest()


def _encode_batch(indices: list[int], *, examples: list, template: ChatTemplate, max_length: int) -> dict:
    encoded = encode_examples([examples[i] for i in indices], template, max_length=max_length)
    return {"prompt_ids": [e[0] for e in encoded], "responses": [e[1] for e in encoded],
            "prompt_cut": [e[2] for e in encoded], "response_cut": [e[3] for e in encoded]}


def _features() -> Any:
    from datasets import Features, List, Value

    return Features({"prompt_ids": List(Value("int32")), "responses": List(List(Value("int32"))),
                     "prompt_cut": Value("bool"), "response_cut": Value("bool")})


def _lists(array: Any) -> list[list[int]]:
    """A list<int> Arrow array as Python lists, through numpy (several times faster than to_pylist).
    Offsets index the child values as they are, a sliced array's included."""
    offsets, values = array.offsets.to_numpy(), array.values.to_numpy()
    return [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _nested_lists(array: Any) -> list[list[list[int]]]:
    outer = array.offsets.to_numpy()
    inner = _lists(array.values)
    return [inner[a:b] for a, b in zip(outer[:-1], outer[1:], strict=True)]


def _read(path: Path) -> list[tuple[list[int], list[list[int]], bool, bool]]:
    from datasets import Dataset

    table = Dataset.from_file(str(path)).data.table
    flags = [np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=bool).tolist()
             for name in ("prompt_cut", "response_cut")]
    return list(zip(_lists(table.column("prompt_ids").combine_chunks()),
                    _nested_lists(table.column("responses").combine_chunks()), *flags, strict=True))


def _write(examples: list, template: ChatTemplate, max_length: int, path: Path, key: str) -> None:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    indices = Dataset.from_dict({"index": list(range(len(examples)))})
    # The function reads the examples by index: no Arrow copy of the chat messages going in. An explicit
    # fingerprint spares datasets hashing the closure (it would pickle every example and the tokenizer).
    indices.map(_encode_batch, batched=True, batch_size=ENCODE_BATCH_SIZE, input_columns="index",
                fn_kwargs={"examples": examples, "template": template, "max_length": max_length},
                remove_columns=["index"], features=_features(), cache_file_name=str(path),
                new_fingerprint=key[:32], desc=f"tokenizing {len(examples)} examples")


def tokenize_cached(examples: list, template: ChatTemplate, *, max_length: int, report: LoadReport,
                    cache_dir: Path | None, min_examples: int | None = None) -> list[TokenizedExample]:
    """`templates.tokenize_examples`, the same result and counts, through a `datasets.map` whose
    Arrow output in `cache_dir` is reused while the key (`cache_key`) holds. `cache_dir` None, or
    fewer than `min_examples` (default `MIN_CACHED_EXAMPLES`) examples, tokenizes in memory, as does
    a cache that cannot be written (a warning). Ranks sharing `cache_dir` should not write the same
    key at once (it is safe, datasets writes a temporary file and renames it, but wasted): let one
    rank go first (`distributed.run_main_first`)."""
    check_max_length(max_length)
    min_examples = MIN_CACHED_EXAMPLES if min_examples is None else min_examples
    if cache_dir is None or not examples or len(examples) < min_examples:
        return tokenize_examples(examples, template, max_length=max_length, report=report)
    key = cache_key(examples, template, max_length=max_length)
    path = Path(cache_dir) / f"tokens-{key[:32]}.arrow"
    if path.exists():
        logger.info("data: tokens of %d examples read from the cache %s", len(examples), path)
    else:
        started = time.perf_counter()
        try:
            _write(examples, template, max_length, path, key)
        except OSError as err:  # the cache only saves time: a read-only or full disk must not stop the run
            logger.warning("data: cannot write the token cache %s (%s); tokenizing in memory", path, err)
            return tokenize_examples(examples, template, max_length=max_length, report=report)
        # Other ranks waited for this in a barrier: --ddp_timeout must exceed it (say so when close).
        logger.info("data: %d examples tokenized in %.0f s, cached in %s", len(examples),
                    time.perf_counter() - started, path)
    encoded = _read(path)
    if len(encoded) != len(examples):
        raise RuntimeError(f"{path}: {len(encoded)} cached rows for {len(examples)} examples; delete the file")
    return [tokenized_example(example, entry, report) for example, entry in zip(examples, encoded, strict=True)]
