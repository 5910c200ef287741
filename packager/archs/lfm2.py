"""LFM2 / LFM2.5 (Lfm2ForCausalLM): short-convolution layers mixed with attention layers.

A convolution layer projects its input to three (B, C, x), convolves B*x along the sequence with a
depthwise kernel of width conv_L_cache and gates the result by C; it carries its last L-1 inputs between
tokens (llama.cpp's recurrent state: F32, hidden x (L-1) floats a sequence) and no KV cache. Attention
layers have q/k RMSNorms per head and head_dim = hidden / heads. Every layer has a SwiGLU FFN whose width
is derived from intermediate_size (_ffn_width). Norms are plain weights; model.embedding_norm is the final norm.

The GGUF keys are llama.cpp's LFM2Model's (conversion/lfm2.py over TextModel's), in the order its writer keeps
them: a key written twice keeps its first position and its last value, so each is written once here, at the
first position, with the final value. The per-layer head_count_kv (0 on convolution layers) is how llama.cpp
tells the kinds apart (models/lfm2.cpp: is_recr = n_head_kv(il) == 0).

The ONNX graph (convert/onnx: shortconv.py for the convolution layers) is edgepack's decoder with the
convolution in the attention's place on those layers, run by onnxruntime-genai's LFM2 runner (model type
"lfm2", 0.18 and later), which carries each convolution's state between steps; the attention layers
normalize each head of q and k as Qwen3's do. LFM2's own names map onto the Llama-style ones the converter
reads (ONNX_RENAMES).
"""

from __future__ import annotations

from typing import Any

import gguf

from packager.archs.common import layer_types, rope_parameters
from packager.archs.layers import LayerKind, conv_layer
from packager.archs.registry import Arch, Config, Family, OnnxArch, register
from packager.errors import IncompleteConfigError, UnsupportedConfigError

LFM2_KINDS = ("full_attention", "conv")
# (the converter's Llama-style name, LFM2's), as dotted paths matched whole (OnnxArch.renames)
ONNX_RENAMES = (("input_layernorm", "operator_norm"), ("post_attention_layernorm", "ffn_norm"),
                ("self_attn.o_proj", "self_attn.out_proj"), ("self_attn.q_norm", "self_attn.q_layernorm"),
                ("self_attn.k_norm", "self_attn.k_layernorm"), ("mlp.gate_proj", "feed_forward.w1"),
                ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"), ("norm", "embedding_norm"))


def _kinds(cfg: Config) -> tuple[str, ...]:
    """Each layer's kind: layer_types, else full_attn_idxs (older LFM2 configs), else every layer attends
    (Lfm2Config's own default when a config names neither)."""
    kinds = layer_types(cfg, LFM2_KINDS)
    if kinds is not None:
        return kinds
    n = int(cfg["num_hidden_layers"])
    idxs = cfg.get("full_attn_idxs")
    if idxs is None:
        return ("full",) * n
    if not isinstance(idxs, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idxs):
        raise IncompleteConfigError(f"config.json: full_attn_idxs must list layer numbers, got {idxs!r:.60}; "
                                    "fix config.json")
    return tuple("full" if i in idxs else "conv" for i in range(n))


def _ffn_width(cfg: Config) -> int:
    """The FFN's real width. With block_auto_adjust_ff_dim, 2/3 of intermediate_size, times
    block_ffn_dim_multiplier, rounded up to block_multiple_of. llama.cpp's converter always rounds; transformers
    rounds only when the multiplier is set: where the two disagree the weights cannot be converted faithfully."""
    ff = int(cfg.get("intermediate_size") or cfg.get("block_ff_dim") or 0)
    if not cfg.get("block_auto_adjust_ff_dim", True):
        return ff
    ff = int(2 * ff / 3)
    multiplier = cfg.get("block_ffn_dim_multiplier", 1.0)
    multiple = int(cfg.get("block_multiple_of", 256))
    if multiplier is None:
        if ff % multiple:
            raise UnsupportedConfigError(
                f"config.json: block_ffn_dim_multiplier is null, so transformers keeps the FFN {ff} wide, but "
                f"llama.cpp's converter rounds it up to a multiple of block_multiple_of ({multiple}); the GGUF "
                "would not match the weights; pack another checkpoint")
        return ff
    ff = int(multiplier * ff)
    return multiple * ((ff + multiple - 1) // multiple)


def _l_cache(cfg: Config) -> int:
    return int(cfg.get("conv_L_cache", 3))


def _layers(cfg: Config) -> tuple[LayerKind, ...]:
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim, width = hidden // heads, _l_cache(cfg)  # llama.cpp's lfm2 takes head_dim = hidden / heads
    return tuple(LayerKind("full", n_kv, head_dim) if k == "full" else conv_layer(hidden, head_dim, width)
                 for k in _kinds(cfg))


def _spec_fields(cfg: Config) -> dict[str, Any]:
    """The adjusted FFN width (the one llama.cpp's converter writes and its weights have), the parameter
    count with attention on the attention layers only, and tied embeddings unless the config unties them."""
    if cfg.get("conv_bias"):
        raise UnsupportedConfigError("config.json: conv_bias is true, but llama.cpp's lfm2 has no biases on its "
                                     "convolution layers; pack another checkpoint")
    hidden, heads, vocab = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["vocab_size"])
    ff = _ffn_width(cfg)
    # Lfm2Config ties by default (older configs say tie_embedding), and save_pretrained leaves the default out.
    tied = bool(cfg.get("tie_word_embeddings", cfg.get("tie_embedding", True)))
    params = vocab * hidden * (1 if tied else 2) + hidden
    for kind in _layers(cfg):
        params += 3 * hidden * ff + 2 * hidden
        if kind.kind == "conv":
            params += kind.mixer_params
        else:
            kv = kind.kv_dim
            params += 2 * hidden * hidden + 2 * hidden * kv + 2 * (hidden // heads)
    return {"intermediate_size": ff, "n_params": params, "tied_embeddings": tied}


def _hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    # TextModel's keys first, with LFM2Model's final values (feed_forward_length adjusted, rms eps = norm_eps).
    kinds = _kinds(cfg)
    n_kv = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_block_count(int(cfg["num_hidden_layers"]))
    if cfg.get("max_position_embeddings") is not None:
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(_ffn_width(cfg))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv([0 if k == "conv" else n_kv for k in kinds])
    rope = rope_parameters(cfg)
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise UnsupportedConfigError(f"config.json: rope type {rope.get('rope_type') or rope.get('type')!r:.40} "
                                     "is not one llama.cpp's lfm2 applies (default only); pack another checkpoint")
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.get("norm_eps", 1e-5)))


def _after_file_type(cfg: Config, w: gguf.GGUFWriter) -> None:
    # LFM2Model adds these after TextModel's general.file_type.
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_shortconv_l_cache(_l_cache(cfg))


LFM2 = Arch(gguf.MODEL_ARCH.LFM2, extra_hparams=_hparams, common_hparams=False, own_hparams=True, qk_norm=True,
            after_file_type=_after_file_type, output_norm="token_embd_norm",
            # the depthwise kernel is stored (H, 1, L); llama.cpp's shortconv takes it (H, L)
            squeeze=("shortconv.conv.weight",))
# RoPE: the default only, as on the GGUF side (transformers' other kinds are untested here).
LFM2_ONNX = OnnxArch("lfm2", qk_norm=True, rope_types=("default",), renames=ONNX_RENAMES)
register(Family(("Lfm2ForCausalLM",), gguf=LFM2, onnx=LFM2_ONNX, layers=_layers, spec_fields=_spec_fields))
