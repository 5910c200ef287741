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

from packager.errors import UnsupportedArchitectureError

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


def _gemma2_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    # Gemma-2 caps attention and final logits and alternates sliding-window layers.
    w.add_key_length(head_dim(cfg))
    w.add_value_length(head_dim(cfg))
    w.add_attn_logit_softcapping(float(cfg.get("attn_logit_softcapping") or 50.0))
    w.add_final_logit_softcapping(float(cfg.get("final_logit_softcapping") or 30.0))
    w.add_sliding_window(int(cfg.get("sliding_window") or 4096))


register(Arch(
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w. The offset is added in f32,
    # not in the checkpoint's bf16 as llama.cpp's converter does, so no precision is lost.
    gguf.MODEL_ARCH.GEMMA2, ("Gemma2ForCausalLM",), norm_offset=1.0, extra_hparams=_gemma2_hparams,
    common_hparams=False,
))
