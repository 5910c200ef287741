"""The planner: a pure function from (model spec, target, overrides) to a Plan.

It walks the target's quant ladder (best first) and takes the first quant whose
predicted memory fits what an app may use on the device, shrinking the context
before giving up. On a discrete GPU it puts every layer in VRAM when it can,
shrinking the context first (down to GPU_MIN_CONTEXT) and only then leaving
layers on the CPU. Every number comes with the arithmetic behind it
(``Plan.explain``), so a bench run can compare and the formulas can be corrected.

Each format's memory model (what its runtime allocates around the weights, as measured by
benchmarks/plan_calibration.py) and the layout of its weights come from its
:class:`~packager.formats.base.Format` (packager/formats/gguf.py, onnx.py); the search here is
the same for every format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from packager.errors import DoesNotFit, UsageError
from packager.formats import get_format
from packager.formats.base import (KV_BYTES, STATE_BYTES, MiB, Format, Memory, Scheme, gb as _gb, kv_bytes,
                                   padded_ctx, shared_kv_reads, state_bytes, window_cells)
from packager.formats.gguf import N_UBATCH, compute_bytes, overhead_bytes
from packager.formats.onnx import WASM_F32_LIMIT
from packager.formats.weights import Tensor, WeightLayout
from packager.plan.targets import Target
from packager.quants import QUANTS
from packager.spec.model import ModelSpec

__all__ = ["Memory", "Overrides", "Plan", "Shipping", "decode_tps", "kv_bytes", "memory", "plan", "prefill_tps",
           "scheme", "weight_layout"]

MIN_CONTEXT = 512  # the planner shrinks the context no further on its own
GPU_MIN_CONTEXT = 2048  # on a discrete GPU, shrink to this before leaving layers on the CPU
@dataclass(frozen=True)
class Overrides:
    """What the user forced on the command line; None means 'let the planner choose'."""

    quant: str | None = None
    format: str | None = None
    n_ctx: int | None = None
    ram_bytes: int | None = None
    vram_bytes: int | None = None
    n_threads: int | None = None
    part_bytes: int | None = None  # the largest model file (--part-size); 0: one file (--no-split)

    def __post_init__(self) -> None:
        if self.n_ctx is not None and not 16 <= self.n_ctx <= 1 << 20:
            raise UsageError(f"--ctx {self.n_ctx} is out of range; use 16..1048576")
        if self.n_threads is not None and not 1 <= self.n_threads <= 1024:
            raise UsageError(f"--threads {self.n_threads} is out of range; use 1..1024")
        for key, low in (("ram_bytes", 64 * MiB), ("vram_bytes", 0)):
            v = getattr(self, key)
            if v is not None and (v < low or v > 1 << 44):  # 16 TiB: no device class has more
                flag = "--" + key.split("_")[0]
                raise UsageError(f"{flag} {v} bytes is not a plausible size; give one like 6GB (at least 64MB, at most 16TiB)")


@dataclass(frozen=True)
class Shipping:
    """How the model file reaches the device."""

    channel: str
    model_bytes: int
    parts: int
    part_bytes: int  # the channel's cap per part (0: none)
    over_download_cap: bool  # bigger than the channel's cellular / base-download cap
    how: str
    setting: str


@dataclass(frozen=True)
class Plan:
    format: str
    quant: str
    n_ctx: int
    kv_type: str
    n_threads: int
    n_gpu_layers: int
    memory: Memory  # in RAM (all of it on CPU-only and unified-memory targets)
    budget_bytes: int
    predicted_decode_tps: float
    predicted_prefill_tps: float
    notes: tuple[str, ...] = field(default=())
    vram: Memory | None = None  # on a discrete GPU
    vram_budget_bytes: int = 0
    n_layers: int = 0  # llama.cpp counts n_layers + 1 (the output layer) for full offload
    requirements: tuple[str, ...] = field(default=())  # entitlements, manifest settings, WebGPU limits
    shipping: Shipping | None = None
    explain: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        if self.vram is not None:
            d["vram"]["total"] = self.vram.total
        for key in ("notes", "requirements", "explain"):
            d[key] = list(getattr(self, key))
        return d


# --- the formulas ----------------------------------------------------------------------------


def scheme(fmt: str, name: str) -> Scheme:
    """A quant by name in the format's own table: llama.cpp's types for GGUF, the int4 schemes for ONNX."""
    return get_format(fmt).scheme(name)


def memory(spec: ModelSpec, quant: Scheme | None, n_ctx: int, kv_type: str, *, fmt: str = "gguf",
           tensors: Sequence[Tensor] | None = None, arch: str = "", n_kv: int | None = None,
           n_tokens: int | None = None, exact_types: dict[str, int] | None = None) -> Memory:
    """Resident memory with everything on the CPU (or unified memory).

    ``n_kv``/``n_tokens`` describe the graph at the peak (default: a full micro-batch at a full
    context, the worst case); the calibration passes what it really ran. ``exact_types``: a GGUF's
    own tensor types, used as they are.
    """
    f = get_format(fmt)
    layout = f.weight_layout(spec, quant, tensors, arch, exact_types)
    return f.memory(spec, layout, n_ctx, f.kv_type_for(kv_type), n_kv, n_tokens, True)


def weight_layout(spec: ModelSpec, quant: Scheme | None, fmt: str = "gguf", tensors: Sequence[Tensor] | None = None,
                  arch: str = "", exact_types: dict[str, int] | None = None) -> WeightLayout:
    return get_format(fmt).weight_layout(spec, quant, tensors, arch, exact_types)


def decode_tps(bytes_per_token_cpu: float, cpu_gbps: float, bytes_per_token_gpu: float = 0.0,
               gpu_gbps: float = 0.0, fixed_s: float = 0.0) -> float:
    """Roofline: decoding reads every weight and the cache once per token, at the bandwidth decode
    sustains (profiles give sustained figures), plus a fixed cost per token (``fixed_s``: the graph's
    per-layer thread barriers and launches, which dominate tiny models)."""
    t = bytes_per_token_cpu / (cpu_gbps * 1e9) + fixed_s
    if bytes_per_token_gpu:
        t += bytes_per_token_gpu / (gpu_gbps * 1e9)
    return 1.0 / t if t > 0 else 0.0


def prefill_tps(spec: ModelSpec, n_ctx: int, gflops: float) -> float:
    """Roofline: prefill is compute-bound, 2 flops per weight per token plus attention over half the context."""
    flops = 2 * spec.n_params + 4 * spec.n_layers * spec.n_heads * spec.head_dim * n_ctx // 2
    return gflops * 1e9 / flops


# --- the search ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Budget:
    ram: int
    why: str
    default_cap: int  # a cap that holds without special permission (iOS jetsam), 0: none
    entitlement: str


def _budget(target: Target, o: Overrides) -> _Budget:
    ram = o.ram_bytes if o.ram_bytes is not None else target.ram_bytes
    budget = int(ram * target.usable_ram_fraction)
    why = f"{target.usable_ram_fraction:.0%} of {ram / 1e9:.1f} GB"
    lim = target.limits
    if lim.lmk_headroom_bytes and ram - lim.lmk_headroom_bytes < budget:
        budget = max(ram - lim.lmk_headroom_bytes, 0)
        why = f"{ram / 1e9:.1f} GB less {lim.lmk_headroom_bytes / 1e9:.1f} GB the system keeps before the low-memory killer acts"
    cap = lim.app_memory_entitled_bytes or lim.app_memory_bytes
    if cap and cap < budget:
        budget = cap
        why = (f"the per-app limit with {lim.memory_entitlement}" if lim.app_memory_entitled_bytes
               else "the per-app memory limit")
    if lim.gpu_working_set_bytes and target.unified_memory and lim.gpu_working_set_bytes < budget:
        budget = lim.gpu_working_set_bytes
        why = "Metal's recommended working set"
    return _Budget(budget, why, lim.app_memory_bytes if lim.app_memory_entitled_bytes else 0, lim.memory_entitlement)


def _contexts(want: int, floor: int) -> list[int]:
    out = [want]
    while out[-1] // 2 >= floor:
        out.append(out[-1] // 2)
    return out


@dataclass(frozen=True)
class _Fit:
    ram: Memory
    vram: Memory | None
    n_gpu_layers: int


def _split(spec: ModelSpec, layout: WeightLayout, n_ctx: int, kv_type: str, k: int) -> _Fit:
    """llama.cpp's split for n_gpu_layers = k: the last k layers (k > n_layers: the output layer too) on the GPU."""
    n = spec.n_layers
    on_gpu = min(k, n)
    gpu_layers = range(n - on_gpu, n)
    cpu_w = sum(layout.per_layer[:n - on_gpu]) + layout.embedding + layout.other
    gpu_w = sum(layout.per_layer[i] for i in gpu_layers)
    if k > n:
        gpu_w += layout.output
    else:
        cpu_w += layout.output
    n_tok = min(N_UBATCH, n_ctx)
    # The GPU runs the offloaded part of the graph: its compute buffer is the full one (worst case);
    # the CPU keeps a small one for the embedding lookup and what stays there.
    gpu_compute = compute_bytes(spec, n_tok, n_ctx) if k else 0
    cpu_compute = compute_bytes(spec, n_tok, n_ctx) if on_gpu < n else n_tok * spec.hidden_size * 4 * 2
    # The recurrent state follows its layer's device, as the KV cache does (llama_memory_recurrent's dev_layer).
    ram = Memory(cpu_w, kv_bytes(spec, n_ctx, kv_type, layers=range(n - on_gpu), windowed=True), cpu_compute,
                 overhead_bytes(spec), sum(layout.repacked_per_layer[:n - on_gpu]),
                 state_bytes(spec, range(n - on_gpu)))
    vram = (Memory(gpu_w, kv_bytes(spec, n_ctx, kv_type, layers=gpu_layers, windowed=True), gpu_compute, 0,
                   state=state_bytes(spec, gpu_layers)) if k else None)
    return _Fit(ram, vram, k)


