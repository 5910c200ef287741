"""Decode speed of edgepack's ONNX int4 bundle vs ONNX Runtime GenAI's builder and vs GGUF Q4_K_M.

Same checkpoint (a random model with Qwen2.5-0.5B-Instruct's exact config), same machine,
same thread count, same run; machines are noisy, so only the ratios mean anything. Targets
(issue 7):
  - decode tokens/s of `pack model --format onnx` >= 1.0x the builder's own default int4
    output (`python -m onnxruntime_genai.models.builder -i DIR -o OUT -p int4 -e cpu`),
  - and >= 0.9x the GGUF Q4_K_M bundle of the same model.

Both ONNX models are driven by the same onnxruntime-genai loop (prompt, then timed
greedy tokens with EOS held off by min_length), each in its own fresh process, in
alternating rounds. GGUF is timed by llama.cpp's llama-bench (tg) when it is built
(benchmarks/llama_tools.py), else by llama-cpp-python's generate loop.

    python benchmarks/onnx_speed.py                 # ~5 min on 2 cores
    python benchmarks/onnx_speed.py --rounds 5 --n-gen 128
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
    args = ap.parse_args()

    model_dir = models.random_qwen2("qwen2.5-0.5b", models.QWEN25_05B_CONFIG)
    work = Path(args.work or tempfile.mkdtemp(prefix="edgepack-onnx-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
    ours_dir, builder_dir, gguf_dist = work / "dist-onnx", work / "builder", work / "dist-gguf"
    steps = {}
    if not (args.keep and ours_dir.exists()):
        shutil.rmtree(ours_dir, ignore_errors=True)
        steps["ours"] = run([sys.executable, "-m", "packager.cli", "model", str(model_dir), "--format", "onnx",
                             "-o", str(ours_dir), "--force", "-q"], env=env, log=work / "ours.log")
    if not (args.keep and (builder_dir / "model.onnx").exists()):
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

    tps: dict[str, list[float]] = {"ours": [], "builder": [], "gguf": []}
    gguf_how = ""
    for r in range(args.rounds):  # alternate, so that noise from other work hits every side alike
        tps["ours"].append(onnx_tps(ours_model, args.n_gen, args.threads))
        tps["builder"].append(onnx_tps(builder_dir, args.n_gen, args.threads))
        g, gguf_how = gguf_tps(gguf, args.n_gen, args.threads)
        tps["gguf"].append(g)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in tps.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in tps.items()}
    size = lambda p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())  # noqa: E731
    result = {
        "benchmark": "onnx_speed", "model": model_dir.name, "threads": args.threads, "n_gen": args.n_gen,
        "rounds": args.rounds, "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "decode_tokens_per_s": med, "samples": tps, "gguf_timed_by": gguf_how,
        "ratio_vs_builder": med["ours"] / med["builder"], "ratio_vs_gguf_q4_k_m": med["ours"] / med["gguf"],
        "bytes": {"ours": size(ours_model), "builder": size(builder_dir), "gguf": gguf.stat().st_size},
        "pack": {k: {"wall_s": v.wall_s, "peak_rss_bytes": v.peak_rss_bytes} for k, v in steps.items()},
        "targets": {"ratio_vs_builder": 1.0, "ratio_vs_gguf_q4_k_m": 0.9},
    }
    result["pass"] = result["ratio_vs_builder"] >= 1.0 and result["ratio_vs_gguf_q4_k_m"] >= 0.9
    print(json.dumps(result, indent=2))
    with open(HERE / "results" / "onnx_speed.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
