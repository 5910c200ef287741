"""Issue 28: time to first token of a four-turn chat with a ~700-token system prompt (packager/measure/chat_turns.py).

Targets, each a ratio measured in the same run (fresh process per measurement, sides alternating):
- GGUF: TTFT of turns 2-4 through packager.load <= 1.2x llama-cpp-python's own chat
  (``Llama.create_chat_completion(stream=True)``, which reuses its cached prefix) on the same GGUF;
- ONNX: TTFT of turns 2-4 <= 0.35x its first turn;
- prompt_cache: the first turn after a reload with ``prompt_cache=DIR`` <= 0.2x a cold first turn (GGUF);
- decode tokens/s unchanged: benchmarks/runtime_overhead.py (>= 0.95x llama-bench).

    python benchmarks/chat_reuse.py                  # random Qwen2.5-0.5B (the issue's model), Q4_K_M + ONNX int4
    python benchmarks/chat_reuse.py --model smollm2 --reps 5
    python benchmarks/chat_reuse.py --skip-onnx
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

MAX_TOKENS = 16


def measure(kind: str, bundle: str, threads: int, cache: str | None) -> dict:
    """One fresh-process measurement: each turn's seconds to its first piece."""
    import packager
    from packager.measure.chat_turns import TURNS, chat_ttfts, system_prompt

    if kind == "llama-cpp-python":
        import llama_cpp
        from packager.bundle.verify import read_bundle

        b = read_bundle(bundle)
        llm = llama_cpp.Llama(model_path=str(b.model_file), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
        messages = [{"role": "system", "content": system_prompt()}]
        out = []
        for turn in TURNS:
            messages.append({"role": "user", "content": turn})
            t0 = time.perf_counter()
            first, reply = None, []
            for chunk in llm.create_chat_completion(messages, max_tokens=MAX_TOKENS, temperature=0.0, stream=True):
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    first = first or time.perf_counter()
                    reply.append(piece)
            out.append((first or time.perf_counter()) - t0)
            messages.append({"role": "assistant", "content": "".join(reply)})
        n_system = len(llm.tokenize(system_prompt().encode()))
        llm.close()
        return {"ttfts": out, "n_system_tokens": n_system}
    opts = {"prompt_cache": cache} if cache else {}
    with packager.load(bundle, n_threads=threads, n_ctx=2048, **opts) as m:
        t = chat_ttfts(m, max_tokens=MAX_TOKENS)
        hits = m.prompt_cache.hits if getattr(m, "prompt_cache", None) is not None else None
    return {"ttfts": t, "prompt_cache_hits": hits}


def run(kind: str, bundle: Path, threads: int, cache: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--bundle", str(bundle), "--threads", str(threads)]
    if cache:
        cmd += ["--cache", str(cache)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{kind} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def pack(src: Path, out: Path, fmt: str, threads: int) -> Path:
    args = [sys.executable, "-m", "packager.cli", "model", str(src), "--target", "laptop", "-o", str(out),
            "--threads", str(threads), "--json", "-q", "--format", fmt]
    if fmt == "gguf":
        args += ["--quant", "Q4_K_M"]
    r = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, EDGEPACK_NO_PROGRESS="1"))
    if r.returncode != 0:
        sys.exit(f"pack failed: {r.stderr.strip()}")
    return Path(json.loads(r.stdout)["path"])


def later(t: list[float]) -> float:
    return statistics.mean(t[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", help="a tests/models.py BENCH_MODELS name")
    ap.add_argument("--work", type=Path, help="scratch directory kept between runs (default: a temp dir)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.bundle, args.threads, args.cache)))
        return 0

    import models
    from packager.host import default_threads

    threads = args.threads or default_threads()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgepack-chat-"))
    src = models.BENCH_MODELS[args.model]()
    bundles = {}
    for fmt in ("gguf",) + (() if args.skip_onnx else ("onnx",)):
        found = sorted((work / fmt).glob("*/manifest.json")) if (work / fmt).exists() else []
        bundles[fmt] = found[0].parent if found else pack(src, work / fmt, fmt, threads)

    ours, theirs, onnx, cold, warm = [], [], [], [], []
    for _ in range(args.reps):  # alternate, so drifting load hits every side alike
        ours.append(run("packager", bundles["gguf"], threads)["ttfts"])
        theirs.append(run("llama-cpp-python", bundles["gguf"], threads)["ttfts"])
        if "onnx" in bundles:
            onnx.append(run("packager", bundles["onnx"], threads)["ttfts"])
        cache = work / "prompt-cache"
        shutil.rmtree(cache, ignore_errors=True)
        first = run("packager", bundles["gguf"], threads, cache)  # reads the system prompt, saves it
        again = run("packager", bundles["gguf"], threads, cache)  # restores it
        if again["prompt_cache_hits"] != 1:
            sys.exit(f"the reload did not restore the prompt cache: {again}")
        cold.append(first["ttfts"][0])
        warm.append(again["ttfts"][0])

    med = statistics.median
    rec = {
        "benchmark": "chat_reuse", "model": args.model, "threads": threads, "reps": args.reps,
        "max_tokens": MAX_TOKENS, "host": platform.node(), "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_avg": os.getloadavg(),
        "gguf": {"ours": ours, "llama_cpp_python": theirs},
        "gguf_later_ratio": med(later(a) / later(b) for a, b in zip(ours, theirs)),
        "gguf_first_ratio": med(a[0] / b[0] for a, b in zip(ours, theirs)),
        "prompt_cache": {"cold_first_s": cold, "restored_first_s": warm},
        "prompt_cache_ratio": med(w / c for w, c in zip(warm, cold)),
    }
    checks = {"GGUF turns 2-4 <= 1.2x llama-cpp-python's chat": rec["gguf_later_ratio"] <= 1.2,
              "first turn after a reload with prompt_cache <= 0.2x a cold one": rec["prompt_cache_ratio"] <= 0.2}
    if onnx:
        rec["onnx"] = onnx
        rec["onnx_later_over_first"] = med(later(t) / t[0] for t in onnx)
        checks["ONNX turns 2-4 <= 0.35x its first turn"] = rec["onnx_later_over_first"] <= 0.35
    rec["checks"] = checks
    (HERE / "results").mkdir(exist_ok=True)
    with open(HERE / "results" / "chat_reuse.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")

    ms = lambda xs: ", ".join(f"{x * 1e3:.0f}" for x in xs)  # noqa: E731
    print(f"| {args.model}, {threads} threads, ms to first token | turn 1 | turns 2-4 (mean) | runs (turn 1 / later) |")
    print("|---|---|---|---|")
    rows = [("packager.load, GGUF Q4_K_M", ours), ("llama-cpp-python chat, same GGUF", theirs)]
    if onnx:
        rows.append(("packager.load, ONNX int4", onnx))
    for name, runs in rows:
        print(f"| {name} | {med(t[0] for t in runs) * 1e3:.0f} | {med(later(t) for t in runs) * 1e3:.0f} | "
              f"{ms([t[0] for t in runs])} / {ms([later(t) for t in runs])} |")
    print(f"| GGUF first turn, cold / restored from prompt_cache | {med(cold) * 1e3:.0f} / {med(warm) * 1e3:.0f} | | "
          f"{ms(cold)} / {ms(warm)} |")
    print(f"\nGGUF turns 2-4: {rec['gguf_later_ratio']:.2f}x llama-cpp-python's; prompt cache: "
          f"{rec['prompt_cache_ratio']:.2f}x a cold first turn"
          + (f"; ONNX turns 2-4: {rec['onnx_later_over_first']:.2f}x its first" if onnx else ""))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
