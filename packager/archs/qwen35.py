"""Qwen3.5 (its dense sizes): gated delta-net linear-attention layers between gated full-attention layers
(every fourth by default, ``layer_types`` says which), zero-centred RMSNorms (x * (1 + w)), partial
interleaved M-RoPE on the attention layers.

GGUF: what llama.cpp's converter writes for ``Qwen3_5ForCausalLM`` and the language model of
``Qwen3_5ForConditionalGeneration`` with ``--no-mtp`` (conversion/qwen.py: Qwen3_5TextModel and its
bases): the multi-token-prediction head (``mtp.*``) and the vision tower are left out, the norms get their
+1 (all but the delta-net's own gated norm), ``A_log`` becomes ``-exp(A_log)``, the conv kernel loses its
singleton axis, and where a key head serves several value heads their V heads move from grouped order
(k0v0 k0v1 .. k1v0 ..) to tiled order (k0v0 k1v0 .. k0v1 ..), which ggml broadcasts without a copy.

The attention layers' q_proj holds the query and its output gate together (2 x heads x head_dim rows),
as llama.cpp's qwen35 reads attn_q. The linear layers carry a fixed state per sequence, not a KV cache.

ONNX: edgepack's own graph (convert/onnx/delta_net.py) for onnxruntime-genai 0.18, which holds the delta-net
layers' conv and recurrent states (ONNX Runtime 1.32's CausalConvWithState and LinearAttention, gated_delta,
on the CPU); the attention layers are GroupQueryAttention with q/k norms (1 + w), partial rotary and the
output gate; the MTP head is left out as for GGUF.
"""

from __future__ import annotations

from typing import Callable

import gguf
import numpy as np

from packager.archs.common import head_dim, layer_types, rope_parameters
from packager.archs.layers import LayerKind
from packager.archs.registry import Arch, Config, Family, OnnxArch, register
from packager.errors import IncompleteConfigError, UnsupportedArchitectureError

ARCH = gguf.MODEL_ARCH.QWEN35
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]
KINDS = ("linear_attention", "full_attention")
INTERVAL = 4  # Qwen3_5TextConfig's default: every fourth layer attends to the whole context
# What the converter writes where rope_parameters names no mrope_section (conversion/qwen.py: llama.cpp's
# qwen35 loader requires the key).
MROPE_DEFAULT = [11, 11, 10, 0]


def _rope(cfg: Config) -> dict:
    rope = rope_parameters(cfg)
    if "partial_rotary_factor" not in rope and cfg.get("partial_rotary_factor") is not None:
        rope["partial_rotary_factor"] = cfg["partial_rotary_factor"]  # transformers 4.x kept it at the top level
    return rope


