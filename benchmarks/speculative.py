"""Issue 18's speed figures: greedy decode with a draft against the same bundle without it.

The bundle loaded twice: without a draft (llama.cpp's own loop: the baseline) and with one, the two
alternated prompt by prompt and round by round so that drift in the machine's speed hits both
alike. Decode tokens/s counts from each reply's first token (the prompt and the first token are the
same work either way). The drafted model's replies must be the same text with drafts turned off
(``speculative=False``, the runtime's promise); whether they also equal the baseline's is recorded
(a near-tie can differ: its lone-token steps sum attention in another order). The record keeps
each round's ratio.

    python benchmarks/speculative.py --draft lookup --prompts grounded     # rewrite / summarise / annotate
    python benchmarks/speculative.py --draft self:Q4_0 --prompts chat      # SmolLM2 Q8_0, drafted by its Q4_0
    python benchmarks/speculative.py --bundle dist/X --draft lookup        # any GGUF bundle

Figures wanted: self: >= 1.3x on generic chat prompts, lookup >= 1.5x on input-grounded ones.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import packager
from packager.bundle.verify import verified
from packager.pack.options import PackOptions
from packager.pack.pipeline import pack_model

CODE = '''def load(path):
    with open(path) as f:
        rows = [line.strip().split(",") for line in f]
    header, body = rows[0], rows[1:]
    return [dict(zip(header, r)) for r in body]

def total(rows, key):
    return sum(float(r[key]) for r in rows)

def by(rows, key):
    out = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out
'''
PASSAGE = ("The river rose for three days. The farmers moved their animals to the hills, and the village school "
           "became a shelter. When the water fell, the fields were covered in silt, and the harvest that year was "
           "the best anyone remembered. The old bridge, which had stood for a hundred years, was gone, and the "
           "children crossed the river in a boat that the baker rowed every morning until the new bridge opened.")
GROUNDED = [
    f"Rewrite this Python code with type hints and docstrings:\n\n{CODE}",
    f"Add a comment above every line of this code:\n\n{CODE}",
    f"Summarise this passage, keeping its own words where you can:\n\n{PASSAGE}",
    f"Correct the spelling and repeat the passage in full:\n\n{PASSAGE.replace('the', 'teh')}",
]
CHAT = [
    "Give me three tips for staying healthy.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short poem about the sea.",
    "How do I make a cup of tea?",
    "Explain what a neural network is to a child.",
]


def requantized(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype}"), True, 2
    if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype}")
    return dst


def reply(model, prompt: str, spec: bool, max_tokens: int) -> tuple[str, float, int]:
    s = model.chat([{"role": "user", "content": prompt}], stream=True, temperature=0.0, repeat_penalty=1.0,
                   max_tokens=max_tokens, speculative=spec)
    first = next(s, "")
    t0 = time.perf_counter()
    rest = "".join(s)
    return first + rest, time.perf_counter() - t0, max(0, s.n_generated - 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="a GGUF bundle (default: SmolLM2-135M-Instruct packed at --quant)")
    ap.add_argument("--quant", default="Q8_0", help="the default bundle's type (default Q8_0)")
    ap.add_argument("--draft", default="lookup", help="lookup, self:QUANT, or a draft model's .gguf")
    ap.add_argument("--prompts", choices=("grounded", "chat"), default="grounded")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speculative.jsonl")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgepack-spec-"))
    bundle = args.bundle or pack_model(None, PackOptions(output=work, quant=args.quant, allow_requantize=True,
                                                         quiet=True)).path
    draft: str | Path = args.draft
    if args.draft.startswith("self:"):
        b = verified(bundle)
        draft = requantized(b.model_file, work / f"draft-{args.draft[5:]}.gguf", args.draft[5:])
    prompts = GROUNDED if args.prompts == "grounded" else CHAT
    model = packager.load(bundle, n_threads=args.threads, draft=draft)
    plain = packager.load(bundle, n_threads=args.threads, draft=False)
    draft_batch = model.draft_batch
    seconds = {False: [0.0] * args.rounds, True: [0.0] * args.rounds}
    tokens = {False: [0] * args.rounds, True: [0] * args.rounds}
    identical, same_as_plain, steps, drafted, accepted, emitted = True, True, 0, 0, 0, 0
    # per prompt, over all rounds: how much each kind of reply gains (copy-heavy ones more than others)
    by_prompt = [{"seconds": {False: 0.0, True: 0.0}, "tokens": {False: 0, True: 0}, "steps": 0, "emitted": 0}
                 for _ in prompts]
    for r in range(args.rounds):
        for i, prompt in enumerate(prompts):
            order = (False, True) if (r + i) % 2 == 0 else (True, False)
            out = {}
            for spec in order:
                text, sec, n = reply(model if spec else plain, prompt, True, args.max_tokens)
                out[spec] = text
                seconds[spec][r] += sec
                tokens[spec][r] += n
                by_prompt[i]["seconds"][spec] += sec
                by_prompt[i]["tokens"][spec] += n
                if spec:
                    st = model.draft_stats
                    steps, drafted, accepted, emitted = (steps + st.steps, drafted + st.drafted,
                                                         accepted + st.accepted, emitted + st.emitted)
                    by_prompt[i]["steps"] += st.steps
                    by_prompt[i]["emitted"] += st.emitted
            if r == 0:
                off, _, _ = reply(model, prompt, False, args.max_tokens)
                if off != out[True]:
                    identical = False
                    print(f"DIFFERENT output with drafts off, prompt {i}", file=sys.stderr)
                same_as_plain = same_as_plain and out[False] == out[True]
    model.close()
    plain.close()
    tps = {s: [tokens[s][r] / seconds[s][r] for r in range(args.rounds)] for s in (False, True)}
    ratios = [tps[True][r] / tps[False][r] for r in range(args.rounds)]
    rec = {
        "bench": "speculative", "bundle": Path(bundle).name,
        "quant": args.quant if args.bundle is None else None, "draft": args.draft, "prompts": args.prompts,
        "n_prompts": len(prompts), "rounds": args.rounds, "max_tokens": args.max_tokens, "threads": args.threads,
        "identical": identical, "identical_to_plain": same_as_plain, "draft_batch": draft_batch,
        "tokens_per_s_plain": [round(x, 2) for x in tps[False]], "tokens_per_s_draft": [round(x, 2) for x in tps[True]],
        "ratio_per_round": [round(x, 3) for x in ratios], "ratio_median": round(statistics.median(ratios), 3),
        "acceptance": round(accepted / drafted, 4) if drafted else 0.0,
        "tokens_per_step": round(emitted / steps, 3) if steps else 0.0,
        "tokens_generated_per_round": tokens[False][0],
        "per_prompt": [{"prompt": " ".join(prompt.split())[:48],
                        "ratio": round((b["tokens"][True] / b["seconds"][True]) / (b["tokens"][False] / b["seconds"][False]), 3)
                        if b["seconds"][True] and b["seconds"][False] and b["tokens"][False] else None,
                        "tokens_per_step": round(b["emitted"] / b["steps"], 3) if b["steps"] else 0.0}
                       for prompt, b in zip(prompts, by_prompt)],
        "host": platform.node(), "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(rec))
    with args.out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
