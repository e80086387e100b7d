"""Per-token log-probs: time and peak memory of each path, forward and forward + backward.

Paths (all give logps_N = log softmax(logits)[label] per row):
  naive         logits.float().log_softmax(-1).gather(...)           (what most trainers do)
  torch         hpalign.ops.logprobs.token_logprobs(impl="torch")   (chunked fp32, the oracle)
  cuda          hpalign.ops.logprobs.token_logprobs(impl="cuda")    (fused kernel, GPU only)
  naive_hidden  lm_head(hidden).float().log_softmax(-1).gather(...)  (baseline for the next row)
  hidden        hidden_logprobs(hidden, lm_head, labels)            (logits never all in memory)
The hidden rows include the lm_head matmul (width --hidden), so compare them with each other.

Peak memory is measured beyond the inputs: on GPU torch.cuda.max_memory_allocated minus what was
allocated before the step; on CPU the growth of ru_maxrss in a fresh child process per row. On GPU
the forward's achieved bandwidth is also given as a fraction of --peak_gbps for reading the logits
once (the floor for any exact method).

  python benchmarks/bench_logprobs.py                       # CPU: N in {512, 2048}, fp32
  python benchmarks/bench_logprobs.py --n 16384 --paths naive torch cuda   # GPU: bf16 by default
Writes benchmarks/results/logprobs_<device>_<date>.json and .md next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a source checkout
from hpalign.ops.logprobs import hidden_logprobs, token_logprobs  # noqa: E402

IGNORE_INDEX = -100
LOGITS_PATHS = ("naive", "torch", "cuda")
HIDDEN_PATHS = ("naive_hidden", "hidden")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Config:
    path: str
    num_rows: int
    vocab: int
    hidden: int
    dtype: str
    device: str
    warmup: int
    repeats: int


@dataclass
class Result:
    path: str
    num_rows: int
    vocab: int
    dtype: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_mib: float | None = None
    fwd_floor_frac: float | None = None  # read-the-logits-once time / measured forward time (GPU)
    error: str | None = None


def naive_logps(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    logp_NV = logits_NV.float().log_softmax(-1)
    picked_N = logp_NV.gather(-1, labels_N.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(labels_N != IGNORE_INDEX, picked_N, picked_N.new_zeros(()))


def build_step(cfg: Config) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """(forward, forward + backward) closures over freshly made inputs for one configuration."""
    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    labels_N = torch.randint(0, cfg.vocab, (cfg.num_rows,), device=device)
    grad_N = torch.randn(cfg.num_rows, device=device)
    params: list[torch.Tensor] = []
    if cfg.path in LOGITS_PATHS:
        logits_NV = (torch.randn(cfg.num_rows, cfg.vocab, device=device, dtype=dtype) * 3).requires_grad_()
        params = [logits_NV]
        impl = {"torch": "torch", "cuda": "cuda"}.get(cfg.path)
        if impl is None:
            forward = lambda: naive_logps(logits_NV, labels_N)  # noqa: E731
        else:
            forward = lambda: token_logprobs(logits_NV, labels_N, impl=impl)  # noqa: E731
    else:
        hidden_NH = torch.randn(cfg.num_rows, cfg.hidden, device=device, dtype=dtype).requires_grad_()
        lm_head = torch.nn.Linear(cfg.hidden, cfg.vocab, bias=False, device=device, dtype=dtype)
        params = [hidden_NH, *lm_head.parameters()]
        if cfg.path == "hidden":
            forward = lambda: hidden_logprobs(hidden_NH, lm_head, labels_N)  # noqa: E731
        else:
            forward = lambda: naive_logps(lm_head(hidden_NH), labels_N)  # noqa: E731

    def forward_backward() -> None:
        (forward() * grad_N).sum().backward()
        for p in params:
            p.grad = None

    return forward, forward_backward


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], cfg: Config) -> float:
    for _ in range(cfg.warmup):
        fn()
    times = []
    for _ in range(cfg.repeats):
        _sync(cfg.device)
        start = time.perf_counter()
        fn()
        _sync(cfg.device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes_cpu(fn: Callable[[], object]) -> int:
    """Growth of this process's peak RSS over one call (meaningful in a fresh process only)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) * (1 if sys.platform == "darwin" else 1024)  # macOS: bytes, Linux: KiB


