"""Phi-3, Phi-3.5 and Phi-4-mini."""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from packager.archs.common import rope_parameters
from packager.archs.registry import Arch, Config, Family, OnnxArch, register
from packager.errors import SourceError, UnsupportedArchitectureError


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


register(Family(
    ("Phi3ForCausalLM",),
    gguf=Arch(gguf.MODEL_ARCH.PHI3, extra_hparams=_phi3_hparams, common_hparams=False, extra_tensors=phi3_rope_factors),
    onnx=OnnxArch("phi3", fused_qkv=True, fused_gate_up=True, rope_types=("default",)),
))