def plan(spec: ModelSpec, target: Target, overrides: Overrides | None = None, *, name: str = "the model",
         tensors: Sequence[Tensor] | None = None, source_quant: str | None = None,
         source_types: dict[str, int] | None = None) -> Plan:
    """Choose format, quant, context and GPU layers so the model fits the target; raise DoesNotFit otherwise.

    ``tensors`` are the GGUF tensors of the real checkpoint when known (else the config's);
    ``source_types`` the ggml types of a GGUF source, used as they are when planning at
    ``source_quant``.
    """
    o = overrides or Overrides()
    fmt = o.format or target.formats[0]
    form = get_format(fmt)
    if fmt not in target.formats:
        raise UsageError(f"{target.name} runs {', '.join(target.formats)}, not {fmt}; drop --format or pick another target")
    budget = _budget(target, o)
    vram_total = o.vram_bytes if o.vram_bytes is not None else target.vram_bytes
    discrete = vram_total > 0 and target.has_gpu and not target.unified_memory
    vram_budget = int(vram_total * target.vram_usable_fraction) if discrete else 0
    ladder = [o.quant] if o.quant else form.ladder(target.quant_ladder)
    want = o.n_ctx or min(target.max_context, spec.context_length)
    contexts = [o.n_ctx] if o.n_ctx else _contexts(want, min(MIN_CONTEXT, want))
    threads = o.n_threads or target.cpu_threads
    smallest: tuple[int, str, int] | None = None  # (total, quant, n_ctx) of the least memory tried
    too_big: list[str] = []  # quants whose largest tensor no device buffer can hold

    for qname in ladder:
        quant = form.scheme(qname)
        qname = quant.name
        exact = source_types if (source_types and source_quant == qname) else None
        layout = form.weight_layout(spec, quant, tensors, target.arch, exact)
        max_buffer = target.limits.gpu_max_buffer_bytes
        if form.per_tensor_buffers and max_buffer and layout.largest > max_buffer:
            # One tensor over WebGPU's maxBufferSize: the device cannot even create its buffer.
            too_big.append(f"its largest tensor is {layout.largest / MiB:.0f} MiB at {qname}, over the "
                           f"{max_buffer / MiB:.0f} MiB WebGPU maxBufferSize of {target.name}")
            continue
        fit, n_ctx, notes = None, want, []
        if discrete:
            full = spec.n_layers + 1
            floor = want if o.n_ctx else min(GPU_MIN_CONTEXT, want)  # a user's --ctx is not shrunk
            for c in (c for c in contexts if c >= floor):
                f = _split(spec, layout, c, target.kv_cache_type, full)
                if f.vram.total <= vram_budget and f.ram.total <= budget.ram:
                    fit, n_ctx = f, c
                    if c < want:
                        notes.append(f"context shrunk from {want} to {c} so that all {full} layers fit in "
                                     f"{_gb(vram_budget)} of VRAM (shrinking the context costs less speed than "
                                     f"running layers on the CPU)")
                    break
            if fit is None:
                # The context is already down to the floor: now leave layers on the CPU.
                for c in (c for c in contexts if c <= floor):
                    k = full
                    while k > 0 and _split(spec, layout, c, target.kv_cache_type, k).vram.total > vram_budget:
                        k -= 1
                    f = _split(spec, layout, c, target.kv_cache_type, k)
                    if f.ram.total <= budget.ram:
                        fit, n_ctx = f, c
                        if c < want:
                            notes.append(f"context shrunk from {want} to {c} first (it costs less speed than "
                                         f"running layers on the CPU)")
                        notes.append(f"only {k} of {full} layers fit in {_gb(vram_budget)} of VRAM at {c} context; "
                                     f"the other {full - k} run on the CPU from RAM")
                        break
                    smallest = _smaller(smallest, f.ram.total, qname, c)
        else:
            for c in contexts:
                mem = form.memory(spec, layout, c, form.kv_type_for(target.kv_cache_type), None, None,
                               target.backends[0] == "cpu")
                if mem.total <= budget.ram:
                    # Unified memory (Metal): llama.cpp's GPU runs every layer, output included.
                    n_gpu = spec.n_layers + 1 if (target.has_gpu and form.offloads_layers) else 0
                    fit, n_ctx = _Fit(mem, None, n_gpu), c
                    if c < want:
                        notes.append(f"context shrunk from {want} to {c} so that {qname} fits in {_gb(budget.ram)}")
                    break
                smallest = _smaller(smallest, mem.total, qname, c)
        if fit is None:
            continue
        return _finish(spec, target, o, form, qname, layout, fit, n_ctx, threads, budget, vram_budget, notes, name)

    if smallest is None:  # every quant was refused for its buffer sizes
        raise DoesNotFit(f"{name} does not fit {target.name}: {too_big[-1]}. Try a smaller model.")
    total, qname, c = smallest
    raise DoesNotFit(f"{name} needs {_gb(total)} at {qname} with {c} context; {target.name} allows "
                     f"{_gb(budget.ram)} ({budget.why}). {_advice(spec, target, o, form, tensors, budget.ram, ladder)}")


