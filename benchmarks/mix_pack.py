"""Issue 15's cost figure: `pack model --quant mix` at Q4_K_M's size against a plain `--quant Q4_K_M` pack.

The target: the mix (its F16 conversion, importance matrix, probes and reference passes included)
finishes within 3x the wall time of the plain pack, on the model with Qwen2.5-3B-Instruct's config.
Runs alternate (plain, mix, plain, mix, ...) on the same checkpoint; the mix's budget is the plain
bundle's model file size, so both ship the same bytes. The record keeps every run, both peak
memories and the mix's own time per step (its manifest's quality.mix.phases).

    python benchmarks/mix_pack.py --model qwen2.5-0.5b
    python benchmarks/mix_pack.py --model qwen2.5-3b          # ~6 GB F16 file beside the output; long
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

MODELS = {k: models.BENCH_MODELS[k] for k in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "smollm2")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-3b")
    ap.add_argument("--rounds", type=int, default=1, help="pairs of (plain, mix) packs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    model_dir = MODELS[args.model]()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgepack-mixpack-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
    warm_page_cache(model_dir)
    base = [sys.executable, "-m", "packager.cli", "model", str(model_dir), "--target", "laptop", "--threads",
            str(args.threads), "--force", "-q", "--json"]
    runs: dict[str, list] = {"plain": [], "mix": []}
    phases, size, mix_size = [], 0, 0
    for r in range(args.rounds):
        for kind in ("plain", "mix"):
            out = work / kind
            extra = ["--quant", "Q4_K_M"] if kind == "plain" else ["--quant", "mix", "--max-size", str(size)]
            log = work / f"{kind}-{r}.log"
            s = run(base + extra + ["-o", str(out)], env=env, log=log)
            if s.returncode != 0:
                print(f"{kind} pack failed (code {s.returncode}); log in {log}", file=sys.stderr)
                return 1
            runs[kind].append(s)
            bundle = next(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
            manifest = json.loads((bundle / "manifest.json").read_text())
            model_bytes = sum(f.stat().st_size for f in (bundle / "model").iterdir())
            if kind == "plain":
                size = model_bytes
            else:
                mix_size = model_bytes
                phases.append(manifest["quality"]["mix"]["phases"])
            shutil.rmtree(out, ignore_errors=True)
    wall = {k: [s.wall_s for s in v] for k, v in runs.items()}
    ratio = statistics.median(wall["mix"]) / statistics.median(wall["plain"])
    record = {
        "benchmark": "mix_pack", "model": args.model, "threads": args.threads, "rounds": args.rounds,
        "host": platform.node(), "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "plain_bytes": size, "mix_bytes": mix_size, "runs": {k: [asdict(s) for s in v] for k, v in runs.items()},
        "wall_ratio_median": ratio, "wall_ratio_per_pair": [b / a for a, b in zip(wall["plain"], wall["mix"])],
        "mix_phases_s": phases,
    }
    checks = {"mix wall <= 3x plain Q4_K_M (median)": ratio <= 3.0, "mix bytes <= plain bytes": mix_size <= size}
    record["checks"] = checks
    with open(HERE / "results" / "mix_pack.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{args.model}: plain Q4_K_M {size / 1e6:.1f} MB vs --quant mix --max-size {size} ({mix_size / 1e6:.1f} MB)\n")
    print("| pack | wall s (each run) | peak RSS GB | peak RssAnon MB |\n|---|---|---|---|")
    for k in ("plain", "mix"):
        rss = max(s.peak_rss_bytes for s in runs[k]) / 1e9
        anon = max(s.peak_rss_anon_bytes for s in runs[k]) / 2**20
        print(f"| {k} | {', '.join(f'{w:.1f}' for w in wall[k])} | {rss:.2f} | {anon:.0f} |")
    print(f"\nwall ratio mix/plain: median {ratio:.2f}; mix steps (s): {phases[-1]}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return report_checks(checks)


if __name__ == "__main__":
    sys.exit(main())
