"""ONNX int4, as data: the int4 schemes (MatMulNBits blocks) and the initializers a decoder holds.

One declaration of the initializers (:func:`declare`) serves both sides: the converter
writes exactly these, at these offsets, into model.onnx.data, and the planner sizes a
bundle from the same list (:func:`weight_layout`), so a plan's weight bytes are the file's.

The schemes live in one table (:data:`SCHEMES`), keyed by the name a bundle's manifest and
the CLI's summary use: ``INT4_B{block}`` (symmetric round-to-nearest), ``INT4_B{block}_ASYM``
(with zero points) and ``INT4_B{block}_HQQ`` (zero points plus HQQ's per-block correction).
Per weight, a scheme stores 4 bits, one f32 scale per block, and where it has them a 4-bit
zero point and an f32 correction per block: block 32 symmetric is 5.0 bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Sequence

import numpy as np

from packager.archs import FAMILIES
from packager.errors import UsageError
from packager.formats.base import MiB, Format, Memory, gb, kv_bytes, part_too_small, state_bytes
from packager.formats.weights import Tensor, WeightLayout
from packager.spec.model import ModelSpec

ALIGN = 4096  # page-aligned offsets let ONNX Runtime map large initializers from the file
BLOCK_SIZES = (32, 64, 128)
ALGORITHMS = ("rtn", "hqq")  # round to nearest (ONNX Runtime's routine), HQQ (kernels/hqq.py)
# The web page's WASM graph (convert/onnx/wasm_graph.py): the same int4 bytes, unpacked to f32 weights when the
# session starts, because onnxruntime-web's WASM has no int4 kernel (benchmarks/web_kernels.py). Written only
# where those f32 weights stay under WASM_F32_LIMIT: a tab's WASM heap ends at 4 GiB, and constant folding
# holds a few copies of the largest matrix while it unpacks it.
WASM_GRAPH = "model.wasm.onnx"
WASM_F32_LIMIT = 1 << 30


class DType(IntEnum):
    """onnx.TensorProto's data type numbers: a layout is planned (and sized) without importing onnx."""

    FLOAT = 1
    UINT8 = 2
    INT32 = 6
    INT64 = 7
    FLOAT16 = 10

    @property
    def itemsize(self) -> int:
        return {DType.FLOAT: 4, DType.UINT8: 1, DType.INT32: 4, DType.INT64: 8, DType.FLOAT16: 2}[self]


@dataclass(frozen=True)
class Init:
    """One initializer stored in the external data file."""

    name: str
    dtype: int  # TensorProto data type
    shape: tuple[int, ...]
    offset: int = -1
    file: int = 0  # which of the layout's data files holds it (Layout.data_files)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DType(self.dtype).itemsize


@dataclass
class Layout:
    """Initializers and their offsets in the data file, assigned in the order they are declared."""

    data_file: str = "model.onnx.data"
    inits: dict[str, Init] = field(default_factory=dict)
    aliases: set[str] = field(default_factory=set)  # second views of another initializer's bytes
    size: int = 0  # bytes of all data files together
    file_sizes: tuple[int, ...] = ()  # each data file's bytes, once split (empty: one file of `size` bytes)

    @property
    def data_files(self) -> list[str]:
        """model.onnx.data, then model.onnx.data.2, ... (ONNX Runtime reads each initializer's own location)."""
        return [self.data_file] + [f"{self.data_file}.{i + 1}" for i in range(1, len(self.file_sizes))]

    @property
    def sizes(self) -> list[int]:
        return list(self.file_sizes) or [self.size]

    def split(self, part_bytes: int) -> "Layout":
        """The same initializers, in file order, in data files of at most ``part_bytes`` each.

        A file ends where the next initializer would cross the limit; an alias stays with its base.
        """
        largest = max((i for n, i in self.inits.items() if n not in self.aliases), key=lambda i: i.nbytes)
        if largest.nbytes > part_bytes:
            raise part_too_small(part_bytes, f"initializer {largest.name}", largest.nbytes, largest.nbytes)
        out = Layout(self.data_file, aliases=set(self.aliases))
        sizes = [0]
        moved: dict[int, tuple[int, int]] = {}  # old offset -> (file, offset): where an alias's base went
        for name, init in self.inits.items():
            if name in self.aliases:
                file, offset = moved[init.offset]
            else:
                offset = sizes[-1] + (-sizes[-1] % ALIGN)
                if offset + init.nbytes > part_bytes and sizes[-1]:
                    sizes.append(0)
                    offset = 0
                file = len(sizes) - 1
                sizes[-1] = offset + init.nbytes
                moved[init.offset] = (file, offset)
            out.inits[name] = replace(init, offset=offset, file=file)
        out.file_sizes, out.size = tuple(sizes), sum(sizes)
        return out

    def add(self, name: str, dtype: int, shape: tuple[int, ...], *, alias_of: str | None = None) -> Init:
        """Declare an initializer; ``alias_of`` makes it a second view (other shape) of another's bytes."""
        if name in self.inits:
            raise ValueError(f"initializer {name!r} declared twice")
        if alias_of is not None:
            init = Init(name, dtype, tuple(shape), self.inits[alias_of].offset)
            if init.nbytes != self.inits[alias_of].nbytes:
                raise ValueError(f"{name}: alias of {alias_of} with a different byte size")
            self.aliases.add(name)
        else:
            offset = self.size + (-self.size % ALIGN)
            init = Init(name, dtype, tuple(shape), offset)
            self.size = offset + init.nbytes
        self.inits[name] = init
        return init


