"""LFM2's short-convolution layers in edgepack's ONNX decoder graph.

Such a layer mixes tokens with a depthwise causal convolution in place of attention, as transformers'
Lfm2ShortConv computes it: in_proj projects the normalized input to B, C and x (hidden wide each), B * x is
convolved along the sequence with a kernel of conv_L_cache taps (no bias, no activation), the result gated by
C, and out_proj projects it back. ONNX Runtime's com.microsoft CausalConvWithState does the convolution and
carries its last conv_L_cache - 1 inputs between calls: the graph takes them as ``past.{i}.conv`` and returns
``present.{i}.conv`` ([batch, hidden, L - 1], channels first), the names onnxruntime-genai's LFM2 runner binds
(genai_config.json's past_conv_names / present_conv_names; output.genai_config). The layer holds no KV cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from packager.convert.onnx.output import PAST_CONV, PRESENT_CONV

if TYPE_CHECKING:
    from packager.convert.onnx.graph import GraphBuilder

MS = "com.microsoft"


def conv_slots(src: str, pre: str) -> list[tuple[str, str, str]]:
    """(checkpoint tensor, slot kind, initializer) of one convolution layer: ``src`` the checkpoint's layer
    prefix, ``pre`` ours. The kernel is stored (H, 1, L), the shape CausalConvWithState takes, and stays f32."""
    return [(f"{src}.conv.in_proj.weight", "linear", f"{pre}.conv.in_proj"),
            (f"{src}.conv.conv.weight", "float", f"{pre}.conv.conv.weight"),
            (f"{src}.conv.out_proj.weight", "linear", f"{pre}.conv.out_proj")]


def short_conv(g: GraphBuilder, i: int, x: str) -> str:
    """The layer's token mixer over the normalized input ``x`` [batch, seq, hidden]; returns its output."""
    d, p, w = g.d, f"/model/layers.{i}/conv", f"model.layers.{i}.conv"
    bcx = g.linear(f"{w}.in_proj", x, 3 * d.hidden, d.hidden, f"{p}/in_proj/MatMul")
    b, c, xs = g.node("Split", [bcx], f"{p}/Split", n_out=3, axis=-1, num_outputs=3)
    (bx,) = g.node("Mul", [b, xs], f"{p}/Mul_1")
    (bx,) = g.node("Transpose", [bx], f"{p}/Transpose_1", perm=[0, 2, 1])  # [batch, hidden, seq]: channels first
    y, _ = g.node("CausalConvWithState", [bx, f"{w}.conv.weight", "", PAST_CONV % i], f"{p}/CausalConvWithState",
                  domain=MS, outputs=[f"{p}/CausalConvWithState/output_0", PRESENT_CONV % i], ndim=1,
                  activation="none")
    (y,) = g.node("Transpose", [y], f"{p}/Transpose_2", perm=[0, 2, 1])
    (y,) = g.node("Mul", [c, y], f"{p}/Mul_2")
    return g.linear(f"{w}.out_proj", y, d.hidden, d.hidden, f"{p}/out_proj/MatMul")


def state_shape(hidden: int, kernel: int) -> list[str | int]:
    """The conv state's shape, as the graph declares its input and output."""
    return ["batch_size", hidden, kernel - 1]
