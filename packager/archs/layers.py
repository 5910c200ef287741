"""What each layer of a model is, as the planner and llama.cpp's memory see it.

A plain transformer's layers all attend (some over a sliding window) and each owns a KV cache that grows
with the context. The hybrids mix in layers that carry a fixed state per sequence instead: LFM2's short
convolutions keep the last few inputs, Qwen3.5's linear attention keeps a recurrent matrix. llama.cpp
gives those layers no KV cache but a recurrent-state buffer, always F32 (llama-model.cpp's create_memory),
whatever type the KV cache has.
"""

from __future__ import annotations

from dataclasses import dataclass

# transformers' layer_types entries, and the kind of layer each names.
LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding", "conv": "conv", "linear_attention": "linear"}
ATTENTION_KINDS = ("full", "sliding")
STATE_KINDS = ("conv", "linear")


@dataclass(frozen=True)
class LayerKind:
    """One layer: its kind, the K/V heads and head size of its cache, and the recurrent state it holds."""

    kind: str  # "full", "sliding" (attention over a window), "conv" or "linear" (state layers)
    n_kv_heads: int  # 0 on state layers
    head_dim: int
    # Where a layer reads another layer's cache (Gemma 4's shared-KV layers): that layer; None: its own.
    kv_source: int | None = None
    # F32 floats of recurrent state per sequence, as llama.cpp sizes its R and S rows (n_embd_r / n_embd_s).
    r_floats: int = 0
    s_floats: int = 0
    # The layer's own token-mixer weights where it does not attend (its convolution's), for the parameter count.
    mixer_params: int = 0
    # A convolution layer's kernel width (LFM2's conv_L_cache); 0 elsewhere.
    conv_kernel: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS + STATE_KINDS:
            raise ValueError(f"layer kind {self.kind!r} is none of {', '.join(ATTENTION_KINDS + STATE_KINDS)}")

    @property
    def owns_kv(self) -> bool:
        """The layer has a KV cache of its own (attention, not reading another layer's)."""
        return self.kind in ATTENTION_KINDS and self.kv_source is None and self.n_kv_heads > 0

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def state_floats(self) -> int:
        return self.r_floats + self.s_floats


def conv_layer(hidden: int, head_dim: int, width: int) -> LayerKind:
    """A short-convolution layer (LFM2's) of ``hidden`` channels and kernel ``width``: it keeps its last width-1
    inputs (llama.cpp's n_embd_r = hidden x (L-1)); its weights are in_proj (3H x H), the depthwise kernel
    (H x L) and out_proj (H x H)."""
    return LayerKind("conv", 0, head_dim, r_floats=hidden * (width - 1), mixer_params=4 * hidden * hidden + hidden * width,
                     conv_kernel=width)
