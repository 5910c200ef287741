"""The planner: a pure function from (model spec, target, overrides) to a Plan.

It walks the target's quant ladder (best first) and takes the first quant whose
predicted memory fits what an app may use on the device, shrinking the context
before giving up. Every number it predicts comes with the arithmetic behind it,
so a bench run can compare and the formulas can be corrected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from packager.errors import DoesNotFit, UsageError
from packager.profiles import Target
from packager.quants import QuantType, get_quant
from packager.spec import ModelSpec

KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
OVERHEAD_BYTES = 64 << 20  # llama.cpp's own allocations, threads' stacks, the tokenizer
N_UBATCH = 512  # llama.cpp's default micro-batch: sizes the compute buffer
MIN_CONTEXT = 512


@dataclass(frozen=True)
class Overrides:
    """What the user forced on the command line; None means 'let the planner choose'."""

    quant: str | None = None
    format: str | None = None
    n_ctx: int | None = None
    ram_bytes: int | None = None
    vram_bytes: int | None = None
    n_threads: int | None = None

    def __post_init__(self) -> None:
        if self.n_ctx is not None and not 16 <= self.n_ctx <= 1 << 20:
            raise UsageError(f"--ctx {self.n_ctx} is out of range; use 16..1048576")
        if self.n_threads is not None and not 1 <= self.n_threads <= 1024:
            raise UsageError(f"--threads {self.n_threads} is out of range; use 1..1024")
        for key in ("ram_bytes", "vram_bytes"):
            v = getattr(self, key)
            if v is not None and (v < 0 or v > 1 << 50):
                raise UsageError(f"--{key.split('_')[0]} {v} is not a plausible size")


@dataclass(frozen=True)
class Memory:
    """Predicted resident memory, in bytes, and how it adds up."""

    weights: int
    kv_cache: int
    compute: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


@dataclass(frozen=True)
class Plan:
    format: str
    quant: str
    n_ctx: int
    kv_type: str
    n_threads: int
    n_gpu_layers: int
    memory: Memory
    budget_bytes: int
    predicted_decode_tps: float
    predicted_prefill_tps: float
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        d["notes"] = list(self.notes)
        return d


def weight_bytes(spec: ModelSpec, quant: QuantType) -> int:
    """Weights at this quant: matrices at the quant's bits per weight, norms in f32."""
    from packager.quants import bits_per_weight

    norms = (2 * spec.n_layers + 1) * spec.hidden_size
    return int((spec.n_params - norms) * bits_per_weight(quant.base) / 8 + norms * 4)


def memory(spec: ModelSpec, quant: QuantType, n_ctx: int, kv_type: str) -> Memory:
    kv = int(2 * spec.n_layers * spec.kv_dim * n_ctx * KV_BYTES[kv_type])
    # llama.cpp's compute buffer: activations of one micro-batch plus its logits (f32).
    ubatch = min(N_UBATCH, n_ctx)
    compute = int(4 * ubatch * (spec.vocab_size + 4 * spec.hidden_size + 2 * spec.intermediate_size)
                  + 4 * ubatch * n_ctx * spec.n_heads // 8)
    return Memory(weight_bytes(spec, quant), kv, compute, OVERHEAD_BYTES)


def plan(spec: ModelSpec, target: Target, overrides: Overrides | None = None) -> Plan:
    """Choose format, quant and context so the model fits the target; raise DoesNotFit otherwise."""
    o = overrides or Overrides()
    fmt = o.format or target.formats[0]
    if fmt not in ("gguf", "onnx"):
        raise UsageError(f"unknown format {fmt!r}; use gguf or onnx")
    ram = o.ram_bytes if o.ram_bytes is not None else target.ram_bytes
    budget = int(ram * target.usable_ram_fraction)
    ladder = [o.quant] if o.quant else list(target.quant_ladder)
    want_ctx = min(o.n_ctx or target.max_context, spec.context_length) if not o.n_ctx else o.n_ctx
    threads = o.n_threads or target.cpu_threads
    notes: list[str] = []
    best: tuple[str, Memory] | None = None
    for name in ladder:
        quant = get_quant(name)
        n_ctx = want_ctx
        while True:
            mem = memory(spec, quant, n_ctx, target.kv_cache_type)
            if mem.total <= budget:
                if n_ctx < want_ctx:
                    notes.append(f"context shrunk from {want_ctx} to {n_ctx} so that {quant.name} fits")
                bytes_per_token = mem.weights + mem.kv_cache // 2  # decode reads all weights, half the cache on average
                decode = target.memory_bandwidth_gbps * 1e9 / bytes_per_token
                prefill = target.compute_gflops * 1e9 / (2 * spec.n_params)
                return Plan(fmt, quant.name, n_ctx, target.kv_cache_type, threads, 0, mem, budget,
                            round(decode, 1), round(prefill, 1), tuple(notes))
            if best is None or mem.total < best[1].total:
                best = (quant.name, mem)
            if o.n_ctx or n_ctx // 2 < MIN_CONTEXT:
                break
            n_ctx //= 2
    assert best is not None
    name, mem = best
    raise DoesNotFit(
        f"the model needs {mem.total / 1e9:.2f} GB at {name} with {min(want_ctx, MIN_CONTEXT) if not o.n_ctx else o.n_ctx} context; "
        f"{target.name} allows {budget / 1e9:.2f} GB ({target.usable_ram_fraction:.0%} of {ram / 1e9:.1f} GB). "
        "Try a smaller --ctx, a lower --quant, a bigger target, or a smaller model."
    )
