"""Decode speed through packager.load(...).stream vs llama.cpp's own llama-bench (tg128).

Same GGUF, same thread count, same run (machines are noisy: only the ratio is meaningful).
Target from issue 6: tokens/s through ``Model.stream`` >= 0.95x llama-bench's tg128. For
reference it also times llama-cpp-python's streaming ``create_completion`` in the same process.

    python benchmarks/runtime_overhead.py                        # random Qwen2.5-0.5B, Q4_K_M
    python benchmarks/runtime_overhead.py --threads 1 --reps 5
    python benchmarks/runtime_overhead.py --bundle dist/SmolLM2-135M-Instruct-laptop
    python benchmarks/runtime_overhead.py --bundle dist/random-qwen3-4b-v4-laptop --stream-only   # issue 26

Each side runs in its own fresh process, alternating, ``--reps`` times; the figures are the
medians. Ours: the decode rate of a 128-token greedy reply (tokens after the first one, over
the time after the first one arrived: prompt processing excluded, as tg128 excludes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

N_GEN = 128
PROMPT = "The"


def measure_ours(bundle: str, threads: int, n_ctx: int, flash_attn: bool, stream_only: bool = False) -> dict:
    """One fresh-process measurement: a warm-up reply, then a timed 128-token reply (and, unless
    ``stream_only``, create_completion's and the bare token loop's)."""
    import packager

    with packager.load(bundle, n_threads=threads, n_ctx=n_ctx, flash_attn=flash_attn) as m:
        m.generate(PROMPT, max_tokens=8)  # warm-up, as llama-bench does
        s = m.stream(PROMPT, max_tokens=N_GEN, temperature=0.0)
        t0 = n0 = None
        for _ in s:
            if t0 is None:
                t0, n0 = time.perf_counter(), s.n_generated
        t1 = time.perf_counter()
        ours = {"tokens": s.n_generated - n0, "seconds": t1 - t0, "finish_reason": s.finish_reason}
        ours["tokens_per_s"] = ours["tokens"] / ours["seconds"]
        if stream_only:  # a 4B decodes a few tokens/s here: the two references would triple each round
            return {"ours": ours}
        # llama-cpp-python's own streaming completion, same model object
        llm = m._llm
        llm.reset()
        t0 = None
        n = 0
        for chunk in llm.create_completion(PROMPT, max_tokens=N_GEN, temperature=0.0, stream=True):
            if chunk["choices"][0]["finish_reason"] is not None:  # the closing chunk carries no token
                break
            n += 1
            if t0 is None:
                t0 = time.perf_counter()
                n = 0
        cc = {"chunks": n, "seconds": time.perf_counter() - t0}
        cc["chunks_per_s"] = n / cc["seconds"]
        # the floor of driving tokens from Python: Llama.generate's bare token loop (what Model.stream wraps)
        ids = m.tokenize(PROMPT)
        llm.reset()
        t0 = None
        n = 0
        for _ in llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if t0 is None:
                t0 = time.perf_counter()
            else:
                n += 1
            if n == N_GEN - 1:
                break
        loop = {"tokens": n, "seconds": time.perf_counter() - t0}
        loop["tokens_per_s"] = n / loop["seconds"]
    return {"ours": ours, "create_completion": cc, "generate_loop": loop}


def llama_bench(gguf: Path, threads: int, flash_attn: bool, kv_type: str) -> dict:
    from llama_tools import llama_tool

    out = subprocess.run([str(llama_tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", "0",
                          "-n", str(N_GEN), "-r", "1", "-fa", "1" if flash_attn else "0", "-ctk", kv_type, "-ctv", kv_type,
                          "-o", "json"],
                         capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout)[0]
    return {k: rec[k] for k in ("avg_ts", "stddev_ts", "n_threads", "n_gen", "model_type", "cpu_info")}


def pack_bundle(work: Path, threads: int) -> Path:
    import models

    src = models.random_qwen2("qwen2.5-0.5b", models.QWEN25_05B_CONFIG)
    out = work / "dist"
    r = subprocess.run([sys.executable, "-m", "packager.cli", "model", str(src), "--quant", "Q4_K_M", "--target",
                        "laptop", "-o", str(out), "--threads", str(threads), "--json", "-q"],
                       capture_output=True, text=True, env=dict(os.environ, EDGEPACK_NO_PROGRESS="1"))
    if r.returncode != 0:
        sys.exit(f"pack failed: {r.stderr.strip()}")
    return Path(json.loads(r.stdout)["path"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="an existing GGUF bundle (default: pack the random Qwen2.5-0.5B)")
    ap.add_argument("--work", type=Path, help="scratch directory kept between runs (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="default: edgepack's default (usable physical cores)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--flash-attn", action="store_true", help="flash attention on, on both sides")
    ap.add_argument("--stream-only", action="store_true",
                    help="time Model.stream alone, not llama-cpp-python's create_completion and bare loop too")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one fresh-process measurement
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure_ours(args.measure, args.threads, args.ctx, args.flash_attn, args.stream_only)))
        return 0

    from packager.bundle.verify import read_bundle
    from packager.host import default_threads

    threads = args.threads or default_threads()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgepack-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle
    if bundle is None:
        found = sorted((work / "dist").glob("*/manifest.json")) if (work / "dist").exists() else []
        bundle = found[0].parent if found else pack_bundle(work, threads)
    b = read_bundle(bundle)
    gguf = b.model_file
    # the KV cache type the bundle loads with; llama.cpp quantizes V only with flash attention (as LlamaModel does)
    kv_type = str(b.manifest.get("runtime", {}).get("kv_type") or "f16").lower()
    args.flash_attn = args.flash_attn or kv_type not in ("f16", "f32", "bf16")
    ref, ours, cc, loop = [], [], [], []
    for _ in range(args.reps):  # alternate, so drifting load hits both sides alike
        ref.append(llama_bench(gguf, threads, args.flash_attn, kv_type)["avg_ts"])
        r = subprocess.run([sys.executable, __file__, "--measure", str(bundle), "--threads", str(threads),
                            "--ctx", str(args.ctx)] + (["--flash-attn"] if args.flash_attn else [])
                           + (["--stream-only"] if args.stream_only else []),
                           capture_output=True, text=True, check=True)
        rec = json.loads(r.stdout)
        ours.append(rec["ours"]["tokens_per_s"])
        if not args.stream_only:
            cc.append(rec["create_completion"]["chunks_per_s"])
            loop.append(rec["generate_loop"]["tokens_per_s"])
        if rec["ours"]["tokens"] < N_GEN - 8:
            print(f"note: the reply ended after {rec['ours']['tokens']} tokens ({rec['ours']['finish_reason']})",
                  file=sys.stderr)
    record = {
        "benchmark": "runtime_overhead", "bundle": str(bundle), "gguf": gguf.name, "threads": threads,
        "flash_attn": args.flash_attn, "kv_type": kv_type, "reps": args.reps, "host": platform.node(), "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_avg": os.getloadavg(),
        "llama_bench_tg128_ts": ref, "stream_ts": ours, "create_completion_ts": cc, "generate_loop_ts": loop,
        "llama_bench_median": statistics.median(ref), "stream_median": statistics.median(ours),
    }
    record["ratio"] = record["stream_median"] / record["llama_bench_median"]
    if not args.stream_only:
        record["create_completion_median"] = statistics.median(cc)
        record["generate_loop_median"] = statistics.median(loop)
        record["create_completion_ratio"] = record["create_completion_median"] / record["llama_bench_median"]
    record["checks"] = {"stream >= 0.95x llama-bench tg128": record["ratio"] >= 0.95}
    (HERE / "results").mkdir(exist_ok=True)
    with open(HERE / "results" / "runtime_overhead.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"| decode, {gguf.name}, {threads} threads | tokens/s (median of {args.reps}) | runs |\n|---|---|---|")
    for name, xs in (("llama-bench tg128", ref), ("packager Model.stream", ours),
                     ("llama-cpp-python create_completion(stream=True)", cc),
                     ("bare Llama.generate token loop (no text)", loop)):
        if not xs:  # --stream-only
            continue
        print(f"| {name} | {statistics.median(xs):.1f} | {', '.join(f'{x:.1f}' for x in xs)} |")
    others = "" if args.stream_only else (
        f" (create_completion {record['create_completion_ratio']:.3f}x, bare loop "
        f"{record['generate_loop_median'] / record['llama_bench_median']:.3f}x)")
    print(f"\nratio {record['ratio']:.3f}x{others}; load average {' '.join(f'{x:.2f}' for x in record['load_avg'])}")
    for name, ok in record["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(record["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
