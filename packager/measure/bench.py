"""`pack bench`: tokens/s and memory of a bundle, each repetition in a fresh process.

    records = run_bench("dist/SmolLM2-135M-Instruct-laptop", BenchOptions(target="android"))

One record per test, as llama-bench writes them (a prefill test pp<N> and a
decode test tg<N>), with llama-bench's field names where they overlap and
edgepack's beside them: load time, time to first token, peak RSS of the child,
model bytes, the planner's predictions for the same configuration, and what of
the device class was emulated on this host and what could not be.

Each repetition is a fresh `python -m packager.measure.bench_child` (see there for what
it measures); one more run before them warms the page cache and the clocks and
is not counted. The child pins itself to as many of this host's fastest cores as
the emulated device has performance cores (its cpu_threads) and caps its private
memory at the device's budget (RLIMIT_DATA, Linux); peak RSS is compared with
the budget after every run on every OS.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packager import __version__, host
from packager.bundle.verify import Bundle, verified
from packager.errors import BenchError, BenchOutOfMemory, EdgepackError, UsageError, VerificationError
from packager.plan.planner import Overrides, memory, plan, scheme
from packager.plan.targets import Target, load_target, target_from_toml
from packager.progress import progress_bar
from packager.runtime import backend
from packager.spec.gguf import spec_from_gguf
from packager.spec.model import ModelSpec

SCHEMA = "edgepack.bench/1"
GPU_BACKENDS_NOTE = "GPU ({backends}): this host's {engine} has no GPU backend, so the run fell back to the CPU"


@dataclass(frozen=True)
class BenchOptions:
    """What `pack bench` measures; the defaults are llama-bench's (-p 512 -n 128 -r 5)."""

    target: str | None = None  # default: the target the bundle was packed for
    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 5
    n_threads: int | None = None  # default: the target's cpu_threads, bounded by this host's cores
    ram_bytes: int | None = None  # override the target's RAM (the ceiling is this x usable_ram_fraction)
    n_ctx: int | None = None  # default: the bundle's context, as an app loads it
    warmup: bool = True
    chat: bool = True  # the multi-turn chat's time to first token (turn 1, later turns), where the bundle chats
    enforce_mem_limit: bool = True
    timeout_s: float = 1800.0
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.n_prompt < 0 or self.n_gen < 0 or self.n_prompt + self.n_gen == 0:
            raise UsageError("-p and -n must be >= 0 and not both 0; e.g. -p 512 -n 128")
        if self.repetitions < 1:
            raise UsageError(f"-r must be at least 1, got {self.repetitions}")
        if self.n_threads is not None and self.n_threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.n_threads}")
        if self.n_ctx is not None and self.n_ctx < 16:
            raise UsageError(f"--ctx must be at least 16, got {self.n_ctx}")


@dataclass(frozen=True)
class Emulation:
    """How this host stands in for the target device class."""

    target: str
    n_threads: int
    cpus: tuple[int, ...] | None  # the CPUs each child is pinned to; None: not pinned
    mem_limit_bytes: int  # the target's usable RAM: the ceiling and the after-run check
    not_emulated: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())


def plan_emulation(tgt: Target, opts: BenchOptions, host_cpus: list[int]) -> Emulation:
    """Threads, pinned CPUs and the memory ceiling for ``tgt`` on a host with ``host_cpus`` (pure).

    ``host_cpus`` comes fastest core first (host.performance_cpus), so the target's
    performance-core count lands on this host's best cores, one thread per core.
    """
    notes: list[str] = []
    want = opts.n_threads or tgt.cpu_threads
    n = want if opts.n_threads else min(want, len(host_cpus))
    if n < want:
        notes.append(f"{tgt.name} has {want} threads; this host has {len(host_cpus)} usable CPUs: ran {n}")
    cpus: tuple[int, ...] | None = tuple(host_cpus[:n]) if n <= len(host_cpus) else None
    if cpus is None:
        notes.append(f"--threads {n} exceeds this host's {len(host_cpus)} usable CPUs: not pinned")
    ram = opts.ram_bytes if opts.ram_bytes is not None else tgt.ram_bytes
    limit = int(ram * tgt.usable_ram_fraction)
    not_emulated = [
        f"memory bandwidth (target {tgt.memory_bandwidth_gbps:g} GB/s; the host's own was used)",
        f"compute speed (target {tgt.compute_gflops:g} GFLOP/s; the host's cores ran at their own clock)",
    ]
    return Emulation(tgt.name, n, cpus, limit, tuple(not_emulated), tuple(notes))