def layer_kinds(cfg: Config) -> tuple[str, ...]:
    """Each layer's kind, "linear_attention" or "full_attention", as transformers builds them."""
    if layer_types(cfg, KINDS) is None:  # checks a listed layer_types: its length, each entry one of KINDS
        every = int(cfg.get("full_attention_interval") or INTERVAL)
        n = int(cfg["num_hidden_layers"])
        return tuple("full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n))
    return tuple(cfg["layer_types"])


def _linear(cfg: Config) -> tuple[int, int, int, int, int]:
    """(key heads, value heads, key head dim, value head dim, conv kernel) of the delta-net layers."""
    try:
        hk, hv = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
        dk, dv = int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"])
        kernel = int(cfg["linear_conv_kernel_dim"])
    except KeyError as exc:
        raise IncompleteConfigError(f"config.json: missing {exc.args[0]!r}, which Qwen3.5's linear-attention "
                                    "layers need; fix config.json") from None
    if min(hk, hv, dk, dv, kernel) < 1 or hv % hk:
        raise IncompleteConfigError(f"config.json: linear_num_value_heads ({hv}) must be a positive multiple of "
                                    f"linear_num_key_heads ({hk}), with positive head dims; fix config.json")
    if dk != dv:  # llama.cpp's qwen35 sizes the value heads by the state size (the key head dim)
        raise UnsupportedArchitectureError(
            f"config.json: linear_key_head_dim ({dk}) differs from linear_value_head_dim ({dv}), which llama.cpp's "
            "qwen35 cannot load; pack another checkpoint")
    return hk, hv, dk, dv, kernel


def _hparams(cfg: Config, w: gguf.GGUFWriter) -> None:
    # After the shape keys and the norm's epsilon (common.write_hparams): what conversion/qwen.py adds.
    hk, hv, dk, dv, kernel = _linear(cfg)
    rope, dim = _rope(cfg), head_dim(cfg)
    if rope.get("mrope_section") is not None:
        w.add_rope_dimension_sections([*rope["mrope_section"], *[0] * (4 - len(rope["mrope_section"]))])
    kind = rope.get("rope_type") or rope.get("type")
    if kind not in (None, "default"):  # llama.cpp's qwen35 takes no RoPE scaling
        raise UnsupportedArchitectureError(f"config.json: rope type {kind!r:.40} is not one llama.cpp's qwen35 "
                                           "runs (none); pack another checkpoint")
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_key_length(dim)
    w.add_value_length(dim)
    w.add_ssm_conv_kernel(kernel)
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(hk)
    w.add_ssm_time_step_rank(hv)
    w.add_ssm_inner_size(dv * hv)
    # gguf 0.19's writer has no add_recurrent_layers: the key and its bool array as llama.cpp reads them.
    w.add_array(f"{ARCH_NAME}.attention.recurrent_layers", [k == "linear_attention" for k in layer_kinds(cfg)])
    w.add_full_attention_interval(int(cfg.get("full_attention_interval") or INTERVAL))
    w.add_rope_dimension_count(int(dim * float(rope.get("partial_rotary_factor", 0.25))))
    if rope.get("mrope_section") is None:
        w.add_rope_dimension_sections(MROPE_DEFAULT)


def _tiled(x: np.ndarray, axis: int, hk: int, per_k: int, d: int) -> np.ndarray:
    """V heads along ``axis`` from grouped (key head, then its value heads) to tiled order."""
    shape = x.shape
    split = shape[:axis] + (hk, per_k, d) + shape[axis + 1:]
    return np.ascontiguousarray(np.swapaxes(x.reshape(split), axis, axis + 1)).reshape(shape)


def _transform(cfg: Config, name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """What conversion/qwen.py does to each tensor, by its GGUF name (numpy order, f32, the tensor whole)."""
    if name.endswith("norm.weight") and not name.endswith("ssm_norm.weight"):
        return lambda x: x + np.float32(1.0)  # zero-centred RMSNorm; the gated delta-net norm is plain w
    if not name.startswith("blk.") or ".ssm_" not in name and not name.endswith(("attn_qkv.weight", "attn_gate.weight")):
        return None
    hk, hv, dk, dv, _ = _linear(cfg)
    per_k, qk = hv // hk, 2 * hk * dk

    def tiled(x: np.ndarray, axis: int, d: int) -> np.ndarray:
        return x if per_k == 1 else _tiled(x, axis, hk, per_k, d)

    if name.endswith("attn_qkv.weight"):  # q and k rows stay; the value rows follow their heads
        return lambda x: np.concatenate([x[:qk], tiled(x[qk:], 0, dv)])
    if name.endswith("attn_gate.weight"):
        return lambda x: tiled(x, 0, dv)
    if name.endswith(("ssm_alpha.weight", "ssm_beta.weight", "ssm_dt.bias")):
        return lambda x: tiled(x, 0, 1)
    if name.endswith(".ssm_a"):  # A_log -> A = -exp(A_log), as llama.cpp's delta rule reads it
        # exp in f64, rounded once: torch's f32 exp (the converter's) is correctly rounded here, numpy's
        # f32 exp is 1 ulp off on some values.
        return lambda x: (-np.exp(tiled(x.reshape(-1), 0, 1).astype(np.float64))).astype(np.float32)
    if name.endswith("ssm_conv1d.weight"):  # (channels, 1, kernel) -> (channels, kernel); v channels reordered
        return lambda x: (lambda y: np.concatenate([y[:qk], tiled(y[qk:], 0, dv)]))(x.reshape(x.shape[0], -1))
    if name.endswith("ssm_out.weight"):  # the input columns are the value heads
        return lambda x: tiled(x, 1, dv)
    return None


def _skip(src: str) -> bool:
    # The multi-token-prediction head (as --no-mtp drops it) and the vision tower of the multimodal checkpoint.
    return src.startswith(("mtp.", "model.mtp.", "model.visual.", "visual."))


def _layers(cfg: Config) -> tuple[LayerKind, ...]:
    """Full-attention layers own a KV cache; each delta-net layer holds, per sequence, its convolution's last
    kernel-1 inputs over the q, k and v channels (llama.cpp's n_embd_r) and a key x value matrix per value head
    (n_embd_s), in F32."""
    hk, hv, dk, dv, kernel = _linear(cfg)
    nkv, hd = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]), head_dim(cfg)
    linear = LayerKind("linear", 0, hd, r_floats=(kernel - 1) * (2 * hk * dk + hv * dv), s_floats=dk * hv * dv)
    return tuple(linear if k == "linear_attention" else LayerKind("full", nkv, hd) for k in layer_kinds(cfg))


