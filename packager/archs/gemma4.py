"""Gemma 4 E2B/E4B (Gemma4ForCausalLM, and the language model of Gemma4ForConditionalGeneration).

Sliding-window layers and full-attention layers with their own head dims (head_dim, and per_layer_config's or
global_head_dim for the full ones), each kind with its own RoPE (the full layers' "proportional" partial RoPE
is llama.cpp's rope_freqs tensor: factor 1 on the rotated pairs, 1e30 on the others); per-layer input
embeddings (a second, narrow embedding table whose rows feed every layer through a gate and a projection);
and shared-KV layers: the last num_kv_shared_layers layers compute no K or V, they attend over the cache of
the last earlier layer of their kind (llama.cpp: n_layer_kv_from_start - 2 for a sliding layer, - 1 for a
full one), so they hold no cache. Norms are plain weights (no Gemma-3 +1); each layer scales its output by
layer_scalar.

GGUF: what llama.cpp's converter writes (conversion/gemma.py: Gemma4Model over Gemma3Model over TextModel):
its keys in its order (a key written twice keeps its first place and its last value, which GGUFWriter does
here too, so each class's writes are repeated as the converter makes them), the vision and audio towers
left out. ONNX: onnxruntime-genai has no graph for per-layer embeddings or shared-KV layers.
"""

from __future__ import annotations

from typing import Any, Sequence

import gguf
import numpy as np

from packager.archs.common import layer_types, sliding_layers, text_config
from packager.archs.layers import LayerKind
from packager.archs.registry import Arch, Config, Family, register
from packager.errors import IncompleteConfigError, UnsupportedArchitectureError

ARCH = gguf.MODEL_ARCH.GEMMA4
KINDS = ("sliding_attention", "full_attention")
ONNX_REFUSAL = ("Gemma 4 E2B/E4B's per-layer embeddings and shared-KV layers have no onnxruntime-genai graph; "
                "pack it with --format gguf")


def _kinds(cfg: Config) -> tuple[str, ...]:
    """Each layer's kind, "sliding" or "full": layer_types, which Gemma4TextConfig always saves."""
    kinds = layer_types(cfg, KINDS)
    if kinds is None:
        raise IncompleteConfigError("config.json: Gemma 4 needs layer_types (which layers slide); fix config.json")
    return kinds


def _full(cfg: Config, key: str, old: str) -> Any:
    """A full layer's own value of ``key`` (per_layer_config, as transformers 5 saves it; ``old``, the hub's older
    top-level field, first), as llama.cpp's converter looks it up; None where neither has it."""
    if cfg.get(old) is not None:
        return cfg[old]
    kinds = cfg.get("layer_types") or []
    for idx, layer in (cfg.get("per_layer_config") or {}).items():
        if int(idx) < len(kinds) and kinds[int(idx)] == "full_attention" and key in layer:
            return layer[key]
    return None


def _dims(cfg: Config) -> tuple[int, int, int, int | None]:
    """(sliding head dim, full head dim, sliding KV heads, full KV heads or None where they are the same)."""
    swa = int(cfg.get("head_dim") or 256)
    full = _full(cfg, "head_dim", "global_head_dim")
    if full is None:
        raise IncompleteConfigError("config.json: Gemma 4's full-attention head dim is missing (global_head_dim, or "
                                    "head_dim in per_layer_config for a full_attention layer); fix config.json")
    n_kv = int(cfg.get("num_key_value_heads") or 4)
    full_kv = _full(cfg, "num_key_value_heads", "num_global_key_value_heads")
    return swa, int(full), n_kv, None if full_kv is None else int(full_kv)


def _first_shared(cfg: Config) -> int:
    """The first layer that reads another's cache (llama.cpp's n_layer_kv_from_start)."""
    n, shared = int(cfg["num_hidden_layers"]), int(cfg.get("num_kv_shared_layers") or 0)
    if not 0 <= shared < n:
        raise IncompleteConfigError(f"config.json: num_kv_shared_layers ({shared}) must be below num_hidden_layers "
                                    f"({n}); fix config.json")
    return n - shared


