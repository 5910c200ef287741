"""What a bundle format declares to the planner: one :class:`Format` object per format.

A format is its quant schemes (typed, with exact bytes per weight), the size function that
lays its weights out tensor by tensor, and the memory its runtime allocates around them
(KV cache, compute buffers, overhead), with the arithmetic a plan shows. The planner asks
the format for each of these and has no per-format branch; the later stages register their
own side of the same format by its name (convert and pack: ``pack.pipeline.PACKERS``;
runtime: ``runtime.BACKENDS``; quality's logits: ``measure.quality.LOGITS``), and
tests/test_formats.py holds that every format has every side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

from packager.errors import PartSizeError
from packager.formats.weights import Tensor, WeightLayout
from packager.spec.model import ModelSpec

MiB = 1 << 20
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CTX_PAD = 256  # llama_context pads n_ctx to a multiple of 256 (src/llama-context.cpp)
N_UBATCH = 512  # llama.cpp's (and llama-cpp-python's) default micro-batch: sizes the compute buffer and windowed caches


@dataclass(frozen=True)
class Memory:
    """Predicted resident memory, in bytes, and how it adds up."""

    weights: int
    kv_cache: int
    compute: int
    overhead: int
    # Clean file pages of the tensors ggml-cpu repacked: read from the mmap'd file to make the
    # copy, they stay in RSS while memory is plentiful and are the first pages the OS reclaims,
    # so they are not part of the budget (``total``) but are of the RSS a host measures (``rss``).
    page_cache: int = 0
    # Recurrent state of the state layers (LFM2's convolutions): fixed per sequence, F32 whatever the KV type.
    state: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead + self.state

    @property
    def rss(self) -> int:
        return self.total + self.page_cache


class Scheme(Protocol):
    """A quant scheme of any format: llama.cpp's ``QuantType``, ONNX's ``WeightFormat``."""

    @property
    def name(self) -> str: ...


def padded_ctx(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def window_cells(spec: ModelSpec, n_ctx: int, n_ubatch: int = N_UBATCH) -> int:
    """Cells of llama.cpp's cache for a sliding layer (llama_kv_cache_iswa, swa_full=False, one sequence):
    the window plus a micro-batch (llama-cpp-python caps it at n_ctx), padded to 256, at most the context's."""
    return min(padded_ctx(n_ctx), padded_ctx(spec.sliding_window + min(n_ubatch, n_ctx)))


# KV types under which edgepack's llama.cpp runtime leaves flash attention off unless asked (runtime/llama.py
# reads this; a quantized V cache needs it on), and so the plan's default.
NO_FLASH_KV = ("f16", "f32", "bf16")


def kv_bytes(spec: ModelSpec, n_ctx: int, kv_type: str, n_layers: int | None = None, *,
             layers: Iterable[int] | None = None, windowed: bool = False, padded: bool = True,
             flash_attn: bool | None = None) -> int:
    """K and V per layer, added up: the layer's kv heads x head dim x cells x bytes, twice.

    Every layer that owns a cache holds the whole context (padded, unless ``padded`` is False), unless
    ``windowed``: then a sliding layer holds :func:`window_cells`, as llama.cpp allocates it; state layers
    (and layers reading another's cache) hold none. ``layers`` (default: the first ``n_layers``, or all)
    picks which layers count (a GPU split holds the last ones).

    Without flash attention (``flash_attn``; None: as edgepack's runtime sets it for ``kv_type``) llama.cpp
    stores V transposed, and where layers' V widths differ (Gemma 4's sliding and full heads) every layer's V
    is as wide as the widest (llama-kv-cache.cpp, n_embd_v_gqa_max); K never is.
    """
    if layers is None:
        layers = range(spec.n_layers if n_layers is None else n_layers)
    full, window = padded_ctx(n_ctx) if padded else n_ctx, window_cells(spec, n_ctx)
    kinds = spec.layer_kinds
    flash = kv_type not in NO_FLASH_KV if flash_attn is None else flash_attn
    v_max = max(k.kv_dim for k in kinds)
    elems = 0
    for i in layers:
        if kinds[i].owns_kv:
            cells = window if windowed and kinds[i].kind == "sliding" else full
            elems += (kinds[i].kv_dim + (kinds[i].kv_dim if flash else v_max)) * cells
    return int(elems * KV_BYTES[kv_type])


