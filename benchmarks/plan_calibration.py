"""Calibrate the planner: predicted vs measured peak RSS and decode tokens/s with llama-cpp-python.

For each model (the SmolLM2-135M fixture, random models with Qwen2.5-0.5B's and 1.5B's exact
configs), quant (Q8_0, Q4_K_M, packed once with `pack model --quant`) and context (512, 2048,
8192), a fresh subprocess loads the GGUF as edgepack's runtime does (llama-cpp-python, mmap,
flash attention off, f16 KV cache), evaluates a prompt and decodes; it reports its own peak RSS
(VmHWM: mapped weight pages count once touched) and its decode speed. The prediction is the
planner's, from what `pack plan` reads before any conversion (config.json and safetensors
headers), for this host: a profile whose memory bandwidth packager.plan.host_probe measures just before.
Targets (issue 5): RSS within +-10%, decode tokens/s within +-25%.

``--format onnx`` does the same for ONNX int4 bundles (issue 14): the child loads the bundle through
packager.load (onnxruntime-genai), appends a prompt of one chunk (formats.onnx.PROMPT_CHUNK tokens at
most: the runtime's largest call) through Model.engine() and decodes; the prediction is the planner's
ONNX memory model (formats.onnx: weights as declared, ONNX Runtime's packed copies, tokenizers,
f32 KV cache, one chunk's logits).

    flock /tmp/bench.lock python3 benchmarks/plan_calibration.py             # everything (~25 min on 2 cores)
    flock /tmp/bench.lock python3 benchmarks/plan_calibration.py --models smollm2 --ctx 512 --quants Q8_0
    flock /tmp/bench.lock python3 benchmarks/plan_calibration.py --build-only # only pack the GGUFs (cached)
    flock /tmp/bench.lock python3 benchmarks/plan_calibration.py --format onnx --ctx 512 2048

Results are appended to benchmarks/results/plan_calibration.jsonl; a markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

import models  # noqa: E402

MODELS = {k: models.BENCH_MODELS[k] for k in ("smollm2", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen3.5-4b")}
QUANTS = ("Q8_0", "Q4_K_M")
ONNX_QUANTS = ("INT4_B32", "INT4_B32_HQQ")  # pack model --format onnx [--algorithm hqq]
CONTEXTS = (512, 2048, 8192)
N_GEN = 48
WORK = models.CACHE / "plan-calibration"

# Runs in the measured subprocess: load as edgepack's runtime does (a GGUF through llama-cpp-python; an
# ONNX bundle, whose path is given, through packager.load and its engine), evaluate a prompt, decode one
# token at a time, then report the process's own peak RSS (VmHWM) and per-token decode times.
CHILD = r"""
import json, sys, time
path, n_ctx, n_threads, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if path.endswith(".gguf"):
    import llama_cpp
    quiet = llama_cpp.llama_log_callback(lambda *a: None)  # kept referenced: llama.cpp calls it later
    llama_cpp.llama_log_set(quiet, None)
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=0,
                          use_mmap=True, flash_attn=False, logits_all=False, verbose=False)
    evaluate = llm.eval
else:
    import packager
    evaluate = packager.load(path, n_ctx=n_ctx, n_threads=n_threads).engine().eval
tokens = [(i * 7919) % 20000 + 1000 for i in range(n_prompt)]
t0 = time.perf_counter(); evaluate(tokens); prefill_s = time.perf_counter() - t0
times, tok = [], 1000
for _ in range(n_gen):
    t = time.perf_counter(); evaluate([tok]); times.append(time.perf_counter() - t)
    tok = (tok * 31 + 7) % 20000 + 1000
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
kib = lambda k: int(status[k].split()[0]) * 1024
print(json.dumps({"prefill_s": prefill_s, "decode_times": times, "peak_rss_bytes": kib("VmHWM"),
                  "rss_anon_bytes": kib("RssAnon"), "rss_file_bytes": kib("RssFile")}))
