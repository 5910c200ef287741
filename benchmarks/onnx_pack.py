"""Peak memory of `pack model --format onnx` on a model with Qwen2.5-3B-Instruct's exact config.

Target (issue 7): peak RSS of the whole packing process tree < 8 GB. The reference, ONNX
Runtime GenAI's builder (`-p int4 -e cpu`), was killed by the kernel's OOM killer at
24.3 GB on this 24 GB machine for the same model, so it is not run here (it would take the
machine down); its 0.5B figure can be measured with --builder.

Also measured, to show where the floor is: the RSS of a process that only imports what
the converter imports (Python, numpy, onnx, the tokenizer stack), which no streaming
design can go below, and the converter's working set on top of it (row blocks in flight).

    python benchmarks/onnx_pack.py                      # the 3B-shaped model (~6 GB of bf16), ~3 min
    python benchmarks/onnx_pack.py --model qwen2.5-0.5b --builder
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
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from pack_speed import MODELS  # noqa: E402  (the same random checkpoints as the GGUF packing benchmark)
from procmon import run  # noqa: E402
IMPORTS = ("import time, numpy, onnx, packager.pack, packager.pack_onnx, packager.convert.onnx, "
           "packager.convert.onnx_graph, packager.kernels.int4, packager.bundle; time.sleep(1)")
LIMIT = 8 * 10**9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-3b")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--builder", action="store_true", help="also run the GenAI builder (0.5B only: it OOMs on 3B)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    model_dir = MODELS[args.model]()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgepack-onnx-pack-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, EDGEPACK_NO_PROGRESS="1")
    for f in model_dir.glob("*.safetensors"):  # warm the page cache: both sides then read from memory
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    floor = run([sys.executable, "-c", IMPORTS], env=env)
    out = work / "dist"
    shutil.rmtree(out, ignore_errors=True)
    ours = run([sys.executable, "-m", "packager.cli", "model", str(model_dir), "--format", "onnx", "-o", str(out),
                "--threads", str(args.threads), "--force", "-q"], env=env, log=work / "ours.log")
    if ours.returncode != 0:
        print(f"pack failed (code {ours.returncode}); log in {work / 'ours.log'}", file=sys.stderr)
        return 1
    bundle = next(p for p in out.iterdir() if p.is_dir())  # not the writer's .lock file beside it
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    result = {
        "benchmark": "onnx_pack", "model": model_dir.name, "threads": args.threads, "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")), "bundle_bytes": size,
        "ours": {"wall_s": round(ours.wall_s, 1), "peak_rss_bytes": ours.peak_rss_bytes,
                 "peak_rss_anon_bytes": ours.peak_rss_anon_bytes},
        "floor_imports": {"peak_rss_bytes": floor.peak_rss_bytes, "peak_rss_anon_bytes": floor.peak_rss_anon_bytes},
        "working_set_bytes": ours.peak_rss_bytes - floor.peak_rss_bytes,
        "limit_bytes": LIMIT,
        "reference": "onnxruntime-genai builder -p int4 -e cpu: OOM-killed at 24.3 GB on the 3B-shaped model (issue 7)",
    }
    if args.builder:
        bout = work / "builder"
        shutil.rmtree(bout, ignore_errors=True)
        b = run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(bout),
                 "-p", "int4", "-e", "cpu", "-c", str(work / "hf-cache")], env=env, log=work / "builder.log")
        result["builder"] = {"wall_s": round(b.wall_s, 1), "peak_rss_bytes": b.peak_rss_bytes,
                             "returncode": b.returncode}
    result["pass"] = ours.peak_rss_bytes < LIMIT
    print(json.dumps(result, indent=2))
    with open(HERE / "results" / "onnx_pack.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
