"""Quality over the whole quant ladder: size, perplexity, KL divergence, time to measure vs time to quantize.

For one model: convert once to F16 (edgepack's converter), run the reference pass
over the shipped evaluation text once, then for every quant quantize from the F16
file with llama.cpp's quantizer (low-bit types with an importance matrix computed
once from the shipped calibration text, as --quant auto does) and measure it
against the reference. Issue 9's target: measuring one candidate on 8 chunks of
512 tokens takes no longer than quantizing it (ratio measure_s / quantize_s <= 1).

    python benchmarks/quality_ladder.py --model smollm2
    python benchmarks/quality_ladder.py --model qwen2.5-0.5b --quants Q8_0,Q4_K_M,Q2_K
    python benchmarks/quality_ladder.py --model qwen2.5-3b --quants Q4_K_M   # ~6 GB F16 file in the temp dir

With --vs-llama, every candidate is also measured by llama.cpp's own
``llama-perplexity --kl-divergence`` (built by benchmarks/llama_tools.py) against
a base file made from the same F16 GGUF, text, chunks and threads: its figures
and wall time go into the record, and the run fails (exit 1) if ppl, mean KLD or
top-1 differ from ours by more than 1%. The 99th-percentile KLD is shown, not
gated: llama.cpp keeps the base's log-probabilities as 16-bit codes, which moves
the tail of very small KLDs (Q8_0) by about 1%; ours are float32.

    python benchmarks/quality_ladder.py --model smollm2 --quants Q8_0,Q4_K_M,Q2_K --vs-llama

Appends one JSON record per quant to benchmarks/results/quality_ladder.jsonl and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

import models  # noqa: E402

MODELS = {k: models.BENCH_MODELS[k] for k in ("smollm2", "qwen2.5-0.5b", "qwen2.5-3b", "tiny-qwen2")}
# Every quant on the shipped targets' ladders, and the two low-bit k-quants below them.
LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "Q3_K_M", "Q3_K_S", "Q2_K"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--quants", default=",".join(LADDER), help="comma-separated quant names")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--vs-llama", action="store_true", help="also run llama-perplexity on every candidate")
    ap.add_argument("--repeat", type=int, default=1,
                    help="quantize and measure each quant this many times, back to back; one record per pair")
    args = ap.parse_args()

    from packager.pack.autoquant import wants_imatrix
    from packager.convert.gguf.requantize import quantize_gguf
    from packager.convert.gguf.converter import convert
    from packager.convert.gguf.imatrix import compute_imatrix, default_calibration_text
    from packager.measure.quality import RunSettings, build_reference, default_evaluation_text, measure
    from packager.quants import get_quant
    from packager.source.resolver import resolve

    model_dir = MODELS[args.model]()
    work = Path(tempfile.mkdtemp(prefix="edgepack-quality-bench-"))
    settings = RunSettings(n_threads=args.threads)
    records = []
    try:
        t0 = time.perf_counter()
        f16 = convert(resolve(model_dir, quiet=True), get_quant("F16"), work / "f16.gguf", n_threads=args.threads,
                      quiet=True).path
        convert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = build_reference(f16, default_evaluation_text(), work, n_ctx=args.ctx, n_chunks=args.chunks,
                              settings=settings, text_name="evaluation.txt", quiet=True)
        reference_s = time.perf_counter() - t0
        imatrix, imatrix_s = None, 0.0
        text_file = work / "evaluation.txt"
        text_file.write_text(default_evaluation_text(), encoding="utf-8")
        tool = None
        if args.vs_llama:
            sys.path.insert(0, str(HERE))
            from llama_tools import llama_tool

            tool = llama_tool("llama-perplexity")
            common = ["-f", text_file, "-c", args.ctx, "-b", args.ctx, "--chunks", args.chunks, "-t", args.threads,
                      "--kl-divergence-base", work / "base.kld"]
            t0 = time.perf_counter()
            base = _run(tool, f16, common)
            llama_ref = {"llama_ppl_ref": _grab(r"Final estimate: PPL = ([\d.]+)", base),
                         "llama_reference_s": time.perf_counter() - t0}
        print(f"{args.model}: F16 conversion {convert_s:.1f} s, reference pass {reference_s:.1f} s "
              f"({ref.n_chunks} chunks of {args.ctx}); load average {os.getloadavg()}", file=sys.stderr)
        for name in [n for n in args.quants.split(",") for _ in range(max(1, args.repeat))]:
            q = get_quant(name.strip().upper())
            if wants_imatrix(q) and imatrix is None:
                t0 = time.perf_counter()
                imatrix = compute_imatrix(f16, default_calibration_text(), n_threads=args.threads, quiet=True)
                imatrix_s = time.perf_counter() - t0
            out = work / f"{q.name}.gguf"
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            quantize_gguf(f16, q, out, imatrix=imatrix if wants_imatrix(q) else None, n_threads=args.threads)
            quantize_s = time.perf_counter() - t0
            m = measure(out, ref, settings=settings, quiet=True)
            s = m.summary
            vs: dict = {}
            if tool is not None:
                t0 = time.perf_counter()
                kl = _run(tool, out, [*common, "--kl-divergence"])
                vs = {**llama_ref, "llama_measure_s": time.perf_counter() - t0,
                      "llama_ppl": _grab(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", kl),
                      "llama_kld_mean": _grab(r"Mean\s+KLD:\s*([\d.]+)", kl),
                      "llama_kld_p99": _grab(r"99\.0%\s+KLD:\s*([\d.]+)", kl),
                      "llama_top1": _grab(r"Same top p:\s*([\d.]+)", kl) / 100}
            rec = {
                "benchmark": "quality_ladder", "model": args.model, "quant": q.name, "imatrix": wants_imatrix(q),
                "size_bytes": out.stat().st_size, "ppl": s.ppl, "ppl_ref": s.ppl_ref, "kld_mean": s.kld_mean,
                "kld_p99": s.kld_p99, "top1": s.top1, "n_tokens": s.n_tokens, "n_ctx": args.ctx,
                "n_chunks": ref.n_chunks, "quantize_s": quantize_s, "measure_s": m.seconds,
                "measure_over_quantize": m.seconds / quantize_s, "reference_s": reference_s,
                "convert_f16_s": convert_s, "imatrix_s": imatrix_s, "threads": args.threads,
                "host": platform.node(), "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                "loadavg": os.getloadavg(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **vs,
            }
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr)
            out.unlink()
            with open(HERE / "results" / "quality_ladder.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| {args.model} | size MB | ppl | KLD mean | KLD p99 | top-1 | quantize s | measure s | measure/quantize "
          "| load before / after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['quant']}{' (imatrix)' if r['imatrix'] else ''} | {r['size_bytes'] / 1e6:.1f} | {r['ppl']:.3f} "
              f"| {r['kld_mean']:.5f} | {r['kld_p99']:.4f} | {100 * r['top1']:.1f}% | {r['quantize_s']:.1f} "
              f"| {r['measure_s']:.1f} | {r['measure_over_quantize']:.2f} "
              f"| {r['loadavg_before'][0]:.2f} / {r['loadavg'][0]:.2f} |")
    failed = []
    if tool is not None:
        print("\n| vs llama-perplexity | ppl ours / llama | KLD ours / llama | KLD p99 ours / llama "
              "| top-1 ours / llama | measure s ours / llama |")
        print("|---|---|---|---|---|---|")
        for r in records:
            ratios = {k: r[k] / r[f"llama_{k}"] for k in ("ppl", "kld_mean", "top1")}
            failed += [f"{r['quant']} {k} {v:.4f}" for k, v in ratios.items() if abs(v - 1) > 0.01]
            print(f"| {r['quant']} | {ratios['ppl']:.4f} | {ratios['kld_mean']:.4f} "
                  f"| {r['kld_p99'] / r['llama_kld_p99']:.4f} | {ratios['top1']:.4f} "
                  f"| {r['measure_s']:.1f} / {r['llama_measure_s']:.1f} |")
        print(f"reference ppl ours / llama: {records[0]['ppl_ref'] / records[0]['llama_ppl_ref']:.4f}; "
              f"within 1%: {'yes' if not failed else 'NO: ' + ', '.join(failed)}")
    if records:
        print(f"\nF16 reference ppl {records[0]['ppl_ref']:.3f}; reference pass {reference_s:.1f} s; "
              f"F16 conversion {convert_s:.1f} s; imatrix {imatrix_s:.1f} s")
        met = [r["quant"] for r in records if r["measure_over_quantize"] <= 1.0]
        print(f"target (measuring takes no longer than quantizing): met by {len(met)} of {len(records)} quants"
              f"{' (' + ', '.join(met) + ')' if met else ''}; load average {os.getloadavg()[0]:.2f}")
    return 1 if failed else 0


def _run(tool: Path, model: Path, args: list) -> str:
    r = subprocess.run([str(tool), "-m", str(model), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{tool.name} failed on {model.name}: {r.stderr[-800:]}")
    return r.stdout + r.stderr


def _grab(pattern: str, out: str) -> float:
    m = re.search(pattern, out)
    if m is None:
        raise SystemExit(f"llama-perplexity's output has no match for {pattern!r}")
    return float(m.group(1))


if __name__ == "__main__":
    sys.exit(main())