"""


def run_child(gguf: Path, n_ctx: int, threads: int, n_prompt: int, n_gen: int) -> dict[str, Any]:
    """One measurement in a fresh process (nothing cached from a previous load)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(gguf), str(n_ctx), str(threads), str(n_prompt), str(n_gen)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement of {gguf.name} at ctx {n_ctx} failed (code {proc.returncode}): "
                           f"{proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict(source: Path, quant: str, n_ctx: int, n_prompt: int, n_gen: int, host: Any) -> dict[str, Any]:
    """The planner's memory and decode speed for what the child runs, from what `pack plan` reads."""
    from packager.formats import onnx
    from packager.plan.inputs import plan_input
    from packager.plan.planner import decode_tps, kv_bytes, memory, scheme, weight_layout

    inp = plan_input(source)  # config.json + safetensors headers: no weights read
    fmt = "onnx" if quant in ONNX_QUANTS else "gguf"
    q = scheme(fmt, quant)
    kv_type = onnx.KV_TYPE if fmt == "onnx" else "f16"
    # The graph at the peak is the prompt's (micro-batches of up to 512 tokens over its cache).
    mem = memory(inp.spec, q, n_ctx, kv_type, fmt=fmt, tensors=inp.tensors, arch=host.arch, n_kv=n_prompt,
                 n_tokens=min(n_prompt, 512))
    layout = weight_layout(inp.spec, q, fmt, inp.tensors, host.arch)
    # Decoding reads every weight and the cache's cells in use (llama.cpp pads n_kv to 256).
    kv_read = kv_bytes(inp.spec, n_prompt + n_gen // 2, kv_type)
    fixed = inp.spec.n_layers * host.decode_layer_overhead_us * 1e-6
    return {"mem": mem, "decode_tps": decode_tps(layout.per_token + kv_read, host.memory_bandwidth_gbps, fixed_s=fixed)}


def bundle_gguf(model: str, quant: str, threads: int) -> tuple[Path, Path]:
    """(source checkpoint, its GGUF at ``quant`` or its ONNX bundle), packed once with `pack model` and cached."""
    src = MODELS[model]()
    out = WORK / quant
    bundle = out / f"{src.name}-laptop"
    gguf = bundle / "model" / f"{src.name}-{quant}.gguf"
    how = ["--quant", quant]
    if quant in ONNX_QUANTS:  # the bundle itself: packager.load reads its manifest
        gguf, how = bundle, ["--format", "onnx", *(["--algorithm", "hqq"] if quant.endswith("_HQQ") else [])]
    if not (gguf / "manifest.json" if gguf == bundle else gguf).is_file():
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "packager.cli", "model", str(src), *how, "--target", "laptop",
               "-o", str(out), "--threads", str(threads), "--force", "-q"]
        subprocess.run(cmd, check=True, env=dict(os.environ, EDGEPACK_NO_PROGRESS="1"))
    return src, gguf


