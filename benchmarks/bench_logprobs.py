"""Per-token log-probs: time and peak memory of each path, forward and forward + backward.

Paths (all give logps_N = log softmax(logits)[label] per row):
  naive             logits.float().log_softmax(-1).gather(...)     (what most trainers do)
  torch             hpalign.ops.logprobs.token_logprobs(impl="torch")   (chunked fp32, the oracle)
  cuda              hpalign.ops.logprobs.token_logprobs(impl="cuda")    (fused kernel, GPU only)
  naive_hidden      lm_head(hidden).float().log_softmax(-1).gather(...)  (baseline for the rows below)
  linear_keep       linear_token_logprobs(hidden, W, labels, keep_logits=True)   (one matmul, logits kept)
  linear_recompute  linear_token_logprobs(..., keep_logits=False)   (chunks recomputed in backward)
  hidden            hidden_logprobs(hidden, lm_head, labels)      (nn.Linear head: linear_recompute,
                                                                   chunk_rows=1024)
  hidden_module     hidden_logprobs with a head whose forward is its own (a LoRA-wrapped head's path:
                    module + token_logprobs per chunk under activation checkpointing)
  liger_hidden      -liger_fused_linear_cross_entropy(hidden, W, labels, reduction="none") (Liger's
                    fused linear cross-entropy, CUDA + Triton; only where liger-kernel imports)
The hidden rows include the lm_head matmul (width --hidden), so compare them with each other.

Memory, stated exactly. `peak MiB` is the growth of the peak during one forward + backward over
what existed before it (the inputs: logits or hidden + lm_head, labels, the upstream gradient):
on GPU torch.cuda.max_memory_allocated minus memory_allocated before; on CPU the peak RSS
(VmHWM, reset through /proc/self/clear_refs just before the call) minus the RSS before it, in a
fresh child process per row (one-off lazy allocations paid first on a tiny problem). `extra MiB` subtracts the gradients the call must return and autograd keeps in `.grad`
(N x V for the logits paths; N x H + V x H for the hidden paths), which every path allocates
alike: it is the path's own working memory (naive: its saved N x V fp32 log-softmax and the
backward's temporaries; torch: about one fp32 chunk). The `x naive` columns divide by the naive
path of the same N and V (naive_hidden for the hidden paths).

Time: the median of --repeats calls after --warmup, with all paths of one (N, V) timed in one
process in turn (A B A B ...), so that load from other processes on a shared machine falls on
every path alike. On GPU the forward's achieved bandwidth is also given as a fraction of
--peak_gbps for reading the logits once (the floor for any exact method).

  python benchmarks/bench_logprobs.py                       # CPU: N in {512, 2048}, fp32
  python benchmarks/bench_logprobs.py --n 16384 --paths naive torch cuda   # GPU: bf16 by default
Writes benchmarks/results/logprobs_<device>_<date>.json and .md next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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
from hpalign.ops.linear_logprobs import hidden_logprobs, linear_token_logprobs  # noqa: E402
from hpalign.ops.logprobs import token_logprobs  # noqa: E402

IGNORE_INDEX = -100
LOGITS_PATHS = ("naive", "torch", "cuda")
HIDDEN_PATHS = ("naive_hidden", "linear_keep", "linear_recompute", "hidden", "hidden_module", "liger_hidden")


def liger_available() -> bool:
    """Liger's kernels are Triton on CUDA: the path runs only there, with liger-kernel installed."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def liger_logps(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs from Liger's fused linear cross-entropy (its per-token loss is -logp)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(hidden_NH, weight_VH, labels_N, reduction="none")
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
    peak_mib: float | None = None  # growth of the peak over the inputs, one fwd+bwd
    extra_mib: float | None = None  # peak_mib minus the returned gradients (see the module doc)
    time_vs_naive: float | None = None  # fwd_bwd_ms / the naive path's
    extra_vs_naive: float | None = None  # extra_mib / the naive path's
    fwd_floor_frac: float | None = None  # read-the-logits-once time / measured forward time (GPU)
    error: str | None = None