def bench_target(bundle: Bundle, name: str | None) -> Target:
    """The target to emulate: the one named, else the one the bundle was packed for."""
    if name:
        return load_target(name)
    packed = bundle.meta.target
    try:
        return load_target(packed.get("name") or "laptop")
    except EdgepackError:  # packed for a profile this install lacks: use the values the manifest kept
        return target_from_toml(dict(packed.get("profile", {})), f"{bundle.path}/manifest.json: target.profile")


def predict(bundle: Bundle, tgt: Target, n_ctx: int, n_threads: int, n_prompt: int = 0,
            n_gen: int = 0) -> tuple[dict[str, Any] | None, str | None]:
    """The planner's memory and tokens/s for this bundle's quant and context on ``tgt``.

    ``memory_bytes`` is the plan's: the whole context in use (the worst case an app must survive);
    ``memory_bytes_at_run`` is the same model at the fill a run of ``n_prompt`` + ``n_gen`` tokens
    reaches, the figure its peak RSS compares with.
    """
    m = bundle.meta
    try:
        spec = bundle_spec(bundle)
        p = plan(spec, tgt, Overrides(quant=m.quant, format=m.format, n_ctx=n_ctx, n_threads=n_threads))
        at_run = memory(spec, scheme(m.format, m.quant), n_ctx, p.kv_type, fmt=m.format, arch=tgt.arch,
                        n_kv=max(n_prompt + n_gen, 1), n_tokens=max(min(n_prompt, 512), 1))
    except EdgepackError as exc:
        return None, f"no prediction: {exc}"
    return {"memory_bytes": p.memory.total, "memory": asdict(p.memory), "memory_bytes_at_run": at_run.total,
            "decode_ts": p.predicted_decode_tps, "prefill_ts": p.predicted_prefill_tps}, None


def bundle_spec(bundle: Bundle) -> ModelSpec:
    """The model spec the manifest records; bundles packed before it did: the GGUF's own metadata."""
    if bundle.meta.spec is not None:
        try:
            return ModelSpec(**bundle.meta.spec)
        except (TypeError, EdgepackError) as exc:
            raise VerificationError(f"{bundle.path}/manifest.json: spec is not a model spec ({exc}); "
                                    f"pack the bundle again") from None
    if bundle.meta.format == "gguf":
        return spec_from_gguf(bundle.model_file)[0]
    raise VerificationError(f"{bundle.path}/manifest.json has no model spec; pack the bundle again")


def _poll_vram(pid: int, peak: list[int], done: threading.Event) -> None:
    while not done.wait(0.2):
        used = host.gpu_memory_used(pid)
        if used is None:
            return
        peak[0] = max(peak[0], used)


