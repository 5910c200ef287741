"""Issue 18's cost side: what one verification step of k+1 tokens costs against a single-token step.

On the random model with Qwen2.5-3B-Instruct's exact config (weights do not change speed), packed
at Q4_K_M, through llama.cpp with flash attention (as the runtime drafts): a context of --ctx tokens,
then, alternating and repeated, a single-token step and steps of 5 and 9 tokens (k = 4 and 8 drafts),
each rolled back after it is timed. A Qwen2.5-0.5B-shaped model at the same type gives a draft
token's cost, for the 3B/0.5B pairing. From those the break-even acceptance on this host is
*measured*; the planner's roofline (plan/draft.py) predicts the same ratios from the host profile,
and is printed beside them, then for every target profile.

    python benchmarks/speculative_cost.py               # ~10 GB of scratch, ~15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

import models  # noqa: E402
from packager.bundle.verify import verified  # noqa: E402
from packager.pack.options import PackOptions  # noqa: E402
from packager.pack.pipeline import pack_model  # noqa: E402
from packager.plan.draft import break_even, plan_draft  # noqa: E402
from packager.plan.inputs import plan_input  # noqa: E402
from packager.plan.planner import Overrides, plan  # noqa: E402
from packager.plan.targets import list_targets, load_target  # noqa: E402


def step_times(gguf: Path, sizes: list[int], ctx: int, reps: int, threads: int) -> dict[int, list[float]]:
    """Seconds per llama_decode of n tokens at position ``ctx``, each rolled back, sizes interleaved."""
    import llama_cpp as lc

    llm = lc.Llama(str(gguf), n_ctx=ctx + 64, n_batch=512, n_threads=threads, n_threads_batch=threads,
                   flash_attn=True, logits_all=False, verbose=False)
    rng = np.random.default_rng(0)
    llm.eval(rng.integers(100, 20000, ctx).tolist())
    batch = lc.llama_batch_init(max(sizes), 0, 1)
    ctx_ptr = llm._ctx.ctx
    out: dict[int, list[float]] = {n: [] for n in sizes}
    for rep in range(reps + 1):  # the first round warms up and is not counted
        for n in (sizes if rep % 2 == 0 else list(reversed(sizes))):
            batch.n_tokens = n
            for i in range(n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(rng.integers(100, 20000)), ctx + i, 1, 1
                batch.seq_id[i][0] = 0
            t0 = time.perf_counter()
            assert lc.llama_decode(ctx_ptr, batch) == 0
            lc.llama_synchronize(ctx_ptr)
            dt = time.perf_counter() - t0
            llm._ctx.kv_cache_seq_rm(-1, ctx, -1)
            if rep:
                out[n].append(dt)
    lc.llama_batch_free(batch)
    llm.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--ctx", type=int, default=256, help="tokens in the cache before the timed steps")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "speculative_cost.jsonl")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgepack-speccost-"))
    gguf = {}
    for name in ("qwen2.5-3b", "qwen2.5-0.5b"):
        src = models.BENCH_MODELS[name]()
        b = pack_model(str(src), PackOptions(output=work / name, quant=args.quant, n_ctx=2048, quiet=True)).path
        gguf[name] = verified(b).model_file
    sizes = [1, 5, 9]
    big = step_times(gguf["qwen2.5-3b"], sizes, args.ctx, args.reps, args.threads)
    small = step_times(gguf["qwen2.5-0.5b"], [1], args.ctx, args.reps, args.threads)
    med = {n: statistics.median(v) for n, v in big.items()}
    draft_ratio = statistics.median(small[1]) / med[1]
    measured = {k: med[k + 1] / med[1] for k in (4, 8)}

    # The planner's roofline, from the host profile and each device's.
    inp = plan_input(models.BENCH_MODELS["qwen2.5-3b"]())
    spec_plan = {}
    for tgt in [load_target("host")] + [load_target(t.name) for t in list_targets()]:
        try:
            p = plan(inp.spec, tgt, Overrides(quant=args.quant, n_ctx=2048), tensors=inp.tensors)
        except Exception as exc:  # noqa: BLE001 - a target the 3B does not fit is reported as such
            spec_plan[tgt.name] = {"error": str(exc).splitlines()[0][:160]}
            continue
        fixed = inp.spec.n_layers * tgt.decode_layer_overhead_us * 1e-6
        row = {}
        for k in (4, 8):
            d = plan_draft("lookup", k=k, target_bytes=p.memory.weights, draft_bytes=0, bandwidth_gbps=tgt.memory_bandwidth_gbps,
                           fixed_s=fixed, draft_fixed_s=0, prefill_tps=p.predicted_prefill_tps, memory_bytes=0,
                           used_bytes=0, budget_bytes=1)
            row[f"verify_ratio_k{k}"] = d.verify_ratio
            row[f"break_even_lookup_k{k}"] = d.break_even
        spec_plan[tgt.name] = row
    rec = {
        "bench": "speculative_cost", "model": "qwen2.5-3b (random, exact config)", "quant": args.quant,
        "ctx": args.ctx, "reps": args.reps, "threads": args.threads, "flash_attn": True,
        "seconds_single": round(med[1], 5),
        "seconds": {str(n): [round(x, 5) for x in v] for n, v in big.items()},
        "measured_verify_ratio": {f"k{k}": round(v, 3) for k, v in measured.items()},
        "measured_draft_ratio_0.5b": round(draft_ratio, 3),
        "measured_break_even_lookup": {f"k{k}": round(break_even(k, 0.0, v), 3) for k, v in measured.items()},
        "measured_break_even_0.5b_draft": {f"k{k}": (round(x, 3) if (x := break_even(k, draft_ratio, v)) <= 1 else None)
                                           for k, v in measured.items()},
        "planner": spec_plan,
        "host": platform.node(), "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(rec, indent=1))
    with args.out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
