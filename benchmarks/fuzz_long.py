"""The long fuzz run: every reader of outside files, for a time budget each, with random seeds.

The default suite runs the same targets (tests/fuzz/test_fuzz_readers.py) for a
fixed, derandomized ~1,500 inputs. Here each target runs in rounds of --round
inputs, each round a pytest run with its own Hypothesis seed (seed, seed+1, ...),
until its --seconds are spent; a failing round stops that target and its
shrunk input (Hypothesis prints it, with the seed to replay) is recorded.

    flock /tmp/bench.lock python3 benchmarks/fuzz_long.py --seconds 170
    flock /tmp/bench.lock python3 benchmarks/fuzz_long.py --targets gguf --seconds 600 --seed 7

One JSON line per target is appended to --out (benchmarks/results/fuzz_long.jsonl):
inputs run, accepted, our errors by type, failures, seconds, seeds, load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
TESTS = {
    "gguf": "test_fuzz_gguf_source",
    "safetensors": "test_fuzz_safetensors_header",
    "config": "test_fuzz_config_to_spec",
    "profile": "test_fuzz_target_profile",
    "manifest": "test_fuzz_manifest_verification",
}


def run_round(target: str, examples: int, seed: int, counts: Path) -> tuple[bool, str]:
    """One pytest run of one target; (passed, the tail of its output)."""
    env = dict(os.environ, EDGEPACK_FUZZ_EXAMPLES=str(examples), EDGEPACK_FUZZ_RANDOM="1",
               EDGEPACK_FUZZ_COUNTS=str(counts), EDGEPACK_NO_PROGRESS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        str(ROOT / "tests" / "fuzz" / "test_fuzz_readers.py"), "-k", TESTS[target],
                        f"--hypothesis-seed={seed}"], cwd=ROOT, env=env, capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr)[-4000:]


def fuzz(target: str, seconds: float, per_round: int, seed: int) -> dict:
    start = time.monotonic()
    totals = {"inputs": 0, "ok": 0, "errors": {}}
    seeds, failures = [], []
    with tempfile.TemporaryDirectory(prefix="edgepack-fuzz-long-") as tmp:
        counts = Path(tmp) / "counts.jsonl"
        while time.monotonic() - start < seconds:
            s = seed + len(seeds)
            seeds.append(s)
            counts.write_text("")
            passed, tail = run_round(target, per_round, s, counts)
            for line in counts.read_text().splitlines():
                rec = json.loads(line)
                if rec["target"] != target:
                    continue
                totals["inputs"] += rec["inputs"]
                totals["ok"] += rec["ok"]
                for k, v in rec["errors"].items():
                    totals["errors"][k] = totals["errors"].get(k, 0) + v
            if not passed:
                failures.append({"seed": s, "output": tail})
                break  # the input is in the output; fix it before fuzzing on
            print(f"  {target}: round seed {s}, {totals['inputs']} inputs so far, "
                  f"{time.monotonic() - start:.0f} s", file=sys.stderr)
    return {"target": target, **totals, "failures": failures, "seconds": round(time.monotonic() - start, 1),
            "seeds": seeds, "per_round": per_round}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TESTS), help="comma-separated: " + ", ".join(TESTS))
    ap.add_argument("--seconds", type=float, default=170.0, help="time budget per target")
    ap.add_argument("--round", type=int, default=2000, help="inputs per pytest run (one seed each)")
    ap.add_argument("--seed", type=int, default=1000, help="first Hypothesis seed")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fuzz_long.jsonl")
    args = ap.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TESTS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; choose from {', '.join(TESTS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print("| target | inputs | accepted | our errors | failures | seconds |\n|---|---|---|---|---|---|")
    for t in targets:
        load_before = os.getloadavg()
        rec = fuzz(t, args.seconds, args.round, args.seed)
        rec.update(load_avg_before=[round(x, 2) for x in load_before], load_avg_after=[round(x, 2) for x in os.getloadavg()],
                   host=platform.node(), cpus=os.cpu_count(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        errs = ", ".join(f"{k} {v}" for k, v in sorted(rec["errors"].items()))
        print(f"| {t} | {rec['inputs']} | {rec['ok']} | {errs} | {len(rec['failures'])} | {rec['seconds']} |", flush=True)
        for fail in rec["failures"]:
            print(f"\n{t} failed with seed {fail['seed']}:\n{fail['output']}\n", file=sys.stderr)


if __name__ == "__main__":
    main()
