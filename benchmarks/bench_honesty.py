"""Honesty check: `pack bench` against llama.cpp's own llama-bench on the same GGUF, threads and CPUs.

Targets (issue 8): tg within 10% and pp within 15% of llama-bench's, on two models:
a Qwen2.5-0.5B-shaped random model packed at Q4_K_M (as benchmarks/pack_speed.py builds
it) and the embedded SmolLM2-135M-Instruct bundle (Q4_1). llama-bench is built from the
llama.cpp source vendored in llama-cpp-python's sdist (benchmarks/llama_tools.py). The
two run alternately (A B B A ...) so drift in a shared machine's load hits both sides
alike; each side's figure is the mean over its runs. Both are pinned to the same CPUs.

    python benchmarks/bench_honesty.py                       # both models, -p 512 -n 128 -r 5, 2 threads
    python benchmarks/bench_honesty.py --model smollm2 --threads 1 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import models  # noqa: E402
from llama_tools import llama_tool  # noqa: E402

from packager.host import performance_cpus  # noqa: E402

FA = {0: "off", 1: "on", -1: "auto"}  # llama.cpp's flash_attn_type -> llama-bench's -fa
MODELS = {"qwen2.5-0.5b": "Q4_K_M", "smollm2": "Q4_1"}  # name -> the quant it is packed at
# Settings both records carry (llama-bench's field names), recorded side by side so a difference shows.
SETTINGS = ("n_threads", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "n_gpu_layers")
LLAMA_BENCH_ONLY = ("poll", "cpu_strict", "cpu_mask", "load_mode", "repack")


def bundle_for(work: Path, model: str) -> Path:
    """The model's laptop bundle (cached in ``work``): the random Qwen2.5-0.5B, or the embedded SmolLM2."""
    quant = MODELS[model]
    if model == "smollm2":  # no source: pack's embedded SmolLM2-135M-Instruct, already Q4_1
        src_args, name = [], "SmolLM2-135M-Instruct"
    else:
        src = models.random_qwen2("qwen2.5-0.5b", models.QWEN25_05B_CONFIG)
        src_args, name = [str(src), "--quant", quant], src.name
    out = work / f"{name}-laptop"
    manifest = out / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text()).get("quant") != quant:
        subprocess.run([sys.executable, "-m", "packager.cli", "model", *src_args, "--target", "laptop",
                        "-o", str(work), "--force", "-q"], check=True, env=dict(os.environ, EDGEPACK_NO_PROGRESS="1"))
    return out


def pack_bench(bundle: Path, args) -> dict[str, dict]:
    # --ctx match: the context llama-bench loads (-p + -n); --ctx bundle: the bundle's planned one, as the app loads it
    ctx = ["--ctx", str(args.p + args.n)] if args.ctx == "match" else []
    out = subprocess.run([sys.executable, "-m", "packager.cli", "bench", str(bundle), "-p", str(args.p), "-n", str(args.n),
                          "-r", str(args.r), "--threads", str(args.threads), *ctx, "-o", "json", "-q"],
                         check=True, capture_output=True, text=True).stdout
    return {r["test"]: r for r in json.loads(out)}


