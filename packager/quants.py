"""The quant types edgepack offers, and which ggml type each tensor gets under one.

``QUANTS`` is the one table of quant types (the CLI's choices are its keys);
each name comes from gguf-py's ``LlamaFileType`` and is written nowhere else.

``tensor_types`` reproduces llama.cpp's ``llama_model_quantize`` decisions
(src/llama-quant.cpp: ``tensor_allows_quantization``, ``llama_tensor_get_type_impl``,
``tensor_type_fallback``) for dense models, so a GGUF edgepack writes has the
same tensor types, sizes and quality as one made with ``llama-quantize``, and
the planner can predict its size from shapes alone. Not reproduced: MoE and
arch-specific rules (Falcon, GLM5-next, 70B-only bumps), ``--pure``, and
per-tensor overrides.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from packager.errors import UnknownQuantError

QT = GGMLQuantizationType
FT = LlamaFileType

__all__ = [
    "ALIASES",
    "QUANTS",
    "QuantType",
    "bits_per_weight",
    "category",
    "get_quant",
    "quantizable",
    "tensor_bytes",
    "tensor_types",
]

_FLOATS = frozenset({QT.F32, QT.F16, QT.BF16})


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    """Storage bits per weight of a ggml type (e.g. Q4_K: 144 bytes per 256 weights = 4.5)."""
    block, type_size = GGML_QUANT_SIZES[QT(qtype)]
    return type_size * 8 / block


@dataclass(frozen=True)
class QuantType:
    """One llama.cpp file type: its default tensor type and what it needs."""

    ftype: LlamaFileType
    base: GGMLQuantizationType  # llama_ftype_get_default_type: most 2-D weights get this
    description: str
    needs_imatrix: bool = False  # llama_model_quantize refuses it without an importance matrix

    def __post_init__(self) -> None:
        if not isinstance(self.ftype, LlamaFileType) or not isinstance(self.base, GGMLQuantizationType):
            raise TypeError(f"QuantType wants a LlamaFileType and a GGMLQuantizationType, got {self.ftype!r}, {self.base!r}")
        if self.base not in GGML_QUANT_SIZES:
            raise ValueError(f"{self.base.name} has no block size in gguf.GGML_QUANT_SIZES")

    @property
    def name(self) -> str:
        """The name llama-quantize and the CLI use: LlamaFileType's name without its prefix."""
        return self.ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_")

    @property
    def is_float(self) -> bool:
        """F32, F16 or BF16: weights are converted, not quantized, and no mixture applies."""
        return self.base in _FLOATS

    @property
    def base_bits_per_weight(self) -> float:
        """Bits per weight of the default tensor type (the file is a little larger: mixtures, norms)."""
        return bits_per_weight(self.base)


def _table(*quants: QuantType) -> dict[str, QuantType]:
    return {q.name: q for q in quants}


