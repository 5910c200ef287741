"""Gemma 3 text: Gemma-2's (1 + w) norms, on q/k too; five sliding-window layers to one global one,
each kind with its own RoPE base; no attention softcap; token_embd trimmed to the tokenizer's ids.

ONNX: edgepack's own graph (convert/onnx/graph.py) with Gemma's four norms a layer, the scaled
embedding, GELU (tanh), the window on the sliding layers only and their own cos/sin caches.

The keys are those llama.cpp's converter writes (conversion/gemma.py's Gemma3Model over TextModel's
common ones). llama.cpp does not read ``layer_types``: it assumes every sixth layer is global
unless the GGUF lists the layers, so a checkpoint whose layers follow another rule gets that list.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from packager.archs.common import sliding_layers, text_config
from packager.archs.registry import Arch, Config, Family, OnnxArch, register
from packager.errors import IncompleteConfigError, UnsupportedArchitectureError, UnsupportedConfigError

PATTERN = 6  # transformers' and llama.cpp's default: every sixth layer attends to the whole context


def _rope(cfg: Config) -> tuple[dict[str, Any], float | None]:
    """(the global layers' RoPE parameters, the sliding layers' base), wherever this transformers put them."""
    params = dict(cfg.get("rope_parameters", cfg.get("rope_scaling")) or {})
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5's per-kind layout
        return dict(params.get("full_attention", params)), params.get("sliding_attention", {}).get("rope_theta")
    if "rope_theta" not in params and cfg.get("rope_theta") is not None:
        params["rope_theta"] = cfg["rope_theta"]
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params, cfg.get("rope_local_base_freq")


def _gemma3_hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    # After the shape keys (common.write_shape_hparams): what llama.cpp's converter adds for Gemma 3.
    n_layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    dim = int(cfg.get("head_dim", 256))  # Gemma3TextConfig's default, not hidden/heads
    if cfg.get("max_position_embeddings") is None:
        w.add_context_length(131072)
    rope, local_base = _rope(cfg)
    kind = rope.get("rope_type")
    if kind == "linear" and rope.get("factor") is not None:  # Gemma 3 4B and up: the global layers only
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in (None, "default"):
        raise UnsupportedArchitectureError(f"config.json: rope_scaling type {kind!r} is not one llama.cpp's gemma3 "
                                           "takes (linear or none); pack another checkpoint")
    w.add_rope_freq_base(float(rope.get("rope_theta", 1_000_000.0)))
    if local_base is not None:
        w.add_rope_freq_base_swa(float(local_base))
    if cfg.get("rms_norm_eps") is None:
        w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(dim)
    w.add_value_length(dim)
    if cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedArchitectureError(
            "config.json: attn_logit_softcapping is set, but llama.cpp's gemma3 never caps attention, so the GGUF "
            "would compute a different model; remove it if the checkpoint was trained without it")
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer (27B)
    # model; a checkpoint that wants another scale would convert into a different model.
    llama_cpp_scalar = hidden // n_heads if n_layers == 62 else dim
    wanted = cfg.get("query_pre_attn_scalar", 256)
    if wanted is not None and float(wanted) != float(llama_cpp_scalar):
        raise UnsupportedArchitectureError(
            f"config.json: query_pre_attn_scalar is {wanted}, but llama.cpp's gemma3 scales queries by "
            f"1/sqrt({llama_cpp_scalar}) for this shape, so the GGUF would compute a different model; "
            "pack another checkpoint")
    window, flags = sliding_layers(cfg, PATTERN)
    if window:
        w.add_sliding_window(window)
        if flags != tuple(bool((i + 1) % PATTERN) for i in range(n_layers)):
            w.add_sliding_window_pattern(list(flags))  # llama.cpp would otherwise assume its own pattern


def _attention(cfg: Config) -> tuple[int, tuple[bool, ...]]:
    return sliding_layers(text_config(cfg), PATTERN)


# transformers' activation names the graph computes: GELU with the tanh approximation (Gemma 3's own).
ONNX_ACTIVATIONS = ("gelu_pytorch_tanh",)


def _onnx_check(cfg: Config) -> None:
    # What edgepack's graph would compute otherwise than transformers: one line naming the field.
    if cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedConfigError(
            "config.json: attn_logit_softcapping is set, but edgepack's ONNX graph for gemma3 never caps attention, "
            "so the bundle would compute a different model; remove it if the checkpoint was trained without it")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedConfigError(
            "config.json: use_bidirectional_attention is true (an embedding model), but edgepack's ONNX graph "
            "attends causally; pack a Gemma 3 text-generation checkpoint")
    kind = _rope(cfg)[0].get("rope_type") or "default"
    if kind not in ("default", "linear"):  # llama.cpp's gemma3 takes no other either: no --format gguf hint
        raise UnsupportedConfigError(f"config.json: rope_scaling type {kind!r:.40} is not one edgepack's "
                                           "ONNX graph for gemma3 computes (linear or none); pack another checkpoint")
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in ONNX_ACTIVATIONS:
        raise UnsupportedConfigError(
            f"config.json: hidden_activation is {act!r:.40}, but edgepack's ONNX graph for gemma3 computes "
            f"{', '.join(ONNX_ACTIVATIONS)}; pack it with --format gguf or another checkpoint")
    scalar = cfg.get("query_pre_attn_scalar", 256)
    if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0:
        raise IncompleteConfigError(f"config.json: query_pre_attn_scalar must be a positive number, got "
                                    f"{scalar!r:.40}; fix config.json")


def _onnx_rope(cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    # The global layers' RoPE (with its linear scaling, if any); the sliding layers' plain one at their own base.
    rope, local_base = _rope(cfg)
    rope.setdefault("rope_theta", 1_000_000.0)  # Gemma3TextConfig's defaults, where the config leaves them out
    return rope, {"rope_type": "default", "rope_theta": 10000.0 if local_base is None else float(local_base)}


def _onnx_graph(cfg: Config) -> dict[str, Any]:
    return dict(
        attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        # transformers multiplies by sqrt(hidden) cast to the weights' dtype: f32, as the graph computes
        embed_scale=float(np.float32(int(cfg["hidden_size"]) ** 0.5)),
        activation="gelu_tanh",
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
    )


GEMMA3 = Arch(
    # The (1 + w) offset is added in f32 to the widened weight and norms stay f32, as for Gemma-2.
    gguf.MODEL_ARCH.GEMMA3, norm_offset=1.0, extra_hparams=_gemma3_hparams, common_hparams=False,
    trim_embedding=True, swa_pattern=PATTERN, qk_norm=True,
)
# genai_config's model.type: onnxruntime-genai (0.11 and 0.18) drives "gemma3_text" as a plain decoder (its builder's
# name for Gemma3ForCausalLM); its own KV buffer holds the whole context on every layer.
GEMMA3_ONNX = OnnxArch("gemma3_text", qk_norm=True, rope_types=("default", "linear"), check=_onnx_check,
                       norm_offset=1.0, sandwich_norms=True, local_rope=True, rope=_onnx_rope, graph=_onnx_graph)
register(Family(("Gemma3ForCausalLM",), gguf=GEMMA3, onnx=GEMMA3_ONNX, attention=_attention))
register(Family(("Gemma3ForConditionalGeneration",), gguf=GEMMA3, onnx=GEMMA3_ONNX, attention=_attention,
                note="Gemma3ForConditionalGeneration: the vision tower and its projector were left out; "
                     "the bundle is the language model (text in, text out)"))
