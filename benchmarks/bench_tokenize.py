"""Tokenizing a data set: in memory (`templates.tokenize_examples`, what every run did before the cache)
against the cached `datasets.map` (`token_cache.tokenize_cached`), cold (empty cache: map + Arrow
write + read back) and warm (the cache file read back; what the other ranks and later runs pay).

Sets: the built-in pairs (400) and a synthetic JSONL file of --rows pairs (prompts of 20-400 words,
some with a system message and history; answers of 10-200 words), cut to each --sizes. Parsing
(`load_examples`) is timed too, for scale. Each cell is the median of --repeats runs, the paths
timed in turn (A B C A B C ...) so that load from other processes falls on each alike.

  python benchmarks/bench_tokenize.py                     # SmolLM2's tokenizer (the default --model)
  python benchmarks/bench_tokenize.py --model tiny-random-llama
Writes benchmarks/results/tokenize_<device>_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from hpalign.data import builtin, formats, templates, token_cache
from hpalign.data.types import LoadReport
from hpalign.models import load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the river model answer question number garden light window quickly because small large "
         "between water colour letter think should would every people little house under across").split()


def synthetic_rows(num_rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = []
    for i in range(num_rows):
        row = {"prompt": f"{i}: {text(20, 400)}", "chosen": text(10, 200), "rejected": text(10, 200)}
        if rng.random() < 0.2:
            row["system"] = text(5, 20)
        if rng.random() < 0.25:
            row["history"] = [[text(5, 60), text(5, 60)]]
        rows.append(row)
    return rows


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(examples: list, template, *, max_length: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"in_memory": [], "map_cold": [], "map_warm": [], "key": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache_dir:
            def cached() -> None:
                token_cache.tokenize_cached(examples, template, max_length=max_length, report=LoadReport(),
                                            cache_dir=Path(cache_dir), min_examples=0)

            times["in_memory"].append(timed(lambda: templates.tokenize_examples(
                examples, template, max_length=max_length, report=LoadReport())))
            times["map_cold"].append(timed(cached))
            times["map_warm"].append(timed(cached))
            times["key"].append(timed(lambda: token_cache.cache_key(examples, template, max_length=max_length)))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    template = templates.resolve_template(load_tokenizer(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(args.rows)))
        parse_s = timed(lambda: formats.load_examples([str(path)], kind="pair"))
        pairs = formats.load_examples([str(path)], kind="pair")
    sets = [("builtin-emoji train", builtin.builtin_dataset("pair", "train"))]
    sets += [(f"synthetic {n}", pairs[:n]) for n in args.sizes]
    rows = []
    for name, examples in sets:
        result = measure(examples, template, max_length=args.max_length, repeats=args.repeats)
        rows.append({"set": name, "examples": len(examples), **{k: round(v, 4) for k, v in result.items()}})
        print(rows[-1], flush=True)
    device = f"cpu{os.cpu_count()}"
    stem = RESULTS / f"tokenize_{device}_{datetime.date.today().isoformat()}"
    meta = {"model": args.model, "max_length": args.max_length, "repeats": args.repeats,
            f"parse_{args.rows}_rows_s": round(parse_s, 3)}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"Tokenizing pairs, {args.model} tokenizer, --max_length {args.max_length}, {device}, median of "
             f"{args.repeats} (seconds). Parsing the {args.rows}-row file: {parse_s:.2f} s.", "",
             "| set | examples | in memory | map, cold | map, warm (cache hit) | key alone |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['examples']} | {r['in_memory']:.3f} | {r['map_cold']:.3f} | {r['map_warm']:.3f} "
              f"| {r['key']:.3f} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
