"""The web page's WASM graph: the same int4 weights, unpacked to f32 once when the session starts (issue 29).

onnxruntime-web's WASM build has no 4-bit kernel: its MatMulNBits unpacks the whole int4 matrix to f32 on
every call, 0.007-0.016x native ONNX Runtime on decode shapes, and int8 (MatMulNBits bits=8, or
DynamicQuantizeMatMul / MatMulInteger, which do have WASM SIMD kernels) reaches only 0.08-0.41x; a plain
f32 MatMul runs at 0.64-0.86x native's own f32 and as fast as or faster than those int8 kernels in the
browser (benchmarks/web_kernels.py, results/web_kernels.jsonl).

So this graph keeps the bundle's int4 bytes (one download serves WebGPU and WASM: it points into the same
model.onnx.data) and replaces each MatMulNBits with plain ops on its initializers, unpack nibbles, subtract
the zero point, scale, transpose, then a MatMul. Every input of that chain is a constant, so ONNX Runtime's
constant folding (graph optimization level basic and up, which the page sets) turns it into one f32 weight
at session start: WASM then multiplies f32 weights at MatMul speed, the heap holds 4 bytes per weight
(:func:`wasm_weight_bytes`), and the numbers are exactly the int4 weights'. Anything else in the graph
(HQQ's correction, GatherBlockQuantized for the embedding) stays as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packager.formats.onnx import WASM_F32_LIMIT, WASM_GRAPH

if TYPE_CHECKING:
    import onnx

MS = "com.microsoft"


def _helpers():
    import onnx  # the optional `onnx` extra, loaded when a graph is rewritten

    return onnx.helper, onnx.numpy_helper


def _unpack_nibbles(nodes: list, consts: list, x: str, name: str) -> str:
    """uint8 ``x`` [..., m] -> f32 [..., 2m]: low nibble first, as MatMulNBits packs."""
    helper, numpy_helper = _helpers()
    c16 = f"{name}/c16"
    consts.append(numpy_helper.from_array(np.array(16.0, np.float32), c16))
    nodes += [helper.make_node("Cast", [x], [f"{name}/f"], to=1),
              helper.make_node("Div", [f"{name}/f", c16], [f"{name}/d"]),
              helper.make_node("Floor", [f"{name}/d"], [f"{name}/hi"]),
              helper.make_node("Mul", [f"{name}/hi", c16], [f"{name}/hi16"]),
              helper.make_node("Sub", [f"{name}/f", f"{name}/hi16"], [f"{name}/lo"]),
              helper.make_node("Unsqueeze", [f"{name}/lo", f"{name}/axis"], [f"{name}/lo1"]),
              helper.make_node("Unsqueeze", [f"{name}/hi", f"{name}/axis"], [f"{name}/hi1"]),
              helper.make_node("Concat", [f"{name}/lo1", f"{name}/hi1"], [f"{name}/pairs"], axis=-1)]
    consts.append(numpy_helper.from_array(np.array([-1], np.int64), f"{name}/axis"))
    return f"{name}/pairs"  # [..., m, 2]: flattened by the caller's Reshape


def dequantized_weight(nodes: list, consts: list, *, q: str, scales: str, zp: str | None, n: int, k: int,
                       block: int, name: str) -> str:
    """Nodes computing MatMulNBits' B as an f32 [K, N] tensor from its initializers (all constants)."""
    helper, numpy_helper = _helpers()
    nb = -(-k // block)

    def const(suffix: str, values: list[int]) -> str:
        consts.append(numpy_helper.from_array(np.array(values, np.int64), f"{name}/c_{suffix}"))
        return f"{name}/c_{suffix}"

    pairs = _unpack_nibbles(nodes, consts, q, f"{name}/q")
    nodes.append(helper.make_node("Reshape", [pairs, const("blocks", [n, nb, block])], [f"{name}/vals"]))
    if zp is None:
        consts.append(numpy_helper.from_array(np.array(8.0, np.float32), f"{name}/zp8"))
        zero = f"{name}/zp8"
    else:  # packed 4-bit, two blocks a byte, rows padded to whole bytes
        zpairs = _unpack_nibbles(nodes, consts, zp, f"{name}/zp")
        nodes += [helper.make_node("Reshape", [zpairs, const("zrows", [n, -1])], [f"{name}/zall"]),
                  helper.make_node("Slice", [f"{name}/zall", const("z0", [0]), const("znb", [nb]), const("z1", [1])],
                                   [f"{name}/znb"]),
                  helper.make_node("Unsqueeze", [f"{name}/znb", const("zaxis", [-1])], [f"{name}/zero"])]
        zero = f"{name}/zero"
    nodes += [helper.make_node("Sub", [f"{name}/vals", zero], [f"{name}/centered"]),
              helper.make_node("Unsqueeze", [scales, const("saxis", [-1])], [f"{name}/s"]),
              helper.make_node("Mul", [f"{name}/centered", f"{name}/s"], [f"{name}/w"]),
              helper.make_node("Reshape", [f"{name}/w", const("rows", [n, nb * block])], [f"{name}/wrows"])]
    w = f"{name}/wrows"
    if nb * block != k:  # the last block was zero-padded
        nodes.append(helper.make_node("Slice", [w, const("k0", [0]), const("k", [k]), const("k1", [1])],
                                      [f"{name}/wk"]))
        w = f"{name}/wk"
    nodes.append(helper.make_node("Transpose", [w], [f"{name}/B"], perm=[1, 0]))
    return f"{name}/B"


def wasm_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (loaded without its external data) with each MatMulNBits as dequantize + MatMul."""
    import onnx

    helper, _ = _helpers()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes: list = []
    consts: list = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != MS:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits", 4) != 4:
            raise ValueError(f"{node.name}: MatMulNBits with {attrs['bits']} bits; the WASM graph unpacks 4-bit only")
        ins = list(node.input) + [""] * (6 - len(node.input))
        x, q, scales, zp, g_idx, bias = ins[:6]
        if g_idx:
            raise ValueError(f"{node.name}: MatMulNBits with g_idx (act-order); the WASM graph does not unpack it")
        w = dequantized_weight(nodes, consts, q=q, scales=scales, zp=zp or None, n=attrs["N"], k=attrs["K"],
                               block=attrs["block_size"], name=f"{node.name}/wasm")
        if bias:
            nodes.append(helper.make_node("MatMul", [x, w], [f"{node.name}/wasm/y"], name=node.name))
            nodes.append(helper.make_node("Add", [f"{node.name}/wasm/y", bias], list(node.output),
                                          name=f"{node.name}/wasm/bias"))
        else:
            nodes.append(helper.make_node("MatMul", [x, w], list(node.output), name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    return out


def wasm_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of f32 weights the WASM graph holds once folded: 4 per MatMulNBits weight."""
    helper, _ = _helpers()
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            total += 4 * int(attrs["N"]) * int(attrs["K"])
    return total


def write_wasm_graph(model_dir: Path, graph_file: str = "model.onnx") -> dict[str, Any]:
    """Write ``model_dir``/model.wasm.onnx beside ``graph_file`` (same external data) where it pays; what was
    decided, for the manifest: {"graph": name or None, "f32_bytes": heap bytes of its weights, "why": ...}."""
    import onnx

    model = onnx.load(str(Path(model_dir) / graph_file), load_external_data=False)
    f32 = wasm_weight_bytes(model)
    if f32 == 0:
        return {"graph": None, "f32_bytes": 0, "why": "the graph has no MatMulNBits: WASM runs it as it is"}
    if f32 > WASM_F32_LIMIT:
        return {"graph": None, "f32_bytes": f32,
                "why": f"its weights unpacked to f32 ({f32 / 2**30:.2f} GiB) would not fit a tab's WASM heap "
                       f"beside the folding's copies (limit {WASM_F32_LIMIT / 2**30:.0f} GiB): WASM runs the int4 graph"}
    onnx.save_model(wasm_graph(model), str(Path(model_dir) / WASM_GRAPH))
    return {"graph": WASM_GRAPH, "f32_bytes": f32,
            "why": "onnxruntime-web's WASM has no int4 kernel; the int4 weights are unpacked to f32 at load"}