def run_child(cfg: dict[str, Any], *, timeout_s: float, gpu: bool = False) -> dict[str, Any]:
    """One repetition in a fresh interpreter; its JSON result, or a BenchError saying why not."""
    env = dict(os.environ, EDGEPACK_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "packager.measure.bench_child", json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_vram, done = [0], threading.Event()
    poller = threading.Thread(target=_poll_vram, args=(proc.pid, peak_vram, done), daemon=True) if gpu else None
    if poller:
        poller.start()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"a repetition ran past {timeout_s:.0f} s and was stopped; use smaller -p/-n or check the host") from None
    finally:
        done.set()
    result: dict[str, Any] | None = None
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    tail = " | ".join(err.strip().splitlines()[-3:])[-400:]
    limited = bool(cfg.get("mem_limit_bytes")) and cfg.get("enforce_mem_limit", True)
    if result is None:
        rc = proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit code {rc}"
        died = {-getattr(signal, s) for s in ("SIGKILL", "SIGABRT", "SIGSEGV", "SIGBUS") if hasattr(signal, s)}
        if limited and rc in died:  # llama.cpp aborts (or the kernel kills) when an allocation fails
            raise BenchOutOfMemory(f"the benchmark process died ({how}) under the emulated memory ceiling of "
                                   f"{cfg['mem_limit_bytes'] / 1e9:.2f} GB; the bundle does not fit this device class "
                                   f"(stderr: {tail or 'empty'})")
        raise BenchError(f"the benchmark process crashed ({how}); stderr: {tail or 'empty'}")
    if not result.get("ok"):
        if result.get("oom") and limited:
            raise BenchOutOfMemory(f"out of memory under the emulated ceiling of {cfg['mem_limit_bytes'] / 1e9:.2f} GB "
                                   f"({result.get('error')}); the bundle does not fit this device class")
        raise BenchError(f"the benchmark failed: {result.get('error')}")
    result["peak_vram_bytes"] = peak_vram[0] if gpu else None
    return result


def run_repetition(cfg: dict[str, Any], *, timeout_s: float, gpu: bool = False) -> dict[str, Any]:
    """run_child, with an out-of-memory verdict confirmed before it is reported.

    Under the ceiling, an allocation that failed and a model file llama.cpp cannot read end
    alike ("failed to load model", an abort): the same run without the ceiling tells them
    apart. It costs one more run, and only when a run has already failed.
    """
    try:
        return run_child(cfg, timeout_s=timeout_s, gpu=gpu)
    except BenchOutOfMemory as oom:
        try:
            unlimited = run_child({**cfg, "enforce_mem_limit": False, "warmup": False}, timeout_s=timeout_s, gpu=gpu)
        except BenchError as again:
            raise BenchError(f"{again} (it fails without the emulated memory ceiling too: not for lack of memory)") from None
        peak = unlimited.get("peak_rss_bytes")
        raise BenchOutOfMemory(f"{oom} (without the ceiling the same run peaked at {peak / 1e9:.2f} GB RSS)"
                               if peak else str(oom)) from None


def _stats(samples_ns: list[int], n_tokens: int) -> dict[str, Any]:
    ts = [n_tokens * 1e9 / s for s in samples_ns]
    sd = statistics.stdev if len(samples_ns) > 1 else (lambda _: 0.0)
    return {"avg_ns": int(statistics.mean(samples_ns)), "stddev_ns": int(sd(samples_ns)), "avg_ts": statistics.mean(ts),
            "stddev_ts": sd(ts), "samples_ns": samples_ns, "samples_ts": ts}


def run_bench(bundle_path: str | os.PathLike[str], opts: BenchOptions | None = None) -> list[dict[str, Any]]:
    """Benchmark a bundle; one record per test (pp, tg). Raises an EdgepackError when a run fails."""
    opts = opts or BenchOptions()
    bundle = verified(bundle_path, weights=True)  # a tampered bundle is refused before any run
    tgt = bench_target(bundle, opts.target)
    emu = plan_emulation(tgt, opts, host.performance_cpus())
    runtime = bundle.meta.runtime
    n_ctx = int(opts.n_ctx or runtime.n_ctx or 2048)
    if max(opts.n_prompt, opts.n_gen + 1) > n_ctx:
        whose = "--ctx" if opts.n_ctx else "the bundle's context"
        raise UsageError(f"-p {opts.n_prompt} / -n {opts.n_gen} exceed {whose} of {n_ctx} tokens; use smaller ones")
    predicted, predict_note = predict(bundle, tgt, n_ctx, emu.n_threads, opts.n_prompt, opts.n_gen)
    gpu_name = host.gpu_info()
    _, load_options = backend(bundle)
    cfg = {"bundle": str(bundle.path), "n_threads": emu.n_threads, "n_ctx": n_ctx,
           "n_gpu_layers": runtime.n_gpu_layers if "n_gpu_layers" in load_options else None,
           "n_prompt": opts.n_prompt, "n_gen": opts.n_gen,
           "cpus": list(emu.cpus) if emu.cpus else None, "mem_limit_bytes": emu.mem_limit_bytes,
           "enforce_mem_limit": opts.enforce_mem_limit, "warmup": opts.warmup, "chat": opts.chat}
    runs: list[dict[str, Any]] = []
    total = opts.repetitions + (1 if opts.warmup else 0)
    with progress_bar(total=total, desc=f"bench {bundle.path.name} as {tgt.name}", unit="run", quiet=opts.quiet) as bar:
        for i in range(total):
            result = run_repetition(cfg, timeout_s=opts.timeout_s, gpu=gpu_name is not None)
            if not (opts.warmup and i == 0):
                runs.append(result)
            bar.update(1)
    return make_records(bundle, tgt, emu, opts, runs, predicted, predict_note, gpu_name)


