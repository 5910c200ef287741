"""The registry of model families: what each converter, the spec and tensor naming need of one.

A family module (llama.py, qwen2.py, qwen3.py, smollm3.py, gemma2.py, phi3.py) registers a :class:`Family` for the
Hugging Face class names it takes: its GGUF side (:class:`Arch`: llama.cpp's architecture, its
hyper-parameters and tensor changes) and its ONNX side (:class:`OnnxArch`: the genai model type
and which projections the checkpoint stores fused), either absent where that converter lacks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import gguf
import numpy as np

from packager.archs.layers import LayerKind
from packager.errors import UnknownArchitectureError

Config = dict[str, Any]


@dataclass(frozen=True)
class Arch:
    """How one model family converts to GGUF."""

    gguf_arch: gguf.MODEL_ARCH
    # HF stores Llama's Q/K rows interleaved for its rotary layout; llama.cpp wants them un-permuted.
    permute_qk: bool = False
    # Gemma stores RMSNorm weights as (w - 1).
    norm_offset: float = 0.0
    extra_hparams: Callable[[Config, gguf.GGUFWriter], None] | None = None
    # Gemma-2 writes no rope keys (llama.cpp's defaults are Gemma's) and its own head dims.
    common_hparams: bool = True
    # extra_hparams writes every hyper-parameter itself, shape keys included, in the converter's order (LFM2's
    # per-layer head_count_kv and adjusted FFN width); False: the shape keys come first, from the config.
    own_hparams: bool = False
    # Keys the converter writes after general.file_type (LFM2's vocab_size and shortconv.l_cache).
    after_file_type: Callable[[Config, gguf.GGUFWriter], None] | None = None
    # The final norm's GGUF name (LFM2's model.embedding_norm is llama.cpp's token_embd_norm).
    output_norm: str = "output_norm"
    # GGUF name suffixes whose singleton dims the converter squeezes out (LFM2's conv kernel (H, 1, L) -> (H, L)).
    squeeze: tuple[str, ...] = ()
    extra_tensors: Callable[[Config], list[tuple[str, np.ndarray]]] = field(default=lambda cfg: [])
    # Qwen3 stores an RMSNorm per head for q and k (attn_q_norm / attn_k_norm, head_dim wide, each layer).
    qk_norm: bool = False
    # Gemma 3: token_embd keeps only the rows the tokenizer has ids for, as llama.cpp's converter trims them.
    trim_embedding: bool = False
    # llama.cpp's own sliding-window pattern for this architecture when the GGUF names none
    # (every n-th layer full; 0: the architecture has no sliding layers in llama.cpp).
    swa_pattern: int = 0
    # Source-name suffixes renamed before gguf-py's name map (Qwen3.5's dt_bias is its dt_proj.bias).
    renames: tuple[tuple[str, str], ...] = ()
    # Source tensors the GGUF leaves out (Qwen3.5's multi-token-prediction head), as llama.cpp's converter does.
    skip: Callable[[str], bool] | None = None
    # A change to a whole tensor (f32, numpy order) by its GGUF name, or None where it is written as read:
    # what convert_hf_to_gguf.py's modify_tensors does that the fields above do not say.
    tensor_transform: Callable[[Config, str], Callable[[np.ndarray], np.ndarray] | None] | None = None

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


@dataclass(frozen=True)
class OnnxArch:
    """How one model family maps onto edgepack's ONNX decoder graph."""

    genai_type: str  # genai_config.json's model.type
    fused_qkv: bool = False  # Phi-3 stores q/k/v as one qkv_proj
    fused_gate_up: bool = False  # and gate/up as one gate_up_proj
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")
    # Qwen3 RMS-normalizes each head of q and k (self_attn.q_norm / k_norm) before RoPE.
    qk_norm: bool = False
    # Which layers apply RoPE (SmolLM3 skips it on some); None: every layer.
    rope_layers: Callable[[Config], tuple[bool, ...]] | None = None
    # Refuses a config this graph would compute differently from transformers (one line naming the field).
    check: Callable[[Config], None] | None = None
    # Gemma stores every RMSNorm weight (q/k norms too) as (w - 1): the converter adds this in f32.
    norm_offset: float = 0.0
    # Gemma 2/3's four norms a layer: post_attention_layernorm on the attention's output before the
    # residual add, pre_feedforward_layernorm before the MLP, post_feedforward_layernorm on its output.
    sandwich_norms: bool = False
    # Gemma 3: sliding layers rotate with their own RoPE base, from a second pair of cos/sin caches.
    local_rope: bool = False
    # (RoPE parameters of every layer, or of the full layers where local_rope; the sliding layers' or None);
    # None: rope_parameters(cfg) for every layer.
    rope: Callable[[Config], tuple[dict[str, Any], dict[str, Any] | None]] | None = None
    # The graph's config-derived fields this family sets (formats.onnx.Dims: attn_scale, embed_scale,
    # activation, final_softcap); None: Llama's (1/sqrt(head_dim), no scale, SiLU, no cap).
    graph: Callable[[Config], dict[str, Any]] | None = None
    # The checkpoint's names for the Llama-style ones the converter reads, as (ours, theirs) dotted paths
    # matched whole (LFM2's ("mlp.gate_proj", "feed_forward.w1"), ("norm", "embedding_norm")); () for none.
    renames: tuple[tuple[str, str], ...] = ()
    # The Dims fields a plan (a ModelSpec, no config) needs beyond the shape fields (Qwen3.5's delta-net layers
    # and gated attention: what ``graph`` sets from the config); None: none.
    spec_dims: Callable[[Any], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Family:
    """One model family under the Hugging Face class names it takes, for each converter that has it."""

    hf_names: tuple[str, ...]
    gguf: Arch | None = None
    onnx: OnnxArch | None = None
    # Which layers attend to a sliding window, as the runtime computes them: (window, one flag per
    # layer) from the config; None: every layer attends to the whole context.
    attention: Callable[[Config], tuple[int, tuple[bool, ...]]] | None = None
    # Each layer's kind where the family mixes kinds (state layers, per-layer KV heads); None: every layer
    # attends with the config's heads (the spec derives the kinds from its own fields).
    layers: Callable[[Config], tuple[LayerKind, ...]] | None = None
    # Spec fields the family computes otherwise than a plain transformer's config gives them (LFM2's
    # adjusted FFN width, a parameter count without attention on its convolution layers); None: none.
    spec_fields: Callable[[Config], dict[str, Any]] | None = None
    # Why --format onnx refuses this family outright (no fallback exporter tried); "" where it does not.
    onnx_refusal: str = ""
    # One line a pack of this class reports (what of the checkpoint the bundle leaves out); "" for none.
    note: str = ""
    # The GGUF tensors (names, numpy-order shapes) a config implies, where they are not the plain decoder's
    # (formats.gguf.gguf_tensors): a hybrid's layers each hold the tensors of their own kind.
    tensors: Callable[[Config], list[tuple[str, tuple[int, ...]]]] | None = None


FAMILIES: dict[str, Family] = {}  # by HF class name


def register(family: Family) -> Family:
    for hf_name in family.hf_names:
        FAMILIES[hf_name] = family
    return family


def attention_layers(cfg: Config) -> tuple[int, tuple[bool, ...]]:
    """(sliding window, which layers slide) of a config's family; (0, ()) where no layer slides."""
    family = FAMILIES.get((cfg.get("architectures") or [""])[0])
    return family.attention(cfg) if family is not None and family.attention is not None else (0, ())


def implied_tensors(cfg: Config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The GGUF tensors a config's family says it implies; () where the plain decoder's layout holds."""
    family = FAMILIES.get((cfg.get("architectures") or [""])[0])
    return tuple(family.tensors(cfg)) if family is not None and family.tensors is not None else ()


def layer_kinds(cfg: Config) -> tuple[LayerKind, ...]:
    """Each layer's kind, where the config's family mixes kinds; () where the spec derives them itself."""
    family = FAMILIES.get((cfg.get("architectures") or [""])[0])
    return family.layers(cfg) if family is not None and family.layers is not None else ()


def spec_fields(cfg: Config) -> dict[str, Any]:
    """The spec fields the config's family computes itself; {} for a plain transformer."""
    family = FAMILIES.get((cfg.get("architectures") or [""])[0])
    return family.spec_fields(cfg) if family is not None and family.spec_fields is not None else {}


def supported(fmt: str) -> list[str]:
    """The HF class names one converter ("gguf" or "onnx") takes."""
    return sorted(n for n, f in FAMILIES.items() if getattr(f, fmt) is not None)


def arch_for(hf_name: str) -> Arch:
    """The GGUF converter's entry for an HF architecture class name."""
    return _side(hf_name, "gguf")


def onnx_arch_for(hf_name: str) -> OnnxArch:
    """The ONNX converter's entry for an HF architecture class name."""
    return _side(hf_name, "onnx")


CONVERTERS = ("gguf", "onnx")  # a Family's side for each, by its format's name


def unsupported(hf_name: str, fmt: str) -> str:
    """Why ``fmt``'s converter refuses ``hf_name``, naming the class names it takes."""
    return (f"architecture {hf_name!r} is not supported by edgepack's {fmt.upper()} converter; supported: "
            f"{', '.join(supported(fmt))}")


def instead(hf_name: str, fmt: str) -> str:
    """A refusal's ending: the other converter that takes ``hf_name``, where one does ("" otherwise)."""
    family = FAMILIES.get(hf_name)
    others = [other for other in CONVERTERS if other != fmt and getattr(family, other, None) is not None]
    return f"; pack it with --format {others[0]} instead" if others else ""


def _side(hf_name: str, fmt: str) -> Any:
    side = getattr(FAMILIES.get(hf_name), fmt, None)
    if side is None:
        raise UnknownArchitectureError(unsupported(hf_name, fmt) + instead(hf_name, fmt))
    return side
