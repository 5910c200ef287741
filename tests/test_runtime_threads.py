"""One Model shared by threads: a UI thread and a worker, and an 8-thread race of generate,
stream, chat, cancel, tokenize and close. No crash, no mixed output, close ends it all."""

from __future__ import annotations

import itertools
import threading

import pytest

import packager
from packager.errors import ModelClosedError

PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Name a colour."}]
N = 8  # tokens per reply: short, the race is what is tested


@pytest.fixture(scope="module")
def refs(smollm2_bundle) -> dict[str, str]:
    """Greedy replies computed one at a time, each on a fresh context."""
    out = {}
    for p in PROMPTS:
        with packager.load(smollm2_bundle, n_threads=1, n_ctx=256) as m:
            out[p] = m.generate(p, max_tokens=N)
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=256) as m:
        out["chat"] = m.chat(CHAT, max_tokens=N)
    assert len(set(out.values())) == len(out)  # distinct replies: a mix-up would show
    return out


def test_ui_thread_tokenizes_while_worker_streams(smollm2_bundle, refs):
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=256) as m:
        s = m.stream(PROMPTS[1], max_tokens=60)
        started = threading.Event()
        pieces: list[str] = []

        def worker() -> None:
            for piece in s:
                pieces.append(piece)
                started.set()
            started.set()

        t = threading.Thread(target=worker)
        t.start()
        assert started.wait(120)
        answered_mid_stream = 0
        while t.is_alive():
            ids = m.tokenize("Hello there, UI thread")  # never waits for the stream
            assert m.detokenize(ids) == "Hello there, UI thread"
            answered_mid_stream += s.finish_reason is None
            if answered_mid_stream >= 3:
                s.cancel()  # the UI's Stop button
        t.join()
        assert answered_mid_stream >= 3 and s.finish_reason == "cancelled"
        assert "".join(pieces) == refs[PROMPTS[1]][: len("".join(pieces))] or "".join(pieces).startswith(refs[PROMPTS[1]])
        assert m.generate(PROMPTS[0], max_tokens=N) == refs[PROMPTS[0]]  # usable after the cancel


def test_eight_threads_race_generate_stream_chat_cancel_and_close(smollm2_bundle, refs):
    m = packager.load(smollm2_bundle, n_threads=1, n_ctx=256)
    errors: list[str] = []
    done = {"calls": 0}
    served: dict[str, int] = {}  # calls answered per thread
    lock = threading.Lock()
    closing = threading.Event()
    log: list[int] = []  # which stream each piece came from, in the order the pieces arrived
    serial = itertools.count()

    def logged(s):
        tag = next(serial)  # not id(s): ids of collected streams are reused
        for piece in s:
            with lock:
                log.append(tag)
            yield piece

    def record(ok: bool, what: str) -> None:
        with lock:
            done["calls"] += 1
            served[threading.current_thread().name] = served.get(threading.current_thread().name, 0) + 1
            if not ok:
                errors.append(what)
        if done["calls"] >= 24:
            closing.set()

    def full(i: int) -> None:  # generate / stream / chat, read to the end
        for k in range(100):
            p = PROMPTS[(i + k) % len(PROMPTS)]
            try:
                if i % 3 == 0:
                    out, ref = m.generate(p, max_tokens=N), refs[p]
                elif i % 3 == 1:
                    s = m.stream(p, max_tokens=N)
                    out, ref = "".join(logged(s)), refs[p]
                    if s.finish_reason == "cancelled":  # close() came while it was running
                        ok = ref.startswith(out)
                        record(ok, f"cancelled stream {out!r} not a prefix of {ref!r}")
                        return
                else:
                    s = m.chat(CHAT, stream=True, max_tokens=N)
                    out, ref = "".join(logged(s)), refs["chat"]
                    if s.finish_reason == "cancelled":
                        record(ref.startswith(out), f"cancelled chat {out!r} not a prefix of {ref!r}")
                        return
            except ModelClosedError:
                return
            record(out == ref, f"thread {i}: {out!r} != {ref!r}")

    def partial(i: int) -> None:  # read one piece, then close or cancel the stream
        for k in range(100):
            p = PROMPTS[k % len(PROMPTS)]
            try:
                s = m.stream(p, max_tokens=N)
                first = next(logged(s), "")
            except ModelClosedError:
                return
            if k % 2:
                s.close()
            else:
                s.cancel()
                rest = "".join(s)
                if rest:
                    record(False, f"cancelled stream went on with {rest!r}")
            record(refs[p].startswith(first), f"first piece {first!r} not the start of {refs[p]!r}")

    def tokens(i: int) -> None:
        text = "Thread-safe tokenizing, 42 times. 世界"
        while not closing.is_set() or not m.closed:
            try:
                ok = m.detokenize(m.tokenize(text, add_special=False)) == text
            except ModelClosedError:
                return
            if not ok:
                record(False, "tokenize round trip failed")

    def closer(i: int) -> None:
        closing.wait(600)
        m.close()

    crashed: list[str] = []
    hook = threading.excepthook
    threading.excepthook = lambda a: crashed.append(f"{a.thread.name}: {a.exc_type.__name__}: {a.exc_value}")
    workers = [full, full, full, full, partial, partial, tokens, closer]
    threads = [threading.Thread(target=w, args=(i,), name=f"{w.__name__}-{i}") for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    threading.excepthook = hook
    assert not [t.name for t in threads if t.is_alive()]
    assert crashed == [] and errors == []
    assert done["calls"] >= 24 and m.closed
    # serialized: once a stream has produced a piece, no other stream produces one until it has ended
    runs = [sid for i, sid in enumerate(log) if i == 0 or log[i - 1] != sid]
    assert len(runs) == len(set(runs)), "pieces of two streams interleaved"
    assert len(runs) >= 10  # enough streams ran for the check to mean something
    # first come, first served: no thread was starved by the others' back-to-back calls
    assert sorted(served) == sorted(t.name for t in threads[:6]), served
    with pytest.raises(ModelClosedError):
        m.generate("x")