# Default types from llama.cpp's llama_ftype_get_default_type; needs_imatrix from
# tensor_requires_imatrix (a file needs one as soon as one tensor gets IQ1/IQ2/IQ3_XXS,
# or Q2_K inside Q2_K_S). Best quality first.
QUANTS: dict[str, QuantType] = _table(
    QuantType(FT.ALL_F32, QT.F32, "32-bit float, lossless, 4x the size of Q8_0"),
    QuantType(FT.MOSTLY_F16, QT.F16, "16-bit float, lossless for most checkpoints"),
    QuantType(FT.MOSTLY_BF16, QT.BF16, "bfloat16, lossless for bf16 checkpoints"),
    QuantType(FT.MOSTLY_Q8_0, QT.Q8_0, "8.5 bpw, near lossless"),
    QuantType(FT.MOSTLY_Q6_K, QT.Q6_K, "6.56 bpw k-quant, near lossless"),
    QuantType(FT.MOSTLY_Q5_K_M, QT.Q5_K, "5.5 bpw k-quant, attn_v/ffn_down partly Q6_K"),
    QuantType(FT.MOSTLY_Q5_K_S, QT.Q5_K, "5.5 bpw k-quant"),
    QuantType(FT.MOSTLY_Q5_1, QT.Q5_1, "6 bpw legacy block quant"),
    QuantType(FT.MOSTLY_Q5_0, QT.Q5_0, "5.5 bpw legacy block quant"),
    QuantType(FT.MOSTLY_Q4_K_M, QT.Q4_K, "4.5 bpw k-quant, attn_v/ffn_down partly Q6_K; the usual choice"),
    QuantType(FT.MOSTLY_Q4_K_S, QT.Q4_K, "4.5 bpw k-quant, first layers Q5_K"),
    QuantType(FT.MOSTLY_Q4_1, QT.Q4_1, "5 bpw legacy block quant"),
    QuantType(FT.MOSTLY_Q4_0, QT.Q4_0, "4.5 bpw legacy block quant, fastest on ARM CPUs (repacked)"),
    QuantType(FT.MOSTLY_IQ4_NL, QT.IQ4_NL, "4.5 bpw non-linear, 32-weight blocks"),
    QuantType(FT.MOSTLY_IQ4_XS, QT.IQ4_XS, "4.25 bpw non-linear"),
    QuantType(FT.MOSTLY_Q3_K_L, QT.Q3_K, "3.44 bpw k-quant, attn_v/attn_output/ffn_down Q5_K"),
    QuantType(FT.MOSTLY_Q3_K_M, QT.Q3_K, "3.44 bpw k-quant, attn_v/attn_output/ffn_down Q4_K-Q5_K"),
    QuantType(FT.MOSTLY_Q3_K_S, QT.Q3_K, "3.44 bpw k-quant"),
    QuantType(FT.MOSTLY_IQ3_M, QT.IQ3_S, "3.44 bpw i-quant mix"),
    QuantType(FT.MOSTLY_IQ3_S, QT.IQ3_S, "3.44 bpw i-quant"),
    QuantType(FT.MOSTLY_IQ3_XS, QT.IQ3_S, "3.3 bpw i-quant mix", needs_imatrix=True),
    QuantType(FT.MOSTLY_IQ3_XXS, QT.IQ3_XXS, "3.06 bpw i-quant", needs_imatrix=True),
    QuantType(FT.MOSTLY_Q2_K, QT.Q2_K, "2.6 bpw k-quant, large quality loss"),
    QuantType(FT.MOSTLY_Q2_K_S, QT.Q2_K, "2.6 bpw k-quant, small mix", needs_imatrix=True),
    QuantType(FT.MOSTLY_IQ2_M, QT.IQ2_S, "2.7 bpw i-quant mix", needs_imatrix=True),
    QuantType(FT.MOSTLY_IQ2_S, QT.IQ2_XS, "2.5 bpw i-quant mix", needs_imatrix=True),
    QuantType(FT.MOSTLY_IQ2_XS, QT.IQ2_XS, "2.31 bpw i-quant", needs_imatrix=True),
    QuantType(FT.MOSTLY_IQ2_XXS, QT.IQ2_XXS, "2.06 bpw i-quant", needs_imatrix=True),
    QuantType(FT.MOSTLY_IQ1_M, QT.IQ1_M, "1.75 bpw i-quant, mostly unusable", needs_imatrix=True),
    QuantType(FT.MOSTLY_IQ1_S, QT.IQ1_S, "1.56 bpw i-quant, mostly unusable", needs_imatrix=True),
)

