"""What splitting a model into a store's parts costs: `pack model` with and without --part-size.

Issue 19's figures: splitting adds no peak memory and under 5% wall time over an unsplit pack
(the Qwen2.5-3B-shaped model). Both are packed from the same checkpoint on the same machine,
alternating (unsplit, split, unsplit, split, ...) so that drift in the machine's speed hits both
alike; the record keeps every run and the spread.

    python benchmarks/split_pack.py --model qwen2.5-3b --rounds 2          # ~6 GB of random bf16 weights
    python benchmarks/split_pack.py --model qwen2.5-0.5b --rounds 3 --part-size 200MB
    python benchmarks/split_pack.py --model qwen2.5-3b --format onnx     # model.onnx.data in parts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
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

MODELS = {k: models.BENCH_MODELS[k] for k in ("qwen2.5-0.5b", "qwen2.5-3b", "smollm2")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-3b")
    ap.add_argument("--format", choices=("gguf", "onnx"), default="gguf")
    ap.add_argument("--quant", default="Q4_K_M", help="GGUF type (ONNX: the web target's int4 scheme)")
    ap.add_argument("--part-size", default="512MB", help="--part-size of the split packs (default: 512MB, iOS ODR's)")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of (unsplit, split) packs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    model_dir = MODELS[args.model]()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgepack-split-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
    warm_page_cache(model_dir)  # neither side pays the first read from disk
    fmt = ["--quant", args.quant, "--target", "laptop"] if args.format == "gguf" else ["--target", "web"]
    base = [sys.executable, "-m", "packager.cli", "model", str(model_dir), *fmt, "--threads", str(args.threads),
            "--force", "-q"]
    runs: dict[str, list] = {"whole": [], "split": []}
    parts = 0
    for r in range(args.rounds):
        for kind in ("whole", "split"):
            out = work / kind
            extra = ["--part-size", args.part_size] if kind == "split" else ["--no-split"]  # whole: one file
            s = run(base + extra + ["-o", str(out)], env=env, log=work / f"{kind}-{r}.log")
            if s.returncode != 0:
                print(f"{kind} pack failed (code {s.returncode}); log in {work}", file=sys.stderr)
                return 1
            runs[kind].append(s)
            if kind == "split":
                parts = len(list(out.glob("*/model/*.gguf" if args.format == "gguf" else "*/model/model.onnx.data*")))
            shutil.rmtree(out, ignore_errors=True)
    wall = {k: [s.wall_s for s in v] for k, v in runs.items()}
    anon = {k: max(s.peak_rss_anon_bytes for s in v) for k, v in runs.items()}
    rss = {k: max(s.peak_rss_bytes for s in v) for k, v in runs.items()}
    ratio = statistics.median(wall["split"]) / statistics.median(wall["whole"])
    pairs = [b / a for a, b in zip(wall["whole"], wall["split"])]
    record = {
        "benchmark": "split_pack", "model": args.model, "format": args.format,
        "quant": args.quant if args.format == "gguf" else "INT4 (web)", "part_size": args.part_size,
        "parts": parts, "threads": args.threads, "rounds": args.rounds, "host": platform.node(),
        "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": {k: [asdict(s) for s in v] for k, v in runs.items()},
        "wall_ratio_median": ratio, "wall_ratio_per_pair": pairs,
        "peak_rss_anon_bytes": anon, "peak_rss_bytes": rss,
    }
    # Peak anonymous memory is what splitting could add (file pages are the page cache's); within
    # 16 MiB counts as no more: the sampler's and the allocator's own noise.
    checks = {"split wall < 1.05x unsplit (median)": ratio < 1.05,
              "split peak RssAnon <= unsplit's + 16 MiB": anon["split"] <= anon["whole"] + (16 << 20)}
    record["checks"] = checks
    with open(HERE / "results" / "split_pack.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    what = args.quant if args.format == "gguf" else "ONNX int4 (web)"
    print(f"{args.model} {what}, split into {parts} parts of at most {args.part_size}, {args.rounds} rounds\n")
    print("| pack | wall s (each run) | peak RSS GB | peak RssAnon MB |\n|---|---|---|---|")
    for k in ("whole", "split"):
        print(f"| {k} | {', '.join(f'{w:.1f}' for w in wall[k])} | {rss[k] / 1e9:.2f} | {anon[k] / 2**20:.0f} |")
    print(f"\nwall ratio split/whole: median {ratio:.3f}, per pair {', '.join(f'{p:.3f}' for p in pairs)}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return report_checks(checks)


if __name__ == "__main__":
    sys.exit(main())
