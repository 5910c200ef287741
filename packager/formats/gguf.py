"""GGUF, as the planner sees it: llama.cpp's types per tensor, and the memory llama.cpp allocates.

The memory model is llama.cpp's, as measured by benchmarks/plan_calibration.py
(llama-cpp-python on this machine's CPU backend, flash attention off, n_ubatch 512):

- weights: each tensor's bytes at its own ggml type as llama-quantize picks it
  (``quants.tensor_types``), for the tensor list of the real checkpoint when it is known (a
  local checkpoint's headers, a GGUF's own tensors) or the one its config implies; mmap'd and
  touched at load (ggml-cpu's repacked copies replace their mapped pages, which stay in RSS as
  reclaimable page cache: ``Memory.page_cache``);
- KV cache: 2 x kv heads x head dim x cells x bytes of the type, per layer: n_ctx (padded to 256),
  or on a sliding-window layer the window plus a micro-batch, padded (llama_kv_cache_iswa, which
  the runtime opens with swa_full=False); none on a state layer;
- recurrent state (hybrids: LFM2's convolution layers): each state layer's rows in F32, once per
  sequence, whatever the KV type (llama_memory_recurrent);
- compute buffer: the ggml allocator's peak for one micro-batch, the largest of the
  attention scores (n_tokens x n_kv x heads, f32, plus the mask), the FFN activations
  and the logits; only the pages a graph uses become resident, so the planner
  counts a full micro-batch at a full context (the worst case an app must survive);
- overhead: the runtime (interpreter and library), the vocab's tables, the logits buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from gguf import GGMLQuantizationType

from packager.archs import FAMILIES
from packager.formats.base import (N_UBATCH, MiB, Format, Memory, gb, kv_bytes, padded_ctx, part_too_small,
                                   state_bytes)
from packager.formats.weights import Tensor, WeightLayout
from packager.quants import QUANTS, QuantType, get_quant, tensor_bytes, tensor_types
from packager.spec.model import ModelSpec

# Measured (benchmarks/plan_calibration.py): python + llama_cpp imported, and what loading a model
# allocates besides its buffers (llama_vocab's token tables and merges grow with the vocab).
RUNTIME_BYTES = 42 * MiB
LOAD_BYTES = 8 * MiB
LOAD_BYTES_PER_TOKEN = 286  # per vocab entry
# llama.cpp reads a tensor its loader marks TENSOR_READ_LAZY (Gemma 4's per_layer_token_embd) from the mapped
# file, a row per token, instead of loading it, when it is over 4 GiB (llama-model-loader.cpp, lazy_read::add,
# lazy_mode AUTO, the default where the device maps files): a real E2B's table at F16 (~4.7 GB), not at Q8_0.
LAZY_READ_BYTES = 4 << 30

QT = GGMLQuantizationType
_BLK = re.compile(r"^blk\.(\d+)\.")

# ggml-cpu's repack (ggml/src/ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type): weight
# matrices of these types are copied at load into interleaved buffers for faster kernels, when
# their row count is a multiple of the given interleave. With mmap the file's pages were read to
# make the copy and stay mapped, so a repacked tensor counts twice in RSS.
REPACK: dict[str, dict[QT, int]] = {
    "x86_64": {QT.Q4_0: 8, QT.Q4_K: 8, QT.IQ4_NL: 8},  # AVX2 (Q2_K too with AVX512: see repack_types)
    "arm64": {QT.Q4_0: 4, QT.Q4_K: 8, QT.Q5_K: 8, QT.Q6_K: 8, QT.IQ4_NL: 4, QT.Q8_0: 4},  # NEON dotprod/i8mm
}


def _layer(name: str) -> int:
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


def gguf_tensors(spec: ModelSpec, *, has_bias: bool | None = None, tied: bool | None = None) -> list[Tensor]:
    """The GGUF tensors a checkpoint of this config converts to (names as llama.cpp's, numpy-order shapes)."""
    if spec.tensors:  # the family's own layout (a hybrid's layers differ by kind)
        tied = spec.tied_embeddings if tied is None else tied
        return [t for t in spec.tensors if t[0] != "output.weight"] + (
            [] if tied else [("output.weight", (spec.vocab_size, spec.hidden_size))])
    h, q, kv, ff = spec.hidden_size, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.intermediate_size
    bias = spec.attention_bias if has_bias is None else has_bias
    tied = spec.tied_embeddings if tied is None else tied
    fused = spec.model_type in ("phi3", "phi3_v") or spec.architecture.startswith("Phi3")
    gemma2 = spec.model_type in ("gemma2", "gemma3", "gemma3_text")
    family = FAMILIES.get(spec.architecture)
    qk_norm = bool(family and family.gguf and family.gguf.qk_norm)
    output_norm = family.gguf.output_norm if family and family.gguf else "output_norm"
    out: list[Tensor] = [("token_embd.weight", (spec.vocab_size, h)), (output_norm + ".weight", (h,))]
    if not tied:
        out.append(("output.weight", (spec.vocab_size, h)))
    for i, kind in enumerate(spec.layer_kinds):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,)), (b + "ffn_norm.weight", (h,))]
        if kind.kind == "conv":  # LFM2's short convolution in place of attention (gguf-py's SHORTCONV_*)
            out += [(b + "shortconv.in_proj.weight", (3 * h, h)), (b + "shortconv.conv.weight", (h, kind.conv_kernel)),
                    (b + "shortconv.out_proj.weight", (h, h)), (b + "ffn_gate.weight", (ff, h)),
                    (b + "ffn_up.weight", (ff, h)), (b + "ffn_down.weight", (h, ff))]
            continue
        kv = kind.kv_dim
        if fused:
            out += [(b + "attn_qkv.weight", (q + 2 * kv, h)), (b + "ffn_up.weight", (2 * ff, h))]
        else:
            out += [(b + "attn_q.weight", (q, h)), (b + "attn_k.weight", (kv, h)), (b + "attn_v.weight", (kv, h)),
                    (b + "ffn_gate.weight", (ff, h)), (b + "ffn_up.weight", (ff, h))]
            if bias:
                out += [(b + "attn_q.bias", (q,)), (b + "attn_k.bias", (kv,)), (b + "attn_v.bias", (kv,))]
        out += [(b + "attn_output.weight", (h, q)), (b + "ffn_down.weight", (h, ff))]
        if gemma2:
            out += [(b + "post_attention_norm.weight", (h,)), (b + "post_ffw_norm.weight", (h,))]
        if qk_norm:
            out += [(b + "attn_q_norm.weight", (spec.head_dim,)), (b + "attn_k_norm.weight", (spec.head_dim,))]
    return out