def _smaller(best: tuple[int, str, int] | None, total: int, quant: str, n_ctx: int) -> tuple[int, str, int]:
    return (total, quant, n_ctx) if best is None or total < best[0] else best


def _advice(spec: ModelSpec, target: Target, o: Overrides, form: Format, tensors, budget: int, ladder: list[str]) -> str:
    """What would fit: a smaller context, a lower quant, or neither."""
    for c in (1024, 512, 256):
        if o.n_ctx and c >= o.n_ctx:
            continue
        for q in ladder:
            if memory(spec, form.scheme(q), c, target.kv_cache_type, fmt=form.name, tensors=tensors,
                      arch=target.arch).total <= budget:
                return f"Try --ctx {c}{'' if o.quant else f' (at {q})'}, or a smaller model."
    if form.uses_target_ladder:  # llama.cpp's low-bit types beyond the target's ladder
        for q in ("Q3_K_M", "IQ3_M", "Q2_K", "IQ2_M"):
            if q not in ladder and memory(spec, QUANTS[q], MIN_CONTEXT, target.kv_cache_type, tensors=tensors,
                                          arch=target.arch).total <= budget:
                return f"Try --quant {q} --ctx {MIN_CONTEXT} (large quality loss), or a smaller model."
    return "Try a smaller model or a bigger target."


