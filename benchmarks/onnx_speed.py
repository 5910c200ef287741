"""Decode speed of edgepack's ONNX int4 bundle vs ONNX Runtime GenAI's builder and vs GGUF Q4_K_M.

Same checkpoint (a random model with Qwen2.5-0.5B-Instruct's exact config, or with
Qwen2.5-3B-Instruct's: --model qwen2.5-3b), same machine, same thread count, same run;
machines are noisy, so only the ratios mean anything. Sides, each in its own fresh process,
in alternating rounds:

  ours      our bundle driven by the plain onnxruntime-genai loop (prompt, then timed greedy
            tokens with EOS held off by min_length)
  load      our bundle through packager.load, as an app decodes: Model.stream, greedy
  bench     `pack bench -p 0 -n N` on our bundle: its tg figure
  builder   the builder's default int4 output (`python -m onnxruntime_genai.models.builder
            -i DIR -o OUT -p int4 -e cpu`), the same genai loop (0.5B only: at 3B the builder
            needs more than 24 GB)
  gguf      the GGUF Q4_K_M bundle of the same model, timed by llama.cpp's llama-bench (tg)
            when it is built (benchmarks/llama_tools.py), else by llama-cpp-python's eval loop

Targets (issue 14): load >= 0.95x builder (0.5B); at 3B, load >= 0.9x gguf; and pack bench's
figure within 10% of the plain genai loop on the same bundle (|bench / ours - 1| <= 0.10).

    python benchmarks/onnx_speed.py                 # ~5 min on 2 cores
    python benchmarks/onnx_speed.py --rounds 5 --n-gen 128
    python benchmarks/onnx_speed.py --model qwen2.5-3b --rounds 3   # ~25 min: packs a 3B twice
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
sys.path.insert(0, str(HERE))

import models  # noqa: E402
from procmon import run  # noqa: E402

ONNX_DECODE = r"""
import json, sys, time
import onnxruntime_genai as og
path, n_gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = og.Config(path)
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                   "inter_op_num_threads": 1}}}}))
model = og.Model(cfg)
prompt = list(range(1000, 1016))
best = None
for _ in range(2):  # the first pass warms caches and ORT's prepacked weights
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n_gen, min_length=len(prompt) + n_gen, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    gen.generate_next_token()
    t0 = time.perf_counter()
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    dt = time.perf_counter() - t0
    best = max(best or 0.0, n / dt)
    del gen
print(json.dumps({"tokens_per_s": best, "n": n}))
"""

GGUF_DECODE = r"""
import json, sys, time
import llama_cpp
path, n_gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
prompt = list(range(1000, 1016))
best = 0.0
for _ in range(2):
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for i in range(n_gen):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    best = max(best, n_gen / (time.perf_counter() - t0))
print(json.dumps({"tokens_per_s": best, "n": n_gen}))
"""


LOAD_DECODE = r"""
import json, sys, time
import packager
bundle, n_gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompt = list(range(1000, 1016))
best, n = 0.0, 0
with packager.load(bundle, n_threads=threads) as m:
    for _ in range(2):  # the first pass warms caches and ORT's prepacked weights
        stamps = [time.perf_counter() for _ in m.stream(prompt, max_tokens=n_gen + 1, temperature=0.0)]
        n = len(stamps) - 1  # tokens after the first (the first one carries the prompt)
        if n > 0:
            best = max(best, n / (stamps[-1] - stamps[0]))