# llama-quantize's short aliases (tools/quantize/quantize.cpp).
ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def get_quant(name: str) -> QuantType:
    """The quant type called ``name`` (case-insensitive, llama-quantize's aliases accepted)."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    try:
        return QUANTS[key]
    except KeyError:
        raise UnknownQuantError(
            f"unknown quant type {name!r}; known: {', '.join(QUANTS)}; pick one of these (Q4_K_M is the usual)"
        ) from None


def tensor_bytes(qtype: GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes a tensor of numpy-order ``shape`` takes in ``qtype`` (rows must fill whole blocks)."""
    block, type_size = GGML_QUANT_SIZES[QT(qtype)]
    ncols = shape[-1] if shape else 1
    if ncols % block:
        raise ValueError(f"{QT(qtype).name} needs rows of a multiple of {block} weights; shape {tuple(shape)} has {ncols}")
    return math.prod(shape[:-1]) * (ncols // block) * type_size


# --- per-tensor policy -------------------------------------------------------

# Substrings that keep a 2-D ".weight" tensor out of quantization (tensor_allows_quantization),
# minus those only MoE, SSM, RWKV or multimodal models have.
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                    "attn_rel_b.weight", "position_embd", "token_types", "ssm_conv1d", "shortconv.conv.weight")
# Small convolution kernels (Mamba-style ssm_conv1d, LFM2's shortconv) that llama.cpp's converter always
# writes F32 (its SSM_CONV1D / SHORTCONV_CONV rule) and its quantizer leaves as they are.
_ALWAYS_F32 = ("ssm_conv1d", "shortconv.conv.weight")
_BLK = re.compile(r"blk\.(\d+)\.")

# tensor_type_fallback: a type whose block does not divide the row length drops to one
# with 32-weight blocks; a row that 32 does not divide either gets F16.
_FALLBACK = {
    QT.IQ1_S: QT.IQ4_NL, QT.IQ1_M: QT.IQ4_NL, QT.IQ2_XXS: QT.IQ4_NL, QT.IQ2_XS: QT.IQ4_NL,
    QT.IQ2_S: QT.IQ4_NL, QT.IQ3_XXS: QT.IQ4_NL, QT.IQ3_S: QT.IQ4_NL, QT.IQ4_XS: QT.IQ4_NL,
    QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.TQ1_0: QT.Q4_0, QT.TQ2_0: QT.Q4_0,
    QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
}