def _kv_line(spec: ModelSpec, form: Format, n_ctx: int, kv_type: str, kv: int) -> str:
    n_sliding = sum(spec.is_sliding(i) for i in range(spec.n_layers))
    n_kv_layers = len(spec.kv_layers())
    if n_kv_layers < spec.n_layers and not n_sliding:  # a hybrid: only its attention layers hold a cache
        cells = padded_ctx(n_ctx) if form.padded_kv else n_ctx
        return (f"KV cache: 2 x {n_kv_layers} attention layers (of {spec.n_layers}; state layers hold none) x "
                f"{spec.n_kv_heads} kv heads x {spec.head_dim} head dim x {cells} ctx x {KV_BYTES[kv_type]:g} B "
                f"({kv_type}) = {_gb(kv)}")
    if form.windowed_kv and n_sliding:
        return (f"KV cache: 2 x {spec.n_kv_heads} kv heads x {spec.head_dim} head dim x {KV_BYTES[kv_type]:g} B "
                f"({kv_type}) x ({spec.n_layers - n_sliding} full layers x {padded_ctx(n_ctx)} ctx + {n_sliding} "
                f"sliding layers x {window_cells(spec, n_ctx)} cells: window {spec.sliding_window} + "
                f"{min(N_UBATCH, n_ctx)} batch, padded) = {_gb(kv)}")
    cells = padded_ctx(n_ctx) if form.padded_kv else n_ctx
    return (f"KV cache: 2 x {spec.n_layers} layers x {spec.n_kv_heads} kv heads x {spec.head_dim} head dim x "
            f"{cells} ctx x {KV_BYTES[kv_type]:g} B ({kv_type}) = {_gb(kv)}")


