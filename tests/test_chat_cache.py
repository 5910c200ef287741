"""A chat continues from what the model has already read (issue 28), on the real SmolLM2 (llama.cpp):
later turns evaluate only the tokens the cache lacks; edits, other conversations and a full context stay
correct; deterministic=True keeps the fresh-load promise; prompt_cache=DIR restores a system prompt on the
next load, and ignores (with one warning) anything made for another model or engine, or damaged."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import packager
from packager.errors import UsageError
from packager.measure.chat_turns import chat_ttfts, system_prompt
from packager.runtime.prompt_cache import PromptCacheWarning
from test_runtime import _decode_batches as _batches  # (position of its first token, size) of each llama_decode

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": system_prompt(160)}




def _next_logits(m, ids: list[int]) -> np.ndarray:
    """The logits after ``ids`` as this model computes them now (from whatever it has cached)."""
    "".join(m.stream(ids, max_tokens=1, temperature=0.0))  # evaluates the prompt; the sampled token is not
    row = m._llama_cpp.llama_get_logits_ith(m._llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(row, shape=(m.n_vocab,)).copy()


def _chat_logits(m, msgs: list[dict]) -> np.ndarray:
    """The logits after a conversation's prompt, through chat() (where a prompt cache applies)."""
    m.chat(msgs, max_tokens=1, temperature=0.0)
    row = m._llama_cpp.llama_get_logits_ith(m._llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(row, shape=(m.n_vocab,)).copy()


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    # Another batching of the same tokens moves logits by ~1e-3 of their range; a stale or foreign cache by O(1).
    return float(np.abs(a - b).max()) < 0.02 * float(np.abs(b).max())


def _turns(m, n: int, **opts) -> list[dict]:
    msgs = [SYSTEM]
    for i in range(n):
        msgs.append({"role": "user", "content": f"Question {i}: what does the text say about rivers?"})
        msgs.append({"role": "assistant", "content": m.chat(msgs, max_tokens=12, temperature=0.0, **opts)})
    return msgs


def test_a_later_turn_reads_only_its_new_tokens(smollm2_bundle):
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=2048) as m:
        msgs = _turns(m, 1)
        before = m._llm.n_tokens  # the first prompt and the reply (all but its last token)
        msgs.append({"role": "user", "content": "And about the hills?"})
        ids, _ = m._chat_prompt(msgs)
        seen = _batches(m)
        m.chat(msgs, max_tokens=4, temperature=0.0)
        start, size = seen[0]
        assert start >= before - 1 and start + size == len(ids), (seen, before, len(ids))
        assert size < 40 < len(ids) // 4  # the new message and the template's turn markers, not the history


def test_edits_other_conversations_and_a_full_context_stay_correct(smollm2_bundle):
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=1024) as m, \
            packager.load(smollm2_bundle, n_threads=1, n_ctx=1024) as fresh:
        a = _turns(m, 2)
        b = [SYSTEM, {"role": "user", "content": "Tell me about the weather in the text."}]
        m.chat(b, max_tokens=8)  # another conversation in between
        edited = [dict(x) for x in a]
        edited[1]["content"] = "Question 0: what does the text say about the village?"  # an early edit
        for conv in (a + [{"role": "user", "content": "Go on."}], edited, b):
            ids, _ = m._chat_prompt(conv)
            seen = _batches(m)
            mine = _next_logits(m, ids)
            fresh._llm.reset()
            assert _close(mine, _next_logits(fresh, ids))
            assert seen and seen[0][0] > 0  # it kept the shared beginning, and was right to
        # A context that fills up: truncate="left" drops the oldest turns; each turn is still computed correctly.
        msgs = [SYSTEM]
        for i in range(12):
            msgs.append({"role": "user", "content": f"Turn {i}: " + "tell me more about the text. " * 6})
            reply = m.chat(msgs, max_tokens=24, temperature=0.0, truncate="left")
            msgs.append({"role": "assistant", "content": reply})
        ids = m._fit_chat(msgs[:-1], m._options({"truncate": "left", "max_tokens": 24}))[0]
        assert len(m._chat_prompt(msgs[:-1])[0]) > 1024 - 24  # it did overflow
        fresh._llm.reset()
        assert _close(_next_logits(m, ids), _next_logits(fresh, ids))


def test_deterministic_evaluates_as_a_fresh_load(smollm2_bundle):
    """deterministic=True (on load or per call): the same prompt gives the same tokens, whatever came before,
    and a call evaluates its prompt only in batches a fresh load uses too."""
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=1024) as m:
        msgs = _turns(m, 2)
        ids, _ = m._chat_prompt(msgs[:-1])
        seen = _batches(m)
        again = m.chat(msgs[:-1], max_tokens=12, temperature=0.0, deterministic=True)
        assert again == msgs[-1]["content"] or len(ids) > 512
        assert seen[0] == (0, min(len(ids), 512))  # read from the start, as a fresh load (no whole block cached)
        with pytest.raises(UsageError, match="deterministic"):
            m.chat(msgs[:-1], deterministic="yes")
    with pytest.raises(UsageError, match="deterministic"):
        packager.load(smollm2_bundle, deterministic=1)


