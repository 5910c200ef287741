"""Gemma-2: norms stored as (w - 1), soft-capped attention and logits, alternating sliding windows."""

from __future__ import annotations

import gguf

from packager.archs.common import rope_parameters, sliding_layers
from packager.archs.registry import Arch, Config, Family, register
from packager.errors import UnsupportedArchitectureError


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


def _attention(cfg: Config) -> tuple[int, tuple[bool, ...]]:
    # Even layers slide (transformers' layer_types, llama.cpp's pattern 2), over Gemma2Config's default window.
    return sliding_layers({**cfg, "sliding_window": cfg.get("sliding_window") or 4096}, 2)


# The ONNX side: optimum-onnx's export (convert/onnx/optimum_export.py), not edgepack's graph.
register(Family(("Gemma2ForCausalLM",), gguf=Arch(
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w. The offset is added in f32 to the
    # widened bf16 weight, as llama.cpp's converter does since it widens first (older versions
    # added it in bf16 and rounded), and the norm is stored in f32: nothing is rounded.
    gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, extra_hparams=_gemma2_hparams, common_hparams=False, swa_pattern=2,
), attention=_attention))