def _block(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def _ne(shape: Sequence[int]) -> list[int]:
    """ggml's ne (columns first) with trailing 1s dropped, as ggml_n_dims counts them."""
    ne = [int(d) for d in reversed(shape)] or [1]
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return ne


def _category(name: str) -> str:
    """tensor_get_category: broad roles by substring, first match wins."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _allows_quantization(name: str, ne: list[int]) -> bool:
    return len(ne) >= 2 and name.endswith("weight") and not any(s in name for s in _NEVER_QUANTIZED)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # The first and last eighth of the layers, and every third one between, get more bits.
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fallback(qtype: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
    if ncols % _block(qtype) == 0:
        return qtype
    new = _FALLBACK.get(qtype, qtype)  # 32-block types have nothing smaller to drop to
    return new if ncols % _block(new) == 0 else QT.F16


@dataclass
class _Mixer:
    """The state llama_tensor_get_type_impl keeps while it walks the tensors in order."""

    ftype: LlamaFileType
    n_gqa: int
    has_imatrix: bool
    tied: bool
    n_attn_v: int
    n_layer: int
    i_attn_v: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0

    def choose(self, t: GGMLQuantizationType, cat: str, ncols: int) -> GGMLQuantizationType:
        f, gqa = self.ftype, self.n_gqa
        iq2_family = (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ1_S,
                      FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ1_M)
        iq2s_or_m = f in (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M)

        if cat == "output" or (self.tied and cat == "token_embd"):
            # The output matrix (and the embedding it shares weights with) decides quality most.
            if ncols % _block(t):
                return QT.Q8_0
            if f in iq2_family or f == FT.MOSTLY_IQ3_XXS:
                return QT.Q5_K
            return t if t == QT.Q8_0 else QT.Q6_K
        if cat == "token_embd":
            if f in (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M):
                return QT.Q2_K
            if iq2s_or_m or f == FT.MOSTLY_IQ3_XXS:
                return QT.IQ3_S
            if f in (FT.MOSTLY_TQ1_0, FT.MOSTLY_TQ2_0):
                return QT.Q4_K
            return t
        if f in iq2_family:
            if cat == "attn_v":
                self.i_attn_v += 1
                return QT.Q4_K if gqa >= 4 else (QT.IQ3_S if iq2s_or_m else QT.Q2_K)
            if cat == "ffn_down":
                low = self.i_ffn_down < self.n_layer // 8
                self.i_ffn_down += 1
                return (QT.IQ3_S if iq2s_or_m else QT.Q2_K) if low else t
            if cat == "attn_output":
                if f in (FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M):
                    return QT.IQ2_XXS
                return QT.IQ3_S if iq2s_or_m else t
            return t
        if cat == "attn_v":
            t = self._attn_v(t)
            self.i_attn_v += 1
            return t
        if cat in ("attn_k", "attn_q"):
            if f == FT.MOSTLY_IQ3_XS:
                return QT.IQ3_XXS
            return QT.IQ2_S if f == FT.MOSTLY_IQ3_XXS else t
        if cat == "ffn_down":
            t = self._ffn_down(t, self.i_ffn_down, self.n_layer)
            self.i_ffn_down += 1
            return t
        if cat == "attn_output":
            return {FT.MOSTLY_Q2_K: QT.Q3_K, FT.MOSTLY_IQ3_XXS: QT.IQ3_S, FT.MOSTLY_Q3_K_M: QT.Q4_K,
                    FT.MOSTLY_Q3_K_L: QT.Q5_K, FT.MOSTLY_IQ3_M: QT.Q4_K}.get(f, t)
        if cat in ("ffn_gate", "ffn_up"):
            # Each has its own layer counter in llama.cpp; for a dense model it is the layer index.
            i = self.i_ffn_gate if cat == "ffn_gate" else self.i_ffn_up
            if cat == "ffn_gate":
                self.i_ffn_gate += 1
            else:
                self.i_ffn_up += 1
            if f == FT.MOSTLY_IQ3_XS and self.n_layer // 8 <= i < 7 * self.n_layer // 8:
                return QT.IQ3_XXS
        return t

    def _attn_v(self, t: GGMLQuantizationType) -> GGMLQuantizationType:
        f, gqa, i = self.ftype, self.n_gqa, self.i_attn_v
        if f == FT.MOSTLY_Q2_K:
            return QT.Q4_K if gqa >= 4 else QT.Q3_K
        if f == FT.MOSTLY_Q2_K_S and gqa >= 4:
            return QT.Q4_K
        if f == FT.MOSTLY_IQ3_XXS:
            return QT.Q4_K if gqa >= 4 else (QT.IQ3_XXS if self.has_imatrix else QT.IQ3_S)
        if f in (FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_S) and gqa >= 4:
            return QT.Q4_K
        if f == FT.MOSTLY_IQ3_M:
            return QT.Q4_K
        if f == FT.MOSTLY_Q3_K_M:
            return QT.Q5_K if i < 2 else QT.Q4_K
        if f == FT.MOSTLY_Q3_K_L:
            return QT.Q5_K
        if f in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and gqa >= 4:
            return QT.Q5_K
        if f in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i, self.n_attn_v):
            return QT.Q6_K
        if f == FT.MOSTLY_Q4_K_S and i < 4:
            return QT.Q5_K
        return t

    def _ffn_down(self, t: GGMLQuantizationType, i: int, n: int) -> GGMLQuantizationType:
        f = self.ftype
        if f == FT.MOSTLY_Q2_K:
            return QT.Q3_K
        if f == FT.MOSTLY_Q2_K_S:
            return QT.Q4_K if i < n // 8 else t
        if f == FT.MOSTLY_IQ3_XXS and not self.has_imatrix:
            return QT.Q4_K if i < n // 8 else QT.Q3_K
        if f == FT.MOSTLY_Q3_K_M:
            # llama.cpp's "arch != FALCON || use_more_bits" is always true for non-Falcon models.
            return QT.Q5_K if i < n // 16 else QT.Q4_K
        if f == FT.MOSTLY_IQ3_M:
            return QT.Q4_K if i < n // 8 else t
        if f == FT.MOSTLY_Q3_K_L:
            return QT.Q5_K
        if f == FT.MOSTLY_Q4_K_M:
            return QT.Q6_K if _use_more_bits(i, n) else t
        if f in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and i < n // 8 and not self.has_imatrix:
            return QT.Q5_K
        if f == FT.MOSTLY_Q5_K_M:
            return QT.Q6_K if _use_more_bits(i, n) else t
        if f == FT.MOSTLY_Q4_K_S:
            return QT.Q5_K if i < n // 8 else t
        if f in (FT.MOSTLY_Q4_0, FT.MOSTLY_Q5_0) and self.has_imatrix and i < n // 8:
            return QT.Q4_1 if f == FT.MOSTLY_Q4_0 else QT.Q5_1
        return t


def category(name: str) -> str:
    """A GGUF tensor's role as llama.cpp's mixtures group it: attn_q, attn_k, attn_v, attn_output, ffn_gate,
    ffn_up, ffn_down, token_embd, output, or other."""
    return _category(name)


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp quantizes this tensor (a 2-D weight that is not a norm and the like); the rest keep their type."""
    return _allows_quantization(name, _ne(shape))


def _layer(name: str) -> int:
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


def tensor_types(
    quant: QuantType,
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    *,
    n_head: int,
    n_head_kv: int,
    has_imatrix: bool = False,
    tied_embeddings: bool | None = None,
) -> dict[str, GGMLQuantizationType]:
    """The ggml type of every tensor of a dense model under ``quant``, as llama-quantize picks it.

    ``tensors`` are GGUF names with numpy-order shapes (rows, columns), i.e. GGUF
    ``ne`` reversed. ``n_head``/``n_head_kv`` give the GQA ratio some mixtures use;
    ``has_imatrix`` says an importance matrix will be applied. ``tied_embeddings``
    defaults to llama.cpp's own test: no ``output.weight`` among the tensors.

    1-D tensors, norms and other never-quantized tensors get F32 (the converter
    keeps them so); other 2-D weights start from ``quant.base``, are adjusted by
    the mixture rules of the file type, then fall back to a type whose block size
    divides their row length.
    """
    names = [n for n, _ in tensors]
    if len(set(names)) != len(names):
        raise ValueError("tensor names repeat; tensor_types needs each GGUF tensor once")
    if tied_embeddings is None:
        tied_embeddings = "output.weight" not in names
    mixer = _Mixer(
        ftype=quant.ftype,
        n_gqa=n_head // n_head_kv if n_head_kv else 0,
        has_imatrix=has_imatrix,
        tied=tied_embeddings,
        n_attn_v=sum(_category(n) == "attn_v" for n in names),
        n_layer=max((_layer(n) for n in names), default=-1) + 1,
    )
    # llama.cpp walks the tensors sorted by (layer, name) and its attn_v / ffn_down
    # counters count in that order, so walk in the same order whatever order we were given.
    ordered = sorted(tensors, key=lambda t: (_layer(t[0]), t[0]))
    out: dict[str, GGMLQuantizationType] = {}
    for name, shape in ordered:
        ne = _ne(shape)
        if not _allows_quantization(name, ne):
            # Kept as the converter wrote it: F32 for what convert_hf_to_gguf.py always keeps
            # in F32 (its rule counts numpy dims), else the file's float type (F16 for quants).
            keep_f32 = (len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight")
                        or any(s in name for s in _ALWAYS_F32))
            out[name] = QT.F32 if keep_f32 or quant.base == QT.F32 else (quant.base if quant.is_float else QT.F16)
            continue
        if quant.is_float:
            out[name] = quant.base
            continue
        out[name] = _fallback(mixer.choose(quant.base, _category(name), ne[0]), ne[0])
    return {name: out[name] for name in names}