def peak_bytes_cuda(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def measure(cfg: Config, peak_gbps: float) -> Result:
    """Memory first (so that the CPU peak-RSS reading starts from the inputs alone), then time."""
    result = Result(cfg.path, cfg.num_rows, cfg.vocab, cfg.dtype)
    try:
        if cfg.device == "cpu":  # pay one-off lazy allocations (libraries, autograd threads) first
            tiny = Config(cfg.path, 4, min(cfg.vocab, 64), min(cfg.hidden, 16), cfg.dtype, "cpu", 0, 1)
            build_step(tiny)[1]()
        forward, forward_backward = build_step(cfg)
        peak = peak_bytes_cuda(forward_backward) if cfg.device == "cuda" else peak_bytes_cpu(forward_backward)
        result.peak_mib = peak / 2**20
        with torch.no_grad():
            result.fwd_ms = median_ms(forward, cfg)
        result.fwd_bwd_ms = median_ms(forward_backward, cfg)
    except (RuntimeError, ValueError) as exc:  # OOM, or a path that cannot run here
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if cfg.device == "cuda" and cfg.path in LOGITS_PATHS and result.fwd_ms:
        floor_ms = cfg.num_rows * cfg.vocab * DTYPES[cfg.dtype].itemsize / (peak_gbps * 1e9) * 1e3
        result.fwd_floor_frac = floor_ms / result.fwd_ms
    return result


def measure_in_child(cfg: Config, peak_gbps: float) -> Result:
    """Run one configuration in a fresh interpreter, so that ru_maxrss starts from a clean slate."""
    cmd = [sys.executable, __file__, "--_child", json.dumps(asdict(cfg)), "--peak_gbps", str(peak_gbps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Result(cfg.path, cfg.num_rows, cfg.vocab, cfg.dtype, error=f"child failed: {tail[:200]}")
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


def device_slug() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu{torch.get_num_threads()}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: list[Result], device: str) -> str:
    header = "| path | N | V | dtype | fwd ms | fwd+bwd ms | peak MiB | fwd / read-once floor |"
    lines = [header, "|" + "---|" * 8]
    for r in results:
        cells = [
            r.path,
            str(r.num_rows),
            str(r.vocab),
            r.dtype,
            _fmt(r.fwd_ms, ".2f"),
            _fmt(r.fwd_bwd_ms, ".2f"),
        ]
        cells += [_fmt(r.peak_mib, ".0f"), _fmt(r.fwd_floor_frac, ".0%")]
        if r.error:
            cells[4:] = [r.error, "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return f"Device: {device}\n\n" + "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[2048, 8192, 16384] if on_gpu else [512, 2048])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--hidden", type=int, default=4096 if on_gpu else 256, help="lm_head width")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if on_gpu else "fp32")
    parser.add_argument("--paths", nargs="+", default=None, help="default: every path that can run here")
    parser.add_argument("--warmup", type=int, default=3 if on_gpu else 1)
    parser.add_argument("--repeats", type=int, default=10 if on_gpu else 3)
    parser.add_argument("--peak_gbps", type=float, default=3350.0, help="HBM peak, GB/s (H100 SXM: 3350)")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child is not None:
        print(json.dumps(asdict(measure(Config(**json.loads(args._child)), args.peak_gbps))))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    valid = LOGITS_PATHS + HIDDEN_PATHS
    paths = args.paths or [p for p in valid if p != "cuda" or device == "cuda"]
    unknown = set(paths) - set(valid)
    if unknown:
        raise ValueError(f"unknown --paths {sorted(unknown)}; choose from {valid}")
    results = []
    for vocab in args.vocab:
        for num_rows in args.n:
            for path in paths:
                cfg = Config(
                    path, num_rows, vocab, args.hidden, args.dtype, device, args.warmup, args.repeats
                )
                result = (
                    measure(cfg, args.peak_gbps)
                    if device == "cuda"
                    else measure_in_child(cfg, args.peak_gbps)
                )
                results.append(result)
                print(markdown_table([result], device).splitlines()[-1], flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    slug, date = device_slug(), dt.date.today().isoformat()
    table = markdown_table(results, f"{slug} (torch {torch.__version__}, {platform.machine()})")
    print("\n" + table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"logprobs_{slug}_{date}"
    meta = {
        "device": slug,
        "date": date,
        "torch": torch.__version__,
        "hidden": args.hidden,
        "peak_gbps": args.peak_gbps,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2)
    )
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
