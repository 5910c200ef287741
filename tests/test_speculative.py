"""Speculative decoding (issue 18): the drafted loop gives llama.cpp's own greedy tokens, fewer steps.

Real engine: SmolLM2-135M-Instruct through llama.cpp, with and without prompt-lookup drafts, on the
same loaded model (``speculative=False`` per call), and the parts that do not touch the engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import packager
from packager.bundle.verify import verified
from packager.errors import ModelClosedError, UsageError
from packager.kernels.speculative import accept_greedy, sample_at, target_probs
from packager.runtime.speculative import AdaptiveLength, LookupDrafter, invariant_batch

CODE = ("Rewrite this code with type hints:\n\ndef add(a, b):\n    return a + b\n\ndef scale(values, factor):\n"
        "    return [v * factor for v in values]\n\ndef mean(values):\n    return sum(values) / len(values)\n")
PASSAGE = ("Summarise this passage: The river rose for three days. The farmers moved their animals to the hills, "
           "and the village school became a shelter. When the water fell, the fields were covered in silt, and the "
           "harvest that year was the best anyone remembered.")
CHAT = "Give me three tips for staying healthy."


# -- the parts without an engine ------------------------------------------------------------------

def test_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    d = LookupDrafter(max_ngram=3)
    d.reset([5, 6, 7, 8, 9, 1, 5, 6, 7])  # "5 6 7" occurred before, followed by 8 9 1
    assert d.propose(3) == [8, 9, 1] and d.match == 3
    d.extend([2])  # "6 7 2", "7 2", "2": never seen before
    assert d.propose(4) == []
    d.extend([5, 6])  # "2 5 6" unseen, "5 6" seen latest at 6..8, followed by 7 2
    assert d.propose(2) == [7, 2]
    assert LookupDrafter().propose(3) == []


def test_lookup_prefers_the_longest_matching_suffix():
    d = LookupDrafter(max_ngram=2)
    d.reset([1, 9, 3, 4, 2, 9, 8, 2, 9])  # "2 9" -> 8; "9" alone latest -> 8 too, but "1 9" -> 3 is older
    assert d.propose(1) == [8]
    d.reset([2, 9, 3, 7, 9, 4, 2, 9])  # bigram "2 9" -> 3 wins over the latest unigram "9" -> 4
    assert d.propose(1) == [3]


def test_accept_greedy_keeps_the_drafts_the_model_would_choose():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 9]) == 2
    assert accept_greedy([4, 5], [1]) == 0
    assert accept_greedy([4, 5, 6], [4, 5]) == 2  # all kept: the model's next choice comes free
    assert accept_greedy([3], []) == 0


def test_adaptive_length_drafts_long_when_slots_are_free_and_not_at_all_when_they_cost():
    free = AdaptiveLength(8)  # every step costs the same: the longest draft gains most
    assert free.length() == 8
    for _ in range(30):
        free.update(8, 0)  # nothing kept, ever: acceptance falls, but extra slots still cost nothing
    assert free.acceptance() < 0.1 and free.length() > 0
    # each extra token of a batch costs three quarters of a step (SmolLM2 on two cores, measured)
    costly = AdaptiveLength(8, [0.0] + [1.0 + 0.75 * (n - 1) for n in range(1, 10)])
    for _ in range(30):
        costly.update(costly.length() or 1, 0)  # drafts are wrong: plain steps win
    assert costly.length() == 0
    for _ in range(30):
        costly.update(8, 8)  # drafts are right: long drafts win again
    assert costly.acceptance() > 0.95 and costly.length() == 8
    # kept apart per key (a lookup's match length); an unused key drifts back to trying
    for _ in range(30):
        costly.update(4, 0, key=1)
    assert costly.length(key=1) == 0 and costly.length(key=3) > 0
    for _ in range(100):
        costly.skipped(key=1)
    assert costly.length(key=1) > 0
    slow_draft = AdaptiveLength(8)
    for _ in range(10):
        slow_draft.update(4, 3, draft_seconds=4 * 0.5)  # a draft token costs half a target step
    assert slow_draft.draft_seconds == pytest.approx(0.5) and slow_draft.length() < 8
    with pytest.raises(ValueError, match="every step"):
        AdaptiveLength(8, [1.0, 1.0])


def test_invariant_batch_stops_at_the_first_size_that_differs():
    def engine(threshold):
        def logits_of(tokens, batch):
            rows = np.arange(len(tokens) - 8, dtype=np.float32)
            return rows + (1e-6 if batch >= threshold else 0.0)
        return logits_of

    toks = list(range(40))
    assert invariant_batch(engine(5), toks) == 4
    assert invariant_batch(engine(2), toks) == 1
    assert invariant_batch(engine(99), toks) == 9
    with pytest.raises(ValueError, match="at least"):
        invariant_batch(engine(5), toks[:10])


def _chain_probs(logits, temperature, top_k, top_p):
    """llama.cpp's own sampler chain (as llama-cpp-python builds it, without the final draw) over ``logits``."""
    import ctypes

    import llama_cpp as lc

    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    for s in (lc.llama_sampler_init_top_k(top_k), lc.llama_sampler_init_typical(1.0, 1),
              lc.llama_sampler_init_top_p(top_p, 1), lc.llama_sampler_init_min_p(0.0, 1),
              lc.llama_sampler_init_temp(temperature)):
        lc.llama_sampler_chain_add(chain, s)
    data = (lc.llama_token_data * len(logits))(*[lc.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)])
    arr = lc.llama_token_data_array(data, len(logits), -1, False)
    lc.llama_sampler_apply(chain, ctypes.byref(arr))
    ids = np.array([data[i].id for i in range(arr.size)])
    z = np.array([data[i].logit for i in range(arr.size)], dtype=np.float64)
    lc.llama_sampler_free(chain)
    out = np.zeros(len(logits))
    out[ids] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.8), (1.3, 5, 1.0), (0.5, 0, 0.9)])