def layer_kind_mismatch(found: Sequence[Tensor], spec: ModelSpec) -> str | None:
    """Where a hybrid config's layer kinds disagree with the weights (layer_types calls a layer a convolution
    while its weights are attention's, or the reverse): one sentence naming the first such layer; None when
    they agree or the model does not mix kinds. A layer holds a tensor its kind lacks (each kind's tensors are
    gguf_tensors', so a family with its own list, Qwen3.5's, is judged by it); where the attention kinds differ
    in head dim (Gemma 4's sliding and full layers) a layer's attention tensor of another kind's shape, and a
    layer lacking the K/V its kind owns (Gemma 4's shared-KV layers have none), disagree too."""
    if not spec.layers:
        return None
    implied = dict(gguf_tensors(spec))
    kinds = spec.layer_kinds
    head_dims = {k.head_dim for k in kinds if k.kind in ("full", "sliding")}

    def kind_of(i: int) -> str:
        k = kinds[i]
        if k.kind not in ("full", "sliding"):
            return f"a {k.kind} layer"
        if k.kv_source is not None:
            return f"a shared-KV layer (reading layer {k.kv_source}'s cache)"
        return "an attention layer" if len(head_dims) < 2 else f"a {k.kind}-attention layer of head dim {k.head_dim}"

    for name, shape in found:
        i = _layer(name)
        if 0 <= i < spec.n_layers and name not in implied:
            return f"config.json's layer_types make layer {i} {kind_of(i)}, but its weights hold {name}"
        # (attention tensors only: a wrong FFN width is not a kind's, first_mismatch names it)
        if 0 <= i < spec.n_layers and len(head_dims) > 1 and ".attn_" in name and tuple(shape) != tuple(implied[name]):
            return (f"config.json's layer_types make layer {i} {kind_of(i)}, but its weights hold {name} of shape "
                    f"{tuple(shape)}, not {tuple(implied[name])}")
    names = {name for name, _ in found}
    for name in implied:  # a layer whose kind owns a cache, without its K or V (a shared-KV layer's weights)
        i = _layer(name)
        if 0 <= i < spec.n_layers and name.endswith(("attn_k.weight", "attn_v.weight")) and name not in names:
            return (f"config.json's layer kinds (layer_types, num_kv_shared_layers) make layer {i} {kind_of(i)}, "
                    f"but its weights have no {name}")
    return None


