"""How many bytes a model's weights take in each bundle format, tensor by tensor, from shapes alone.

The planner's seam between formats: ``WEIGHT_LAYOUTS[format](spec, quant, ...)``
returns a :class:`WeightLayout` (bytes per layer, outside the layers, read per
decoded token, the largest single buffer, what llama.cpp's CPU backend copies
into repacked buffers), so adding a format is adding one function.

- GGUF: every tensor's ggml type as llama-quantize picks it (``quants.tensor_types``),
  for the tensor list of the real checkpoint when it is known (a local
  checkpoint's headers, a GGUF's own tensors) or the one its config implies.
- ONNX: the initializers edgepack's ONNX converter writes, as packager.formats.onnx
  declares them for one int4 scheme (block size, zero points, HQQ's correction).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from gguf import GGMLQuantizationType

from packager.formats import onnx
from packager.formats.onnx import WeightFormat
from packager.formats.weights import Tensor, WeightLayout
from packager.quants import QuantType, tensor_bytes, tensor_types
from packager.spec.model import ModelSpec

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
    h, q, kv, ff = spec.hidden_size, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.intermediate_size
    bias = spec.attention_bias if has_bias is None else has_bias
    tied = spec.tied_embeddings if tied is None else tied
    fused = spec.model_type in ("phi3", "phi3_v") or spec.architecture.startswith("Phi3")
    gemma2 = spec.model_type in ("gemma2", "gemma3", "gemma3_text")
    out: list[Tensor] = [("token_embd.weight", (spec.vocab_size, h)), ("output_norm.weight", (h,))]
    if not tied:
        out.append(("output.weight", (spec.vocab_size, h)))
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,)), (b + "ffn_norm.weight", (h,))]
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
    return out


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
        types = tensor_types(quant, tensors, n_head=spec.n_heads, n_head_kv=spec.n_kv_heads, has_imatrix=has_imatrix,
                             tied_embeddings=tied)
    repack = repack_types(arch)
    per_layer = [0] * spec.n_layers
    repacked = [0] * spec.n_layers
    embedding = output = other = largest = 0
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
    # Decoding a token reads every layer and the output matrix (the embedding itself when tied);
    # an untied embedding contributes one row.
    per_token = sum(per_layer) + output + (embedding if tied else embedding // max(spec.vocab_size, 1))
    return WeightLayout("gguf", tuple(per_layer), embedding, output, other, per_token, largest,
                        tuple(repacked), counts)


def onnx_layout(spec: ModelSpec, quant: WeightFormat | None = None, tensors: Sequence[Tensor] | None = None, *,
                arch: str = "", **_: object) -> WeightLayout:
    """Bytes of edgepack's ONNX int4 model at one scheme (default INT4_B32), initializer by initializer
    as the converter declares them (formats.onnx.declare)."""
    return onnx.weight_layout(spec, quant or onnx.SCHEMES[onnx.DEFAULT])


WEIGHT_LAYOUTS: dict[str, Callable[..., WeightLayout]] = {"gguf": gguf_layout, "onnx": onnx_layout}