def test_target_probs_are_llama_cpps_sampler_chain(temperature, top_k, top_p):
    logits = np.random.default_rng(7).normal(0, 3, 500).astype(np.float32)
    want = _chain_probs(logits, temperature, top_k, top_p)
    got = target_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert np.array_equal(got > 0, want > 0)  # the same tokens can be drawn
    assert np.allclose(got, want, atol=1e-6)


def test_seeded_samples_follow_the_distribution_and_only_the_seed_and_position():
    # 40000 seeds: the token drawn at a position follows p (chi-square at 1e-4; a biased rule fails by far).
    # A draft d is kept exactly when the draw is d, so with probability p(d): the speculative rule.
    from scipy.stats import chisquare

    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    counts = np.bincount([sample_at(p, seed, 7) for seed in range(40000)], minlength=6)
    assert counts[5] == 0 and chisquare(counts[:5], p[:5] * counts.sum()).pvalue > 1e-4
    assert sample_at(p, 3, 7) == sample_at(p.copy(), 3, 7)  # nothing but (seed, position, p) matters
    assert len({sample_at(p, 3, pos) for pos in range(50)}) > 1  # positions draw independently


def test_the_plans_speed_up_and_break_even():
    from packager.kernels.speculative import expected_tokens
    from packager.plan.draft import break_even, plan_draft, speedup, step_seconds

    assert expected_tokens(0.0, 4) == 1 and expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    # lookup drafts are free: at any acceptance above 0 a verify step that costs what one step does gains
    assert break_even(4, 0.0, 1.0) < 0.01 and speedup(0.5, 4, 0.0, 1.0) == pytest.approx(expected_tokens(0.5, 4))
    even = break_even(4, 0.3, 1.2)
    assert 0 < even < 1 and speedup(even, 4, 0.3, 1.2) == pytest.approx(1.0, abs=1e-6)
    assert break_even(4, 0.9, 1.5) == float("inf")  # a draft nearly as slow as the model never pays
    # memory-bound: 5 tokens cost one read; compute-bound: they cost 5 tokens at the prefill rate
    assert step_seconds(2e9, 20, 0.0, 50, 5) == pytest.approx(0.1)
    assert step_seconds(2e9, 20, 0.0, 10, 5) == pytest.approx(0.5)
    kw = dict(k=4, target_bytes=2e9, draft_bytes=0.4e9, bandwidth_gbps=20, fixed_s=0.0, draft_fixed_s=0.0,
              prefill_tps=50, memory_bytes=5e8, used_bytes=3e9, budget_bytes=4e9)
    good = plan_draft("model", acceptance=0.8, **kw)
    assert good.pays_off and good.fits and good.predicted_speedup > 1 and "pays off above" in good.why
    assert not plan_draft("model", acceptance=0.05, **kw).pays_off
    tight = plan_draft("model", acceptance=0.8, **{**kw, "budget_bytes": 3.2e9})
    assert not tight.fits and not tight.pays_off and "GB more" in tight.why
    measured = plan_draft("lookup", acceptance=0.9, tokens_per_step=1.05, **{**kw, "memory_bytes": 0})
    assert measured.predicted_speedup == pytest.approx(1.05 / measured.verify_ratio)


