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
from typing import Callable, Protocol, Sequence

from packager.errors import PartSizeError
from packager.formats.weights import Tensor, WeightLayout
from packager.spec.model import ModelSpec

MiB = 1 << 20
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CTX_PAD = 256  # llama_context pads n_ctx to a multiple of 256 (src/llama-context.cpp)


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

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead

    @property
    def rss(self) -> int:
        return self.total + self.page_cache


class Scheme(Protocol):
    """A quant scheme of any format: llama.cpp's ``QuantType``, ONNX's ``WeightFormat``."""

    @property
    def name(self) -> str: ...


def padded_ctx(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def kv_bytes(spec: ModelSpec, n_ctx: int, kv_type: str, n_layers: int | None = None) -> int:
    """K and V for every layer: layers x kv heads x head dim x context x bytes, twice."""
    layers = spec.n_layers if n_layers is None else n_layers
    return int(2 * layers * spec.kv_dim * padded_ctx(n_ctx) * KV_BYTES[kv_type])


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

    def ladder(self, target_ladder: Sequence[str]) -> list[str]:
        return list(target_ladder) if self.uses_target_ladder else list(self.default_ladder)

    def auto(self, target_ladder: Sequence[str]) -> list[str]:
        return list(target_ladder) if self.uses_target_ladder else list(self.auto_ladder)

    def kv_type_for(self, target_kv: str) -> str:
        return self.kv_type or target_kv
