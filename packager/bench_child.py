"""One benchmark repetition, in a fresh process: ``python -m packager.bench_child CONFIG_JSON``.

`pack bench` starts one of these per repetition so nothing (page cache aside)
carries over: each pays the app's own start-up, `packager.load`, and its first
request. The child applies the emulated device limits to itself before it
loads anything, then measures, in this order:

  load_s    packager.load(bundle) (the app's path: its n_ctx, threads, GPU layers, mmap)
  ttft_s    the first request through Model.stream, cold, as an app's first call
  warm-up   one prefill of the test's size and one decode step, not counted (llama-bench does the same)
  pp        n_prompt tokens evaluated as one prompt from an empty KV cache
  tg        n_gen tokens decoded one at a time from an empty KV cache

pp and tg drive the llama.cpp context inside the loaded Model directly, as
llama-bench does (llama_decode of a prompt batch / of single tokens, no
sampling), so their figures compare with llama-bench's; the app's view of
decoding (Model.stream, sampling included) is reported beside them as
app_tg_ts. It prints one JSON object on stdout's last line; failures are
reported the same way (with "error"), so the parent can say why.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from typing import Any

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


def _ggml_type_name(value: int | None) -> str | None:
    if value is None:
        return None
    try:
        import gguf

        return gguf.GGMLQuantizationType(int(value)).name.lower()
    except (ValueError, ImportError):
        return str(value)


def _backends(llama_cpp) -> str:
    """llama-bench's backends column: the ggml backends this llama.cpp build has ('CPU', 'CUDA', ...)."""
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    names = [part.split(":", 1)[0].strip() for part in info.split("|") if ":" in part and "=" not in part.split(":", 1)[0]]
    names = [n for n in names if n and n.isupper()]
    return ",".join(dict.fromkeys(names)) or "CPU"


def _tokens(n: int, vocab: int, bos: int | None, seed: int) -> list[int]:
    """A prompt of n tokens: BOS then pseudo-random ids, as llama-bench builds its pp prompt."""
    rng = random.Random(seed)
    toks = [rng.randrange(vocab) for _ in range(n)]
    if toks and bos is not None and bos >= 0:
        toks[0] = bos
    return toks


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    from packager.hostinfo import readings
    from packager.progress import quiet_llama_log

    before = readings()
    t = time.perf_counter()
    import llama_cpp  # imported first so load_s is the model's load alone

    from packager.runtime import load

    with quiet_llama_log():
        t_load = time.perf_counter()
        model = load(cfg["bundle"], n_threads=cfg["n_threads"], n_ctx=cfg.get("n_ctx"),
                     n_gpu_layers=cfg.get("n_gpu_layers"))
        load_s = time.perf_counter() - t_load
        import_s = t_load - t
        with model:
            out = _run(model, cfg)

    out.update(load_s=load_s, import_s=import_s, readings_before=before, readings_after=readings(),
               gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()), backends=_backends(llama_cpp),
               llama_cpp_python=getattr(llama_cpp, "__version__", None))
    return out


def _run(model, cfg: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    llm = model._llm  # the llama.cpp context packager.load built: the one the app uses

    def decode(tokens: list[int]) -> None:
        # llama_decode may return before a GPU backend (Metal, CUDA) has finished; Llama.eval reads no
        # logits, so nothing waits for it. Wait here, as llama-bench does after every decode.
        llm.eval(tokens)
        llama_cpp.llama_synchronize(llm._ctx.ctx)

    n_prompt, n_gen = int(cfg["n_prompt"]), int(cfg["n_gen"])
    vocab = llm.n_vocab()
    bos = llm.token_bos()

    # The app's first request: time to the first streamed piece, then its decode rate.
    t0 = time.perf_counter()
    stamps = []
    for _ in model.stream(TTFT_PROMPT, max_tokens=min(APP_TOKENS, max(n_gen, 1)), temperature=0.0, seed=0):
        stamps.append(time.perf_counter())
    ttft_s = (stamps[0] if stamps else time.perf_counter()) - t0
    app_tg_ts = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) >= 3 and stamps[-1] > stamps[0] else None

    prompt = _tokens(n_prompt, vocab, bos, seed=1)
    gen = _tokens(max(n_gen, 1), vocab, bos, seed=2)
    if cfg.get("warmup", True):
        llm.reset()
        decode(prompt if n_prompt else gen[:1])
        llm.reset()
        decode(gen[:1])
    pp_ns = tg_ns = None
    if n_prompt:
        llm.reset()
        t = time.perf_counter_ns()
        decode(prompt)
        pp_ns = time.perf_counter_ns() - t
    if n_gen:
        llm.reset()
        t = time.perf_counter_ns()
        for tok in gen[:n_gen]:
            decode([tok])
        tg_ns = time.perf_counter_ns() - t
    ctx = llm.context_params
    return {
        "ttft_s": ttft_s, "app_tg_ts": app_tg_ts, "pp_ns": pp_ns, "tg_ns": tg_ns,
        "model_type": llm._model.desc(), "model_size": int(llm._model.size()),
        "model_n_params": int(llm._model.n_params()), "n_ctx": llm.n_ctx(), "n_batch": llm.n_batch,
        "n_ubatch": int(ctx.n_ubatch), "type_k": _ggml_type_name(getattr(ctx, "type_k", None)),
        "type_v": _ggml_type_name(getattr(ctx, "type_v", None)), "n_threads": int(ctx.n_threads),
        "n_gpu_layers": int(llm.model_params.n_gpu_layers),
        "flash_attn": int(getattr(ctx, "flash_attn_type", getattr(ctx, "flash_attn", 0))),
    }


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