# -- llama.cpp: the same tokens, fewer steps -----------------------------------------------------

@pytest.fixture(scope="module")
def drafted(smollm2_bundle):
    # draft_min=1: verify a draft wherever the lookup finds one, whether or not it pays on this machine
    # (on two cores SmolLM2's batches cost compute, so the adaptive length would mostly not draft)
    with packager.load(smollm2_bundle, deterministic=True, n_threads=1, n_ctx=1024, draft="lookup", draft_min=1) as m:
        yield m


def _both(m, fn, **kw):
    """(undrafted, drafted) results of ``fn(m, **kw)``: (text, finish_reason, n_generated) each.

    Drafting's promise is the undrafted reply from the same state of the cache; the models compared here load
    with deterministic=True, so each call starts from the state a fresh load has (by default a call continues
    from the cache, and reading a prompt's last token alone instead of in its batch can flip a near-tie)."""
    out = []
    for spec in (False, True):
        s = fn(m, speculative=spec, **kw)
        out.append(("".join(s), s.finish_reason, s.n_generated))
    return out


def _chat(content):
    return lambda m, **kw: m.chat([{"role": "user", "content": content}], stream=True, **kw)


@pytest.mark.slow
def test_the_engine_is_batch_invariant_with_flash_attention(drafted):
    # What makes identity possible at all; where it fails (another CPU's kernels) drafts are off.
    assert drafted.draft == "lookup" and drafted.draft_batch >= 5


@pytest.mark.parametrize("content", [CODE, PASSAGE, CHAT])
@pytest.mark.parametrize("max_tokens", [1, 7, 200])
@pytest.mark.slow
def test_greedy_tokens_are_identical_with_and_without_drafts(drafted, content, max_tokens):
    plain, spec = _both(drafted, _chat(content), temperature=0.0, max_tokens=max_tokens)
    assert spec == plain
    if max_tokens == 200:
        assert plain[1] == "stop"  # the model ended its reply (EOS) inside the budget
        if content != CHAT:  # replies that repeat their input: drafts were kept
            st = drafted.draft_stats
            assert st.accepted > 0 and st.steps < plain[2]


@pytest.mark.slow
@pytest.mark.parametrize("lone", ["one thread", "filler row"])
def test_identical_past_512_cache_cells_with_two_threads(smollm2_bundle, lone):
    # llama.cpp's flash attention splits a lone token's cache across threads from 512 cells on, which
    # sums in another order than a batch: the drafted model runs such a token on one thread, or (where
    # that costs more than a batch of two) never evaluates a lone token there (a filler row); else these
    # replies, which cross 256 tokens of context, would differ (measured: one of three).
    from packager.measure.quality import default_evaluation_text
    from packager.measure.speculative import PROMPT, passages

    with packager.load(smollm2_bundle, deterministic=True, n_threads=2, n_ctx=1024, draft="lookup", draft_min=1) as m:
        if lone == "one thread":
            assert m.lone_threads in (1, None)  # measured at load: 1 where it is the cheaper way
            m.lone_threads = 1
        else:
            m.lone_threads = None
        for passage in passages(default_evaluation_text(), 3):
            msgs = [{"role": "user", "content": PROMPT.format(passage=passage)}]
            n_prompt = len(m._chat_prompt(msgs)[0])
            plain, spec = _both(m, lambda m, **kw: m.chat(msgs, stream=True, **kw), temperature=0.0, max_tokens=200)
            assert spec == plain
            assert n_prompt + plain[2] > 256 or plain[1] == "stop"


@pytest.mark.slow
def test_a_chat_continued_from_the_cache_is_identical_with_and_without_drafts(smollm2_bundle):
    # The default path: each turn reads only what the cache lacks. Two models that went through the same turns
    # hold the same cache (drafted rows equal single steps bit for bit), so their replies agree turn by turn.
    kw = dict(temperature=0.0, max_tokens=60)
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=1024, draft="lookup", draft_min=1) as a, \
            packager.load(smollm2_bundle, n_threads=1, n_ctx=1024, draft="lookup", draft_min=1) as b:
        msgs = []
        for content in (CODE, "Now add a docstring to each function.", PASSAGE):
            msgs.append({"role": "user", "content": content})
            plain, spec = a.chat(msgs, speculative=False, **kw), b.chat(msgs, **kw)
            assert spec == plain
            msgs.append({"role": "assistant", "content": plain})
        assert b.draft_stats.accepted > 0