def naive_logps(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    logp_NV = logits_NV.float().log_softmax(-1)
    picked_N = logp_NV.gather(-1, labels_N.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(labels_N != IGNORE_INDEX, picked_N, picked_N.new_zeros(()))


class ModuleHead(torch.nn.Linear):
    """A Linear with its own forward: hidden_logprobs treats it as any module (a LoRA-wrapped head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def build_step(cfg: Config) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """(forward, forward + backward) closures over freshly made inputs for one configuration."""
    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    labels_N = torch.randint(0, cfg.vocab, (cfg.num_rows,), device=device)
    grad_N = torch.randn(cfg.num_rows, device=device)
    params: list[torch.Tensor] = []
    if cfg.path in LOGITS_PATHS:
        logits_NV = torch.randn(cfg.num_rows, cfg.vocab, device=device, dtype=dtype).mul_(3).requires_grad_()
        params = [logits_NV]
        impl = {"torch": "torch", "cuda": "cuda"}.get(cfg.path)
        if impl is None:
            forward = lambda: naive_logps(logits_NV, labels_N)  # noqa: E731
        else:
            forward = lambda: token_logprobs(logits_NV, labels_N, impl=impl)  # noqa: E731
    else:
        hidden_NH = torch.randn(cfg.num_rows, cfg.hidden, device=device, dtype=dtype).requires_grad_()
        head_cls = ModuleHead if cfg.path == "hidden_module" else torch.nn.Linear
        lm_head = head_cls(cfg.hidden, cfg.vocab, bias=False, device=device, dtype=dtype)
        params = [hidden_NH, *lm_head.parameters()]
        forward = {
            "naive_hidden": lambda: naive_logps(lm_head(hidden_NH), labels_N),
            "linear_keep": lambda: linear_token_logprobs(hidden_NH, lm_head.weight, labels_N, keep_logits=True),
            "linear_recompute": lambda: linear_token_logprobs(hidden_NH, lm_head.weight, labels_N,
                                                              keep_logits=False),
            "hidden": lambda: hidden_logprobs(hidden_NH, lm_head, labels_N),
            "hidden_module": lambda: hidden_logprobs(hidden_NH, lm_head, labels_N),
            "liger_hidden": lambda: liger_logps(hidden_NH, lm_head.weight, labels_N),
        }[cfg.path]

    def forward_backward() -> None:
        (forward() * grad_N).sum().backward()
        for p in params:
            p.grad = None

    return forward, forward_backward


def grad_bytes(cfg: Config) -> int:
    """Bytes of the gradients one forward + backward returns (kept in `.grad` by autograd)."""
    itemsize = DTYPES[cfg.dtype].itemsize
    if cfg.path in LOGITS_PATHS:
        return cfg.num_rows * cfg.vocab * itemsize
    return (cfg.num_rows + cfg.vocab) * cfg.hidden * itemsize


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_median_ms(fns: list[Callable[[], object]], cfg: Config) -> list[float]:
    """Median wall time of each function, called in turn (A B A B ...) so that drift hits all alike."""
    for _ in range(cfg.warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(cfg.repeats):
        for fn, fn_times in zip(fns, times, strict=True):
            _sync(cfg.device)
            start = time.perf_counter()
            fn()
            _sync(cfg.device)
            fn_times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def _proc_status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(match.group(1))


def peak_bytes_cpu(fn: Callable[[], object]) -> int:
    """Growth of the peak RSS during one call over the RSS just before it.

    Linux: the peak (VmHWM) is reset first through /proc/self/clear_refs, so that earlier
    transients (building the inputs) cannot hide the call's own peak. Elsewhere: the growth of
    ru_maxrss, which is only meaningful in a fresh process.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
        fn()
        return (_proc_status_kib("VmHWM") - before) * 1024
    except OSError:
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


def measure_memory(cfg: Config) -> Result:
    """Peak memory of one forward + backward (on CPU: call in a fresh process, see measure_memory_in_child)."""
    result = Result(cfg.path, cfg.num_rows, cfg.vocab, cfg.dtype)
    try:
        if cfg.device == "cpu":  # pay one-off lazy allocations (libraries, autograd threads) first
            tiny = Config(cfg.path, 4, min(cfg.vocab, 64), min(cfg.hidden, 16), cfg.dtype, "cpu", 0, 1)
            build_step(tiny)[1]()
        _, forward_backward = build_step(cfg)
        peak = peak_bytes_cuda(forward_backward) if cfg.device == "cuda" else peak_bytes_cpu(forward_backward)
        result.peak_mib = peak / 2**20
        result.extra_mib = (peak - grad_bytes(cfg)) / 2**20
    except (RuntimeError, ValueError) as exc:  # OOM, or a path that cannot run here
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return result


def measure_times(cfgs: list[Config], peak_gbps: float) -> list[dict[str, float | None]]:
    """fwd / fwd+bwd medians of every path of one (N, V), interleaved; None where a path fails."""
    steps, out = [], []
    for cfg in cfgs:
        try:
            steps.append(build_step(cfg))
        except (RuntimeError, ValueError):
            steps.append(None)
    runnable = [(cfg, step) for cfg, step in zip(cfgs, steps, strict=True) if step is not None]
    with torch.no_grad():
        fwd_ms = interleaved_median_ms([step[0] for _, step in runnable], cfgs[0])
    fwd_bwd_ms = interleaved_median_ms([step[1] for _, step in runnable], cfgs[0])
    by_path = {cfg.path: (f, fb) for (cfg, _), f, fb in zip(runnable, fwd_ms, fwd_bwd_ms, strict=True)}
    for cfg in cfgs:
        f, fb = by_path.get(cfg.path, (None, None))
        floor = None
        if cfg.device == "cuda" and cfg.path in LOGITS_PATHS and f:
            floor_ms = cfg.num_rows * cfg.vocab * DTYPES[cfg.dtype].itemsize / (peak_gbps * 1e9) * 1e3
            floor = floor_ms / f
        out.append({"fwd_ms": f, "fwd_bwd_ms": fb, "fwd_floor_frac": floor})
    return out


def run_child(mode: str, payload: object, peak_gbps: float) -> object:
    """Run measure_memory (one Config) or measure_times (a list) in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--_child", json.dumps({"mode": mode, "payload": payload}),
           "--peak_gbps", str(peak_gbps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"child failed: {tail[:200]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(spec: dict, peak_gbps: float) -> object:
    if spec["mode"] == "memory":
        return asdict(measure_memory(Config(**spec["payload"])))
    return measure_times([Config(**c) for c in spec["payload"]], peak_gbps)


def measure_shape(cfgs: list[Config], peak_gbps: float) -> list[Result]:
    """Every path of one (N, V): memory one path per fresh process (CPU), then interleaved times."""
    on_cpu = cfgs[0].device == "cpu"
    results = []
    for cfg in cfgs:
        try:
            results.append(Result(**run_child("memory", asdict(cfg), peak_gbps)) if on_cpu else measure_memory(cfg))
        except RuntimeError as exc:
            results.append(Result(cfg.path, cfg.num_rows, cfg.vocab, cfg.dtype, error=str(exc)))
        if not on_cpu:
            torch.cuda.empty_cache()
    ok = [(cfg, r) for cfg, r in zip(cfgs, results, strict=True) if r.error is None]
    if ok:
        ok_cfgs = [cfg for cfg, _ in ok]
        times = run_child("time", [asdict(c) for c in ok_cfgs], peak_gbps) if on_cpu else measure_times(
            ok_cfgs, peak_gbps)
        for (_, r), t in zip(ok, times, strict=True):
            r.fwd_ms, r.fwd_bwd_ms, r.fwd_floor_frac = t["fwd_ms"], t["fwd_bwd_ms"], t["fwd_floor_frac"]
    add_ratios(results)
    return results


def add_ratios(results: list[Result]) -> None:
    """time_vs_naive / extra_vs_naive against naive (logits paths) or naive_hidden (hidden paths)."""
    base = {r.path: r for r in results}
    for r in results:
        ref = base.get("naive" if r.path in LOGITS_PATHS else "naive_hidden")
        if ref is None or r.error or ref.error:
            continue
        if r.fwd_bwd_ms and ref.fwd_bwd_ms:
            r.time_vs_naive = r.fwd_bwd_ms / ref.fwd_bwd_ms
        if r.extra_mib is not None and ref.extra_mib:
            r.extra_vs_naive = r.extra_mib / ref.extra_mib


def device_slug() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu{torch.get_num_threads()}"


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    digits = int(spec.strip(".f%")) + (2 if spec.endswith("%") else 0)
    return format(round(value, digits) + 0.0, spec)  # + 0.0: no "-0" for a tiny negative


def markdown_table(results: list[Result], device: str) -> str:
    header = ("| path | N | V | dtype | fwd ms | fwd+bwd ms | time x naive | peak MiB | extra MiB | "
              "extra x naive | fwd / read-once floor |")
    lines = [header, "|" + "---|" * 11]
    for r in results:
        cells = [r.path, str(r.num_rows), str(r.vocab), r.dtype, _fmt(r.fwd_ms, ".1f"), _fmt(r.fwd_bwd_ms, ".1f"),
                 _fmt(r.time_vs_naive, ".2f"), _fmt(r.peak_mib, ".0f"), _fmt(r.extra_mib, ".0f"),
                 _fmt(r.extra_vs_naive, ".3f"), _fmt(r.fwd_floor_frac, ".0%")]
        if r.error:
            cells[4:] = [r.error] + [""] * 6
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
        print(json.dumps(child_main(json.loads(args._child), args.peak_gbps)))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    valid = LOGITS_PATHS + HIDDEN_PATHS
    runnable = {"cuda": device == "cuda", "liger_hidden": device == "cuda" and liger_available()}
    paths = args.paths or [p for p in valid if runnable.get(p, True)]
    if "liger_hidden" in paths and not runnable["liger_hidden"]:  # an optional opponent: say so, go on
        print("liger_hidden skipped: it needs CUDA and the liger-kernel package", file=sys.stderr)
        paths = [p for p in paths if p != "liger_hidden"]
    unknown = set(paths) - set(valid)
    if unknown:
        raise ValueError(f"unknown --paths {sorted(unknown)}; choose from {valid}")
    load_before = os.getloadavg()
    results = []
    for vocab in args.vocab:
        for num_rows in args.n:
            cfgs = [Config(path, num_rows, vocab, args.hidden, args.dtype, device, args.warmup, args.repeats)
                    for path in paths]
            shape_results = measure_shape(cfgs, args.peak_gbps)
            results += shape_results
            print("\n".join(markdown_table(shape_results, device).splitlines()[-len(shape_results):]), flush=True)
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
        "threads": torch.get_num_threads(),
        "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "memory": "peak = growth of the peak over the inputs in one fwd+bwd (CPU: VmHWM reset via "
        "/proc/self/clear_refs, minus VmRSS before, fresh process); "
        "extra = peak minus the returned gradients (N x V logits grad; hidden paths N x H + V x H)",
    }
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2)
    )
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