CACHES = ("cos_cache", "sin_cache")
LOCAL_CACHES = ("cos_cache_local", "sin_cache_local")  # Gemma 3's sliding layers: their own RoPE base
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class Dims:
    """The decoder's shape, as the graph needs it."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rotary_dim: int
    max_positions: int
    attn_scale: float
    window: int = -1  # GroupQueryAttention's local_window_size on the sliding layers; -1: none
    qk_norm: bool = False  # each head of q and k RMS-normalized before RoPE (Qwen3)
    rope_layers: tuple[bool, ...] = ()  # whether each layer applies RoPE (SmolLM3); empty: every layer
    sliding_layers: tuple[bool, ...] = ()  # which layers take `window` (Gemma 3); empty: every layer
    local_rope: bool = False  # sliding layers rotate from cos_cache_local/sin_cache_local (their own base)
    sandwich_norms: bool = False  # Gemma's four norms a layer (archs.OnnxArch.sandwich_norms)
    embed_scale: float = 0.0  # the embedding rows multiplied by this after the gather (Gemma); 0: not
    activation: str = "silu"  # the MLP gate's: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    final_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0: none
    # LFM2's short-convolution layers (no attention, no KV: a depthwise kernel of conv_kernel taps over
    # B*x, gated by C, carrying its last conv_kernel - 1 inputs); empty: every layer attends.
    conv_layers: tuple[bool, ...] = ()
    conv_kernel: int = 0
    # Hybrids (Qwen3.5): which layers are gated delta-net ("linear") layers, the others attending; empty: none.
    linear_layers: tuple[bool, ...] = ()
    # The delta-net's (key heads, value heads, key head dim, value head dim, conv kernel); () without one.
    linear: tuple[int, ...] = ()
    # q_proj holds each head's query and its output gate (2 x heads x head_dim rows, Qwen3.5's gated attention).
    attn_gate: bool = False

    def __post_init__(self) -> None:
        for name in ("rope_layers", "sliding_layers", "conv_layers", "linear_layers"):
            flags = getattr(self, name)
            if flags and len(flags) != self.n_layers:
                raise ValueError(f"{name} has {len(flags)} entries for {self.n_layers} layers")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    def conv(self, layer: int) -> bool:
        """Whether the layer is a short convolution (holds a conv state, not a KV cache)."""
        return bool(self.conv_layers) and self.conv_layers[layer]

    def rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]

    def is_linear(self, layer: int) -> bool:
        """Whether the layer is a gated delta-net layer (a conv and a recurrent state, no KV cache)."""
        return bool(self.linear_layers) and self.linear_layers[layer]

    @property
    def q_rows(self) -> int:
        """q_proj's rows: the query's, and its gate's where the attention is gated."""
        return self.n_heads * self.head_dim * (2 if self.attn_gate else 1)

    @property
    def conv_dim(self) -> int:
        """The delta-net convolution's channels: q, k and v (2 x key heads x dk + value heads x dv)."""
        hk, hv, dk, dv, _ = self.linear
        return 2 * hk * dk + hv * dv

    def sliding(self, layer: int) -> bool:
        """Whether the layer attends to a window (its local_window_size is ``window``)."""
        return self.window > 0 and (not self.sliding_layers or self.sliding_layers[layer])

    def caches(self, layer: int) -> tuple[str, str]:
        """The cos/sin caches the layer rotates with."""
        if self.local_rope and self.sliding(layer):
            return LOCAL_CACHES
        return CACHES

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "Dims":
        """The shape a plan sizes (full rotary, the spec's context as the caches' length)."""
        family = FAMILIES.get(spec.architecture)
        arch = family.onnx if family is not None else None
        fields = dict(n_layers=spec.n_layers, hidden=spec.hidden_size, intermediate=spec.intermediate_size,
                      n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, vocab=spec.vocab_size,
                      rms_eps=1e-6, rotary_dim=spec.head_dim, max_positions=spec.context_length,
                      attn_scale=spec.head_dim ** -0.5, qk_norm=bool(arch and arch.qk_norm),
                      local_rope=bool(arch and arch.local_rope), sandwich_norms=bool(arch and arch.sandwich_norms),
                      **state_layer_fields(spec))
        if arch is not None and arch.spec_dims is not None:  # a hybrid's own fields (Qwen3.5's delta-net heads)
            fields.update(arch.spec_dims(spec))
        return cls(**fields)