def measure(model: str, quant: str, src: Path, gguf: Path, n_ctx: int, threads: int, host: Any,
            fill: bool = False) -> dict[str, Any]:
    """Measured and predicted figures of one (model, quant, context)."""
    # A prompt of half the context (at most 256 tokens), or (fill) the whole context less the decode.
    n_prompt = n_ctx - N_GEN if fill else min(256, n_ctx // 2)
    if quant in ONNX_QUANTS:  # the runtime's largest call: one prompt chunk (the planner's compute buffer)
        n_prompt = min(n_ctx - N_GEN, 512)
    m = run_child(gguf, n_ctx, threads, n_prompt, N_GEN)
    p = predict(src, quant, n_ctx, n_prompt, N_GEN, host)
    times = sorted(m["decode_times"])
    # The median token: robust to the other processes on a shared machine stealing a time slice.
    measured_tps = 1.0 / times[len(times) // 2]
    mem = p["mem"]
    return {
        "model": model, "quant": quant, "n_ctx": n_ctx, "n_prompt": n_prompt, "n_gen": N_GEN, "threads": threads,
        "fill": fill, "predicted_rss_bytes": mem.rss,
        "predicted": {"weights": mem.weights, "page_cache": mem.page_cache, "kv_cache": mem.kv_cache,
                      "compute": mem.compute, "overhead": mem.overhead},
        "peak_rss_bytes": m["peak_rss_bytes"], "rss_anon_bytes": m["rss_anon_bytes"],
        "rss_file_bytes": m["rss_file_bytes"], "rss_error": mem.rss / m["peak_rss_bytes"] - 1,
        "predicted_decode_tps": p["decode_tps"], "measured_decode_tps": measured_tps,
        "measured_decode_mean_tps": len(times) / sum(times), "measured_prefill_tps": n_prompt / m["prefill_s"],
        "decode_error": p["decode_tps"] / measured_tps - 1, "bandwidth_gbps": host.memory_bandwidth_gbps,
        "load_avg": os.getloadavg(), "host": platform.node(), "cpu": host.description,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


HEADER = ("| model | quant | ctx | prompt | predicted RSS MiB | measured RSS MiB | error | predicted decode t/s | "
          "measured decode t/s | error | load |\n|---|---|---|---|---|---|---|---|---|---|---|")


def row_md(r: dict[str, Any]) -> str:
    return (f"| {r['model']} | {r['quant']} | {r['n_ctx']} | {r['n_prompt']} | {r['predicted_rss_bytes'] / 2**20:.0f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['rss_error']:+.1%} | {r['predicted_decode_tps']:.1f} | "
            f"{r['measured_decode_tps']:.1f} | {r['decode_error']:+.1%} | {r['load_avg'][0]:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--format", choices=("gguf", "onnx"), default="gguf")
    ap.add_argument("--quants", nargs="+", choices=QUANTS + ONNX_QUANTS, help="default: the format's quants")
    ap.add_argument("--ctx", nargs="+", type=int, default=list(CONTEXTS))
    ap.add_argument("--threads", type=int, default=None, help="default: this machine's physical cores")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--fill", action="store_true", help="also fill the whole context (the planner's worst case)")
    args = ap.parse_args()
    from packager.host import default_threads

    threads = args.threads or default_threads()
    args.quants = args.quants or list(ONNX_QUANTS[:1] if args.format == "onnx" else QUANTS)
    built = {(m, q): bundle_gguf(m, q, threads) for m in args.models for q in args.quants}
    if args.build_only:
        for k, (src, gguf) in built.items():
            print(*k, src, gguf)
        return 0
    from packager.plan.host_probe import DECODE_FRACTION, read_bandwidth_gbps
    from packager.plan.targets import host_target

    host = host_target()
    print(f"host: {host.description}, decode bandwidth {host.memory_bandwidth_gbps} GB/s (probed x "
          f"{DECODE_FRACTION}), load {os.getloadavg()}", file=sys.stderr)
    print(HEADER, flush=True)
    rows = []
    for (model, quant), (src, gguf) in built.items():
        for n_ctx in args.ctx:
            for fill in ([False, True] if args.fill else [False]):
                rows.append(measure(model, quant, src, gguf, n_ctx, threads, host, fill))
                print(row_md(rows[-1]), flush=True)
    bw_after = read_bandwidth_gbps(threads) * DECODE_FRACTION  # drift over the run, on the same scale
    out = HERE / "results" / "plan_calibration.jsonl"
    out.parent.mkdir(exist_ok=True)
    with open(out, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "decode_bandwidth_after_gbps": round(bw_after, 2)}) + "\n")
    rss_ok = sum(abs(r["rss_error"]) <= 0.10 for r in rows)
    tps_ok = sum(abs(r["decode_error"]) <= 0.25 for r in rows)
    print(f"\nRSS within 10%: {rss_ok}/{len(rows)}; decode within 25%: {tps_ok}/{len(rows)}; "
          f"bandwidth {host.memory_bandwidth_gbps} GB/s before, {bw_after:.2f} after; load {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