def _check(cfg: Config) -> None:
    """What llama.cpp's gemma4 would compute otherwise than transformers: one line naming the field."""
    if cfg.get("enable_moe_block") or cfg.get("num_experts"):
        raise UnsupportedArchitectureError("config.json: a Gemma 4 mixture of experts (enable_moe_block) is not one "
                                           "edgepack converts (E2B/E4B are dense); pack another checkpoint")
    if cfg.get("attention_k_eq_v"):
        raise UnsupportedArchitectureError("config.json: attention_k_eq_v is true (K reused as V), which edgepack's "
                                           "Gemma 4 converter does not take; pack E2B or E4B")
    kinds, first = _kinds(cfg), _first_shared(cfg)
    if first < len(kinds):
        # llama.cpp maps a shared sliding layer to layer first-2 and a shared full one to first-1; transformers
        # to the last unshared layer of that kind. They agree only where those two are sliding, then full.
        if first < 2 or kinds[first - 2:first] != ("sliding", "full"):
            raise UnsupportedArchitectureError(
                f"config.json: with num_kv_shared_layers the two layers before the first shared one (layer {first}) "
                "must be sliding then full, or llama.cpp's gemma4 reads another layer's cache than transformers; "
                "pack another checkpoint")
    rope = (cfg.get("rope_parameters") or {}).get("full_attention") or {}
    if rope.get("rope_type", "proportional") != "proportional":
        raise UnsupportedArchitectureError(f"config.json: the full layers' rope_type is {rope.get('rope_type')!r:.40}, "
                                           "not the proportional RoPE llama.cpp's gemma4 applies; pack another checkpoint")


def layer_kinds(sliding: Sequence[bool], kv_heads: Sequence[int], swa_dim: int, full_dim: int,
                first_shared: int) -> tuple[LayerKind, ...]:
    """Each layer's kind and cache, from a config or a GGUF: sliding layers of head dim ``swa_dim``, full ones of
    ``full_dim``; from ``first_shared`` on, a layer reads the cache of llama.cpp's source layer for its kind
    (n_layer_kv_from_start - 2 if sliding, - 1 if full) and holds none."""
    return tuple(LayerKind("sliding" if s else "full", int(n), swa_dim if s else full_dim,
                           kv_source=None if i < first_shared else first_shared - (2 if s else 1))
                 for i, (s, n) in enumerate(zip(sliding, kv_heads)))


def _layers(cfg: Config) -> tuple[LayerKind, ...]:
    _check(cfg)
    swa, full, n_kv, full_kv = _dims(cfg)
    kinds = _kinds(cfg)
    heads = [n_kv if k == "sliding" or full_kv is None else full_kv for k in kinds]
    return layer_kinds([k == "sliding" for k in kinds], heads, swa, full, _first_shared(cfg))


def _ffn(cfg: Config) -> list[int]:
    """Each layer's FFN width: twice intermediate_size on the shared layers with use_double_wide_mlp."""
    ff, first = int(cfg["intermediate_size"]), _first_shared(cfg)
    wide = bool(cfg.get("use_double_wide_mlp"))
    return [ff * 2 if wide and i >= first else ff for i in range(int(cfg["num_hidden_layers"]))]


def _tensors(cfg: Config) -> list[tuple[str, tuple[int, ...]]]:
    """The GGUF tensors a Gemma 4 config implies (numpy-order shapes), each layer's own: shared layers lack
    attn_k, attn_v and attn_k_norm; rope_freqs is generated."""
    h, vocab, nh = int(cfg["hidden_size"]), int(cfg["vocab_size"]), int(cfg["num_attention_heads"])
    n, p = int(cfg["num_hidden_layers"]), int(cfg.get("hidden_size_per_layer_input") or 0)
    _, full, _, _ = _dims(cfg)
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, h)), ("output_norm.weight", (h,))]
    if not cfg.get("tie_word_embeddings", True):
        out.append(("output.weight", (vocab, h)))
    if p:
        out += [("per_layer_token_embd.weight", (int(cfg.get("vocab_size_per_layer_input") or vocab), n * p)),
                ("per_layer_model_proj.weight", (n * p, h)), ("per_layer_proj_norm.weight", (p,))]
    for i, (kind, ff) in enumerate(zip(_layers(cfg), _ffn(cfg))):
        b, hd, kv = f"blk.{i}.", kind.head_dim, kind.kv_dim
        out += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (nh * hd, h)), (b + "attn_q_norm.weight", (hd,)),
                (b + "attn_output.weight", (h, nh * hd)), (b + "post_attention_norm.weight", (h,)),
                (b + "ffn_norm.weight", (h,)), (b + "ffn_gate.weight", (ff, h)), (b + "ffn_up.weight", (ff, h)),
                (b + "ffn_down.weight", (h, ff)), (b + "post_ffw_norm.weight", (h,)),
                (b + "layer_output_scale.weight", (1,))]
        if kind.kv_source is None:
            out += [(b + "attn_k.weight", (kv, h)), (b + "attn_v.weight", (kv, h)), (b + "attn_k_norm.weight", (hd,))]
        if p:
            out += [(b + "inp_gate.weight", (p, h)), (b + "proj.weight", (h, p)), (b + "post_norm.weight", (h,))]
    return out