def state_layer_fields(spec: ModelSpec) -> dict[str, Any]:
    """Dims' flags of the layers that hold a state, not a KV cache, from the spec's layer kinds: conv_layers and
    conv_kernel (LFM2's short convolutions), linear_layers (Qwen3.5's delta-nets); {} where every layer attends."""
    kinds = [k.kind for k in spec.layer_kinds]
    fields: dict[str, Any] = {}
    if "conv" in kinds:
        fields.update(conv_layers=tuple(k == "conv" for k in kinds),
                      conv_kernel=max(k.conv_kernel for k in spec.layer_kinds))
    if "linear" in kinds:
        fields["linear_layers"] = tuple(k == "linear" for k in kinds)
    return fields


@dataclass(frozen=True)
class WeightFormat:
    """How linear layers are stored: int4 blocks for MatMulNBits (one scheme), or f32 (a reference graph)."""

    int4: bool = True
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits' activation precision: 4 = int8 dot products (CPU's fastest)
    zero_correction: bool = False  # HQQ: uint8 zero points + an f32 correction per block (kernels/hqq.py)

    @property
    def name(self) -> str:
        if not self.int4:
            return "FP32"
        if self.zero_correction:
            return f"INT4_B{self.block_size}_HQQ"
        return f"INT4_B{self.block_size}{'' if self.symmetric else '_ASYM'}"

    @property
    def algorithm(self) -> str:
        return "hqq" if self.zero_correction else "rtn"

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight of a linear layer whose width is a multiple of the block."""
        if not self.int4:
            return 32.0
        zp = 0 if self.symmetric and not self.zero_correction else 4
        return 4 + (32 + zp + (32 if self.zero_correction else 0)) / self.block_size

    def linear_inits(self, layout: Layout, base: str, n: int, k: int) -> None:
        """Declare the initializers of one linear layer with ``n`` outputs over ``k`` inputs."""
        if not self.int4:
            layout.add(f"{base}.weight", DType.FLOAT, (n, k))
            return
        nb = -(-k // self.block_size)
        layout.add(f"{base}.weight_Q4", DType.UINT8, (n, nb, self.block_size // 2))
        layout.add(f"{base}.weight_scales", DType.FLOAT, (n, nb))
        if not self.symmetric or self.zero_correction:
            layout.add(f"{base}.weight_zp", DType.UINT8, (n, -(-nb // 2)))
        if self.zero_correction:
            layout.add(f"{base}.weight_zc", DType.FLOAT, (n, nb))


def wasm_f32_bytes(layout: "Layout") -> int:
    """Bytes of the f32 weights the WASM graph unpacks from ``layout``'s int4 linear layers (4 per weight)."""
    return sum(4 * init.shape[0] * init.shape[1] * init.shape[2] * 2 for name, init in layout.inits.items()
               if name.endswith(".weight_Q4") and name not in layout.aliases)