def first_mismatch(found: Sequence[Tensor], spec: ModelSpec) -> str | None:
    """Where a checkpoint's tensors (GGUF names, numpy-order shapes) disagree with its config: the
    first tensor that is missing, extra or of another shape, as one sentence; None when they agree.

    A config that claims more layers or another FFN width than the weights have converts
    without complaint and then cannot be loaded by llama.cpp; this catches it from the headers.
    Tensors the converter generates (rope factors) are not the config's to imply.
    """
    names = {n for n, _ in found}
    want = gguf_tensors(spec, has_bias=any(n.endswith("attn_q.bias") for n in names), tied="output.weight" not in names)
    want_shape = dict(want)
    for name, shape in found:
        if name in want_shape:
            if tuple(shape) != tuple(want_shape[name]):
                return (f"{name} is {tuple(shape)} in the weights but config.json implies {tuple(want_shape[name])} "
                        f"(hidden_size {spec.hidden_size}, intermediate_size {spec.intermediate_size}, "
                        f"{spec.n_heads} heads x {spec.head_dim}, {spec.n_kv_heads} kv heads, vocab {spec.vocab_size})")
        elif _layer(name) >= 0 or name.startswith(("token_embd.", "output")):
            return (f"the weights have {name}, which config.json does not imply "
                    f"({spec.n_layers} layers: blk.0 .. blk.{spec.n_layers - 1})")
    for name, _ in want:
        if name not in names:
            return (f"config.json implies {name} ({spec.n_layers} layers), which the weights do not have"
                    if _layer(name) >= 0 else f"the weights have no {name}, which config.json implies")
    return None


def repack_types(arch: str) -> dict[QT, int]:
    """The types ggml-cpu repacks on a target's CPU architecture (this host's, for 'host' profiles)."""
    a = arch.lower()
    if "x86" in a or "amd64" in a:
        return REPACK["x86_64"]
    if "arm" in a or "aarch64" in a:
        return REPACK["arm64"]
    return {}


