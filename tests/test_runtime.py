"""packager.load on a real model (SmolLM2-135M-Instruct, llama.cpp): options, verification,
cancellation, context overflow, threads. One thread per model: the CI machine is shared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import packager
from packager.errors import ContextOverflowError, ModelClosedError, UsageError, VerificationError
from packager.runtime.model import GenOptions
from packager.runtime.stops import StopFilter
from packager.host import allowed_cpus, cpu_quota, default_threads, physical_cores

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def model(smollm2_bundle):
    # deterministic: these tests compare replies to the same prompt across calls (the default path continues
    # from the cache, where a near-tie can flip; tests/test_chat_cache.py holds that path)
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=512, deterministic=True) as m:
        yield m


# -- generate / stream / chat / tokens ------------------------------------------------------

def test_generate_stream_and_chat_agree(model):
    text = model.generate(STORY, max_tokens=12)
    s = model.stream(STORY, max_tokens=12)
    pieces = list(s)
    assert len(pieces) > 1 and "".join(pieces) == text  # streamed piece by piece, same text
    assert s.finish_reason == "length" and s.n_generated == 12
    assert s.n_prompt == len(model.tokenize(STORY))
    reply = model.chat(QUESTION, max_tokens=16)
    streamed = model.chat(QUESTION, stream=True, max_tokens=16)
    assert "".join(streamed) == reply and reply.strip()
    # the bundle's own template, system prompt included
    assert streamed.n_prompt > len(model.tokenize(QUESTION[0]["content"], add_special=False)) + 10


def _decode_batches(m):
    """Record every llama_decode batch of a LlamaModel as (position of its first token, size)."""
    llm, seen = m._llm, []
    real = llm._ctx.decode

    def spy(batch):
        seen.append((llm.n_tokens, batch.n_tokens()))
        return real(batch)

    llm._ctx.decode = spy
    return seen


def test_the_same_prompt_gives_the_same_tokens_whatever_came_before(smollm2_bundle):
    """The promise of deterministic=True: the same prompt and settings give the same output on a fresh load and
    on a model that generated before. llama.cpp's logits depend on how the prompt is cut into batches, so the
    test holds the mechanism, not one machine's rounding: a later call evaluates its prompt only in
    batches a fresh load evaluates too (it may skip whole cached blocks from position 0)."""
    long = STORY + " " + " ".join(f"Chapter {i}: the wizard walked on." for i in range(60))
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=2048, deterministic=True) as m:
        ids = m.tokenize(long)
        assert 512 + 16 < len(ids) < 1024 - 64  # two blocks of n_batch = 512: the first can be kept
        for prompt in (m.tokenize(STORY), ids):
            with packager.load(smollm2_bundle, n_threads=1, n_ctx=2048) as fresh_model:
                fresh_batches = _decode_batches(fresh_model)
                first = fresh_model.generate(prompt, max_tokens=6)
            fresh = [b for b in fresh_batches if b[0] < len(prompt)]
            m.generate(prompt, max_tokens=3)  # something before
            later_batches = _decode_batches(m)
            again = m.generate(prompt, max_tokens=6)
            later = [b for b in later_batches if b[0] < len(prompt)]
            assert again == first
            skipped = fresh[:len(fresh) - len(later)]
            assert fresh[len(skipped):] == later, (later, fresh)
            assert all(size == 512 for _, size in skipped)
        assert skipped == [(0, 512)]  # the long prompt kept its first block
        # a conversation that grows: the reply was decoded token by token, so only the block is kept
        grown = ids + m.tokenize(again + " And then?", add_special=False)
        batches = _decode_batches(m)
        m.generate(grown, max_tokens=2)
        assert [b for b in batches if b[0] < len(grown)][0] == (512, len(grown) - 512)


def test_tokenize_detokenize_round_trip(model):
    text = "Héllo, wörld! 世界 🙂 tabs\tand\nnewlines"
    ids = model.tokenize(text, add_special=False)
    assert ids and all(isinstance(i, int) for i in ids)
    assert model.detokenize(ids) == text
    assert model.tokenize("<|im_end|>", add_special=False) == [model.tokenize("<|im_end|>", add_special=False)[0]]


def test_max_tokens_stop_and_seed(model):
    s = model.stream(STORY, max_tokens=5)
    "".join(s)
    assert (s.finish_reason, s.n_generated) == ("length", 5)
    full = model.generate(STORY, max_tokens=24)
    word = full.split()[3]
    cut = model.stream(STORY, max_tokens=24, stop=[word])
    text = "".join(cut)
    assert cut.finish_reason == "stop" and word not in text and full.startswith(text)
    a = model.generate(STORY, max_tokens=16, temperature=1.2, seed=7)
    b = model.generate(STORY, max_tokens=16, temperature=1.2, seed=7)
    others = {model.generate(STORY, max_tokens=16, temperature=1.2, seed=s) for s in (1, 2, 3)}
    assert a == b and len(others | {a}) > 1
    # top_k=1 is greedy at any temperature; repeat_penalty and top_p are accepted and change sampling
    assert model.generate(STORY, max_tokens=16, temperature=1.5, top_k=1, seed=1) == model.generate(STORY, max_tokens=16)
    assert model.generate(STORY, max_tokens=40, repeat_penalty=2.0) != model.generate(STORY, max_tokens=40)
    def sampled(**opts) -> list[str]:
        return [model.generate(STORY, max_tokens=12, temperature=1.5, seed=s, **opts) for s in range(4)]

    free = sampled()
    assert sampled() == free  # seeded: the comparisons below are the options' doing
    assert sampled(top_p=0.3) != free and sampled(top_k=3) != free


def test_bad_options_are_usage_errors(model):
    for opts in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"stop": [3]},
                 {"truncate": "middle"}, {"max_new_tokens": 3}, {"seed": -1}):
        with pytest.raises(UsageError):
            model.generate("hi", **opts)
    with pytest.raises(UsageError, match="messages"):
        model.chat([{"role": "user"}])
    # token-id prompts: checked before llama.cpp sees them (it would fail mid-decode)
    for ids, msg in (([], "prompt is empty"), ([10**7], "not in the vocabulary"), ([5, -1], "not in the vocabulary")):
        with pytest.raises(UsageError, match=msg):
            model.generate(ids, max_tokens=2)
    assert model.generate(model.tokenize(STORY), max_tokens=4) == model.generate(STORY, max_tokens=4)


def test_stop_filter_holds_back_a_split_stop_string():
    f = StopFilter(["<|end|>"])
    assert f.feed("Hello <|") == ("Hello ", False)
    assert f.feed("en") == ("", False)
    assert f.feed("d|> more") == ("", True)
    g = StopFilter(["END"])
    assert g.feed("EN") == ("", False) and g.feed("D") == ("", True)
    h = StopFilter(["END"])
    assert h.feed("E") == ("", False) and h.feed("x") == ("Ex", False) and h.flush() == ""
    assert GenOptions.build({"temperature": 0.5}, {"stop": "x"}).stop == ("x",)


# -- lifecycle and verification ------------------------------------------------------------

def test_context_manager_and_close(smollm2_bundle):
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=256) as m:
        assert m.generate("Hi", max_tokens=2)
    assert m.closed
    for call in (lambda: m.generate("Hi"), lambda: m.tokenize("Hi"), lambda: m.chat(QUESTION)):
        with pytest.raises(ModelClosedError, match="closed"):
            call()
    m.close()  # twice is fine


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / bundle.name
    shutil.copytree(bundle, dst)
    return dst


def test_verify_on_load_names_the_file(smollm2_bundle, tmp_path):
    b = _copy(smollm2_bundle, tmp_path)
    gguf = next((b / "model").glob("*.gguf"))
    with open(gguf, "r+b") as f:  # same size, one byte of the last tensor changed
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    packager.load(b, n_threads=1, n_ctx=64).close()  # sizes match: weights are hashed only when asked
    with pytest.raises(VerificationError, match=f"model/{gguf.name}: changed"):
        packager.load(b, verify=True)
    (b / "README.md").write_text("tampered")
    with pytest.raises(VerificationError, match="README.md: changed"):
        packager.load(b)


def test_incomplete_or_newer_bundles_are_refused(smollm2_bundle, tmp_path):
    b = _copy(smollm2_bundle, tmp_path)
    (b / "README.md").unlink()
    with pytest.raises(VerificationError, match="README.md: missing"):
        packager.load(b)
    gguf = next((b / "model").glob("*.gguf"))
    with open(gguf, "r+b") as f:
        f.truncate(gguf.stat().st_size // 2)
    with pytest.raises(VerificationError, match=f"model/{gguf.name}: changed \\(size"):
        packager.load(b)
    man = json.loads((smollm2_bundle / "manifest.json").read_text())
    c = tmp_path / "newer"
    c.mkdir()
    (c / "manifest.json").write_text(json.dumps(dict(man, schema_version=99)))
    with pytest.raises(VerificationError, match="manifest.json has schema_version 99.*upgrade edgepack"):
        packager.load(c)
    with pytest.raises(VerificationError, match="no manifest.json"):
        packager.load(tmp_path)
    with pytest.raises(UsageError, match="unknown load option"):
        packager.load(smollm2_bundle, n_thread=2)


# -- context window ------------------------------------------------------------------------

def test_context_overflow_names_tokens_and_n_ctx(smollm2_bundle):
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=64) as m:
        long = "word " * 100
        n = len(m.tokenize(long))
        with pytest.raises(ContextOverflowError, match=f"has {n} tokens but the context holds 64"):
            m.generate(long)
        s = m.stream(long, max_tokens=8, truncate="left")
        text = "".join(s)
        assert s.n_prompt == 64 - 8 and (s.finish_reason, s.n_generated) in (("length", 8), ("stop", s.n_generated))
        assert text == m.generate(m.tokenize(long)[-(64 - 8):], max_tokens=8)  # the last 56 tokens were kept
        # a prompt that fits but leaves little room ends at the context's edge, never beyond it
        edge = m.stream("word " * 55, max_tokens=50)
        "".join(edge)
        assert edge.n_prompt + edge.n_generated <= 64 and edge.finish_reason in ("stop", "length")
        chat = [{"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "ok " * 30},
                {"role": "user", "content": "Say hi."}]
        with pytest.raises(ContextOverflowError, match="the conversation has .* tokens but the context holds 64"):
            m.chat(chat)
        s = m.chat(chat, stream=True, max_tokens=4, truncate="left")
        "".join(s)
        assert s.n_prompt + 4 <= 64  # the oldest turns went, the system prompt and last message stayed
        with pytest.raises(ContextOverflowError, match="last message"):
            m.chat([{"role": "user", "content": "word " * 100}], truncate="left")
        assert m.generate("The capital of France is", max_tokens=3)  # still usable


# -- cancellation ----------------------------------------------------------------------------

def test_closing_a_stream_midway_stops_decoding_and_leaves_model_usable(model):
    it = model.chat(QUESTION, stream=True, max_tokens=64)
    first = next(it)
    it.close()
    assert it.finish_reason == "cancelled" and it.n_generated <= 2
    assert model._llm.n_tokens <= it.n_prompt + it.n_generated  # nothing decoded after close
    again = model.chat(QUESTION, stream=True, max_tokens=64)
    assert next(again) == first  # same greedy start: nothing of the closed stream leaked
    again.close()
    with pytest.raises(StopIteration):
        next(again)


def _reader(stream, seen: list[str], got: threading.Event, k: int):
    def run() -> None:
        for piece in stream:
            seen.append(piece)
            if len(seen) >= k:
                got.set()
        got.set()
    return threading.Thread(target=run)


def test_cancel_from_another_thread_stops_within_a_token(model):
    s = model.stream(STORY, max_tokens=300)
    seen: list[str] = []
    got = threading.Event()
    t = _reader(s, seen, got, 5)
    t.start()
    assert got.wait(120)
    n_at_cancel = s.n_generated
    t0 = time.perf_counter()
    s.cancel()
    t.join(60)
    stopped_in = time.perf_counter() - t0
    assert not t.is_alive() and s.finish_reason == "cancelled"
    assert s.n_generated <= n_at_cancel + 1 < 300  # at most the token being decoded
    # model free at once: a short reply takes about as long as it does on an idle model
    t0 = time.perf_counter()
    model.generate("Hi", max_tokens=2)
    assert stopped_in < 10 * (time.perf_counter() - t0) + 1.0


def test_model_close_while_another_thread_streams(smollm2_bundle):
    m = packager.load(smollm2_bundle, n_threads=1, n_ctx=256)
    s = m.stream(STORY, max_tokens=200)
    seen: list[str] = []
    got = threading.Event()
    t = _reader(s, seen, got, 3)
    t.start()
    assert got.wait(120)
    m.close()  # cancels the stream at its next token, waits for it, frees the model
    t.join(60)
    assert not t.is_alive() and s.finish_reason == "cancelled" and s.n_generated < 200
    with pytest.raises(ModelClosedError):
        m.generate("Hi")


def test_second_stream_in_the_same_thread_is_refused_not_deadlocked(model):
    a = model.stream(STORY, max_tokens=20)
    next(a)
    b = model.stream("Hello", max_tokens=3)
    with pytest.raises(UsageError, match="still open in this thread"):
        next(b)
    a.close()
    assert "".join(b) == model.generate("Hello", max_tokens=3) and b.finish_reason in ("stop", "length")


def test_an_abandoned_stream_frees_the_model(model):
    def start() -> None:
        s = model.stream(STORY, max_tokens=50)
        next(s)  # dropped without close

    start()
    s = model.stream("Hi", max_tokens=2)
    "".join(s)
    assert (s.finish_reason, s.n_generated) == ("length", 2) or (s.finish_reason == "stop" and s.n_generated < 2)


# -- threads ---------------------------------------------------------------------------------

def test_default_threads_are_the_usable_physical_cores():
    n = default_threads()
    assert 1 <= n <= len(allowed_cpus())
    assert n <= (psutil.cpu_count(logical=False) or n)


def test_physical_cores_counts_hyperthreads_once(tmp_path):
    for cpu, core in ((0, 0), (1, 0), (2, 1), (3, 1)):  # two cores, two threads each
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(f"{core}\n")
        (topo / "physical_package_id").write_text("0\n")
    assert physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert physical_cores({0, 1}, tmp_path) == 1
    assert physical_cores({9}, tmp_path) == 0  # unknown: the caller falls back to psutil


def test_cpu_quota_of_the_cgroup_and_its_parents(tmp_path):
    proc = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    (v2 / "app" / "worker").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "app" / "cpu.max").write_text("250000 100000\n")  # docker --cpus 2.5, on the parent
    (v2 / "app" / "worker" / "cpu.max").write_text("max 100000\n")
    proc.write_text("0::/app/worker\n")
    assert cpu_quota(v2, proc) == 2.5
    proc.write_text("0::/\n")
    assert cpu_quota(v2, proc) is None  # unlimited
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "job").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:memory:/job\n2:cpu,cpuacct:/job\n")
    assert cpu_quota(v1, proc) == 1.5
    assert cpu_quota(v1, tmp_path / "absent") is None  # not Linux
    quota = cpu_quota()
    assert quota is None or default_threads() <= max(1, int(quota))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity API")
def test_threads_follow_the_affinity_mask(smollm2_bundle):
    code = ("import os, packager; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
            f"m = packager.load({str(smollm2_bundle)!r}, n_ctx=64); print(m.n_threads);"
            f"m2 = packager.load({str(smollm2_bundle)!r}, n_ctx=64, n_threads=3); print(m2.n_threads)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3"]  # one usable CPU -> one thread; an override wins
