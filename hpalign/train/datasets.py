"""Turn the data flags into tokenized train / held-out sets, logging everything that was changed.

Every rank parses and validates the rows (a bad row stops every rank with the same message); the
tokenization runs through `data.token_cache` on rank 0 first, then on each node's first rank, and
the other ranks read its cache ($HPALIGN_CACHE/tokenized, see `distributed.run_main_first`).
Pairs whose chosen and rejected tokens are identical are dropped and counted
(`templates.drop_identical_pairs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hpalign import distributed
from hpalign.config import Config
from hpalign.data import builtin, formats, templates, token_cache
from hpalign.data.types import LoadReport, TokenizedExample

logger = logging.getLogger("hpalign")


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    val: list[TokenizedExample]
    val_prompts: list  # chat-message prompts of held-out examples, for generation
    report: LoadReport
    builtin: bool
    val_pairs: list[TokenizedExample] = field(default_factory=list)  # pair form, for preference accuracy
    train_prompts: list = field(default_factory=list)  # prompt kind: the chat prompts of `train` (rule rewards)


def _load(paths: list[str], kind: str, cfg: Config, report: LoadReport) -> list:
    return formats.load_examples(paths, kind=kind, skip_bad_rows=cfg.data.skip_bad_rows, report=report)


def load_raw(cfg: Config, kind: str, report: LoadReport) -> tuple[list, list, bool]:
    """(train examples, held-out examples, is_builtin) in the algorithm's data kind."""
    if not cfg.data.dataset:
        return (builtin.builtin_dataset(kind, "train", seed=0),
                builtin.builtin_dataset(kind, "test", seed=0), True)
    train = _load(cfg.data.dataset, kind, cfg, report)
    if cfg.data.val_dataset:
        return train, _load(cfg.data.val_dataset, kind, cfg, report), False
    if cfg.data.split_dataset_ratio > 0:
        train, val = formats.split_examples(train, ratio=cfg.data.split_dataset_ratio, seed=cfg.train.seed)
        return train, val, False
    return train, [], False


def token_budget(cfg: Config, kind: str) -> int:
    """Tokens an example may take: --max_length, less --response_length for a prompt (PPO samples
    up to that many tokens after it, and prompt + response must fit --max_length)."""
    if kind == "prompt":
        return cfg.data.max_length - cfg.ppo.response_length
    return cfg.data.max_length


def token_cache_dir() -> Path:
    """Where tokenized data sets are cached: $HPALIGN_CACHE/tokenized (see `models.cache_root`)."""
    from hpalign.models import cache_root

    return cache_root() / "tokenized"


def tokenize_sets(sets: list[list], template: templates.ChatTemplate, *, max_length: int, report: LoadReport,
                  cache_dir: Path | None) -> list[list[TokenizedExample]]:
    """Each list of examples tokenized (`token_cache.tokenize_cached`), rank 0 first, the others reading
    its cache; truncations counted into `report` once per rank."""
    def work() -> list[list[TokenizedExample]]:
        return [token_cache.tokenize_cached(examples, template, max_length=max_length, report=report,
                                            cache_dir=cache_dir) for examples in sets]

    return distributed.run_main_first(work)


def prepare_data(cfg: Config, kind: str, template: templates.ChatTemplate, *,
                 cache_dir: Path | None = None) -> PreparedData:
    """Load, validate, split and tokenize the data of `kind`; `cache_dir` defaults to `token_cache_dir()`.
    Pair data loses its identical pairs (counted, logged with their sources)."""
    report = LoadReport()
    train_raw, val_raw, is_builtin = load_raw(cfg, kind, report)
    budget = token_budget(cfg, kind)
    train, val = tokenize_sets([train_raw, val_raw], template, max_length=budget, report=report,
                               cache_dir=cache_dir or token_cache_dir())
    if kind == "pair":
        train, val = (templates.drop_identical_pairs(part, report) for part in (train, val))
        if train_raw and not train:
            raise ValueError(f"all {len(train_raw)} training pairs have identical chosen and rejected answers "
                             f"(after truncation to {budget} tokens): nothing to learn a preference from "
                             f"(first: {report.identical_pairs[:3]})")
    _log_report(report, len(train), len(val))
    prompts = _unique_prompts(val_raw)[: cfg.data.num_eval_generations]
    val_pairs = val if kind == "pair" else []
    if is_builtin and kind != "pair":  # the built-in KTO/SFT/prompt forms come from pairs: evaluate on those
        pairs = builtin.builtin_dataset("pair", "test", seed=0)
        val_pairs = templates.tokenize_examples(pairs, template, max_length=cfg.data.max_length,
                                                report=LoadReport())
    return PreparedData(train=train, val=val, val_prompts=prompts, report=report, builtin=is_builtin,
                        val_pairs=val_pairs,
                        train_prompts=[example.prompt for example in train_raw] if kind == "prompt" else [])


def _unique_prompts(examples: list) -> list:
    seen, prompts = set(), []
    for example in examples:
        key = repr(example.prompt)
        if key not in seen:
            seen.add(key)
            prompts.append(example.prompt)
    return prompts


def _log_report(report: LoadReport, num_train: int, num_val: int) -> None:
    logger.info("data: %d train / %d held-out examples (%d rows read)", num_train, num_val, report.num_rows)
    if report.num_skipped:
        logger.warning("data: skipped %d bad rows (--skip_bad_rows): %s%s", report.num_skipped,
                       "; ".join(report.skipped[:10]), " ..." if len(report.skipped) > 10 else "")
    if report.num_dropped_responses:
        logger.info("data: dropped %d responses of pair/KTO/SFT rows (prompt-only data: PPO samples its own)",
                    report.num_dropped_responses)
    if report.num_identical_pairs:
        logger.warning("data: dropped %d pairs whose chosen and rejected answers are identical (no preference "
                       "to learn; their NLL term goes with them): %s%s", report.num_identical_pairs,
                       "; ".join(report.identical_pairs[:5]), " ..." if len(report.identical_pairs) > 5 else "")
    if report.num_truncated or report.num_truncated_response:
        logger.warning("data: %d examples lost prompt tokens from the left and %d had their response cut "
                       "to fit --max_length", report.num_truncated, report.num_truncated_response)
