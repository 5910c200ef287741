"""Architectures the GGUF converter knows: one registered entry per family.

Each entry says which HF class names it takes, which llama.cpp architecture it
becomes, which hyper-parameters llama.cpp reads, and the few tensor changes the
family needs (Llama's Q/K row order, Llama-3's rope_freqs, Gemma's norm offset).
Tensor names are mapped by gguf-py's TensorNameMap, never by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import gguf
import numpy as np

from packager.errors import SourceError, UnsupportedArchitectureError

Config = dict[str, Any]


@dataclass(frozen=True)
class Arch:
    """How one model family converts to GGUF."""

    gguf_arch: gguf.MODEL_ARCH
    hf_names: tuple[str, ...]
    # HF stores Llama's Q/K rows interleaved for its rotary layout; llama.cpp wants them un-permuted.
    permute_qk: bool = False
    # Gemma stores RMSNorm weights as (w - 1).
    norm_offset: float = 0.0
    extra_hparams: Callable[[Config, gguf.GGUFWriter], None] | None = None
    # Gemma-2 writes no rope keys (llama.cpp's defaults are Gemma's) and its own head dims.
    common_hparams: bool = True
    extra_tensors: Callable[[Config], list[tuple[str, np.ndarray]]] = field(default=lambda cfg: [])

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHS: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    for hf_name in arch.hf_names:
        ARCHS[hf_name] = arch
    return arch


def arch_for(hf_name: str) -> Arch:
    """The converter entry for an HF architecture class name."""
    try:
        return ARCHS[hf_name]
    except KeyError:
        known = ", ".join(sorted(ARCHS))
        raise UnsupportedArchitectureError(
            f"architecture {hf_name!r} is not supported by edgepack's GGUF converter; supported: {known}"
        ) from None


def head_dim(cfg: Config) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def write_hparams(arch: Arch, cfg: Config, w: gguf.GGUFWriter) -> None:
    """All hyper-parameters llama.cpp reads for this architecture."""
    if arch.common_hparams:
        write_common_hparams(cfg, w)
    else:
        write_shape_hparams(cfg, w)
        if cfg.get("rms_norm_eps") is not None:
            w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    if arch.extra_hparams:
        arch.extra_hparams(cfg, w)


def write_shape_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    """Layers, widths and heads."""
    w.add_block_count(int(cfg["num_hidden_layers"]))
    if cfg.get("max_position_embeddings") is not None:
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))


def write_common_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    """Shape, RoPE and norm hyper-parameters, as most decoder-only architectures carry them."""
    write_shape_hparams(cfg, w)
    rope = rope_parameters(cfg)
    scaling = rope.get("rope_type") or rope.get("type")
    if scaling == "linear" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif scaling == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    if cfg.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    if cfg.get("head_dim") is not None:
        w.add_key_length(int(cfg["head_dim"]))
        w.add_value_length(int(cfg["head_dim"]))


def rope_parameters(cfg: Config) -> dict[str, Any]:
    """rope_theta and rope scaling, wherever this transformers version put them."""
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    if "rope_theta" not in rope and cfg.get("rope_theta") is not None:
        rope["rope_theta"] = cfg["rope_theta"]
    return rope


def _llama_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_rope_dimension_count(head_dim(cfg))


def llama3_rope_freqs(cfg: Config) -> list[tuple[str, np.ndarray]]:
    """Llama 3.1+ scales long wavelengths of RoPE; llama.cpp reads the factors from a tensor."""
    rope = rope_parameters(cfg)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return []
    base = float(rope.get("rope_theta", 10000.0))
    dim = head_dim(cfg)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    # float32 throughout, as the reference implementation computes it: the factors are then
    # bit-identical to what llama.cpp's own converter writes.
    f32 = np.float32
    factors = []
    for freq in freqs.astype(f32):
        wavelen = f32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            factors.append(f32(1.0))
        elif wavelen > low_wavelen:
            factors.append(f32(factor))
        else:  # smooth interpolation between the two regimes
            smooth = (f32(old_ctx) / wavelen - f32(low)) / f32(high - low)
            factors.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.array(factors, dtype=np.float32))]


register(Arch(
    gguf.MODEL_ARCH.LLAMA, ("LlamaForCausalLM", "MistralForCausalLM"),
    permute_qk=True, extra_hparams=_llama_hparams, extra_tensors=llama3_rope_freqs,
))
register(Arch(gguf.MODEL_ARCH.QWEN2, ("Qwen2ForCausalLM",)))


def _softcap(cfg: Config, key: str, default: float) -> float:
    # Absent: Gemma2Config's default. Explicitly null means "no capping" to transformers, but
    # llama.cpp's gemma2 always caps: refuse rather than write a model that computes otherwise.
    if key not in cfg:
        return default
    if cfg[key] is None:
        raise UnsupportedArchitectureError(
            f"config.json: {key} is null (no softcapping), but llama.cpp's gemma2 always caps, so the GGUF "
            "would compute a different model; pack it with --format onnx instead"
        )
    return float(cfg[key])


def _gemma2_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    # Gemma-2 caps attention and final logits and alternates sliding-window layers.
    dim = int(cfg.get("head_dim") or 256)  # Gemma2Config's default, not hidden/heads
    w.add_key_length(dim)
    w.add_value_length(dim)
    w.add_attn_logit_softcapping(_softcap(cfg, "attn_logit_softcapping", 50.0))
    w.add_final_logit_softcapping(_softcap(cfg, "final_logit_softcapping", 30.0))
    w.add_sliding_window(int(cfg.get("sliding_window") or 4096))
    # llama.cpp's default base (10000) is Gemma-2's; another one must be written (its converter would not).
    theta = rope_parameters(cfg).get("rope_theta")
    if theta is not None and float(theta) != 10000.0:
        w.add_rope_freq_base(float(theta))
    # llama.cpp does not read query_pre_attn_scalar: it scales queries by 1/sqrt(head_dim), or by
    # 1/sqrt(hidden/heads) for the 46-layer (27B) model. A checkpoint that wants anything else
    # would convert into a model that computes something different: refuse it.
    n_layers, n_heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    llama_cpp_scalar = int(cfg["hidden_size"]) // n_heads if n_layers == 46 else dim
    wanted = cfg.get("query_pre_attn_scalar", 256)
    if wanted is not None and float(wanted) != float(llama_cpp_scalar):
        raise UnsupportedArchitectureError(
            f"config.json: query_pre_attn_scalar is {wanted}, but llama.cpp's gemma2 scales queries by "
            f"1/sqrt({llama_cpp_scalar}) for this shape, so the GGUF would compute a different model; "
            "pack it with --format onnx instead"
        )


register(Arch(
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w. The offset is added in f32 to the
    # widened bf16 weight, as llama.cpp's converter does since it widens first (older versions
    # added it in bf16 and rounded), and the norm is stored in f32: nothing is rounded.
    gguf.MODEL_ARCH.GEMMA2, ("Gemma2ForCausalLM",), norm_offset=1.0, extra_hparams=_gemma2_hparams,
    common_hparams=False,
))


# -- Phi-3, Phi-3.5, Phi-4-mini: fused qkv_proj and gate_up_proj (gguf-py maps them to attn_qkv
# and ffn_up, which llama.cpp's phi3 splits itself), RoPE over part of the head for Phi-4-mini,
# and Phi-3.5's "longrope" scaling: per-frequency factors in two tensors, one for contexts up
# to the original training length and one beyond, plus an attention factor.

def _phi3_rope(cfg: Config) -> tuple[dict[str, Any], int, int]:
    """The rope parameters, the rotary dimensions and the original context length."""
    rope = rope_parameters(cfg)
    n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    fraction = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor")) or 1.0)
    n_rot = int(fraction * n_embd) // n_head
    # llama.cpp's converter requires original_max_position_embeddings; without it there is no
    # scaling, and the training context is the original one.
    orig = rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    orig = int(orig if orig is not None else cfg["max_position_embeddings"])
    return rope, n_rot, orig


def _phi3_long_scaling(cfg: Config) -> tuple[str, list[float], list[float]] | None:
    rope, n_rot, _ = _phi3_rope(cfg)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return None
    kind = str(rope.get("rope_type") or rope.get("type") or "").lower()
    if kind not in ("longrope", "su"):  # "su": the early Phi-3-128k configs' name for it
        raise UnsupportedArchitectureError(
            f"config.json: rope_scaling type {kind or '(missing)'!r} with long/short factors is not supported "
            "for Phi-3 (expected 'longrope'); pack it with --format onnx instead"
        )
    if not short or len(long) != len(short) or len(long) * 2 != n_rot:
        raise SourceError(
            f"config.json: rope_scaling long_factor ({len(long)}) and short_factor ({len(short or [])}) must "
            f"both have {n_rot // 2} entries (half the rotary dimensions); the config is malformed, re-download it"
        )
    return kind, [float(x) for x in long], [float(x) for x in short]


def _phi3_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    rope, n_rot, orig = _phi3_rope(cfg)
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_rope_dimension_count(n_rot)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    # llama.cpp reads the window but runs Phi-3 without one (its phi3 disables SWA); a zero
    # tells Phi-4 (no window) apart, as llama.cpp's converter writes it.
    w.add_sliding_window(int(cfg.get("sliding_window") or 0))
    scaling = _phi3_long_scaling(cfg)
    if scaling is None:
        return
    scale = int(cfg["max_position_embeddings"]) / orig
    if rope.get("attention_factor") is not None:  # transformers' rope code honours an explicit one
        attn_factor = float(rope["attention_factor"])
    elif scale <= 1.0:
        attn_factor = 1.0
    else:
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig))
    w.add_rope_scaling_attn_factors(attn_factor)


def phi3_rope_factors(cfg: Config) -> list[tuple[str, np.ndarray]]:
    """longrope's per-frequency factors; llama.cpp picks long or short by the context it runs with."""
    scaling = _phi3_long_scaling(cfg)
    if scaling is None:
        return []
    _, long, short = scaling
    return [
        (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.array(long, dtype=np.float32)),
        (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.array(short, dtype=np.float32)),
    ]


register(Arch(
    gguf.MODEL_ARCH.PHI3, ("Phi3ForCausalLM",), extra_hparams=_phi3_hparams, common_hparams=False,
    extra_tensors=phi3_rope_factors,
))
