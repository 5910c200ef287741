"""The ONNX decoder graph edgepack writes, in the shape ONNX Runtime GenAI's model builder emits.

Per layer: SimplifiedLayerNormalization (or SkipSimplifiedLayerNormalization, which also
adds the residual), one MatMulNBits over the packed q/k/v rows (with the qkv bias as
its bias input; Qwen3: split, each head of q and k RMS-normalized), GroupQueryAttention
with rotary embedding inside (cos/sin caches; none on SmolLM3's NoPE layers),
MatMulNBits for o_proj, then the SwiGLU MLP (gate and up as one MatMulNBits, then Split);
a final norm and lm_head. Gemma 3 adds to that: the embedding scaled by sqrt(hidden), four
norms a layer (the attention's and the MLP's outputs normalized before the residual add),
GELU (tanh) for SiLU, a window on the sliding layers only, which rotate from their own
cos/sin caches (another RoPE base), and the final logits soft-capped where the config says.
Qwen3.5 (delta_net.py): gated delta-net layers in place of attention on most layers, their conv and
recurrent states the graph's past.N.conv / past.N.recurrent inputs and present.N.* outputs; its attention
layers' q_proj holds each head's query and output gate, the attention's output times sigmoid(gate).
The graph's inputs and outputs carry the names genai_config.json
declares (input_ids, attention_mask, past_key_values.N.key/value -> logits,
present.N.key/value).

Initializers never pass through memory here: the layout decides each one's offset in
model.onnx.data up front, the converter writes the bytes there as it produces them,
and the graph refers to them as external data. Only this small proto is serialized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from packager.convert.onnx import delta_net, shortconv
from packager.convert.onnx.output import PAST_CONV, PRESENT_CONV
from packager.formats.onnx import Dims, DType, Layout, WeightFormat

if TYPE_CHECKING:
    import onnx

MS = "com.microsoft"
OPSET = 21


def _onnx():
    import onnx  # the optional `onnx` extra, loaded when a graph is built

    return onnx


def tensor_protos(layout: Layout) -> list[onnx.TensorProto]:
    """The layout's initializers as external-data TensorProtos pointing into its data file."""
    TensorProto = _onnx().TensorProto
    out = []
    for init in layout.inits.values():
        t = TensorProto()
        t.name, t.data_type = init.name, init.dtype
        t.dims.extend(init.shape)
        t.data_location = TensorProto.EXTERNAL
        location = layout.data_files[init.file]
        for key, value in (("location", location), ("offset", str(init.offset)), ("length", str(init.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        out.append(t)
    return out


class GraphBuilder:
    """Collects nodes and value infos; emits the ModelProto."""

    def __init__(self, dims: Dims, fmt: WeightFormat, layout: Layout) -> None:
        self.d, self.fmt, self.layout = dims, fmt, layout
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
             outputs: list[str] | None = None, **attrs) -> list[str]:
        outputs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(_onnx().helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const_f32(self, name: str, value: float) -> str:
        self.consts.append(_onnx().numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    def const_i64(self, name: str, values: list[int] | int) -> str:
        self.consts.append(_onnx().numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def linear(self, base: str, x: str, n: int, k: int, name: str, bias: str | None = None,
               out: str | None = None) -> str:
        outs = [out] if out else None
        if self.fmt.int4:
            inputs = [x, f"{base}.weight_Q4", f"{base}.weight_scales"]
            if not self.fmt.symmetric or self.fmt.zero_correction:
                inputs.append(f"{base}.weight_zp")
            if bias:
                inputs += [""] * (5 - len(inputs)) + [bias]
            (y,) = self.node("MatMulNBits", inputs, name, domain=MS, outputs=None if self.fmt.zero_correction else outs,
                             K=k, N=n, bits=4, block_size=self.fmt.block_size, accuracy_level=self.fmt.accuracy_level)
            if not self.fmt.zero_correction:
                return y
            # HQQ's fractional zero points: + (sum of x over each block) @ correction^T.
            bs, nb = self.fmt.block_size, -(-k // self.fmt.block_size)
            if nb * bs != k:  # the last block is zero-padded, as the quantizer padded the weights
                (x,) = self.node("Pad", [x, self.const_i64(f"{name}/Correction/pads", [0, 0, 0, 0, 0, nb * bs - k])],
                                 f"{name}/Correction/Pad")
            (xb,) = self.node("Reshape", [x, self.const_i64(f"{name}/Correction/shape", [0, 0, nb, bs])],
                              f"{name}/Correction/Reshape")
            (sums,) = self.node("ReduceSum", [xb, self.const_i64(f"{name}/Correction/axes", [-1])],
                                f"{name}/Correction/ReduceSum", keepdims=0)
            (ct,) = self.node("Transpose", [f"{base}.weight_zc"], f"{name}/Correction/Transpose", perm=[1, 0])
            (corr,) = self.node("MatMul", [sums, ct], f"{name}/Correction/MatMul")
            return self.node("Add", [y, corr], f"{name}/Correction/Add", outputs=outs)[0]
        (wt,) = self.node("Transpose", [f"{base}.weight"], f"{name}/Transpose", perm=[1, 0])
        if bias:
            (y,) = self.node("MatMul", [x, wt], name)
            return self.node("Add", [y, bias], f"{name}/Bias", outputs=outs)[0]
        return self.node("MatMul", [x, wt], name, outputs=outs)[0]

    def build(self, *, qkv_bias: bool, embed_base: str | None, embed_zp: str | None) -> onnx.ModelProto:
        """The whole decoder; ``embed_base`` names the int4 linear whose blocks the embedding gathers
        (None: an f32 embedding table), ``embed_zp`` its zero points."""
        d = self.d
        # Attention-mask bookkeeping GroupQueryAttention wants: per-row lengths - 1, total length.
        one = self.const_i64("/model/constants/INT64/[1]", [1])
        (ssum,) = self.node("ReduceSum", ["attention_mask", one], "/model/attn_mask/ReduceSum", keepdims=0)
        (sub,) = self.node("Sub", [ssum, one], "/model/attn_mask/Sub")
        (seqlens_k,) = self.node("Cast", [sub], "/model/attn_mask/Sub/Cast", to=DType.INT32)
        (shape,) = self.node("Shape", ["attention_mask"], "/model/attn_mask/Shape")
        idx1 = self.const_i64("/model/constants/INT64/1", 1)
        (total,) = self.node("Gather", [shape, idx1], "/model/attn_mask/Gather", axis=0)
        (total_len,) = self.node("Cast", [total], "/model/attn_mask/Gather/Cast", to=DType.INT32)

        if embed_base is not None:
            inputs = ["model.embed_tokens.qdata", "input_ids", f"{embed_base}.weight_scales", embed_zp or ""]
            (h,) = self.node("GatherBlockQuantized", inputs, "/model/embed_tokens/GatherBlockQuantized", domain=MS,
                             bits=4, block_size=self.fmt.block_size, gather_axis=0, quantize_axis=1)
            if self.fmt.zero_correction:
                h = self._gather_correction(embed_base, h)
        else:
            (h,) = self.node("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather")
        if d.embed_scale:  # Gemma: the rows times sqrt(hidden); the tied lm_head reads them unscaled
            scale = self.const_f32("/model/embed_tokens/scale", d.embed_scale)
            (h,) = self.node("Mul", [h, scale], "/model/embed_tokens/Mul")
        residual, pending = h, None  # pending: the output to add to the residual at the next norm
        for i in range(d.n_layers):
            residual, pending = self._layer(i, residual, pending, seqlens_k, total_len, qkv_bias)
        (final,) = self.node("SkipSimplifiedLayerNormalization", [residual, pending, "model.norm.weight"],
                             "/model/norm", domain=MS, epsilon=d.rms_eps)
        if not d.final_softcap:
            self.linear("lm_head", final, d.vocab, d.hidden, "/lm_head/MatMul", out="logits")
            return self._model()
        logits = self.linear("lm_head", final, d.vocab, d.hidden, "/lm_head/MatMul")
        cap = self.const_f32("/lm_head/softcap", d.final_softcap)
        (x,) = self.node("Div", [logits, cap], "/lm_head/softcap/Div")
        (x,) = self.node("Tanh", [x], "/lm_head/softcap/Tanh")
        self.node("Mul", [x, cap], "/lm_head/softcap/Mul", outputs=["logits"])
        return self._model()

    def _layer(self, i: int, residual: str, pending: str | None, seqlens_k: str, total_len: str,
               qkv_bias: bool) -> tuple[str, str]:
        """One decoder layer: (the residual stream, the output still to add to it at the next norm)."""
        d, p, w = self.d, f"/model/layers.{i}", f"model.layers.{i}"
        x, residual = self._norm(f"{w}.input_layernorm.weight", residual, pending, f"{p}/input_layernorm")
        if d.conv(i):  # LFM2's short convolution mixes the tokens in the attention's place
            attn = shortconv.short_conv(self, i, x)
        elif d.is_linear(i):  # Qwen3.5's gated delta-net: a conv and a recurrent state, no KV cache
            attn = delta_net.layer(self, i, x)
        else:
            attn = self._attention(i, x, seqlens_k, total_len, qkv_bias)
        if d.sandwich_norms:  # Gemma normalizes the attention's output before adding it to the residual
            attn, _ = self._norm(f"{w}.post_attention_layernorm.weight", attn, None, f"{p}/post_attention_layernorm")
            x, residual = self._norm(f"{w}.pre_feedforward_layernorm.weight", residual, attn,
                                     f"{p}/pre_feedforward_layernorm")
        else:
            x, residual = self._norm(f"{w}.post_attention_layernorm.weight", residual, attn,
                                     f"{p}/post_attention_layernorm")
        out = self._mlp(i, x)
        if d.sandwich_norms:  # and the MLP's
            out, _ = self._norm(f"{w}.post_feedforward_layernorm.weight", out, None, f"{p}/post_feedforward_layernorm")
        return residual, out

    def _attention(self, i: int, x: str, seqlens_k: str, total_len: str, qkv_bias: bool) -> str:
        """One layer's attention over the normalized input: q/k/v, GroupQueryAttention, o_proj."""
        d, p, w = self.d, f"/model/layers.{i}", f"model.layers.{i}"
        q_n, kv_n = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
        qkv = self.linear(f"{w}.attn.qkv_proj", x, d.q_rows + 2 * kv_n, d.hidden, f"{p}/attn/qkv_proj/MatMul",
                          bias=f"{w}.attn.qkv_proj.bias" if qkv_bias else None)
        qkv_inputs, gate = self._qk_norm(i, qkv) if d.qk_norm or d.attn_gate else ([qkv, "", ""], None)
        rope = d.rope(i)  # a NoPE layer (SmolLM3) attends without positions: no rotation, no caches
        attrs = dict(num_heads=d.n_heads, kv_num_heads=d.n_kv_heads, scale=d.attn_scale, softcap=0.0,
                     do_rotary=int(rope), rotary_interleaved=0)
        if d.sliding(i):
            attrs["local_window_size"] = d.window
        self.nodes.append(_onnx().helper.make_node(
            "GroupQueryAttention",
            [*qkv_inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
             *(d.caches(i) if rope else [])],
            [f"{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
            name=f"{p}/attn/GroupQueryAttention", domain=MS, **attrs))
        out = f"{p}/attn/GroupQueryAttention/output_0"
        if gate is not None:
            out = delta_net.output_gate(self, i, out, gate)
        return self.linear(f"{w}.attn.o_proj", out, d.hidden, q_n, f"{p}/attn/o_proj/MatMul")

    def _mlp(self, i: int, x: str) -> str:
        """down(act(gate(x)) * up(x)): SiLU (SwiGLU) or tanh-approximated GELU (Gemma's GeGLU)."""
        d, p = self.d, f"/model/layers.{i}/mlp"
        gate_up = self.linear(f"model.layers.{i}.mlp.gate_up_proj", x, 2 * d.intermediate, d.hidden,
                              f"{p}/gate_up_proj/MatMul")
        gate, up = self.node("Split", [gate_up], f"{p}/Split", n_out=2, axis=-1, num_outputs=2)
        if d.activation == "gelu_tanh":  # ONNX's Gelu (opset 20), which ONNX Runtime's CPU provider runs
            (act,) = self.node("Gelu", [gate], f"{p}/act_fn/Gelu", approximate="tanh")
        else:
            (sig,) = self.node("Sigmoid", [gate], f"{p}/act_fn/Sigmoid")
            (act,) = self.node("Mul", [gate, sig], f"{p}/act_fn/Mul")
        (act,) = self.node("Mul", [act, up], f"{p}/Mul")
        return self.linear(f"model.layers.{i}.mlp.down_proj", act, d.hidden, d.intermediate, f"{p}/down_proj/MatMul")

    def _qk_norm(self, i: int, qkv: str) -> tuple[list[str], str | None]:
        """q, k and v apart, each head of q and k RMS-normalized (Qwen3's q_norm/k_norm), for
        GroupQueryAttention to rotate after: transformers normalizes before RoPE. A gated query (Qwen3.5's
        q_proj: each head's query, then its output gate) gives its gate too; else None."""
        d, p = self.d, f"/model/layers.{i}/attn"
        q_n, kv_n = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
        q, k, v = self.node("Split", [qkv, self.const_i64(f"{p}/qkv/Split/sizes", [d.q_rows, kv_n, kv_n])],
                            f"{p}/qkv/Split", n_out=3, axis=-1)
        heads = self.const_i64(f"{p}/qk_norm/heads", [0, 0, -1, d.head_dim])  # [b, s, heads, head_dim]
        gate = None
        if d.attn_gate:
            q, gate = delta_net.gated_query(self, i, q)  # the query comes out in heads already
        out = []
        for name, x, n in (("q_norm", q, q_n), ("k_norm", k, kv_n)):
            if not (name == "q_norm" and gate is not None):
                (x,) = self.node("Reshape", [x, heads], f"{p}/{name}/Reshape")
            (x,) = self.node("SimplifiedLayerNormalization", [x, f"model.layers.{i}.attn.{name}.weight"],
                             f"{p}/{name}/SimplifiedLayerNormalization", axis=-1, epsilon=d.rms_eps, stash_type=1)
            (x,) = self.node("Reshape", [x, self.const_i64(f"{p}/{name}/rows", [0, 0, n])], f"{p}/{name}/Reshape/Rows")
            out.append(x)
        return [out[0], out[1], v], gate

    def _gather_correction(self, base: str, h: str) -> str:
        """HQQ's per-block correction (kernels/hqq.py) added to the gathered embedding rows."""
        d, bs = self.d, self.fmt.block_size
        p = "/model/embed_tokens/Correction"
        (rows,) = self.node("Reshape", [h, self.const_i64(f"{p}/blocks", [0, 0, d.hidden // bs, bs])], f"{p}/Reshape")
        (c,) = self.node("Gather", [f"{base}.weight_zc", "input_ids"], f"{p}/Gather")  # [b, s, n_blocks]
        (c,) = self.node("Unsqueeze", [c, self.const_i64(f"{p}/axes", [-1])], f"{p}/Unsqueeze")
        (rows,) = self.node("Add", [rows, c], f"{p}/Add")
        return self.node("Reshape", [rows, self.const_i64(f"{p}/rows", [0, 0, d.hidden])], f"{p}/Reshape/Rows")[0]

    def _norm(self, weight: str, residual: str, pending: str | None, name: str) -> tuple[str, str]:
        """RMS-normalize residual (+ pending, which is then folded into the residual)."""
        if pending is None:
            (y,) = self.node("SimplifiedLayerNormalization", [residual, weight], name, axis=-1,
                             epsilon=self.d.rms_eps, stash_type=1)
            return y, residual
        y, _, _, summed = self.node("SkipSimplifiedLayerNormalization", [residual, pending, weight], name, n_out=4,
                                    domain=MS, epsilon=self.d.rms_eps)
        self.nodes[-1].output[1] = ""  # mean and inverse std dev: not needed
        self.nodes[-1].output[2] = ""
        return y, summed

    def _model(self) -> onnx.ModelProto:
        helper = _onnx().helper
        d = self.d
        f32 = DType.FLOAT
        kv = lambda name, seq: helper.make_tensor_value_info(name, f32, ["batch_size", d.n_kv_heads, seq, d.head_dim])
        inputs = [helper.make_tensor_value_info("input_ids", DType.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", DType.INT64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", d.vocab])]
        for i in range(d.n_layers):
            if d.conv(i):  # a convolution layer's state, not a KV cache
                state = shortconv.state_shape(d.hidden, d.conv_kernel)
                inputs.append(helper.make_tensor_value_info(PAST_CONV % i, f32, state))
                outputs.append(helper.make_tensor_value_info(PRESENT_CONV % i, f32, state))
                continue
            if d.is_linear(i):  # genai 0.18's past.N.conv / past.N.recurrent, in and out
                state_in, state_out = delta_net.value_infos(self, i)
                inputs += state_in
                outputs += state_out
                continue
            inputs += [kv(f"past_key_values.{i}.key", "past_sequence_length"),
                       kv(f"past_key_values.{i}.value", "past_sequence_length")]
            outputs += [kv(f"present.{i}.key", "total_sequence_length"),
                        kv(f"present.{i}.value", "total_sequence_length")]
        graph = helper.make_graph(self.nodes, "edgepack", inputs, outputs,
                                  initializer=self.consts + tensor_protos(self.layout))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="edgepack")
        model.ir_version = 10
        return model