def _tensors(cfg: Config) -> list[tuple[str, tuple[int, ...]]]:
    """The GGUF tensors a Qwen3.5 config implies, each layer those of its kind (numpy-order shapes)."""
    h, ff, vocab = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    nh, hd = int(cfg["num_attention_heads"]), head_dim(cfg)
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hk, hv, dk, dv, kernel = _linear(cfg)
    conv = 2 * hk * dk + hv * dv
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, h)), ("output_norm.weight", (h,))]
    if not cfg.get("tie_word_embeddings", False):
        out.append(("output.weight", (vocab, h)))
    for i, kind in enumerate(layer_kinds(cfg)):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,)), (b + "post_attention_norm.weight", (h,)),
                (b + "ffn_gate.weight", (ff, h)), (b + "ffn_up.weight", (ff, h)), (b + "ffn_down.weight", (h, ff))]
        if kind == "linear_attention":
            out += [(b + "attn_qkv.weight", (conv, h)), (b + "attn_gate.weight", (hv * dv, h)),
                    (b + "ssm_beta.weight", (hv, h)), (b + "ssm_alpha.weight", (hv, h)), (b + "ssm_a", (hv,)),
                    (b + "ssm_dt.bias", (hv,)), (b + "ssm_conv1d.weight", (conv, kernel)),
                    (b + "ssm_norm.weight", (dv,)), (b + "ssm_out.weight", (h, hv * dv))]
        else:
            out += [(b + "attn_q.weight", (2 * nh * hd, h)), (b + "attn_k.weight", (nkv * hd, h)),
                    (b + "attn_v.weight", (nkv * hd, h)), (b + "attn_output.weight", (h, nh * hd)),
                    (b + "attn_q_norm.weight", (hd,)), (b + "attn_k_norm.weight", (hd,))]
    return out


def _onnx_check(cfg: Config) -> None:
    # What edgepack's ONNX graph would compute otherwise than transformers: one line naming the field.
    _linear(cfg)
    kind = _rope(cfg).get("rope_type") or _rope(cfg).get("type") or "default"
    if kind != "default":
        raise UnsupportedArchitectureError(f"config.json: rope type {kind!r:.40} is not one edgepack's ONNX graph for "
                                           "Qwen3.5 computes (none); pack another checkpoint")
    if cfg.get("attention_bias"):
        raise UnsupportedArchitectureError("config.json: attention_bias is true, which edgepack's ONNX graph for "
                                           "Qwen3.5's gated attention does not take; pack it with --format gguf")
    if (cfg.get("hidden_act") or "silu") != "silu":
        raise UnsupportedArchitectureError(f"config.json: hidden_act is {cfg.get('hidden_act')!r:.40}, but edgepack's "
                                           "ONNX graph for Qwen3.5 computes silu; pack another checkpoint")


def _onnx_graph(cfg: Config) -> dict:
    """The graph's Qwen3.5 fields (formats.onnx.Dims) beyond which layers are delta-nets (the layer kinds say that):
    their heads and kernel, the gated query. Text positions give every M-RoPE section the same position: plain
    RoPE over the rotary dims."""
    return dict(linear=_linear(cfg), attn_gate=True)