def make_records(bundle: Bundle, tgt: Target, emu: Emulation, opts: BenchOptions, runs: list[dict[str, Any]],
                 predicted: dict[str, Any] | None, predict_note: str | None, gpu_name: str | None) -> list[dict[str, Any]]:
    """llama-bench-style records from the children's results (pure)."""
    first = runs[0]
    peak = max(r["peak_rss_bytes"] or 0 for r in runs) or None
    vram = [r["peak_vram_bytes"] for r in runs if r.get("peak_vram_bytes") is not None]
    applied = first.get("applied", {})
    notes = list(emu.notes) + list(applied.get("errors", []))
    not_emulated = list(emu.not_emulated)
    fallback = None
    gpu_backends = [b for b in tgt.backends if b != "cpu"]
    if gpu_backends and not first.get("gpu_offload"):
        fallback = GPU_BACKENDS_NOTE.format(backends=", ".join(gpu_backends), engine=first.get("engine") or "engine")
        not_emulated.append(fallback)
    elif not gpu_backends:
        not_emulated.append("GPU: none on the target (CPU inference)")
    if predict_note:
        notes.append(predict_note)
    within = peak <= emu.mem_limit_bytes if peak else None
    if within is False:
        notes.append(f"peak RSS {peak / 1e9:.2f} GB exceeds {tgt.name}'s usable {emu.mem_limit_bytes / 1e9:.2f} GB: "
                     "this bundle would not fit there")
    emulated = {
        "target": tgt.name, "threads": emu.n_threads, "cpus": applied.get("cpus"), "mem_limit_bytes": emu.mem_limit_bytes,
        "mem_limit_enforced": applied.get("mem_limit"), "mem_checked_after": True, "within_budget": within,
        "not_emulated": not_emulated, "notes": notes,
    }
    loads = [r["load_s"] for r in runs]
    ttfts = [r["ttft_s"] for r in runs]
    apps = [r["app_tg_ts"] for r in runs if r.get("app_tg_ts")]
    chats = [r["chat_ttfts"] for r in runs if r.get("chat_ttfts")]
    common = {
        "schema": SCHEMA, "edgepack_version": __version__, "engine": first.get("engine"),
        "bundle": str(bundle.path), "model_name": bundle.meta.name,
        "model_filename": str(bundle.model_file), "model_type": first["model_type"], "model_size": first["model_size"],
        "model_n_params": first["model_n_params"], "backends": first["backends"], "cpu_info": host.cpu_info(),
        "gpu_info": gpu_name or "", "n_threads": first["n_threads"], "n_gpu_layers": first["n_gpu_layers"],
        "n_batch": first["n_batch"], "n_ubatch": first["n_ubatch"], "type_k": first["type_k"], "type_v": first["type_v"],
        "flash_attn": first["flash_attn"], "n_ctx": first["n_ctx"],
        # The context the runs loaded with, and where it came from: the bundle's plan (what the app
        # loads) unless --ctx chose another (llama-bench's is -p + -n).
        "n_ctx_from": "--ctx" if opts.n_ctx else "bundle", "bundle_n_ctx": bundle.meta.runtime.n_ctx,
        "target": tgt.name, "format": bundle.meta.format, "quant": bundle.meta.quant,
        "model_bytes": bundle.model_bytes, "repetitions": len(runs), "warmup": opts.warmup,
        "load_s": statistics.mean(loads), "load_s_samples": loads,
        "ttft_s": statistics.mean(ttfts), "ttft_s_samples": ttfts,
        # A four-turn chat with a ~700-token system prompt (measure/chat_turns.py): the first turn reads it all,
        # later turns only their new message where the runtime continues from its cache.
        "ttft_chat_first_s": statistics.mean(c[0] for c in chats) if chats else None,
        "ttft_chat_later_s": statistics.mean(statistics.mean(c[1:]) for c in chats) if chats else None,
        "ttft_chat_samples": chats or None,
        "peak_rss_bytes": peak, "peak_rss_samples": [r["peak_rss_bytes"] for r in runs],
        "peak_vram_bytes": max(vram) if vram else None,
        "predicted_rss_bytes": predicted["memory_bytes"] if predicted else None,  # the planned context, full
        "predicted_rss_at_run_bytes": predicted["memory_bytes_at_run"] if predicted else None,  # this run's fill
        "predicted_memory": predicted["memory"] if predicted else None,
        "emulated": emulated, "fallback": fallback, "host": host.host(),
        "readings": [{"before": r.get("readings_before"), "after": r.get("readings_after")} for r in runs],
        "test_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "status": "ok",
    }
    records = []
    if opts.n_prompt:
        records.append({**common, "test": f"pp{opts.n_prompt}", "n_prompt": opts.n_prompt, "n_gen": 0,
                        **_stats([r["pp_ns"] for r in runs], opts.n_prompt),
                        "predicted_ts": predicted["prefill_ts"] if predicted else None})
    if opts.n_gen:
        records.append({**common, "test": f"tg{opts.n_gen}", "n_prompt": 0, "n_gen": opts.n_gen,
                        **_stats([r["tg_ns"] for r in runs], opts.n_gen),
                        "predicted_ts": predicted["decode_ts"] if predicted else None,
                        "app_tg_ts": statistics.mean(apps) if apps else None})
    drafted = [r["sg"] for r in runs if r.get("sg")]
    if drafted:
        records.append({**common, "test": f"sg{opts.n_gen}", "n_prompt": 0, "n_gen": opts.n_gen, **_drafted(drafted),
                        "predicted_ts": None})
    return records