def shared_kv_reads(spec: ModelSpec, n_ctx: int, kv_type: str, layers: Iterable[int] | None = None) -> int:
    """The KV that layers reading another layer's cache (Gemma 4's shared-KV layers) among ``layers`` (default:
    all) read, at the full cache: their sources' caches once more each. They allocate nothing (kv_bytes skips
    them), but a decode step reads it; 0 for every model without such layers (llama.cpp's windowed cache)."""
    kinds = spec.layer_kinds
    sources = [kinds[i].kv_source for i in (range(spec.n_layers) if layers is None else layers)
               if kinds[i].kv_source is not None]
    return sum(kv_bytes(spec, n_ctx, kv_type, layers=[j], windowed=True) for j in sources)


STATE_BYTES = 4  # llama.cpp's recurrent state is F32 whatever --cache-type-k/v say (llama-model.cpp create_memory)


def state_bytes(spec: ModelSpec, layers: Iterable[int] | None = None, n_seq: int = 1) -> int:
    """The recurrent state of ``n_seq`` sequences over ``layers`` (default: all): each state layer's R and S
    rows in F32, allocated once at load whatever the context (llama_memory_recurrent)."""
    return STATE_BYTES * n_seq * spec.state_floats(None if layers is None else list(layers))


def part_too_small(part_bytes: int, what: str, size: int, need_bytes: int, also: str = "") -> PartSizeError:
    """The one-line refusal of a part size below the largest tensor, naming it and the smallest size that works
    (whole MB, 10^6 bytes: what --part-size and llama-gguf-split take)."""
    need = -(-need_bytes // 10**6)
    return PartSizeError(f"part size {part_bytes / 1e6:.1f} MB is too small: {what} alone is {size / 1e6:.1f} MB{also}; "
                         f"the smallest part size that works is {need}MB (pass --part-size {need}MB or more, "
                         f"or --no-split)")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# (spec, scheme, tensors of the real checkpoint or None, target CPU arch, a GGUF's own types or None)
LayoutFn = Callable[[ModelSpec, Scheme, "Sequence[Tensor] | None", str, "dict[str, int] | None"], WeightLayout]
# (spec, layout, n_ctx, kv_type, n_kv at the peak, n_tokens at the peak, runs on CPU kernels)
MemoryFn = Callable[[ModelSpec, WeightLayout, int, str, "int | None", "int | None", bool], Memory]
# (spec, layout, n_ctx, memory) -> the compute and overhead lines of a plan's arithmetic
ExplainFn = Callable[[ModelSpec, WeightLayout, int, Memory], "list[str]"]


@dataclass(frozen=True)
class Format:
    """One bundle format, as the planner sees it."""

    name: str  # "gguf", "onnx": the manifest's format and the CLI's --format
    engine: str  # what runs it, for messages
    noun: str  # what one of its schemes is called in a sentence: "a GGUF type"
    model_suffix: str  # the model file's suffix in a bundle
    scheme: Callable[[str], Scheme]  # a quant by name (a one-line UsageError naming the choices)
    schemes: tuple[str, ...]  # every scheme's name, for --help and errors
    default_ladder: tuple[str, ...]  # tried best first when the target's own ladder does not apply
    auto_ladder: tuple[str, ...]  # what --quant auto measures when the target's ladder does not apply
    weight_layout: LayoutFn
    memory: MemoryFn
    explain: ExplainFn
    kv_type: str | None = None  # a fixed KV cache type (ONNX's f32); None: the target's
    offloads_layers: bool = False  # GPU layers as llama.cpp's n_gpu_layers (unified memory, discrete splits)
    uses_target_ladder: bool = False  # the target's quant ladder names this format's schemes
    per_tensor_buffers: bool = False  # each tensor is one device buffer (WebGPU's buffer limits apply)
    windowed_kv: bool = False  # sliding-window layers cache only their window (llama.cpp's iswa cache)
    padded_kv: bool = True  # the cache's cells are the context padded to CTX_PAD (llama.cpp's); else exactly n_ctx

    def ladder(self, target_ladder: Sequence[str]) -> list[str]:
        return list(target_ladder) if self.uses_target_ladder else list(self.default_ladder)

    def auto(self, target_ladder: Sequence[str]) -> list[str]:
        return list(target_ladder) if self.uses_target_ladder else list(self.auto_ladder)

    def kv_type_for(self, target_kv: str) -> str:
        return self.kv_type or target_kv
