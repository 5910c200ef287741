"""Packing speed and memory: edgepack vs llama.cpp's convert_hf_to_gguf.py + llama_model_quantize.

Both run on the same checkpoint, machine and thread count, in the same run (machines are noisy:
only the ratio is meaningful). Targets from issue 4:
  - wall time of `pack model ... --quant Q4_K_M` <= 0.8x (reference converter + quantizer),
  - peak RSS no more than the reference's,
  - for the Qwen2.5-3B-shaped model: peak anonymous RSS (RssAnon; mapped file pages excluded) < 2 GB;
  - for Qwen3-4B's config (issue 26): peak RssAnon < 1 GB.

    python benchmarks/pack_speed.py --model qwen2.5-0.5b
    python benchmarks/pack_speed.py --model qwen2.5-3b        # ~6 GB of random bf16 weights
    python benchmarks/pack_speed.py --model qwen3-4b          # ~8 GB; the reference writes an 8 GB F16 file
    python benchmarks/pack_speed.py --model qwen3.5-4b        # Qwen3.5-4B's language model, ~8 GB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import models  # noqa: E402
from procmon import report_checks, run, warm_page_cache  # noqa: E402

MODELS = {k: models.BENCH_MODELS[k] for k in ("qwen2.5-0.5b", "qwen2.5-3b", "qwen3-4b", "qwen3.5-4b", "smollm2",
                                              "tiny-qwen2")}
# The converter's flags that make its output the one edgepack writes: Qwen3.5's MTP head is left out.
CONVERT_ARGS = {"qwen3.5-4b": ["--no-mtp"]}
QUANTIZE = """
import ctypes, sys, gguf, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(getattr(gguf.LlamaFileType, "MOSTLY_" + sys.argv[3])); p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-0.5b")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    model_dir = MODELS[args.model]()
    src = models.llama_cpp_src()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgepack-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
    warm_page_cache(model_dir)  # neither side pays the first read from disk

    f16 = work / "ref-f16.gguf"
    conv = run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f16",
                "--outfile", str(f16), *CONVERT_ARGS.get(args.model, [])], env=dict(env, PYTHONPATH=str(src / "gguf-py")), log=work / "ref-convert.log")
    quant = run([sys.executable, "-c", QUANTIZE, str(f16), str(work / "ref-q.gguf"), args.quant, str(args.threads)],
                env=env, log=work / "ref-quantize.log")
    f16.unlink(missing_ok=True)
    ours = run([sys.executable, "-m", "packager.cli", "model", str(model_dir), "--quant", args.quant,
                "--target", "laptop", "-o", str(work / "dist"), "--threads", str(args.threads), "--force", "-q"],
               env=env, log=work / "ours.log")
    for step in (conv, quant, ours):
        if step.returncode != 0:
            print(f"a step failed (code {step.returncode}); logs in {work}", file=sys.stderr)
            return 1
    ref_wall = conv.wall_s + quant.wall_s
    ref_rss = max(conv.peak_rss_bytes, quant.peak_rss_bytes)
    record = {
        "benchmark": "pack_speed", "model": args.model, "quant": args.quant, "threads": args.threads,
        "host": platform.node(), "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "reference": {"convert": asdict(conv), "quantize": asdict(quant), "wall_s": ref_wall, "peak_rss_bytes": ref_rss},
        "edgepack": asdict(ours),
        "wall_ratio": ours.wall_s / ref_wall,
        "rss_ratio": ours.peak_rss_bytes / ref_rss,
    }
    checks = {
        "wall <= 0.8x reference": record["wall_ratio"] <= 0.8,
        "peak RSS <= reference": ours.peak_rss_bytes <= ref_rss,
    }
    if args.model == "qwen2.5-3b":
        checks["RssAnon < 2 GB"] = ours.peak_rss_anon_bytes < 2e9
    if args.model in ("qwen3-4b", "qwen3.5-4b"):  # issues 26 and 27
        checks["RssAnon < 1 GB"] = ours.peak_rss_anon_bytes < 1e9
    record["checks"] = checks
    with open(HERE / "results" / "pack_speed.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print("| step | wall s | peak RSS GB | peak RssAnon GB |\n|---|---|---|---|")
    for name, s in (("convert_hf_to_gguf (f16)", conv), ("llama_model_quantize", quant), ("edgepack pack model", ours)):
        print(f"| {name} | {s.wall_s:.1f} | {s.peak_rss_bytes / 1e9:.2f} | {s.peak_rss_anon_bytes / 1e9:.2f} |")
    print(f"\nwall ratio {record['wall_ratio']:.2f}x, RSS ratio {record['rss_ratio']:.2f}x")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return report_checks(checks)


if __name__ == "__main__":
    sys.exit(main())