def _state_line(spec: ModelSpec, state: int) -> list[str]:
    """The recurrent state's line of the arithmetic; none for a model without state layers."""
    kinds = spec.layer_kinds
    layers = [k for k in kinds if k.state_floats]
    if not layers:
        return []
    counts = sorted({(k.kind, k.state_floats) for k in layers})
    parts = " + ".join(f"{sum(1 for k in layers if (k.kind, k.state_floats) == c)} {c[0]} layers x {c[1]} floats"
                       for c in counts)
    return [f"recurrent state: ({parts}) x {STATE_BYTES} B (f32, whatever the KV type) x 1 sequence = {_gb(state)}"
            f", read and written in full each token"]


def _ship(target: Target, model_bytes: int, part_override: int | None = None) -> Shipping:
    d = target.distribution
    if part_override is not None:
        d = replace(d, part_bytes=part_override)
    # At least this many: `pack model` splits at tensor boundaries and the first part holds the metadata.
    parts = -(-model_bytes // d.part_bytes) if d.part_bytes else 1
    over = bool(d.download_cap_bytes and model_bytes > d.download_cap_bytes)
    if parts > 1:
        how = f"{parts} parts of at most {d.part_bytes / 1e6:.0f} MB: {d.delivery}"
    elif d.download_cap_bytes and not over:
        how = f"inside the app's own download (under {d.channel}'s {d.download_cap_bytes / 1e6:.0f} MB cap)"
    else:
        how = d.delivery or "one file"
    return Shipping(d.channel, model_bytes, parts, d.part_bytes, over, how, d.setting)


def _finish(spec, target, o, form: Format, qname, layout, fit: _Fit, n_ctx, threads, budget: _Budget, vram_budget, notes, name) -> Plan:
    req: list[str] = []
    ram = fit.ram
    if budget.default_cap and ram.total > budget.default_cap:
        req.append(f"{budget.entitlement} (entitlement): {_gb(ram.total)} is over the {_gb(budget.default_cap)} "
                   f"per-app limit without it")
    lim = target.limits
    if form.per_tensor_buffers and lim.gpu_max_binding_bytes:
        req.append(f"WebGPU requiredLimits: maxStorageBufferBindingSize >= {layout.largest / MiB:.0f} MiB, "
                   f"maxBufferSize >= {layout.largest / MiB:.0f} MiB (largest tensor)")
        if layout.largest > lim.gpu_max_binding_bytes:
            notes.append(f"the largest tensor ({layout.largest / MiB:.0f} MiB) is over the "
                         f"{lim.gpu_max_binding_bytes / MiB:.0f} MiB storage-buffer binding some phones allow: "
                         f"those devices cannot run it")
    if form.per_tensor_buffers and lim.gpu_max_binding_bytes and layout.wasm_f32_bytes:
        # the web page's WASM fallback (convert/onnx/wasm_graph.py): same download, f32 weights in the heap
        if layout.wasm_f32_bytes <= WASM_F32_LIMIT:
            notes.append(f"without WebGPU the page runs WASM on the same download, its int4 weights unpacked to f32 "
                         f"at load: {_gb(layout.wasm_f32_bytes)} in the tab's WASM heap")
        else:
            notes.append(f"without WebGPU the page runs the int4 graph on WASM, slowly (~0.03x native): its weights "
                         f"as f32 ({_gb(layout.wasm_f32_bytes)}) would not fit a tab's WASM heap")
    ship = _ship(target, layout.total, o.part_bytes)
    if ship.over_download_cap:
        notes.append(f"the model ({_gb(layout.total)}) is over {target.distribution.channel}'s "
                     f"{target.distribution.download_cap_bytes / 1e6:.0f} MB download cap: it cannot ride in the app's "
                     f"own download, ship it separately as planned")
    cap = target.distribution.total_cap_bytes
    if cap and layout.total > cap:
        notes.append(f"the model ({_gb(layout.total)}) is over the {cap / 1e9:.1f} GB {target.distribution.channel} "
                     f"accepts for a whole app: it cannot ship through that store; use a smaller quant or model")
    if ship.setting and (ship.parts > 1 or ship.over_download_cap):
        req.append(ship.setting)

    kv_type = form.kv_type_for(target.kv_cache_type)
    # Roofline: bytes read per token (weights + half the cache on average + the whole recurrent state, which
    # each state layer reads in full every token) over bandwidth.
    # Gemma 4's shared-KV layers read their sources' caches too (nothing allocated, as much read).
    n_cpu = spec.n_layers - min(fit.n_gpu_layers, spec.n_layers)
    kv_avg_cpu = (ram.kv_cache + shared_kv_reads(spec, n_ctx, kv_type, range(n_cpu))) / 2 + ram.state
    fixed = spec.n_layers * target.decode_layer_overhead_us * 1e-6
    if fit.vram is not None:
        gpu_frac = min(fit.n_gpu_layers, spec.n_layers) / spec.n_layers
        gpu_reads = shared_kv_reads(spec, n_ctx, kv_type, range(n_cpu, spec.n_layers))
        gpu_bytes = layout.per_token * gpu_frac + (fit.vram.kv_cache + gpu_reads) / 2 + fit.vram.state
        cpu_bytes = layout.per_token * (1 - gpu_frac) + kv_avg_cpu
        decode = decode_tps(cpu_bytes, target.memory_bandwidth_gbps, gpu_bytes, target.vram_bandwidth_gbps, fixed)
        gflops = target.compute_gflops * (1 - gpu_frac) + target.gpu_compute_gflops * gpu_frac
    else:
        decode = decode_tps(layout.per_token + kv_avg_cpu, target.memory_bandwidth_gbps, fixed_s=fixed)
        gflops = target.gpu_compute_gflops if (target.has_gpu and target.gpu_compute_gflops) else target.compute_gflops
    prefill = prefill_tps(spec, n_ctx, gflops)

    explain = [
        f"budget: {_gb(budget.ram)} = {budget.why}" + (f"; VRAM {_gb(vram_budget)} = {target.vram_usable_fraction:.0%} "
                                                     f"of {_gb(o.vram_bytes or target.vram_bytes)}" if vram_budget else ""),
        f"weights: {_gb(layout.total)} = sum of {sum((layout.tensor_types or {}).values()) or 'all'} tensors at their "
        f"own types ({', '.join(f'{k} x{v}' for k, v in sorted((layout.tensor_types or {}).items())) or form.name})"
        + (f" ({_gb(layout.repacked)} of them repacked for the CPU's kernels: their mapped pages stay in RSS "
           f"as reclaimable page cache)" if layout.repacked else ""),
        _kv_line(spec, form, n_ctx, kv_type, ram.kv_cache),
        *_state_line(spec, ram.state + (fit.vram.state if fit.vram else 0)),
        *form.explain(spec, layout, n_ctx, ram),
        f"RAM: {_gb(ram.total)} of {_gb(budget.ram)}" + (f"; VRAM: {_gb(fit.vram.total)} of {_gb(vram_budget)} "
                                                        f"({fit.n_gpu_layers} of {spec.n_layers + 1} layers)"
                                                        if fit.vram is not None else ""),
        f"decode: {target.memory_bandwidth_gbps:g} GB/s / ({_gb(layout.per_token)} weights + {_gb(kv_avg_cpu)} "
        f"half the KV cache" + (" and the recurrent state" if ram.state else "") + ") per token"
        + (f" + {spec.n_layers} layers x {target.decode_layer_overhead_us:g} us" if fixed else "")
        + f" = {decode:.1f} tokens/s" if fit.vram is None else
        f"decode: GPU part at {target.vram_bandwidth_gbps:g} GB/s + CPU part at {target.memory_bandwidth_gbps:g} GB/s "
        f"= {decode:.1f} tokens/s",
        f"prefill: {gflops:g} GFLOP/s / (2 x {spec.n_params / 1e9:.2f} B params + attention) = {prefill:.1f} tokens/s",
        f"ships as: {ship.how}",
    ]
    return Plan(form.name, qname, n_ctx, kv_type, threads, fit.n_gpu_layers, ram, budget.ram,
                round(decode, 1), round(prefill, 1), tuple(notes), fit.vram, vram_budget, spec.n_layers + 1,
                tuple(req), ship, tuple(explain))
