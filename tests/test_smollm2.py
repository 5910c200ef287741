"""SmolLM2-135M-Instruct, a real model: HF checkpoint -> GGUF bundle -> answer, against transformers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import packager
from packager.errors import ContextOverflowError
from packager.pack.options import PackOptions
from packager.pack.pipeline import pack_model

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def bundles(smollm2_hf, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    return {q: pack_model(smollm2_hf, PackOptions(quant=q, output=out / q, quiet=True)).path for q in ("Q8_0", "Q4_K_M")}


PROMPTS = ["What is the boiling point of water in Celsius?", "What is the capital of France?",
           "Who wrote Romeo and Juliet?", "How many legs does a spider have?", "What is the largest planet?"]
CLEAR = 1.0  # logits: a greedy choice HF makes by at least this margin must not flip under Q8_0


@pytest.fixture(scope="module")
def hf_greedy(smollm2_hf) -> dict[str, tuple[list[int], list[float], str]]:
    """HF transformers' greedy continuation of each prompt: token ids, top-1 margins, text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    out = {}
    for q in PROMPTS:
        # return_dict=False: transformers 5 returns a BatchEncoding by default, 4.x the ids
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=False)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        new = gen.sequences[0, ids.shape[1]:].tolist()
        margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in gen.scores]
        out[q] = (new, margins, tok.decode(new, skip_special_tokens=True))
    return out


def test_q8_0_greedy_answer_equals_transformers(bundles, hf_greedy):
    # The first prompt's first 8 greedy choices are all clear in HF (checked here), so its
    # answer is well defined and the Q8_0 bundle must give the same text.
    q = PROMPTS[0]
    ids, margins, text = hf_greedy[q]
    assert min(margins[:8]) > CLEAR / 2, margins
    with packager.load(bundles["Q8_0"]) as m:
        ours = m.chat([{"role": "user", "content": q}], temperature=0.0, max_tokens=16)
        first8 = m.detokenize(ids[:8])
    assert ours.startswith(first8), (ours, text)


def test_q8_0_agrees_with_transformers_wherever_hf_is_clear(bundles, hf_greedy):
    """Teacher-forced: after HF's own prefix, Q8_0's argmax equals HF's at every clear position."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(next((bundles["Q8_0"] / "model").glob("*.gguf"))), n_ctx=512, logits_all=True,
                          verbose=False)
    checked = 0
    try:
        for q, (ids, margins, _) in hf_greedy.items():
            prompt = llm.tokenize(f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n".encode(), add_bos=False, special=True)
            llm.reset()
            llm.eval(prompt + ids)
            scores = np.array(llm.scores[len(prompt) - 1:len(prompt) - 1 + len(ids)])
            for i, (tok, margin) in enumerate(zip(ids, margins)):
                if margin > CLEAR:
                    assert int(scores[i].argmax()) == tok, (q, i)
                    checked += 1
    finally:
        llm.close()
    assert checked >= 40


def test_q4_k_m_bundle_answers_and_is_smaller(bundles):
    sizes = {q: sum(f.stat().st_size for f in (b / "model").iterdir()) for q, b in bundles.items()}
    assert sizes["Q4_K_M"] < 0.75 * sizes["Q8_0"]
    with packager.load(bundles["Q4_K_M"], verify=True) as m:
        assert "100" in m.chat([{"role": "user", "content": PROMPTS[0]}], temperature=0.0, max_tokens=24)


def test_stream_closed_midway_leaves_model_usable(bundles):
    with packager.load(bundles["Q8_0"]) as m:
        it = m.chat(QUESTION, stream=True, temperature=0.0, max_tokens=64)
        first = next(it)
        it.close()
        assert first
        again = m.chat(QUESTION, stream=True, temperature=0.0, max_tokens=64)
        assert next(again) == first  # same greedy start: nothing of the closed stream leaked
        again.close()


def test_context_overflow_is_a_clear_error(bundles):
    with packager.load(bundles["Q8_0"], n_ctx=64) as m:
        with pytest.raises(ContextOverflowError, match="tokens but the context holds 64"):
            m.generate("word " * 200)


def test_two_threads_share_one_model(bundles):
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = m.chat(QUESTION, temperature=0.0, max_tokens=12)

    with packager.load(bundles["Q8_0"]) as m:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results[0] == results[1] and results[0]
