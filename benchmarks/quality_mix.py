"""Issue 15's quality figure: per-tensor mixes against llama.cpp's uniform types at the same size.

For one model: convert to F16 once, compute the importance matrix from the shipped calibration
text, measure every tensor's error per type, and measure the category gains with one probe each
on the decision text (packager/data/decision.txt), exactly as `pack model --quant mix` does. Then
for every uniform type of the ladder: quantize it with llama.cpp's quantizer and the same
importance matrix, allocate a mix with a budget of exactly that file's size, write it, and
measure both on the evaluation text, which neither the importance matrix nor any decision saw
(every chunk of it: no early stop, so both get the same tokens).

Targets (in the issue): at Q3_K_M's and Q4_K_M's size, mean KLD(mix) <= 0.8 x KLD(uniform); over
the ladder, every mix at or below the uniform types' size-KLD curve.

    python benchmarks/quality_mix.py --model smollm2
    python benchmarks/quality_mix.py --model smollm2 --quants Q3_K_M,Q4_K_M

SmolLM2's weights were dequantized from Q4_1, so ~4-bit KLDs are understated for every type:
compare the two columns with each other, not with published figures. Worse, Q5_1 contains Q4_1's
grid and can reproduce SmolLM2 exactly (zero error measured on blk.0.ffn_gate): uniform
Q5_K_S/Q5_K_M use Q5_1 (Q5_K's fallback for its 576-wide rows) and look near-lossless, and a mix that may use Q5_1 does the same. So run it both
ways: with Q5_1 (the default: the fair comparison where the uniform types use it, Q5 and up) and
with --exclude Q5_1 (the fair one below, where the uniform types do not). Appends one JSON record per
type to benchmarks/results/quality_mix.jsonl and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import models  # noqa: E402

MODELS = {k: models.BENCH_MODELS[k] for k in ("smollm2", "qwen2.5-0.5b", "tiny-qwen2")}
LADDER = "Q2_K,Q3_K_S,Q3_K_M,Q3_K_L,Q4_K_S,Q4_K_M,Q5_K_S,Q5_K_M,Q6_K"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--quants", default=LADDER, help=f"uniform types to compare with (default {LADDER})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gains", choices=("probe", "nsr"), default="probe",
                    help="probe: one measured probe per category (what pack does); nsr: no probes, each tensor's "
                         "error relative to its own importance-weighted power (noise-to-signal), all gains 1")
    ap.add_argument("--exclude", default="", help="candidate types the mixes may not use, e.g. Q5_1 (see the doc)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quality_mix.jsonl")
    args = ap.parse_args()

    import hashlib

    from packager.convert.gguf.converter import convert
    from packager.convert.gguf.imatrix import compute_imatrix, default_calibration_text
    from packager.convert.gguf.mixes import open_reference, tensor_options
    from packager.convert.gguf.requantize import quantize_gguf
    from packager.measure.quality import RunSettings, build_reference, decision_text, default_evaluation_text, measure
    from packager.pack.mixquant import Mixer, relative_errors
    from packager.plan.mix import allocate
    from packager.quants import get_quant
    from packager.source.resolver import resolve
    from packager.spec.model import load_spec

    model_dir = MODELS[args.model]()
    spec = load_spec(model_dir)
    settings = RunSettings(args.threads)
    records = []
    with tempfile.TemporaryDirectory(prefix="quality-mix-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        f16 = convert(resolve(model_dir, hash_weights=False, quiet=True), get_quant("F16"), work / "f16.gguf",
                      n_threads=args.threads, quiet=True).path
        calib = default_calibration_text()
        imatrix = compute_imatrix(f16, calib, n_threads=args.threads, quiet=True)
        exclude = [q for q in args.exclude.split(",") if q]
        ref_file = open_reference(f16)
        options, kept = tensor_options(ref_file, imatrix, n_threads=args.threads, quiet=True, exclude=exclude)
        mixer = Mixer(ref_file, work, spec, imatrix, options, kept, args.threads, quiet=True)
        dec_body, dec_name = decision_text()
        dec_ref = build_reference(f16, dec_body, work / "decision", settings=settings, text_name=dec_name, quiet=True)
        if args.gains == "probe":
            gains = mixer.gains(dec_ref)
        else:
            options = relative_errors(options)
            gains = {t.category: 1.0 for t in options}
        setup_s = time.perf_counter() - t0
        print(f"setup (F16, imatrix, sensitivities, {len(gains)} probes): {setup_s:.0f} s; gains "
              + ", ".join(f"{k} {v:.3g}" for k, v in sorted(gains.items())), file=sys.stderr)
        ev_ref = build_reference(f16, default_evaluation_text(), work / "evaluation", settings=settings,
                                 text_name="evaluation.txt", quiet=True)
        for q in args.quants.split(","):
            uni = work / f"uniform-{q}.gguf"
            quantize_gguf(f16, get_quant(q), uni, imatrix=imatrix, n_threads=args.threads)
            size = uni.stat().st_size
            mu = measure(uni, ev_ref, settings=settings, quiet=True).summary
            uni.unlink()
            mix = allocate(options, gains, size - mixer.overhead - mixer.kept_bytes)
            path = mixer.write(mix.types, q, f"mix at {q}")
            msize = path.stat().st_size
            mm = measure(path, ev_ref, settings=settings, quiet=True).summary
            path.unlink()
            rec = {
                "bench": "quality_mix", "model": args.model, "quant": q, "uniform_bytes": size, "mix_bytes": msize,
                "uniform_kld": mu.kld_mean, "mix_kld": mm.kld_mean, "ratio": mm.kld_mean / mu.kld_mean,
                "uniform_ppl": mu.ppl, "mix_ppl": mm.ppl, "uniform_top1": mu.top1, "mix_top1": mm.top1,
                "predicted_kld": mix.predicted, "excluded": exclude, "gain_mode": args.gains, "mix_types": mix.counts(), "n_tokens": mm.n_tokens,
                "gains": gains, "imatrix_text_sha256": hashlib.sha256(calib.encode()).hexdigest(),
                "decision_text_sha256": dec_ref.text_sha256, "evaluation_text_sha256": ev_ref.text_sha256,
                "threads": args.threads, "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            records.append(rec)
            print(f"{q}: uniform {size / 1e6:.2f} MB KLD {mu.kld_mean:.5f} | mix {msize / 1e6:.2f} MB KLD "
                  f"{mm.kld_mean:.5f} | ratio {rec['ratio']:.3f}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print("| type | size MB | uniform KLD | mix KLD | ratio | uniform ppl | mix ppl | uniform top-1 | mix top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['quant']} | {r['uniform_bytes'] / 1e6:.2f} | {r['uniform_kld']:.5f} | {r['mix_kld']:.5f} | "
              f"{r['ratio']:.3f} | {r['uniform_ppl']:.3f} | {r['mix_ppl']:.3f} | {100 * r['uniform_top1']:.1f}% | "
              f"{100 * r['mix_top1']:.1f}% |")
    # The curve: a mix is on or below it when no uniform type is both no larger and better.
    worse = [r["quant"] for r in records if r["mix_kld"] > r["uniform_kld"]]
    print(f"mixes above the uniform curve: {', '.join(worse) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