print(json.dumps({"tokens_per_s": best, "n": n}))
"""


def load_tps(bundle: Path, n_gen: int, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", LOAD_DECODE, str(bundle), str(n_gen), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def bench_tps(bundle: Path, n_gen: int, threads: int) -> float:
    out = subprocess.run([sys.executable, "-m", "packager.cli", "bench", str(bundle), "-p", "0", "-n", str(n_gen),
                          "-r", "3", "--threads", str(threads), "-o", "json", "-q"],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def onnx_tps(folder: Path, n_gen: int, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", ONNX_DECODE, str(folder), str(n_gen), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def gguf_tps(gguf: Path, n_gen: int, threads: int) -> tuple[float, str]:
    try:
        from llama_tools import tools_dir

        bench = tools_dir() / "llama-bench"
    except Exception:  # noqa: BLE001
        bench = None
    if bench is not None and bench.exists():
        out = subprocess.run([str(bench), "-m", str(gguf), "-p", "0", "-n", str(n_gen), "-t", str(threads),
                              "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)
        rec = [r for r in json.loads(out.stdout) if r["n_gen"] > 0][0]
        return float(rec["avg_ts"]), "llama-bench"
    out = subprocess.run([sys.executable, "-c", GGUF_DECODE, str(gguf), str(n_gen), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"], "llama-cpp-python eval loop"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="reuse bundles already in --work")
    ap.add_argument("--model", choices=("qwen2.5-0.5b", "qwen2.5-3b"), default="qwen2.5-0.5b")
    args = ap.parse_args()

    model_dir = models.BENCH_MODELS[args.model]()
    with_builder = args.model == "qwen2.5-0.5b"
    work = Path(args.work or tempfile.mkdtemp(prefix="edgepack-onnx-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
    ours_dir, builder_dir, gguf_dist = work / "dist-onnx", work / "builder", work / "dist-gguf"
    steps = {}
    if not (args.keep and ours_dir.exists()):
        shutil.rmtree(ours_dir, ignore_errors=True)
        steps["ours"] = run([sys.executable, "-m", "packager.cli", "model", str(model_dir), "--format", "onnx",
                             "-o", str(ours_dir), "--force", "-q"], env=env, log=work / "ours.log")
    if with_builder and not (args.keep and (builder_dir / "model.onnx").exists()):
        shutil.rmtree(builder_dir, ignore_errors=True)
        steps["builder"] = run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
                                "-o", str(builder_dir), "-p", "int4", "-e", "cpu", "-c", str(work / "hf-cache")],
                               env=env, log=work / "builder.log")
    if not (args.keep and gguf_dist.exists()):
        shutil.rmtree(gguf_dist, ignore_errors=True)
        steps["gguf"] = run([sys.executable, "-m", "packager.cli", "model", str(model_dir), "--quant", "Q4_K_M",
                             "-o", str(gguf_dist), "--force", "-q"], env=env, log=work / "gguf.log")
    for name, st in steps.items():
        if st.returncode != 0:
            print(f"{name} failed (code {st.returncode}); logs in {work}", file=sys.stderr)
            return 1
    ours_model = next(ours_dir.glob("*/model"))
    gguf = next(gguf_dist.glob("*/model/*.gguf"))

    sides = ["ours", "load", "bench", *(["builder"] if with_builder else []), "gguf"]
    tps: dict[str, list[float]] = {k: [] for k in sides}
    gguf_how = ""
    for r in range(args.rounds):  # alternate, so that noise from other work hits every side alike
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side == "ours":
                tps[side].append(onnx_tps(ours_model, args.n_gen, args.threads))
            elif side == "load":
                tps[side].append(load_tps(ours_model.parent, args.n_gen, args.threads))
            elif side == "bench":
                tps[side].append(bench_tps(ours_model.parent, args.n_gen, args.threads))
            elif side == "builder":
                tps[side].append(onnx_tps(builder_dir, args.n_gen, args.threads))
            else:
                g, gguf_how = gguf_tps(gguf, args.n_gen, args.threads)
                tps[side].append(g)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in tps.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in tps.items()}
    size = lambda p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())  # noqa: E731
    result = {
        "benchmark": "onnx_speed", "model": model_dir.name, "threads": args.threads, "n_gen": args.n_gen,
        "rounds": args.rounds, "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "decode_tokens_per_s": med, "samples": tps, "gguf_timed_by": gguf_how,
        "ratio_load_vs_builder": med["load"] / med["builder"] if with_builder else None,
        "ratio_load_vs_gguf_q4_k_m": med["load"] / med["gguf"], "ratio_ours_vs_gguf_q4_k_m": med["ours"] / med["gguf"],
        "ratio_bench_vs_genai_loop": med["bench"] / med["ours"],
        "bytes": {"ours": size(ours_model), "gguf": gguf.stat().st_size,
                  **({"builder": size(builder_dir)} if with_builder else {})},
        "pack": {k: {"wall_s": v.wall_s, "peak_rss_bytes": v.peak_rss_bytes} for k, v in steps.items()},
        "load_avg": os.getloadavg(),
        "targets": {"ratio_load_vs_builder": 0.95, "ratio_load_vs_gguf_q4_k_m (3B)": 0.9,
                    "ratio_bench_vs_genai_loop": "within 10%"},
    }
    ok = abs(result["ratio_bench_vs_genai_loop"] - 1) <= 0.10
    ok &= result["ratio_load_vs_builder"] >= 0.95 if with_builder else result["ratio_load_vs_gguf_q4_k_m"] >= 0.9
    result["pass"] = bool(ok)
    print(json.dumps(result, indent=2))
    with open(HERE / "results" / "onnx_speed.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
