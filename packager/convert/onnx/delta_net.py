"""Qwen3.5's layers in edgepack's ONNX graph: the gated delta-net (linear attention) and the gated query.

A delta-net layer, as onnxruntime-genai 0.18's builder emits it for the CPU (builders/qwen.py,
make_qwen_gated_delta_net with linear_attn_op "linear_attention") and transformers 5 computes it
(modeling_qwen3_5.Qwen3_5GatedDeltaNet):

    qkv = in_proj_qkv(x) -> CausalConvWithState (depthwise, kernel K, SiLU; its last K-1 inputs are the
          state past.N.conv -> present.N.conv, [B, conv channels, K-1]) -> q, k, v
    q, k  each head L2-normalized (x * rsqrt(sum x^2 + 1e-6), transformers' l2norm)
    beta  = sigmoid(b), decay g = -exp(A_log) * softplus(a + dt_bias)     (b, a: one f32 matmul)
    o     = LinearAttention(update_rule gated_delta, q heads Hk, kv heads Hv, scale 1/sqrt(dk); the
            state past.N.recurrent -> present.N.recurrent, [B, Hv, dk, dv])
    out   = out_proj(RMSNorm_w(o per value head) * silu(in_proj_z(x)))

ONNX Runtime's LinearAttention with more kv heads than q heads serves value head j with q/k head
j // (Hv / Hk): the checkpoint's grouped order, so the V heads stay as stored (the GGUF's tiled reorder
is llama.cpp's, not this graph's). Every op here runs on ONNX Runtime 1.32's CPU provider.

The gated full-attention layers hold query and output gate per head in q_proj (2 x head_dim rows a
head): :func:`gated_query` splits them for GroupQueryAttention; the graph multiplies the attention's
output by sigmoid(gate) before o_proj.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from packager.convert.onnx.output import PAST_CONV, PAST_RECURRENT, PRESENT_CONV, PRESENT_RECURRENT
from packager.formats.onnx import Dims, DType

if TYPE_CHECKING:
    from packager.convert.onnx.converter import Slot
    from packager.convert.onnx.graph import GraphBuilder

MS = "com.microsoft"
L2_EPS = 1e-6  # transformers' l2norm (modeling_qwen3_5.l2norm), as the FLA kernels use it


def state_names(i: int) -> tuple[str, str, str, str]:
    """(past conv, past recurrent, present conv, present recurrent) of layer ``i``: genai 0.18's names."""
    return PAST_CONV % i, PAST_RECURRENT % i, PRESENT_CONV % i, PRESENT_RECURRENT % i


def state_shapes(d: Dims) -> tuple[list, list]:
    """The conv state [B, channels, K-1] and the recurrent state [B, Hv, dk, dv] (F32)."""
    hk, hv, dk, dv, kernel = d.linear
    return ["batch_size", d.conv_dim, kernel - 1], ["batch_size", hv, dk, dv]


def slots(put: Callable[[str, "Slot"], None], slot: type, d: Dims, src: str, pre: str) -> None:
    """Where a delta-net layer's checkpoint tensors go (``src``: the checkpoint's layer prefix, ``pre``: the
    initializers'). The gated norm's weight is plain w (not zero-centred): no offset."""
    hv = d.linear[1]
    la, ours = f"{src}.linear_attn", f"{pre}.linear_attn"
    put(f"{la}.in_proj_qkv.weight", slot("linear", f"{ours}.in_proj_qkv"))
    put(f"{la}.in_proj_z.weight", slot("linear", f"{ours}.in_proj_z"))
    put(f"{la}.in_proj_b.weight", slot("float", f"{ours}.in_proj_ba.weight", 0))
    put(f"{la}.in_proj_a.weight", slot("float", f"{ours}.in_proj_ba.weight", hv))
    put(f"{la}.conv1d.weight", slot("float", f"{ours}.conv1d.weight"))
    for name in ("dt_bias", "A_log", "norm.weight"):
        put(f"{la}.{name}", slot("float", f"{ours}.{name}"))
    put(f"{la}.out_proj.weight", slot("linear", f"{ours}.out_proj"))


def _heads(b: "GraphBuilder", x: str, name: str, heads: int, dim: int) -> str:
    return b.node("Reshape", [x, b.const_i64(f"{name}/shape", [0, 0, heads, dim])], name)[0]


def _rows(b: "GraphBuilder", x: str, name: str, width: int) -> str:
    return b.node("Reshape", [x, b.const_i64(f"{name}/shape", [0, 0, width])], name)[0]


def _l2norm(b: "GraphBuilder", x: str, p: str, heads: int, dim: int) -> str:
    """Each head of x [B, S, heads x dim] times rsqrt(its sum of squares + 1e-6)."""
    h = _heads(b, x, f"{p}/Reshape", heads, dim)
    (ss,) = b.node("ReduceSumSquare", [h, b.const_i64(f"{p}/axes", [-1])], f"{p}/ReduceSumSquare", keepdims=1)
    (ss,) = b.node("Add", [ss, b.const_f32(f"{p}/eps", L2_EPS)], f"{p}/Add")
    (r,) = b.node("Sqrt", [ss], f"{p}/Sqrt")
    (h,) = b.node("Div", [h, r], f"{p}/Div")
    return _rows(b, h, f"{p}/Reshape/Rows", heads * dim)


