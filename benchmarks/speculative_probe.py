"""Probe for issue 18: llama-cpp-python's own prompt-lookup drafting against plain greedy decoding.

Same GGUF, same prompts (two input-grounded, one generic chat), greedy, up to 96 tokens each; prints
whether the outputs are identical (and where they first differ) and the tokens/s of both. Measured
on SmolLM2 Q8_0 (session 7): 0.66x the speed, one of three outputs diverged at token 63 (batched
verification numerics at a near-tie). A starting point, not a target: see the session 7 note.

    python benchmarks/speculative_probe.py path/to/model.gguf     # a ChatML model (SmolLM2, Qwen2.5)
"""

from __future__ import annotations

import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

MAX_TOKENS = 96
PROMPTS = [
    "Rewrite this code with type hints:\n\ndef add(a, b):\n    return a + b\n\ndef scale(values, factor):\n"
    "    return [v * factor for v in values]\n\ndef mean(values):\n    return sum(values) / len(values)\n",
    "Summarise this passage: The river rose for three days. The farmers moved their animals to the hills, and "
    "the village school became a shelter. When the water fell, the fields were covered in silt, and the harvest "
    "that year was the best anyone remembered.",
    "Give me three tips for staying healthy.",
]


def chatml(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def run(model: str, draft: LlamaPromptLookupDecoding | None) -> tuple[list[list[int]], float]:
    """Greedy tokens for every prompt, and the decode tokens/s over all of them."""
    llm = Llama(model, n_ctx=1024, n_threads=2, verbose=False, draft_model=draft, logits_all=draft is not None)
    outputs, seconds, n = [], 0.0, 0
    for prompt in PROMPTS:
        llm.reset()
        ids = llm.tokenize(chatml(prompt).encode(), add_bos=False, special=True)
        t0, out = time.perf_counter(), []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            if token == llm.token_eos() or len(out) >= MAX_TOKENS:
                break
            out.append(token)
        seconds += time.perf_counter() - t0
        n += len(out)
        outputs.append(out)
    return outputs, n / seconds


def main() -> int:
    model = sys.argv[1]
    base, base_tps = run(model, None)
    spec, spec_tps = run(model, LlamaPromptLookupDecoding(num_pred_tokens=8))
    for a, b in zip(base, spec):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(len(a), len(b), "identical" if a == b else f"first difference at token {first}")
    print(f"tokens/s: plain {base_tps:.1f}, lookup {spec_tps:.1f}, ratio {spec_tps / base_tps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
