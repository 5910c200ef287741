"""Issue 18, ONNX side: can onnxruntime-genai verify drafts without changing greedy output?

A drafted loop appends the last token and k drafts as one batch (`append_tokens`), reads every
position's logits (`get_output("logits")`: edgepack's graphs return them all) and rolls back the
rejected ones (`rewind_to`). Greedy output stays token-for-token the same only if a batch of k+1
tokens gets the very logits that k+1 single-token steps get. This probe packs SmolLM2-135M-Instruct
as ONNX int4 at each MatMulNBits accuracy level, feeds one passage both ways through genai, and
prints the largest logit difference per batch size, how many positions were bit-equal, how many
kept the same argmax, and what a batch of k+1 costs against a single step.

Measured (session 10, 2 threads, genai 0.11.4, onnxruntime 1.32): level 4 (int8 dot products,
the default) up to 1.3 logits apart, level 0 (f32) ~6e-5 apart; no position bit-equal at either.
So pack refuses `--format onnx --draft` (one line, exit 2) and says why. Rerun on genai 0.18.0
(same onnxruntime 1.32): the same largest differences to the last bit as results/onnx_draft_probe.jsonl's
(1.0176 at level 4, one argmax of 45 flipped; 7.49e-5 at level 0), no position bit-equal.

    python benchmarks/onnx_draft_probe.py     # ~1 minute
"""

from __future__ import annotations

import argparse
import json
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

TEXT = ("The river rose for three days. The farmers moved their animals to the hills, and the village school "
        "became a shelter. When the water fell, the fields were covered in silt, and the harvest that year was the "
        "best anyone remembered. Nobody in the valley had seen a flood like it since their grandparents' time.")
START = 16  # tokens appended before the comparison starts


def probe(model_dir: Path, sizes: list[int], threads: int) -> list[dict]:
    import onnxruntime_genai as og

    cfg = og.Config(str(model_dir))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)
    ids = list(og.Tokenizer(model).encode(TEXT))

    def generator():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 8, do_sample=False, top_k=1)
        return og.Generator(model, params)

    single, single_s = [], []
    gen = generator()
    gen.append_tokens(ids[:START])
    for t in ids[START:]:  # the reference: one token per step, as plain greedy decoding runs
        t0 = time.perf_counter()
        gen.append_tokens([t])
        single.append(np.array(gen.get_output("logits"))[0, -1].copy())
        single_s.append(time.perf_counter() - t0)
    rows = []
    for k in sizes:
        gen, pos, diffs, same_top, step_s = generator(), START, [], 0, []
        gen.append_tokens(ids[:START])
        while pos + k <= len(ids):
            t0 = time.perf_counter()
            gen.append_tokens(ids[pos:pos + k])
            logits = np.array(gen.get_output("logits"))[0]
            step_s.append(time.perf_counter() - t0)
            for i in range(k):
                ref = single[pos - START + i]
                diffs.append(float(np.abs(logits[i] - ref).max()))
                same_top += int(np.argmax(logits[i]) == np.argmax(ref))
            pos += k
        rows.append({"batch": k, "positions": len(diffs), "max_abs_dlogit": max(diffs),
                     "bit_equal": sum(d == 0 for d in diffs), "same_argmax": same_top,
                     "step_ratio": round(statistics.median(step_s) / statistics.median(single_s), 2)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="4,0", help="MatMulNBits accuracy levels to pack and probe")
    ap.add_argument("--sizes", default="2,3,5,9", help="batch sizes (k+1) to compare with single steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "onnx_draft_probe.jsonl")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    src = models.smollm2_hf()
    with tempfile.TemporaryDirectory(prefix="edgepack-onnx-probe-") as tmp:
        for level in (int(x) for x in args.levels.split(",")):
            result = pack_model(src, PackOptions(output=Path(tmp) / f"level{level}", format="onnx",
                                                 onnx_accuracy_level=level, quiet=True))
            rows = probe(verified(result.path).model_file.parent, sizes, args.threads)
            for row in rows:
                record = {"model": "SmolLM2-135M-Instruct", "accuracy_level": level, "threads": args.threads, **row}
                print(json.dumps(record))
                with args.out.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