@pytest.mark.slow
def test_identical_with_stop_strings(drafted):
    for stop in (["hints"], ["\n\n"], ["def scale"]):
        plain, spec = _both(drafted, _chat(CODE), temperature=0.0, max_tokens=200, stop=stop)
        assert spec == plain and plain[1] == "stop"


@pytest.mark.slow
def test_identical_at_the_end_of_the_context(smollm2_bundle):
    with packager.load(smollm2_bundle, deterministic=True, n_threads=1, n_ctx=128, draft="lookup", draft_min=1) as m:
        ids = m.tokenize(CODE * 2)[:100]
        plain, spec = _both(m, lambda m, **kw: m.stream(ids, **kw), temperature=0.0, max_tokens=500)
        assert spec == plain
        assert plain[1] == "stop" or plain[2] == 128 - 100  # EOS, or every free position of the context used


@pytest.mark.slow
def test_identical_on_a_raw_prompt_and_a_long_conversation(drafted):
    plain, spec = _both(drafted, lambda m, **kw: m.stream(CODE, **kw), temperature=0.0, max_tokens=120)
    assert spec == plain
    turns = [{"role": "user", "content": PASSAGE}, {"role": "assistant", "content": "A flood, then a good harvest."},
             {"role": "user", "content": CODE}]
    plain, spec = _both(drafted, lambda m, **kw: m.chat(turns, stream=True, **kw), temperature=0.0, max_tokens=150)
    assert spec == plain


@pytest.mark.slow
def test_a_seeded_sampled_reply_is_the_same_with_and_without_drafts(drafted):
    kw = dict(temperature=0.7, top_k=20, top_p=0.9, max_tokens=80)
    for seed in (3, 4):
        plain, spec = _both(drafted, _chat(CODE), seed=seed, **kw)
        assert spec == plain
        assert drafted.draft_stats.accepted > 0  # drafts were verified and kept along the way


@pytest.mark.slow
def test_sampled_drafting_draws_from_llama_cpps_distribution(smollm2_bundle, drafted):
    # Many seeds, four tokens each, drafted (Gumbel-max over llama.cpp's logits) against the bundle
    # loaded without a draft (llama.cpp's own sampler chain): the replies' distributions agree
    # (two-sample chi-square over the replies seen at least 5 times in all).
    from scipy.stats import chi2_contingency

    msgs = [{"role": "user", "content": CODE}]
    kw = dict(temperature=1.0, top_k=3, max_tokens=4)
    counts: dict[bool, dict[str, int]] = {False: {}, True: {}}
    kept = 0
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=1024, draft=False) as plain:
        for seed in range(150):
            for spec, m in ((False, plain), (True, drafted)):
                text = m.chat(msgs, seed=seed, **kw)
                counts[spec][text] = counts[spec].get(text, 0) + 1
                kept += m.draft_stats.accepted if spec else 0
    assert kept > 0  # drafts were kept: the drafted path was exercised
    keys = sorted(k for k in set(counts[False]) | set(counts[True]) if counts[False].get(k, 0) + counts[True].get(k, 0) >= 5)
    rest = [150 - sum(counts[s].get(k, 0) for k in keys) for s in (False, True)]
    table = [[counts[s].get(k, 0) for k in keys] + [rest[i]] for i, s in enumerate((False, True))]
    table = [[row[j] for j in range(len(row)) if table[0][j] + table[1][j] > 0] for row in table]
    assert len(table[0]) >= 2  # the prompt has more than one likely reply at this temperature
    assert chi2_contingency(table).pvalue > 1e-3


@pytest.mark.slow
def test_a_repeat_penalty_goes_undrafted(drafted):
    s = drafted.chat([{"role": "user", "content": CODE}], stream=True, temperature=0.0, repeat_penalty=1.1,
                     max_tokens=40)
    "".join(s)
    assert drafted.draft_stats.steps == 0


@pytest.mark.slow
def test_cancel_and_close_stop_a_drafted_stream(smollm2_bundle):
    m = packager.load(smollm2_bundle, deterministic=True, n_threads=1, n_ctx=512, draft="lookup", draft_min=1)
    s = m.chat([{"role": "user", "content": CODE}], stream=True, temperature=0.0, max_tokens=200)
    next(s)
    s.cancel()
    assert list(s) == [] and s.finish_reason == "cancelled"
    # the model is free and gives the same reply as before
    a = m.chat([{"role": "user", "content": CODE}], temperature=0.0, max_tokens=30)
    b = m.chat([{"role": "user", "content": CODE}], temperature=0.0, max_tokens=30, speculative=False)
    assert a == b
    s = m.chat([{"role": "user", "content": CODE}], stream=True, temperature=0.0, max_tokens=200)
    next(s)
    m.close()
    assert list(s) == [] and s.finish_reason == "cancelled"
    with pytest.raises(ModelClosedError):
        m.generate("Hi")


