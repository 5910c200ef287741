"""Llama (Llama-2/3.x, SmolLM2) and Mistral: Q/K rows un-permuted for llama.cpp, Llama-3's rope factors."""

from __future__ import annotations

import math

import gguf
import numpy as np

from packager.archs.common import head_dim, rope_parameters
from packager.archs.registry import Arch, Config, Family, OnnxArch, register


def llama_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
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


LLAMA = Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, extra_hparams=llama_hparams, extra_tensors=llama3_rope_freqs)
register(Family(("LlamaForCausalLM",), gguf=LLAMA, onnx=OnnxArch("llama")))
register(Family(("MistralForCausalLM",), gguf=LLAMA, onnx=OnnxArch("mistral")))