def llama_bench(gguf: Path, args, fa: str) -> dict[str, dict]:
    cpus = performance_cpus()[: args.threads] if hasattr(os, "sched_setaffinity") else None

    def pin() -> None:  # the same CPUs pack bench pins its children to
        if cpus:
            os.sched_setaffinity(0, cpus)

    out = subprocess.run([str(llama_tool("llama-bench")), "-m", str(gguf), "-p", str(args.p), "-n", str(args.n),
                          "-r", str(args.r), "-t", str(args.threads), "-fa", fa, "-o", "json"],
                         check=True, capture_output=True, text=True, preexec_fn=pin if cpus else None).stdout
    recs = json.loads(out)
    return {(f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"): r for r in recs}


def compare(model: str, args) -> dict:
    """A-B-B-A rounds of llama-bench and pack bench on one model; the record with its checks."""
    bundle = bundle_for(args.work, model)
    gguf = next((bundle / "model").glob("*.gguf"))
    ours: list[dict[str, dict]] = []
    ref: list[dict[str, dict]] = []
    fa = "off"
    rounds: list[dict] = []  # per round: each side's wall time, the load after it, its within-run spread
    for i in range(args.rounds):
        order = ("ref", "ours") if i % 2 == 0 else ("ours", "ref")
        rounds.append({})
        for side in order:
            t = time.time()
            if side == "ours":
                ours.append(pack_bench(bundle, args))
                fa = FA.get(int(ours[-1][f"tg{args.n}"].get("flash_attn", 0)), "off")
            else:
                ref.append(llama_bench(gguf, args, fa))
            recs = (ours if side == "ours" else ref)[-1]
            # A side whose own repetitions spread widely was disturbed by the machine, not by the tool.
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            rounds[-1][side] = {"wall_s": round(time.time() - t, 1), "load_avg": load,
                                **{f"{k}_ts": round(v["avg_ts"], 2) for k, v in recs.items()},
                                **{f"{k}_cv": round(v["stddev_ts"] / v["avg_ts"], 3) for k, v in recs.items()}}
            print(f"{model} round {i + 1} {side}: {rounds[-1][side]}", file=sys.stderr)
    limits = {f"pp{args.p}": 0.15, f"tg{args.n}": 0.10}
    rows, checks = [], {}
    for test, limit in limits.items():
        a = statistics.mean(r[test]["avg_ts"] for r in ours)
        b = statistics.mean(r[test]["avg_ts"] for r in ref)
        diff = a / b - 1
        checks[f"{model} {test} within {limit:.0%} of llama-bench"] = abs(diff) <= limit
        # every repetition of every round: the spread a shared machine puts on each side
        reps_a = [x for r in ours for x in r[test]["samples_ts"]]
        reps_b = [x for r in ref for x in r[test]["samples_ts"]]
        rows.append({"test": test, "pack_bench_ts": a, "llama_bench_ts": b, "diff": diff,
                     "pack_bench_samples": [r[test]["avg_ts"] for r in ours],
                     "llama_bench_samples": [r[test]["avg_ts"] for r in ref],
                     "pack_bench_median_ts": statistics.median(reps_a), "llama_bench_median_ts": statistics.median(reps_b),
                     "pack_bench_range_ts": [min(reps_a), max(reps_a)], "llama_bench_range_ts": [min(reps_b), max(reps_b)]})
    return {"benchmark": "bench_honesty", "model": model, "quant": MODELS[model], "gguf": gguf.name,
            "threads": args.threads, "cpus": ours[0][f"tg{args.n}"]["emulated"]["cpus"], "flash_attn": fa,
            "p": args.p, "n": args.n, "r": args.r, "rounds": args.rounds, "ctx": args.ctx,
            "settings": {test: {"pack_bench": {k: ours[0][test].get(k) for k in SETTINGS + ("n_ctx", "n_ctx_from")},
                                "llama_bench": {**{k: ref[0][test].get(k) for k in SETTINGS + LLAMA_BENCH_ONLY},
                                                # llama-bench loads each test's own context: n_prompt + n_gen,
                                                # which llama.cpp rounds up to a multiple of 256
                                                "n_ctx": -(-(ref[0][test]["n_prompt"] + ref[0][test]["n_gen"]) // 256) * 256}}
                         for test in limits},
            "rows": rows, "checks": checks, "per_round": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=2, help="A-B-B-A pairs of (llama-bench, pack bench) runs")
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="Default: all of them.")
    ap.add_argument("--ctx", choices=("match", "bundle"), default="bundle",
                    help="pack bench's context: 'match' passes --ctx p+n (llama-bench's), 'bundle' keeps the "
                         "bundle's planned one, as the app loads it. Default: %(default)s.")
    ap.add_argument("--work", type=Path, default=models.CACHE / "bench-honesty")
    args = ap.parse_args()

    llama_bench_path = llama_tool("llama-bench")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    records = [compare(m, args) for m in (args.model or list(MODELS))]
    host = {"llama_bench": str(llama_bench_path), "host": platform.node(), "cpu_count": os.cpu_count(),
            "load_avg_before": load_before, "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (HERE / "results").mkdir(exist_ok=True)
    with open(HERE / "results" / "bench_honesty.jsonl", "a") as f:
        f.write("".join(json.dumps({**rec, **host}) + "\n" for rec in records))
    print("| model | test | pack bench t/s | llama-bench t/s | difference | pack bench range | llama-bench range |\n"
          "|---|---|--:|--:|--:|--:|--:|")
    for rec in records:
        for row in rec["rows"]:
            ra, rb = row["pack_bench_range_ts"], row["llama_bench_range_ts"]
            print(f"| {rec['model']} {rec['quant']} | {row['test']} | {row['pack_bench_ts']:.2f} "
                  f"| {row['llama_bench_ts']:.2f} | {row['diff']:+.1%} | {ra[0]:.1f}-{ra[1]:.1f} | {rb[0]:.1f}-{rb[1]:.1f} |")
        for test, sides in rec["settings"].items():
            print(f"{rec['model']} {test} settings: pack bench {sides['pack_bench']}; llama-bench {sides['llama_bench']}")
    checks = {k: v for rec in records for k, v in rec["checks"].items()}
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    print(f"load average before {load_before}, after {host['load_avg']}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