def _schemes() -> dict[str, WeightFormat]:
    out = {}
    for block in BLOCK_SIZES:
        for w in (WeightFormat(block_size=block), WeightFormat(block_size=block, symmetric=False),
                  WeightFormat(block_size=block, symmetric=False, zero_correction=True)):
            out[w.name] = w
    return out


# Every int4 scheme a bundle can have (accuracy level 4; it changes the compute, not the bytes).
SCHEMES: dict[str, WeightFormat] = _schemes()
DEFAULT = "INT4_B32"
# What --quant auto tries for ONNX, walked smallest first: HQQ's lower error at bigger blocks
# often buys the size of plain round-to-nearest at block 32 (benchmarks/quality_ladder.py).
AUTO_LADDER = ("INT4_B32", "INT4_B128_HQQ", "INT4_B64_HQQ", "INT4_B32_HQQ")


@dataclass(frozen=True)
class Declared:
    """The initializers of one decoder, and how the embedding reads the lm_head's blocks."""

    layout: Layout
    embed_base: str | None  # the int4 linear whose blocks the embedding gathers (None: f32 embedding)
    embed_zp: str | None


def declare(d: Dims, fmt: WeightFormat, *, has_bias: bool, tied: bool, int4_embeddings: bool = True) -> Declared:
    """Every initializer of the decoder graph, in file order (the converter writes these, the planner sums them)."""
    layout = Layout()
    f32 = DType.FLOAT
    for i in range(d.n_layers):
        pre = f"model.layers.{i}"
        for norm in layer_norms(d):
            layout.add(f"{pre}.{norm}.weight", f32, (d.hidden,))
        if d.conv(i):
            _conv_inits(layout, d, fmt, pre)
        elif d.is_linear(i):
            declare_delta_net(layout, d, fmt, pre)
        else:
            _attention_inits(layout, d, fmt, pre, has_bias)
        # gate and up read the same input: one MatMulNBits over their stacked rows quantizes the
        # activations once and dispatches the thread pool once (benchmarks/onnx_speed.py).
        fmt.linear_inits(layout, f"{pre}.mlp.gate_up_proj", 2 * d.intermediate, d.hidden)
        fmt.linear_inits(layout, f"{pre}.mlp.down_proj", d.hidden, d.intermediate)
    layout.add("model.norm.weight", f32, (d.hidden,))
    fmt.linear_inits(layout, "lm_head", d.vocab, d.hidden)
    embed_base = embed_zp = None
    if fmt.int4 and int4_embeddings and d.hidden % fmt.block_size == 0:
        embed_base = "lm_head"
        if not tied:
            embed_base = "model.embed_tokens"
            fmt.linear_inits(layout, embed_base, d.vocab, d.hidden)
        # GatherBlockQuantized reads the same bytes as rows of packed nibbles.
        layout.add("model.embed_tokens.qdata", DType.UINT8, (d.vocab, d.hidden // 2), alias_of=f"{embed_base}.weight_Q4")
        if fmt.symmetric and not fmt.zero_correction:  # MatMulNBits' implicit zero point (8), made explicit
            embed_zp = "model.embed_tokens.zp"
            layout.add(embed_zp, DType.UINT8, (d.vocab, -(-d.hidden // fmt.block_size // 2)))
        else:  # HQQ too: its rounded zero points, and the graph adds its correction
            embed_zp = f"{embed_base}.weight_zp"
    else:
        layout.add("model.embed_tokens.weight", f32, (d.vocab, d.hidden))
    for cache in CACHES + (LOCAL_CACHES if d.local_rope else ()):
        layout.add(cache, f32, (d.max_positions, d.rotary_dim // 2))
    return Declared(layout, embed_base, embed_zp)


def _attention_inits(layout: Layout, d: Dims, fmt: WeightFormat, pre: str, has_bias: bool) -> None:
    q_n, kv_n = d.q_rows, d.n_kv_heads * d.head_dim  # q_proj's rows (Qwen3.5's: query and gate per head)
    fmt.linear_inits(layout, f"{pre}.attn.qkv_proj", q_n + 2 * kv_n, d.hidden)
    if has_bias:
        layout.add(f"{pre}.attn.qkv_proj.bias", DType.FLOAT, (q_n + 2 * kv_n,))
    if d.qk_norm:
        for norm in ("q_norm", "k_norm"):
            layout.add(f"{pre}.attn.{norm}.weight", DType.FLOAT, (d.head_dim,))
    fmt.linear_inits(layout, f"{pre}.attn.o_proj", d.hidden, d.n_heads * d.head_dim)


def _conv_inits(layout: Layout, d: Dims, fmt: WeightFormat, pre: str) -> None:
    """A short-convolution layer's (LFM2's, by its Hugging Face names): in_proj to B, C and x (int4), the
    depthwise kernel (H, 1, L) kept f32 as llama.cpp keeps it, out_proj (int4)."""
    fmt.linear_inits(layout, f"{pre}.conv.in_proj", 3 * d.hidden, d.hidden)
    layout.add(f"{pre}.conv.conv.weight", DType.FLOAT, (d.hidden, 1, d.conv_kernel))
    fmt.linear_inits(layout, f"{pre}.conv.out_proj", d.hidden, d.hidden)


def declare_delta_net(layout: Layout, d: Dims, fmt: WeightFormat, pre: str) -> None:
    """A gated delta-net layer's initializers (Qwen3.5's linear_attn): its q/k/v and z projections and
    out_proj in the linear layers' format; b and a (2 x value heads rows, read by the decay and the update
    rate, which exp() amplifies) in f32 as one matrix, as genai's builder keeps them dense; the depthwise
    conv kernel (channels, 1, K), dt_bias, A_log and the gated norm's weight in f32."""
    f32 = DType.FLOAT
    hk, hv, dk, dv, kernel = d.linear
    la = f"{pre}.linear_attn"
    fmt.linear_inits(layout, f"{la}.in_proj_qkv", d.conv_dim, d.hidden)
    fmt.linear_inits(layout, f"{la}.in_proj_z", hv * dv, d.hidden)
    layout.add(f"{la}.in_proj_ba.weight", f32, (2 * hv, d.hidden))
    layout.add(f"{la}.conv1d.weight", f32, (d.conv_dim, 1, kernel))
    layout.add(f"{la}.dt_bias", f32, (hv,))
    layout.add(f"{la}.A_log", f32, (hv,))
    layout.add(f"{la}.norm.weight", f32, (dv,))
    fmt.linear_inits(layout, f"{la}.out_proj", d.hidden, hv * dv)


def layer_norms(d: Dims) -> tuple[str, ...]:
    """The RMSNorms of each layer, by their Hugging Face names (the initializers keep them)."""
    if d.sandwich_norms:
        return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
    return ("input_layernorm", "post_attention_layernorm")


def weight_layout(spec: ModelSpec, fmt: WeightFormat, *, has_bias: bool | None = None, tied: bool | None = None,
                  dims: Dims | None = None) -> WeightLayout:
    """Bytes of the ONNX model's weights, initializer by initializer, as :func:`declare` lays them out."""
    d = dims or Dims.from_spec(spec)
    decl = declare(d, fmt, has_bias=spec.attention_bias if has_bias is None else has_bias,
                   tied=spec.tied_embeddings if tied is None else tied)
    per_layer = [0] * spec.n_layers
    embedding = output = other = largest = 0
    for init in decl.layout.inits.values():
        if init.name in decl.layout.aliases:
            continue
        n = init.nbytes
        largest = max(largest, n)
        if init.name.startswith("model.layers."):
            per_layer[int(init.name.split(".")[2])] += n
        elif init.name.startswith("model.embed_tokens."):
            embedding += n
        elif init.name.startswith(("lm_head.", "model.norm.")):
            output += n
        else:
            other += n
    # Decoding a token reads every layer, the lm_head and one embedding row.
    per_token = sum(per_layer) + output + embedding // max(spec.vocab_size, 1)
    return WeightLayout("onnx", tuple(per_layer), embedding, output, other, per_token, largest,
                        file_bytes=decl.layout.size, wasm_f32_bytes=wasm_f32_bytes(decl.layout))


# How onnxruntime-genai's process grows, measured (benchmarks/plan_calibration.py --format onnx):
# the runtime and two tokenizers (the `tokenizers` library's and genai's own, each holding the
# vocabulary and merges), and ONNX Runtime's MatMulNBits packed copies of the int4 weights beside
# the initializers it loaded (the weights count PREPACK_FRACTION more).
RUNTIME_BYTES = 70 << 20
BYTES_PER_VOCAB = 1190
PREPACK_FRACTION = 0.40
KV_TYPE = "f32"  # the graph's KV cache (GroupQueryAttention over f32 past/present)
PROMPT_CHUNK = 512  # the runtime appends a prompt this many tokens at a time


def overhead_bytes(spec: ModelSpec, weights: int, *, cpu: bool = True) -> int:
    """The runtime, its tokenizers and, on the CPU execution provider, ONNX Runtime's packed weight
    copies (a GPU provider keeps its copies in device memory)."""
    return RUNTIME_BYTES + BYTES_PER_VOCAB * spec.vocab_size + (int(PREPACK_FRACTION * weights) if cpu else 0)


def compute_bytes(spec: ModelSpec, n_tokens: int) -> int:
    """ONNX Runtime's arena for one call over ``n_tokens``: the graph returns every position's
    logits (f32), and the FFN's activations (gate, up, their product, the int8 copy) beside them."""
    return n_tokens * (spec.vocab_size + 4 * spec.intermediate_size) * 4


def memory(spec: ModelSpec, layout: WeightLayout, n_ctx: int, kv_type: str = KV_TYPE, n_kv: int | None = None,
           n_tokens: int | None = None, cpu_kernels: bool = True) -> Memory:
    """Everything in RAM, as onnxruntime-genai allocates it (``cpu_kernels``: the CPU execution
    provider, which packs the weights). Its KV cache is f32 whatever the target's llama.cpp type."""
    n_tokens = min(PROMPT_CHUNK, n_ctx) if n_tokens is None else n_tokens
    # genai's shared past/present buffer: max_length (n_ctx) positions on every layer that attends, sliding ones
    # too; a convolution layer (LFM2) holds its f32 conv state instead, H x (L - 1) floats a sequence, and a
    # delta-net layer (Qwen3.5) its conv and recurrent state (genai 0.18's past.N.conv [B, channels, K-1] and
    # past.N.recurrent [B, Hv, dk, dv]), F32: llama.cpp's R and S rows.
    return Memory(layout.total, kv_bytes(spec, n_ctx, KV_TYPE, padded=False), compute_bytes(spec, n_tokens),
                  overhead_bytes(spec, layout.total, cpu=cpu_kernels), state=state_bytes(spec))


def explain(spec: ModelSpec, layout: WeightLayout, n_ctx: int, ram: Memory) -> list[str]:
    n = min(PROMPT_CHUNK, n_ctx)
    return [f"compute: a prompt chunk of {n} tokens x (logits {spec.vocab_size} + FFN 4 x {spec.intermediate_size}) "
            f"x 4 B = {gb(ram.compute)}",
            f"overhead: runtime {RUNTIME_BYTES / MiB:.0f} MiB + tokenizers {BYTES_PER_VOCAB} B x "
            f"{spec.vocab_size} vocab + ONNX Runtime's packed weights on the CPU ({PREPACK_FRACTION:.0%} x "
            f"{gb(layout.total)}) = {gb(ram.overhead)}"]


def scheme(name: str) -> WeightFormat:
    """An int4 scheme by name (case-insensitive)."""
    try:
        return SCHEMES[name.strip().upper()]
    except KeyError:
        raise UsageError(f"{name!r} is not an ONNX int4 scheme; use one of {', '.join(SCHEMES)}") from None


def _layout(spec: ModelSpec, fmt: WeightFormat | None, tensors: Sequence[Tensor] | None, arch: str,
            exact_types: dict[str, int] | None) -> WeightLayout:
    # The ONNX converter writes its own initializers whatever the checkpoint's tensor list.
    return weight_layout(spec, fmt or SCHEMES[DEFAULT])


FORMAT = Format(
    name="onnx", engine="onnxruntime-genai", noun="an ONNX int4 scheme", model_suffix=".onnx", scheme=scheme, schemes=tuple(SCHEMES),
    default_ladder=(DEFAULT,), auto_ladder=AUTO_LADDER, weight_layout=_layout, memory=memory, explain=explain,
    kv_type=KV_TYPE, per_tensor_buffers=True, padded_kv=False)