def _drafted(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The sg test: greedy decode with the bundle's draft (avg_ts) beside the same reply from the bundle
    loaded without it (plain_ts). ``identical``: the drafted model gave the same text with drafts off."""
    with_draft = [r["draft_n"] * 1e9 / r["draft_ns"] for r in runs if r["draft_ns"]]
    plain = [r["plain_n"] * 1e9 / r["plain_ns"] for r in runs if r["plain_ns"]]
    sd = statistics.stdev if len(runs) > 1 else (lambda _: 0.0)
    return {"avg_ts": statistics.mean(with_draft), "stddev_ts": sd(with_draft), "samples_ts": with_draft,
            "plain_ts": statistics.mean(plain), "plain_samples_ts": plain,
            "speedup": statistics.mean(with_draft) / statistics.mean(plain),
            "acceptance": statistics.mean(r["acceptance"] for r in runs),
            "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in runs),
            "identical": all(r["identical"] for r in runs),
            "identical_to_plain": all(r["text"] == r["plain_text"] for r in runs), "draft": runs[0]["draft"]}


def failed_record(*, model: str, target: str, stage: str, error: BaseException | str, **extra: Any) -> dict[str, Any]:
    """The record of a matrix cell that could not be measured, with the reason."""
    reason = str(error) if isinstance(error, BaseException) else error
    kind = type(error).__name__ if isinstance(error, BaseException) else "Error"
    return {"schema": SCHEMA, "edgepack_version": __version__, "status": "failed", "stage": stage, "error_type": kind,
            "error": reason, "model_name": model, "target": target, "host": host.host(),
            "test_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def write_records(records: list[dict[str, Any]], path: Path) -> None:
    """Append records as JSON lines (one write, so concurrent appenders interleave whole lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