def layer(b: "GraphBuilder", i: int, x: str) -> str:
    """The delta-net mixer of layer ``i`` over the normalized input ``x`` [B, S, hidden]; its output [B, S, hidden]."""
    d = b.d
    hk, hv, dk, dv, _ = d.linear
    w, p = f"model.layers.{i}.linear_attn", f"/model/layers.{i}/linear_attn"
    past_conv, past_rec, present_conv, present_rec = state_names(i)
    qkv = b.linear(f"{w}.in_proj_qkv", x, d.conv_dim, d.hidden, f"{p}/in_proj_qkv/MatMul")
    (qkv,) = b.node("Transpose", [qkv], f"{p}/conv/Transpose", perm=[0, 2, 1])  # [B, channels, S]
    name = f"{p}/conv/CausalConvWithState"
    (conv, _) = b.node("CausalConvWithState", [qkv, f"{w}.conv1d.weight", "", past_conv], name, domain=MS,
                       outputs=[f"{name}/output_0", present_conv], activation="silu")
    (conv,) = b.node("Transpose", [conv], f"{p}/conv/Transpose/Back", perm=[0, 2, 1])  # [B, S, channels]
    q, k, v = b.node("Split", [conv, b.const_i64(f"{p}/qkv/Split/sizes", [hk * dk, hk * dk, hv * dv])],
                     f"{p}/qkv/Split", n_out=3, axis=-1)
    q, k = _l2norm(b, q, f"{p}/q_l2norm", hk, dk), _l2norm(b, k, f"{p}/k_l2norm", hk, dk)
    # beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias), in f32 as transformers computes them
    (wt,) = b.node("Transpose", [f"{w}.in_proj_ba.weight"], f"{p}/in_proj_ba/Transpose", perm=[1, 0])
    (ba,) = b.node("MatMul", [x, wt], f"{p}/in_proj_ba/MatMul")
    beta_in, a = b.node("Split", [ba, b.const_i64(f"{p}/ba/Split/sizes", [hv, hv])], f"{p}/ba/Split", n_out=2, axis=-1)
    (beta,) = b.node("Sigmoid", [beta_in], f"{p}/beta/Sigmoid")
    (a,) = b.node("Add", [a, f"{w}.dt_bias"], f"{p}/decay/Add")
    (a,) = b.node("Softplus", [a], f"{p}/decay/Softplus")
    (neg_a,) = b.node("Exp", [f"{w}.A_log"], f"{p}/decay/Exp")
    (neg_a,) = b.node("Neg", [neg_a], f"{p}/decay/Neg")
    (g,) = b.node("Mul", [a, neg_a], f"{p}/decay/Mul")
    (o, _) = b.node("LinearAttention", [q, k, v, past_rec, g, beta], f"{p}/LinearAttention", domain=MS,
                    outputs=[f"{p}/LinearAttention/output_0", present_rec], q_num_heads=hk, kv_num_heads=hv,
                    update_rule="gated_delta", scale=float(dk) ** -0.5)
    # The gated RMSNorm: each value head normalized (plain w), times silu(z)
    (o,) = b.node("SimplifiedLayerNormalization", [_heads(b, o, f"{p}/norm/Reshape", hv, dv), f"{w}.norm.weight"],
                  f"{p}/norm/SimplifiedLayerNormalization", axis=-1, epsilon=d.rms_eps, stash_type=1)
    z = b.linear(f"{w}.in_proj_z", x, hv * dv, d.hidden, f"{p}/in_proj_z/MatMul")
    (zs,) = b.node("Sigmoid", [z], f"{p}/z/Sigmoid")
    (z,) = b.node("Mul", [z, zs], f"{p}/z/Mul")
    (o,) = b.node("Mul", [_rows(b, o, f"{p}/norm/Reshape/Rows", hv * dv), z], f"{p}/gate/Mul")
    return b.linear(f"{w}.out_proj", o, d.hidden, hv * dv, f"{p}/out_proj/MatMul")


def gated_query(b: "GraphBuilder", i: int, q: str) -> tuple[str, str]:
    """q_proj's output [B, S, heads x 2 x head_dim] as (query [B, S, heads, head_dim], gate [B, S, heads x head_dim]):
    each head's first head_dim rows are its query, the next its gate (transformers' view + chunk)."""
    d, p = b.d, f"/model/layers.{i}/attn/q_gate"
    qg = _heads(b, q, f"{p}/Reshape", d.n_heads, 2 * d.head_dim)
    q4, g4 = b.node("Split", [qg, b.const_i64(f"{p}/Split/sizes", [d.head_dim, d.head_dim])], f"{p}/Split",
                    n_out=2, axis=-1)
    return q4, _rows(b, g4, f"{p}/gate/Reshape", d.n_heads * d.head_dim)


def output_gate(b: "GraphBuilder", i: int, attn: str, gate: str) -> str:
    """The attention's output times sigmoid(gate), before o_proj."""
    p = f"/model/layers.{i}/attn/gate"
    (s,) = b.node("Sigmoid", [gate], f"{p}/Sigmoid")
    return b.node("Mul", [attn, s], f"{p}/Mul")[0]


def value_infos(b: "GraphBuilder", i: int) -> tuple[list, list]:
    """The layer's state inputs and outputs (F32)."""
    from onnx import helper
    conv, rec = state_shapes(b.d)
    names = state_names(i)
    make = lambda name, shape: helper.make_tensor_value_info(name, DType.FLOAT, shape)
    return [make(names[0], conv), make(names[1], rec)], [make(names[2], conv), make(names[3], rec)]