def _onnx_spec_dims(spec) -> dict:
    """_onnx_graph's fields from a spec (a plan without the config): the delta-net heads from the GGUF tensors a
    config's spec lists; a manifest's spec (which keeps no tensors) from its layers' state sizes (s = Hv d^2, r = (K-1) d (2 Hk + Hv),
    with the kernel of 4 every Qwen3.5 has) and, where several head layouts fit them, the one whose tensors add up
    to the spec's parameter count."""
    flags = tuple(k.kind == "linear" for k in spec.layer_kinds)
    # The cos/sin caches' width: Qwen3_5TextConfig's partial_rotary_factor (0.25, every released checkpoint's),
    # which a spec does not keep.
    ours = dict(attn_gate=True, rotary_dim=int(spec.head_dim * 0.25))
    if True not in flags:
        return ours
    i = flags.index(True)
    shapes = dict(spec.tensors)
    if f"blk.{i}.ssm_a" in shapes:
        hv, dv = shapes[f"blk.{i}.ssm_a"][0], shapes[f"blk.{i}.ssm_norm.weight"][0]
        conv, kernel = shapes[f"blk.{i}.ssm_conv1d.weight"]
        return dict(ours, linear=(int((conv - hv * dv) // (2 * dv)), hv, dv, dv, kernel))
    kind, kernel, fits = spec.layer_kinds[i], 4, []
    for d in (512, 256, 128, 64, 32, 16, 8):
        hv, rest = divmod(kind.s_floats, d * d)
        width, rest2 = divmod(kind.r_floats, (kernel - 1) * d)
        if not rest and not rest2 and hv and width > hv and not (width - hv) % 2 and not hv % ((width - hv) // 2):
            fits.append(((width - hv) // 2, hv, d, d, kernel))
    cfg = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size, "vocab_size": spec.vocab_size,
           "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
           "num_hidden_layers": spec.n_layers, "tie_word_embeddings": spec.tied_embeddings,
           "layer_types": [KINDS[not f] for f in flags]}
    for hk, hv, dk, dv, k in fits:
        layer = dict(cfg, linear_num_key_heads=hk, linear_num_value_heads=hv, linear_key_head_dim=dk,
                     linear_value_head_dim=dv, linear_conv_kernel_dim=k)
        if len(fits) == 1 or sum(int(np.prod(s)) for _, s in _tensors(layer)) == spec.n_params:
            return dict(ours, linear=(hk, hv, dk, dv, k))
    raise IncompleteConfigError(f"{spec.architecture}: the spec's delta-net state sizes fit no head layout")


QWEN35 = Arch(ARCH, extra_hparams=_hparams, common_hparams=False, renames=((".dt_bias", ".dt_proj.bias"),),
              skip=_skip, tensor_transform=_transform, squeeze=("ssm_conv1d.weight",))
# genai_config's model.type: onnxruntime-genai 0.18's builder's name for Qwen3.5's language model; its runtime finds
# the delta-net layers' states (past.N.conv / past.N.recurrent) by the names genai_config.json binds.
QWEN35_ONNX = OnnxArch("qwen3_5_text", qk_norm=True, rope_types=("default",), check=_onnx_check, norm_offset=1.0,
                       graph=_onnx_graph, spec_dims=_onnx_spec_dims)
register(Family(("Qwen3_5ForCausalLM",), gguf=QWEN35, onnx=QWEN35_ONNX, tensors=_tensors, layers=_layers,
                note="Qwen3.5: the multi-token-prediction head (mtp.*), where the checkpoint has one, was left out, "
                     "as convert_hf_to_gguf.py --no-mtp does; llama.cpp and onnxruntime-genai decode without it"))
register(Family(("Qwen3_5ForConditionalGeneration",), gguf=QWEN35, onnx=QWEN35_ONNX, tensors=_tensors, layers=_layers,
                note="Qwen3_5ForConditionalGeneration: the vision tower and the multi-token-prediction head (mtp.*) "
                     "were left out; the bundle is the language model (text in, text out)"))
