"""One benchmark repetition, in a fresh process: ``python -m packager.measure.bench_child CONFIG_JSON``.

`pack bench` starts one of these per repetition so nothing (page cache aside)
carries over: each pays the app's own start-up, `packager.load`, and its first
request. The child applies the emulated device limits to itself before it
loads anything, then measures, in this order:

  load_s    packager.load(bundle) (the app's path: its n_ctx, threads, GPU layers, mmap)
  ttft_s    the first request through Model.stream, cold, as an app's first call
  chat      time to first token of each turn of a four-turn chat with a ~700-token system prompt
            (measure/chat_turns.py), where the bundle has a chat template and its context holds it
  warm-up   one prefill of the test's size and one decode step, not counted (llama-bench does the same)
  pp        n_prompt tokens evaluated as one prompt from an empty KV cache
  tg        n_gen tokens decoded one at a time from an empty KV cache
  sg        a bundle with a draft only: greedy replies of up to n_gen tokens to an input-grounded
            request with the draft, with drafts turned off (the same text?), and, once the model is
            closed, from the bundle loaded without its draft (decode rates from the first token)

pp and tg drive the engine inside the loaded Model (``Model.engine()``: llama.cpp's
context, or onnxruntime-genai's Generator) directly, as llama-bench does (a prompt
batch / single tokens evaluated, no sampling), so their figures compare with
llama-bench's for either format; the app's view of
decoding (Model.stream, sampling included) is reported beside them as
app_tg_ts. It prints one JSON object on stdout's last line; failures are
reported the same way (with "error"), so the parent can say why.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict
from typing import Any

from packager.host import readings
from packager.progress import quiet_llama_log
from packager.bundle.verify import read_bundle
from packager.errors import ContextOverflowError
from packager.measure.chat_turns import chat_ttfts
from packager.measure.quality import default_evaluation_text
from packager.measure.speculative import PROMPT, passages, timed_reply
from packager.runtime import backend, load
from packager.runtime.model import Model

TTFT_PROMPT = "The three best tips for staying healthy are"
APP_TOKENS = 32  # tokens streamed through Model.stream for app_tg_ts
# Messages llama.cpp / llama-cpp-python give when an allocation failed (under RLIMIT_DATA, say).
OOM_MARKERS = ("failed to create llama_context", "failed to load model", "bad_alloc", "cannot allocate",
               "out of memory", "failed to allocate", "memoryerror")


def apply_limits(cfg: dict[str, Any]) -> dict[str, Any]:
    """Pin CPUs and cap memory as the parent asked; say what took effect."""
    applied: dict[str, Any] = {"cpus": None, "mem_limit": None, "errors": []}
    cpus = cfg.get("cpus")
    if cpus:
        if hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(0, set(cpus))
                applied["cpus"] = sorted(os.sched_getaffinity(0))
            except OSError as exc:
                applied["errors"].append(f"CPU affinity not set: {exc}")
        else:  # Windows (and FreeBSD) through psutil; macOS has no CPU affinity at all
            try:
                import psutil

                psutil.Process().cpu_affinity(list(cpus))
                applied["cpus"] = sorted(psutil.Process().cpu_affinity())
            except (AttributeError, OSError, ValueError, ImportError) as exc:
                applied["errors"].append(f"CPU affinity is not available on {platform.system()} ({exc}); threads not pinned")
    limit = cfg.get("mem_limit_bytes")
    if limit and cfg.get("enforce_mem_limit", True):
        try:
            import resource

            # RLIMIT_DATA, not RLIMIT_AS: the GGUF is mmap'd read-only (file pages, counted in RSS
            # but not in the data segment) and glibc/ggml reserve far more address space than they
            # touch; RLIMIT_AS would kill runs that fit. RLIMIT_DATA caps the private writable
            # memory (KV cache, compute buffers, the Python heap); peak RSS is checked after.
            soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
            new = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (new, hard))
            if platform.system() == "Linux":
                applied["mem_limit"] = "RLIMIT_DATA"
            else:  # macOS accepts the call but does not enforce it on mmap'd memory
                applied["errors"].append(f"RLIMIT_DATA is not enforced on {platform.system()}; peak RSS checked after")
        except (ImportError, ValueError, OSError) as exc:
            applied["errors"].append(f"memory ceiling not enforced ({exc}); peak RSS checked after")
    return applied


def peak_rss_bytes() -> int | None:
    """This process's high-water resident set (the kernel's, not a sampled one)."""
    try:
        # Linux: VmHWM belongs to this program's own address space. ru_maxrss would not do: it
        # keeps the high-water mark of the forked copy of the parent from before exec, so a
        # benchmark started from a 2 GB process (an app, pytest) reported 2 GB for a 0.2 GB model.
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if platform.system() == "Darwin" else int(peak) * 1024  # macOS: bytes, Linux: KiB
    except ImportError:  # Windows
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0)) or None


def _tokens(n: int, vocab: int, bos: int | None, seed: int) -> list[int]:
    """A prompt of n tokens: BOS then pseudo-random ids, as llama-bench builds its pp prompt."""
    rng = random.Random(seed)
    toks = [rng.randrange(vocab) for _ in range(n)]
    if toks and bos is not None and bos >= 0:
        toks[0] = bos
    return toks


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    before = readings()
    bundle = read_bundle(cfg["bundle"])
    cls, _ = backend(bundle)
    t = time.perf_counter()
    importlib.import_module(cls.ENGINE)  # imported first so load_s is the model's load alone
    with quiet_llama_log():
        t_load = time.perf_counter()
        overrides = {"n_threads": cfg["n_threads"], "n_ctx": cfg.get("n_ctx")}
        if cfg.get("n_gpu_layers") is not None:
            overrides["n_gpu_layers"] = cfg["n_gpu_layers"]
        model = load(cfg["bundle"], **overrides)
        load_s = time.perf_counter() - t_load
        import_s = t_load - t
        with model:
            out = _run(model, cfg)
        if out.get("sg"):
            out["sg"].update(_plain(cfg, overrides, int(cfg["n_gen"])))

    out.update(load_s=load_s, import_s=import_s, readings_before=before, readings_after=readings())
    return out


def _run(model: Model, cfg: dict[str, Any]) -> dict[str, Any]:
    n_prompt, n_gen = int(cfg["n_prompt"]), int(cfg["n_gen"])

    # The app's first request: time to the first streamed piece, then its decode rate.
    t0 = time.perf_counter()
    stamps = []
    for _ in model.stream(TTFT_PROMPT, max_tokens=min(APP_TOKENS, max(n_gen, 1)), temperature=0.0, seed=0):
        stamps.append(time.perf_counter())
    ttft_s = (stamps[0] if stamps else time.perf_counter()) - t0
    app_tg_ts = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) >= 3 and stamps[-1] > stamps[0] else None

    chat = None
    if cfg.get("chat", True):
        try:
            chat = chat_ttfts(model)
        except ContextOverflowError:  # a context planned shorter than the conversation
            chat = None

    engine = model.engine()  # the context the app's generation used, driven as llama-bench drives it
    prompt = _tokens(n_prompt, engine.n_vocab, engine.bos, seed=1)
    gen = _tokens(max(n_gen, 1), engine.n_vocab, engine.bos, seed=2)
    if cfg.get("warmup", True):
        engine.reset()
        engine.eval(prompt if n_prompt else gen[:1])
        engine.reset()
        engine.eval(gen[:1])
    pp_ns = tg_ns = None
    if n_prompt:
        engine.reset()
        t = time.perf_counter_ns()
        engine.eval(prompt)
        pp_ns = time.perf_counter_ns() - t
    if n_gen:
        engine.reset()
        t = time.perf_counter_ns()
        for tok in gen[:n_gen]:
            engine.eval([tok])
        tg_ns = time.perf_counter_ns() - t
    out = {"ttft_s": ttft_s, "app_tg_ts": app_tg_ts, "chat_ttfts": chat, "pp_ns": pp_ns, "tg_ns": tg_ns, **asdict(engine.info)}
    if n_gen and getattr(model, "draft", None):
        out["sg"] = _drafted(model, n_gen)
    return out


def _grounded_prompt() -> str:
    return PROMPT.format(passage=passages(default_evaluation_text(), 1)[0])


def _greedy(model: Model, n_gen: int, **kw: Any) -> tuple[str, int, int]:
    """A greedy reply of up to n_gen tokens after its first: text, ns from the first token, tokens in them."""
    text, seconds, n = timed_reply(model, _grounded_prompt(), max_tokens=n_gen + 1, **kw)
    return text, int(seconds * 1e9), n


def _drafted(model: Model, n_gen: int) -> dict[str, Any]:
    """Greedy decode with the bundle's draft on a reply that draws on its prompt, and whether turning the
    draft off per call gives the same text."""
    text, ns, n = _greedy(model, n_gen)
    st = model.draft_stats
    undrafted, _, _ = _greedy(model, n_gen, speculative=False)
    return {"draft": model.draft, "draft_ns": ns, "draft_n": n, "acceptance": st.acceptance,
            "tokens_per_step": st.tokens_per_step, "identical": undrafted == text, "text": text}


def _plain(cfg: dict[str, Any], overrides: dict[str, Any], n_gen: int) -> dict[str, Any]:
    """The same reply from the bundle loaded without its draft (llama.cpp's own loop), after the drafted
    model is closed, so the peak memory stays the drafted model's."""
    with load(cfg["bundle"], draft=False, **overrides) as model:
        text, ns, n = _greedy(model, n_gen)
    return {"plain_ns": ns, "plain_n": n, "plain_text": text}


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    applied = apply_limits(cfg)
    try:
        result = measure(cfg)
        result["ok"] = True
    except BaseException as exc:  # reported to the parent, which decides what it means
        text = f"{type(exc).__name__}: {exc}"
        result = {"ok": False, "error": text, "oom": isinstance(exc, MemoryError)
                  or any(m in text.lower() for m in OOM_MARKERS)}
    result["applied"] = applied
    result["peak_rss_bytes"] = peak_rss_bytes()
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
