"""What every family shares: head size, RoPE parameters, and the GGUF hyper-parameters most carry."""

from __future__ import annotations

from typing import Any

import gguf

from packager.archs.layers import LAYER_TYPES
from packager.archs.registry import Arch, Config
from packager.errors import IncompleteConfigError, UnsupportedArchitectureError


def head_dim(cfg: Config) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def text_config(cfg: Config) -> Config:
    """A multimodal wrapper's language model config lifted to the top, as llama.cpp's converter reads it;
    the wrapper's class name stays (it says which tensors the checkpoint holds)."""
    inner = cfg.get("text_config")
    if not isinstance(inner, dict):
        return cfg
    outer = {"architectures": cfg["architectures"]} if cfg.get("architectures") else {}
    return {**cfg, **inner, **outer}


def write_hparams(arch: Arch, cfg: Config, w: gguf.GGUFWriter) -> None:
    """All hyper-parameters llama.cpp reads for this architecture."""
    cfg = text_config(cfg)
    if arch.own_hparams:
        pass  # extra_hparams writes them all
    elif arch.common_hparams:
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


def refuse_sliding_window(cfg: Config, family: str) -> None:
    """Qwen3 and SmolLM3 configs may ask transformers for a window on some layers (use_sliding_window);
    llama.cpp's qwen3/smollm3 and edgepack's graph attend over the whole context on every layer, so
    such a model would convert into one that computes something else: refuse it."""
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        raise UnsupportedArchitectureError(
            f"config.json: use_sliding_window is true, but {family} converts with full attention on every layer "
            "(as llama.cpp runs it); set use_sliding_window to false if the model was trained without a window, "
            "or pack another model"
        )


def layer_types(cfg: Config, known: tuple[str, ...] = tuple(LAYER_TYPES)) -> tuple[str, ...] | None:
    """Each layer's kind (LAYER_TYPES' values: full, sliding, conv, linear) from the config's ``layer_types``;
    None where the config has none. An entry that is not one of ``known`` (the family's own: a Gemma has no
    convolution layers) is one line naming it."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != n:
        raise IncompleteConfigError(f"config.json: layer_types must list {n} entries (num_hidden_layers), "
                                    f"got {types!r:.60}; fix config.json")
    for i, t in enumerate(types):
        if not isinstance(t, str) or t not in known:
            raise IncompleteConfigError(
                f"config.json: layer_types[{i}] is {t!r:.40}, which edgepack does not know (it knows "
                f"{', '.join(known)}); fix config.json or use a checkpoint of a supported model")
    return tuple(LAYER_TYPES[t] for t in types)


def sliding_layers(cfg: Config, pattern: int,
                   known: tuple[str, ...] = ("full_attention", "sliding_attention")) -> tuple[int, tuple[bool, ...]]:
    """(window, one flag per layer): from ``layer_types`` where the config has them, else every
    ``sliding_window_pattern``-th layer (default ``pattern``) is full, as transformers builds them.

    A layer type nothing here knows, or a window no context could use, is one line naming the field.
    """
    n = int(cfg["num_hidden_layers"])
    kinds = layer_types(cfg, known)
    if kinds is not None:
        flags = tuple(k == "sliding" for k in kinds)
    else:
        every = cfg.get("sliding_window_pattern", pattern)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise IncompleteConfigError(f"config.json: sliding_window_pattern must be a positive integer, "
                                        f"got {every!r:.40}; fix config.json")
        flags = tuple(bool((i + 1) % every) for i in range(n))
    window = cfg.get("sliding_window")
    if not any(flags) or window is None:
        return 0, ()
    limit = cfg.get("max_position_embeddings")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise IncompleteConfigError(f"config.json: sliding_window must be a positive integer, got {window!r:.40}; "
                                    "fix config.json")
    if isinstance(limit, int) and window > limit:
        raise IncompleteConfigError(f"config.json: sliding_window {window} is larger than the context "
                                    f"(max_position_embeddings {limit}); fix config.json")
    return window, flags