@pytest.mark.slow
def test_eight_threads_share_a_drafted_model(drafted):
    prompts = [CODE, PASSAGE, CHAT, CODE, PASSAGE, CHAT, CODE, PASSAGE]
    want = {p: drafted.chat([{"role": "user", "content": p}], temperature=0.0, max_tokens=60, speculative=False)
            for p in set(prompts)}
    got: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def run(p: str) -> None:
        try:
            got.append((p, drafted.chat([{"role": "user", "content": p}], temperature=0.0, max_tokens=60)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(got) == 8
    assert all(text == want[p] for p, text in got)


@pytest.mark.slow
def test_bad_draft_options(smollm2_bundle):
    with pytest.raises(UsageError, match="draft must be"):
        packager.load(smollm2_bundle, draft=42)
    with pytest.raises(UsageError, match="medusa: not a GGUF file"):
        packager.load(smollm2_bundle, draft="medusa")
    with pytest.raises(UsageError, match="draft_min <= draft_max"):
        packager.load(smollm2_bundle, draft="lookup", draft_min=3, draft_max=2)
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=256) as m:
        with pytest.raises(UsageError, match="speculative must be True or False"):
            m.generate("Hi", speculative="yes")
        assert m.draft is None  # a bundle packed without a draft decodes as it always did


# -- a draft model -------------------------------------------------------------------------------

def _requantized(src, dst, ftype_name):
    """``src`` re-quantized by llama.cpp to another type (a smaller or larger copy of the same model)."""
    import ctypes

    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype_name}"), True, 2
    assert lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.fixture(scope="module")
def q4_0_draft(smollm2_bundle, tmp_path_factory):
    bundle = verified(smollm2_bundle)
    return _requantized(bundle.model_file, tmp_path_factory.mktemp("draft") / "draft-Q4_0.gguf", "Q4_0")


@pytest.mark.slow
def test_a_draft_model_gives_the_same_greedy_tokens(smollm2_bundle, q4_0_draft):
    with packager.load(smollm2_bundle, deterministic=True, n_threads=1, n_ctx=1024, draft=q4_0_draft, draft_min=2) as m:
        assert m.draft == "model"
        for content in (CODE, CHAT):
            plain, spec = _both(m, _chat(content), temperature=0.0, max_tokens=120)
            assert spec == plain
            st = m.draft_stats
            assert st.acceptance > 0.5 and st.steps < plain[2]  # the same model at 4 bits agrees most of the time
        a = m.chat([{"role": "user", "content": CHAT}], temperature=0.8, seed=5, max_tokens=40)
        assert m.draft_stats.accepted > 0 and a == m.chat([{"role": "user", "content": CHAT}], temperature=0.8,
                                                            seed=5, max_tokens=40)


@pytest.mark.slow
def test_a_draft_with_another_tokenizer_or_not_smaller_is_refused(smollm2_bundle, tmp_path):
    import models

    other = models.llama_cpp_src() / "models" / "ggml-vocab-qwen2.gguf"
    with pytest.raises(UsageError, match=r"another tokenizer .*tokenizer\.ggml\.\w+ differs"):
        packager.load(smollm2_bundle, draft=other)
    bundle = verified(smollm2_bundle)
    bigger = _requantized(bundle.model_file, tmp_path / "draft-Q8_0.gguf", "Q8_0")
    with pytest.raises(UsageError, match="is not smaller than"):
        packager.load(smollm2_bundle, draft=bigger)


# -- pack model --draft ---------------------------------------------------------------------------