def _attention(cfg: Config) -> tuple[int, tuple[bool, ...]]:
    return sliding_layers(text_config(cfg), 6, KINDS)


def _spec_fields(cfg: Config) -> dict[str, Any]:
    # Gemma4TextConfig ties by default, and save_pretrained leaves a default out.
    return {"tied_embeddings": bool(cfg.get("tie_word_embeddings", True))}


def _hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    # The keys TextModel.set_gguf_parameters writes before general.file_type, each once, with the value the
    # converter's later classes (Gemma3Model's defaults, Gemma4Model's arrays and full-layer head dim) leave.
    _check(cfg)
    swa, full, n_kv, full_kv = _dims(cfg)
    rope = cfg.get("rope_parameters") or {}
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_context_length(int(cfg.get("max_position_embeddings") or 131072))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(_ffn(cfg) if cfg.get("use_double_wide_mlp") else int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg.get("num_attention_heads") or 8))
    w.add_head_count_kv(n_kv if full_kv is None else [n_kv if k == "sliding" else full_kv for k in _kinds(cfg)])
    w.add_rope_freq_base(float((rope.get("full_attention") or rope).get("rope_theta", 1_000_000.0)))
    if (theta_swa := (rope.get("sliding_attention") or {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(float(theta_swa))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-6))
    w.add_key_length(full)
    w.add_value_length(full)


def _after_file_type(cfg: Config, w: gguf.GGUFWriter) -> None:
    # Gemma3Model's and Gemma4Model's keys that TextModel has not written before general.file_type.
    swa, full, _, _ = _dims(cfg)
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if cfg.get("sliding_window_pattern") != 1:
        w.add_sliding_window(int(cfg["sliding_window"]))
    w.add_shared_kv_layers(int(cfg.get("num_kv_shared_layers") or 0))
    w.add_embedding_length_per_layer_input(int(cfg.get("hidden_size_per_layer_input") or 0))
    w.add_sliding_window_pattern([k == "sliding" for k in _kinds(cfg)])
    w.add_key_length_swa(swa)
    w.add_value_length_swa(swa)
    w.add_rope_dimension_count(full)  # the full layers rotate all dims; rope_freqs leaves the others unturned
    # the sliding layers rotate whole heads (the per-kind rope_parameters has no top-level partial factor)
    w.add_rope_dimension_count_swa(int(swa * float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))))


def _rope_freqs(cfg: Config) -> list[tuple[str, np.ndarray]]:
    """llama.cpp's form of the full layers' proportional RoPE: ggml's NeoX rotation turns the first pairs, so
    the pairs transformers leaves unrotated get a frequency factor of 1e30 (an angle of ~0), the others 1."""
    cfg = text_config(cfg)
    _, full, _, _ = _dims(cfg)
    factor = float(((cfg.get("rope_parameters") or {}).get("full_attention") or {}).get("partial_rotary_factor", 1.0))
    rotated = int(full * factor / 2)
    return [("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (full // 2 - rotated), dtype=np.float32))]


def _skip(src: str) -> bool:
    # Gemma4ForConditionalGeneration's vision and audio towers and their embedders (as TextModel.filter_tensors).
    return any(part in src for part in ("vision_", "audio_", "vision.", "audio."))


GEMMA4 = Arch(ARCH, extra_hparams=_hparams, common_hparams=False, own_hparams=True, after_file_type=_after_file_type,
              extra_tensors=_rope_freqs, trim_embedding=True, qk_norm=True, skip=_skip,
              swa_pattern=6,  # a GGUF source's spec reads the layers' list, which every gemma4 GGUF has
              # transformers' layer_scalar is a buffer without a .weight suffix; the converter adds it
              renames=((".layer_scalar", ".layer_scalar.weight"),))
register(Family(("Gemma4ForCausalLM",), gguf=GEMMA4, onnx_refusal=ONNX_REFUSAL, layers=_layers, tensors=_tensors,
                spec_fields=_spec_fields, attention=_attention))
register(Family(("Gemma4ForConditionalGeneration",), gguf=GEMMA4, onnx_refusal=ONNX_REFUSAL, layers=_layers,
                tensors=_tensors, spec_fields=_spec_fields, attention=_attention,
                note="Gemma4ForConditionalGeneration: the vision and audio towers were left out; the bundle is the "
                     "language model (text in, text out)"))