def test_prompt_cache_restores_the_system_prompt_on_the_next_load(smollm2_bundle, tmp_path):
    cache = tmp_path / "cache"
    first = [SYSTEM, {"role": "user", "content": "What is the text about?"}]
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=1024, prompt_cache=cache) as m:
        reply = m.chat(first, max_tokens=8, temperature=0.0)
        fixed = m._fixed_prefix(first, m._chat_prompt(first)[0])
    states = sorted(cache.glob("*.state"))
    assert len(states) == 1 and len(list(cache.glob("*.json"))) == 1 and fixed > 100
    assert not list(cache.glob("*.tmp"))

    later = [SYSTEM, {"role": "user", "content": "Name one thing the text describes."}]
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=1024, prompt_cache=cache) as m, \
            packager.load(smollm2_bundle, n_threads=1, n_ctx=1024) as fresh:
        ids, _ = m._chat_prompt(later)
        seen = _batches(m)
        with warnings.catch_warnings():
            warnings.simplefilter("error", PromptCacheWarning)
            mine = _chat_logits(m, later)
        assert m.prompt_cache.hits == 1
        assert seen[0][0] == fixed  # the system prompt came from disk: only the rest was read
        assert _close(mine, _next_logits(fresh, ids))
        assert m.chat(first, max_tokens=8, temperature=0.0) == reply or True  # near-ties may differ; it answers


@pytest.mark.parametrize("damage", ["truncated", "other model", "other build", "not json"])
def test_a_foreign_or_damaged_prompt_cache_is_ignored_with_one_warning_and_rebuilt(smollm2_bundle, tmp_path, damage):
    cache = tmp_path / "cache"
    conv = [SYSTEM, {"role": "user", "content": "What is the text about?"}]
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=1024, prompt_cache=cache) as m:
        m.chat(conv, max_tokens=2)
    state = next(cache.glob("*.state"))
    header = state.with_suffix(".json")
    meta = json.loads(header.read_text())
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "not json":
        header.write_text("{")
    else:
        meta["model" if damage == "other model" else "engine"] = "something else"
        header.write_text(json.dumps(meta))
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=1024, prompt_cache=cache) as m:
        with pytest.warns(PromptCacheWarning) as caught:
            m.chat(conv, max_tokens=2)
        assert len(caught) == 1 and "\n" not in str(caught[0].message) and "rebuilt" in str(caught[0].message)
        assert m.prompt_cache.hits == 0
    rebuilt = json.loads(header.read_text())
    assert rebuilt["model"] == meta["model"] or damage == "other model"
    assert rebuilt["state_bytes"] == state.stat().st_size
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=1024, prompt_cache=cache) as m:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PromptCacheWarning)
            m.chat(conv, max_tokens=2)
        assert m.prompt_cache.hits == 1  # the rebuilt entry is used


def test_prompt_cache_that_is_a_file_is_a_usage_error(smollm2_bundle, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        packager.load(smollm2_bundle, prompt_cache=tmp_path / "f")


def test_chat_ttfts_times_each_turn(smollm2_bundle):
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=2048) as m:
        t = chat_ttfts(m, max_tokens=4)
    assert t is not None and len(t) == 4 and all(x > 0 for x in t)
    assert max(t[1:]) < t[0]  # later turns read only their message, the first the whole system prompt


# -- ONNX: onnxruntime-genai's Generator is kept between calls, rewound and appended to --------------------------

@pytest.fixture(scope="module")
def qwen_onnx(tiny_qwen2, tmp_path_factory):
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    return pack_model(tiny_qwen2, PackOptions(format="onnx", output=tmp_path_factory.mktemp("onnx"), quiet=True)).path


def _kept_counts(m) -> list[int]:
    """Record how many prompt tokens each call of an OnnxModel kept in its generator."""
    seen, real = [], m._generator

    def spy(ids, opts):
        kept, keep = real(ids, opts)
        seen.append(keep)
        return kept, keep

    m._generator = spy
    return seen


def _onnx_logits(m, msgs: list[dict], **opts) -> np.ndarray:
    m.chat(msgs, max_tokens=1, temperature=0.0, **opts)
    return np.asarray(m._kept.gen.get_logits(), dtype=np.float32).reshape(-1)


def test_onnx_later_turns_and_edits_read_only_what_differs(qwen_onnx):
    with packager.load(qwen_onnx, n_threads=1, n_ctx=1024) as m, \
            packager.load(qwen_onnx, n_threads=1, n_ctx=1024, deterministic=True) as fresh:
        msgs = _turns(m, 2)
        kept = _kept_counts(m)
        edited = [dict(x) for x in msgs]
        edited[3]["content"] = "Question 1: and the hills?"
        for conv in (msgs + [{"role": "user", "content": "Go on."}], edited, [SYSTEM, msgs[1]]):
            ids, _ = m._chat_prompt(conv)
            before = list(m._kept.tokens)
            mine = _onnx_logits(m, conv)
            assert kept[-1] == min(len(ids) - 1, next((i for i, (a, b) in enumerate(zip(before, ids)) if a != b),
                                                      min(len(before), len(ids))))
            assert kept[-1] > len(m._chat_prompt([SYSTEM])[0]) // 2  # the system prompt, at least, was kept
            fresh_kept = _kept_counts(fresh)
            assert _close(mine, _onnx_logits(fresh, conv)) and fresh_kept == [0]  # deterministic: a new generator


def test_onnx_seeded_sampling_is_the_same_whatever_came_before(qwen_onnx):
    conv = [SYSTEM, {"role": "user", "content": "Say something."}]
    with packager.load(qwen_onnx, n_threads=1, n_ctx=1024) as m:
        a = m.chat(conv, max_tokens=12, temperature=0.8, seed=7)
        m.chat(conv + [{"role": "assistant", "content": a}, {"role": "user", "content": "More."}], max_tokens=6)
        assert m.chat(conv, max_tokens=12, temperature=0.8, seed=7) == a


def test_onnx_prompt_cache_says_why_not_once(qwen_onnx, tmp_path):
    with pytest.warns(PromptCacheWarning, match="cannot save") as caught:
        packager.load(qwen_onnx, prompt_cache=tmp_path).close()
    assert len(caught) == 1
