"""SmolLM2-135M-Instruct, a real model: HF checkpoint -> GGUF bundle -> answer, against transformers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import packager
from packager.errors import ContextOverflowError
from packager.pack import PackOptions, pack_model

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def bundles(smollm2_hf, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    return {q: pack_model(smollm2_hf, PackOptions(quant=q, output=out / q, quiet=True)).path for q in ("Q8_0", "Q4_K_M")}


@pytest.fixture(scope="module")
def hf_answer(smollm2_hf) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_q8_0_greedy_answer_equals_transformers(bundles, hf_answer):
    with packager.load(bundles["Q8_0"]) as m:
        ours = m.chat(QUESTION, temperature=0.0, max_tokens=24)
    assert "Paris" in hf_answer
    n = 32  # the first tokens: quantization noise may flip a late near-tie
    assert ours[:n] == hf_answer[:n], (ours, hf_answer)


def test_q4_k_m_bundle_answers_and_is_smaller(bundles):
    sizes = {q: sum(f.stat().st_size for f in (b / "model").iterdir()) for q, b in bundles.items()}
    assert sizes["Q4_K_M"] < 0.75 * sizes["Q8_0"]
    with packager.load(bundles["Q4_K_M"], verify=True) as m:
        assert "Paris" in m.chat(QUESTION, temperature=0.0, max_tokens=24)


def test_stream_closed_midway_leaves_model_usable(bundles):
    with packager.load(bundles["Q8_0"]) as m:
        it = m.chat(QUESTION, stream=True, temperature=0.0, max_tokens=64)
        first = next(it)
        it.close()
        assert first
        assert "Paris" in m.chat(QUESTION, temperature=0.0, max_tokens=24)


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