def _pack(*args, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "packager.cli", "model", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def lookup_pack(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("lookup")
    r = _pack(smollm2_gguf, "-o", out, "--draft", "lookup", "-q", "--json")
    assert r.returncode == 0, r.stderr
    return next(p for p in out.iterdir() if p.is_dir()), json.loads(r.stdout)


@pytest.mark.slow
def test_pack_measures_a_lookup_draft_and_the_bundle_uses_it(lookup_pack):
    bundle, man = lookup_pack
    d = man["draft"]
    m, plan = d["measured"], d["plan"]
    assert d["kind"] == "lookup" and m["identical"] and m["max_batch"] >= 2 and m["n_tokens"] > 0
    assert isinstance(m["identical_to_plain"], bool) and m["speedup"] > 0
    assert 0 < m["acceptance"] <= 1 and m["tokens_per_step"] >= 1
    assert plan["verify_ratio"] >= 1 and plan["draft_ratio"] == 0 and plan["memory_bytes"] == 0
    assert d["enabled"] == plan["pays_off"] and d["why"]
    card = (bundle / "README.md").read_text(encoding="utf-8")  # the model card says what the manifest says
    assert "## Speculative decoding" in card and f"{m['speedup']:.2f}x decode speed" in card
    assert ("on by default" if d["enabled"] else "not shipped") in card
    with packager.load(bundle, n_threads=1) as model:
        assert model.draft == ("lookup" if d["enabled"] else None)
    with packager.load(bundle, n_threads=1, draft=False) as model:
        assert model.draft is None


@pytest.mark.slow
def test_pack_bench_records_the_draft_beside_plain_decoding(lookup_pack):
    from packager.measure.bench import BenchOptions, run_bench
    from packager.measure.records import markdown

    bundle, man = lookup_pack
    if not man["draft"]["enabled"]:
        pytest.skip(f"the plan left the draft off: {man['draft']['why']}")
    records = run_bench(bundle, BenchOptions(n_prompt=16, n_gen=48, repetitions=1, n_threads=1, warmup=False))
    sg = next(r for r in records if r["test"] == "sg48")
    assert sg["draft"] == "lookup" and sg["identical"] and sg["flash_attn"]
    assert sg["avg_ts"] > 0 and sg["plain_ts"] > 0 and sg["speedup"] == pytest.approx(sg["avg_ts"] / sg["plain_ts"])
    assert 0 <= sg["acceptance"] <= 1 and sg["tokens_per_step"] >= 1
    assert "vs no draft" in markdown(records) and "kept" in markdown(records)
    # the device matrix's report gets the same column
    from packager.measure.matrix_report import markdown as matrix_markdown

    cells = [{**r, "runner": "ci", "matrix_model": "smollm2", "run_id": "1"} for r in records]
    table = matrix_markdown(cells)
    assert "draft vs none" in table and f"lookup: {sg['speedup']:.2f}x" in table


def test_a_matrix_model_may_name_a_draft(tmp_path):
    from packager.errors import MatrixError
    from packager.measure.matrix import load_matrix

    path = tmp_path / "m.toml"
    path.write_text('targets = ["laptop"]\n[[model]]\nname = "s"\ndraft = "lookup"\n')
    assert load_matrix(path).models[0].draft == "lookup"
    path.write_text('targets = ["laptop"]\n[[model]]\nname = "s"\ndraft = 3\n')
    with pytest.raises(MatrixError, match="draft must be a string"):
        load_matrix(path)


@pytest.mark.slow
def test_pack_self_draft_ships_a_smaller_copy_only_where_it_pays(smollm2_gguf, tmp_path):
    # Q8_0, drafted by Q4_0: the draft reads about half the bytes (the bundle's own Q4_1 would be refused as
    # too close to Q4_0 to pay off)
    r = _pack(smollm2_gguf, "-o", tmp_path, "--quant", "Q8_0", "--allow-requantize", "--draft", "self:Q4_0", "-q",
              "--json")
    assert r.returncode == 0, r.stderr
    man = json.loads(r.stdout)
    d = man["draft"]
    assert d["kind"] == "model" and d["request"] == "self:Q4_0" and d["measured"]["identical"]
    assert d["measured"]["acceptance"] > 0.5  # the same model at 4 bits agrees with itself most of the time
    assert d["plan"]["memory_bytes"] > 0 and 0 < d["plan"]["draft_ratio"] < 1
    bundle = next(p for p in tmp_path.iterdir() if p.is_dir())
    files = {f["path"] for f in man["files"]}
    drafts = sorted(p.name for p in (bundle / "model").glob("draft-*"))
    if d["enabled"]:
        assert d["file"] in files and drafts == [Path(d["file"]).name]
        with packager.load(bundle, n_threads=1, deterministic=True) as model:
            assert model.draft == "model"
            text = model.chat([{"role": "user", "content": CHAT}], temperature=0.0, max_tokens=40)
            assert text == model.chat([{"role": "user", "content": CHAT}], temperature=0.0, max_tokens=40,
                                      speculative=False)
    else:
        assert drafts == [] and "file" not in d and any("--draft self:Q4_0" in w for w in man["warnings"])


def _nothing_written(out: Path) -> bool:
    """No bundle and no partial one (the writer's lock file may stay: it keeps two runs apart)."""
    return not out.exists() or [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []


def _slow_steps_target(tmp_path):
    """The laptop profile with a large fixed cost per layer and step: every step costs about the same."""
    import re
    from importlib.resources import files

    text = (files("packager.targets") / "laptop.toml").read_text()
    text = re.sub(r'(?m)^name = "laptop"$', 'name = "slow-steps"\ndecode_layer_overhead_us = 2000', text)
    path = tmp_path / "slow-steps.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("draft,message", [
    ("self:Q8_0", "is not smaller than the bundle's"),
    ("medusa", "use lookup, self:QUANT"),
    ("./nowhere", "checkpoint directory or its hub id"),
    ("self:Q9_X", "--draft self:Q9_X"),
    ("missing.gguf", "no such file"),
])
@pytest.mark.slow
def test_bad_drafts_are_one_line_exit_2_before_any_work(smollm2_gguf, tmp_path, draft, message):
    out = tmp_path / "dist"
    r = _pack(smollm2_gguf, "-o", out, "--draft", draft, "-q", timeout=300)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _nothing_written(out)


@pytest.mark.slow
def test_a_draft_with_another_tokenizer_is_refused_before_converting(smollm2_hf, tmp_path):
    import models

    out = tmp_path / "dist"
    other = models.llama_cpp_src() / "models" / "ggml-vocab-qwen2.gguf"
    r = _pack(smollm2_hf, "-o", out, "--draft", other, "-q", timeout=300)
    assert r.returncode == 2, r.stderr
    assert "another tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "tokenizer.ggml." in r.stderr and _nothing_written(out)


@pytest.mark.slow
def test_a_draft_bigger_than_the_target_is_refused_before_converting(smollm2_gguf, smollm2_bundle, tmp_path):
    bigger = _requantized(verified(smollm2_bundle).model_file, tmp_path / "big-Q8_0.gguf", "Q8_0")
    out = tmp_path / "dist"
    r = _pack(smollm2_gguf, "-o", out, "--draft", bigger, "-q", timeout=300)
    assert r.returncode == 2, r.stderr
    assert "is not smaller than" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _nothing_written(out)


def test_parse_draft_tells_a_checkpoint_from_a_file(tmp_path):
    from packager.pack.draft import draft_file, parse_draft
    from packager.quants import get_quant

    hub = parse_draft("Qwen/Qwen2.5-0.5B-Instruct")
    assert hub.kind == "hf" and hub.ref == "Qwen/Qwen2.5-0.5B-Instruct" and hub.label == hub.ref
    ckpt = tmp_path / "small"
    ckpt.mkdir()
    with pytest.raises(UsageError, match="without config.json"):
        parse_draft(str(ckpt))
    (ckpt / "config.json").write_text("{}")
    req = parse_draft(str(ckpt))
    assert req.kind == "hf" and req.ref == str(ckpt)
    from dataclasses import replace

    named = replace(req, quant=get_quant("Q4_K_M"), name="small")
    assert draft_file(named, "big") == "model/draft-small-Q4_K_M.gguf"


HUB_DRAFT = "edgepack-test/SmolLM2-4-layers"


@pytest.fixture(scope="module")
def checkpoint_draft_pack(smollm2_gguf, tmp_path_factory):
    """--draft as a hub id, found in a local HF cache (offline), as `--draft Qwen/Qwen2.5-0.5B-Instruct` runs."""
    import os

    import models
    from test_source import COMMIT, make_hub_cache

    draft = models.smollm2_hf_layers(4)
    cache = tmp_path_factory.mktemp("hub")
    make_hub_cache(cache, HUB_DRAFT, draft)
    out = tmp_path_factory.mktemp("ckpt-draft")
    r = _pack(smollm2_gguf, "-o", out, "--draft", HUB_DRAFT, "-q", "--json",
              env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    return draft, COMMIT, next(p for p in out.iterdir() if p.is_dir()), json.loads(r.stdout)


@pytest.mark.slow
def test_pack_converts_a_checkpoint_draft_and_measures_it(checkpoint_draft_pack):
    """A checkpoint with the target's tokenizer (SmolLM2 cut to 4 layers) is converted at the bundle's type
    (Q4_1, as the target's GGUF came), measured, planned, and shipped only where it pays."""
    draft, commit, bundle, man = checkpoint_draft_pack
    d = man["draft"]
    assert d["kind"] == "model" and d["request"] == HUB_DRAFT
    assert d["source"]["repo"] == HUB_DRAFT and d["source"]["revision"] == commit
    assert d["measured"]["identical"] and d["measured"]["n_tokens"] > 0
    assert 0 <= d["measured"]["acceptance"] <= 1 and d["plan"]["memory_bytes"] > 0 and 0 < d["plan"]["draft_ratio"] < 1
    weights = {f["path"]: f["sha256"] for f in d["source"]["files"]}
    import hashlib

    assert weights["model.safetensors"] == hashlib.sha256((draft / "model.safetensors").read_bytes()).hexdigest()
    drafts = sorted(p.name for p in (bundle / "model").glob("draft-*"))
    if d["enabled"]:
        assert drafts == ["draft-SmolLM2-4-layers-Q4_1.gguf"] and d["file"] == f"model/{drafts[0]}"
    else:  # 4 of 30 layers guess poorly: the plan leaves it out, and says so
        assert drafts == [] and "file" not in d and "pays off above" in d["why"]
        assert any(w.startswith(f"--draft {HUB_DRAFT}") for w in man["warnings"])


@pytest.mark.slow
def test_a_checkpoint_draft_with_another_tokenizer_or_not_smaller_is_refused(smollm2_gguf, smollm2_hf, tiny_qwen2,
                                                                              tmp_path):
    out = tmp_path / "dist"
    r = _pack(smollm2_gguf, "-o", out, "--draft", tiny_qwen2, "-q", timeout=300)
    assert r.returncode == 2, r.stderr
    assert "another tokenizer" in r.stderr and "tokenizer.ggml." in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and _nothing_written(out)
    # the whole SmolLM2 checkpoint at the bundle's own Q4_1 is as large as the target
    r = _pack(smollm2_gguf, "-o", out, "--draft", smollm2_hf, "-q", timeout=300)
    assert r.returncode == 2, r.stderr
    assert "is not smaller than" in r.stderr and len(r.stderr.strip().splitlines()) == 1 and _nothing_written(out)


@pytest.mark.slow
def test_a_target_too_small_for_self_drafting_is_refused(smollm2_gguf, tmp_path):
    out = tmp_path / "dist"
    r = _pack(smollm2_gguf, "-o", out, "--target", _slow_steps_target(tmp_path), "--quant", "Q8_0",
              "--allow-requantize", "--draft", "self:Q4_0", "-q", timeout=300)
    assert r.returncode == 2, r.stderr
    assert "too small for --draft self:Q4_0 to pay off" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _nothing_written(out)


def _plan(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "packager.cli", "plan", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_pack_plan_says_whether_a_draft_could_pay_off(smollm2_hf):
    """Before any conversion: the verify and draft costs on the target's roofline, the break-even, the memory."""
    import models

    r = _plan(smollm2_hf, "--target", "android", "--quant", "Q8_0", "--draft", "lookup", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    d = out["draft"]
    assert d["kind"] == "lookup" and d["k"] == 4 and d["memory_bytes"] == 0 and d["draft_ratio"] == 0
    assert d["verify_ratio"] >= 1 and d["best_speedup"] == pytest.approx(5 / d["verify_ratio"], rel=1e-3)
    assert d["predicted_speedup"] is None and (d["break_even"] is None or 0 < d["break_even"] <= 1)
    small = models.smollm2_hf_layers(4)
    r = _plan(smollm2_hf, "--target", "android", "--quant", "Q8_0", "--draft", small, "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["draft"]
    assert m["kind"] == "model" and m["memory_bytes"] > 0 and 0 < m["draft_ratio"] < 1
    assert m["fits"] == (out["plan"]["memory"]["total"] + m["memory_bytes"] <= out["plan"]["budget_bytes"])
    # a draft ratio of 0.3 (4 of 30 layers, and the same embeddings) makes it dearer than lookup
    assert m["best_speedup"] < d["best_speedup"]
    text = _plan(smollm2_hf, "--target", "android", "--quant", "Q8_0", "--draft", "self:Q4_0").stdout
    assert "  draft   self:Q4_0, 4 drafts a step, " in text and "pack model --draft self:Q4_0 measures" in text
    for args, message in ((("--draft", "self:Q8_0"), "is not smaller than the bundle's"),
                          (("--format", "onnx", "--draft", "lookup"), "--draft needs --format gguf"),
                          (("--draft", "medusa"), "use lookup, self:QUANT")):
        r = _plan(smollm2_hf, "--quant", "Q8_0", *args) if args[0] != "--format" else _plan(smollm2_hf, *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_draft_for_onnx_is_one_line_exit_2(smollm2_hf, tmp_path):
    r = _pack(smollm2_hf, "--format", "onnx", "--draft", "lookup", "-o", tmp_path, "-q", timeout=300)
    assert r.returncode == 2
    assert "--draft needs --format gguf" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _nothing_written(tmp_path)