def gguf_layout(spec: ModelSpec, quant: QuantType, tensors: Sequence[Tensor] | None = None, *,
                arch: str = "", exact_types: dict[str, int] | None = None, has_imatrix: bool = False) -> WeightLayout:
    """Per-tensor bytes of the GGUF at ``quant`` (``exact_types``: a GGUF's own types, used as they are)."""
    tensors = list(tensors) if tensors is not None else gguf_tensors(spec)
    names = {n for n, _ in tensors}
    tied = "output.weight" not in names  # llama.cpp's own test
    if exact_types is not None:
        types = {n: QT(exact_types[n]) for n, _ in tensors}
    else:
        types = tensor_types(quant, tensors, n_head=spec.n_heads, n_head_kv=spec.quant_kv_heads, has_imatrix=has_imatrix,
                             tied_embeddings=tied)
    repack = repack_types(arch)
    per_layer = [0] * spec.n_layers
    repacked = [0] * spec.n_layers
    embedding = output = other = largest = per_layer_inputs = lazy = 0
    counts: dict[str, int] = {}
    for name, shape in tensors:
        qt = types[name]
        counts[qt.name] = counts.get(qt.name, 0) + 1
        n = tensor_bytes(qt, shape)
        largest = max(largest, n)
        i = _layer(name)
        if 0 <= i < spec.n_layers:
            per_layer[i] += n
            if len(shape) == 2 and qt in repack and shape[0] % repack[qt] == 0:
                repacked[i] += n
        elif name == "token_embd.weight":
            embedding += n
        elif name.startswith("output"):
            output += n
        else:
            other += n
            if name == "per_layer_token_embd.weight":  # Gemma 4's per-layer inputs: a token reads its one row
                per_layer_inputs += n // max(shape[0], 1)
                if n > LAZY_READ_BYTES:
                    lazy += n
            elif name.startswith("per_layer_"):  # their projection from the hidden state: read every token
                per_layer_inputs += n
    # Decoding a token reads every layer and the output matrix (the embedding itself when tied);
    # an untied embedding contributes one row.
    per_token = (sum(per_layer) + output + (embedding if tied else embedding // max(spec.vocab_size, 1))
                 + per_layer_inputs)
    return WeightLayout("gguf", tuple(per_layer), embedding, output, other, per_token, largest,
                        tuple(repacked), counts, lazy=lazy)


def compute_bytes(spec: ModelSpec, n_tokens: int, n_kv: int, n_outputs: int = 1) -> int:
    """Peak of the ggml allocator for one graph of ``n_tokens`` over ``n_kv`` cached tokens.

    The largest of three phases (the allocator reuses memory between them): attention
    scores (f32, in place through the softmax) with their mask, the FFN activations
    (gate, up, their product and its quantized copy), and the logits of the outputs.
    llama.cpp reserves it for n_tokens = n_ubatch, n_kv = n_ctx, n_outputs = n_tokens;
    only the pages a graph touches become resident. Plus ggml-cpu's work buffer, outside the
    allocator: the scores converted to f16 for their product with the f16 V cache
    (ggml_compute_forward_mul_mat converts src1 to the weights' vec_dot_type); measured with a
    full context (benchmarks/plan_calibration.py --fill) it was the 4-5% the allocator alone missed.
    """
    h, q = spec.hidden_size, spec.n_heads * spec.head_dim
    n_kv = padded_ctx(max(n_kv, 1))
    attention = n_tokens * n_kv * (spec.n_heads * 4 + 4) + n_tokens * (2 * h + q + 2 * spec.kv_dim) * 4
    ffn = n_tokens * (4 * spec.intermediate_size + 2 * h) * 4
    logits = n_outputs * spec.vocab_size * 4 + n_tokens * 2 * h * 4
    work = n_tokens * n_kv * spec.n_heads * 2
    return max(attention, ffn, logits) + work


def overhead_bytes(spec: ModelSpec) -> int:
    """The runtime itself, the vocab's tables and the logits buffer of one sequence."""
    return RUNTIME_BYTES + LOAD_BYTES + LOAD_BYTES_PER_TOKEN * spec.vocab_size + 4 * spec.vocab_size


def memory(spec: ModelSpec, layout: WeightLayout, n_ctx: int, kv_type: str, n_kv: int | None = None,
           n_tokens: int | None = None, cpu_kernels: bool = True) -> Memory:
    """Everything in RAM (or unified memory), as llama.cpp allocates it."""
    n_kv = n_ctx if n_kv is None else n_kv
    n_tokens = min(N_UBATCH, n_ctx) if n_tokens is None else n_tokens
    return Memory(layout.loaded, kv_bytes(spec, n_ctx, kv_type, windowed=True), compute_bytes(spec, n_tokens, n_kv),
                  overhead_bytes(spec), layout.repacked, state_bytes(spec))


def explain(spec: ModelSpec, layout: WeightLayout, n_ctx: int, ram: Memory) -> list[str]:
    n = min(N_UBATCH, n_ctx)
    return [f"compute: max(attention {n} x {padded_ctx(n_ctx)} x ({spec.n_heads} heads x 4 B + 4 B mask), "
            f"FFN {n} x 4 x {spec.intermediate_size} x 4 B, logits {spec.vocab_size} x 4 B) + f16 scores "
            f"{n} x {padded_ctx(n_ctx)} x {spec.n_heads} heads x 2 B = {gb(compute_bytes(spec, n, n_ctx))}",
            f"overhead: runtime {RUNTIME_BYTES / MiB:.0f} MiB + load {LOAD_BYTES / MiB:.0f} MiB + "
            f"{LOAD_BYTES_PER_TOKEN + 4} B x {spec.vocab_size} vocab = {gb(overhead_bytes(spec))}"]



# llama.cpp's split GGUF (tools/gguf-split): each part a GGUF of its own, the first holding every
# metadata key, all carrying split.no / split.count / split.tensors.count; tensor data padded to 32.
GGUF_ALIGNMENT = 32
SPLIT_UNIT = 1000 * 1000  # gguf-split's --split-max-size takes whole M (10^6 bytes) or G


@dataclass(frozen=True)
class SplitLayout:
    """Which tensors go into which part, by gguf-split's own rule, so that no file exceeds ``part_bytes``."""

    part_bytes: int  # the largest file the channel takes
    max_tensor_bytes: int  # tensor data per part: what `llama-gguf-split --split-max-size` is given
    parts: tuple[tuple[str, ...], ...]  # tensor names of each part, in file order

    @property
    def gguf_split_command(self) -> str:
        """The llama.cpp command that writes the same parts from the unsplit file."""
        return f"llama-gguf-split --split --split-max-size {self.max_tensor_bytes // SPLIT_UNIT}M MODEL.gguf PREFIX"


def padded(n: int, align: int = GGUF_ALIGNMENT) -> int:
    return -(-n // align) * align


def split_layout(tensors: Sequence[tuple[str, int]], part_bytes: int, meta_bytes: int) -> SplitLayout:
    """The parts of a GGUF whose files stay within ``part_bytes``.

    ``tensors`` are (name, data bytes) in file order; ``meta_bytes`` bounds the first part's
    metadata (header, every key, every tensor's info). gguf-split caps only the tensor data of a
    part, so the cap is what the part size leaves after that metadata, rounded down to the whole
    megabytes gguf-split accepts: its own rule then gives these very parts.
    """
    cap = (part_bytes - meta_bytes) // SPLIT_UNIT * SPLIT_UNIT
    name, largest = max(((n, padded(b)) for n, b in tensors), key=lambda t: t[1])
    if cap < largest:  # gguf-split would leave a part without tensors
        need = meta_bytes + -(-largest // SPLIT_UNIT) * SPLIT_UNIT
        raise part_too_small(part_bytes, f"tensor {name}", largest, need,
                             f" and the first part also holds {meta_bytes / 1e6:.1f} MB of metadata")
    parts: list[list[str]] = [[]]
    size = 0
    for n, b in tensors:
        b = padded(b)
        if size + b > cap:  # gguf-split's should_split: the part would grow past the cap
            parts.append([])
            size = 0
        parts[-1].append(n)
        size += b
    return SplitLayout(part_bytes, cap, tuple(tuple(p) for p in parts))


def _layout(spec: ModelSpec, quant: QuantType, tensors: Sequence[Tensor] | None, arch: str,
            exact_types: dict[str, int] | None) -> WeightLayout:
    return gguf_layout(spec, quant, tensors, arch=arch, exact_types=exact_types)


FORMAT = Format(
    name="gguf", engine="llama.cpp", noun="a GGUF type", model_suffix=".gguf", scheme=get_quant, schemes=tuple(QUANTS),
    default_ladder=("Q4_K_M",), auto_ladder=("Q4_K_M",), weight_layout=_layout, memory=memory, explain=explain,
    offloads_layers=True, uses_target_ladder=True, windowed_kv=True)
