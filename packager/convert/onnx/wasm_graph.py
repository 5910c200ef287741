"""The web page's WASM graph: the same int4 weights, unpacked to f32 once when the session starts (issue 29).

onnxruntime-web's WASM build has no 4-bit kernel: its MatMulNBits unpacks the whole int4 matrix to f32 on
every call, 0.005-0.016x native ONNX Runtime on decode shapes, and int8 (MatMulNBits bits=8, or
DynamicQuantizeMatMul / MatMulInteger, which do have WASM SIMD kernels) reaches only 0.08-0.41x; a plain
f32 MatMul runs at 0.55-0.86x native's own f32, as fast as or faster than those int8 kernels in the
browser (benchmarks/web_kernels.py, results/web_kernels.jsonl).

So this graph keeps the bundle's int4 bytes (one download serves WebGPU and WASM: it points into the same
model.onnx.data) and reads each MatMulNBits' B through a blocked DequantizeLinear (the same bytes typed
uint4) into a Gemm. With the session option WASM_SESSION_CONFIG, constant folding turns each into one f32
weight at session start: WASM then multiplies at f32 speed, the heap holds 4 bytes per weight
(:func:`wasm_weight_bytes`; folding holds one f32 copy of each, Gemm takes B transposed so there is no
second), and the numbers are exactly the int4 weights'. Anything else in the graph (HQQ's correction,
GatherBlockQuantized for the embedding) stays as written.

What it buys and where it stops (benchmarks/web_page.py): page decode 3-5x the int4 graph's on WASM, yet
0.05-0.13x native ONNX Runtime on a quiet machine, because decode is bandwidth-bound and f32 weights are 8x
the bytes int4 reads a token (profiled in onnxruntime-web: Gemm is ~75% of a SmolLM2 step). WASM's int8
kernels do not help: they run at ~2 GB/s of weights, compute-bound, slower than f32 from memory.

Where a page decode step goes (app.js run.timing, 2 threads, isolated, 47 steps, load 1.0-1.6; web_page.jsonl
2026-12-06T21:10, page_step_ms): tiny-qwen2 30 ms = session.run 19.4 + top-k over 151k logits 2.8 + yield to
the event loop 7.3 + feeds and text 0.5; SmolLM2-135M 64 ms = session.run 57.5 + yield 5.4 + top-k 0.7 + 0.6.
session.run is the f32 weights streamed from memory (160 MB in 19 ms, 538 MB in 58 ms: 8-9 GB/s); the KV cache
it copies in and out (at most 0.2 MB and 4 MB a step) and the one row of logits are ~2% of it. So the JS
around the graph is 10-35% of a step and the graph's weight bytes the rest: no page-side change reaches 0.25x
native.
Folding to int8 instead (DequantizeLinear, QuantizeLinear per column, MatMulInteger with
DynamicQuantizeLinear's activations: what WASM's int8 kernels take) was tried on SmolLM2 and changes its
answer: per-tensor uint8 activations lose its outlier channels (all matmuls int8: no sentence; down_proj kept
f32: leaves the int4 graph's tokens at the 4th, down_proj and o_proj kept f32: at the 7th).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packager.formats.onnx import WASM_F32_LIMIT, WASM_GRAPH

if TYPE_CHECKING:
    import onnx

MS = "com.microsoft"
# The session option the WASM graph needs (onnxruntime-web: InferenceSession.create's `extra`): fold
# DequantizeLinear of constants like any other constant node.
WASM_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


def _helpers():
    import onnx  # the optional `onnx` extra, loaded when a graph is rewritten

    return onnx.helper, onnx.numpy_helper


class NotUnpackable(ValueError):
    """A MatMulNBits this rewrite cannot express with the same bytes (the WASM graph is then not written)."""


def _as_uint4(init: onnx.TensorProto, name: str, dims: list[int]) -> onnx.TensorProto:
    """A second view of external int4 bytes: the same location, offset and length, typed UINT4 ``dims``."""
    import onnx

    t = onnx.TensorProto()
    t.name, t.data_type = name, onnx.TensorProto.UINT4
    t.dims.extend(dims)
    t.data_location = init.data_location
    t.external_data.extend(init.external_data)
    if init.data_location != onnx.TensorProto.EXTERNAL:
        t.raw_data = init.raw_data
    return t


def wasm_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (loaded without its external data) whose MatMulNBits read the same int4 bytes through
    DequantizeLinear (blocked, opset 21) into a Gemm: constant folding makes that one f32 weight at session start,
    given the session option WASM_SESSION_CONFIG (ONNX Runtime keeps DequantizeLinear unfolded by default, and
    would otherwise dequantize on every call). Raises NotUnpackable where the bytes do not allow it."""
    import onnx

    helper, numpy_helper = _helpers()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    nodes: list = []
    added: list = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != MS:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, k, block, bits = int(attrs["N"]), int(attrs["K"]), int(attrs["block_size"]), int(attrs.get("bits", 4))
        ins = list(node.input) + [""] * (6 - len(node.input))
        x, q, scales, zp, g_idx, bias = ins[:6]
        if bits != 4 or g_idx:
            raise NotUnpackable(f"{node.name}: MatMulNBits with {bits} bits or g_idx; the WASM graph reads 4-bit "
                                "blocks in order only")
        nb = -(-k // block)
        p = f"{node.name}/wasm"
        # MatMulNBits' B, [N, n_blocks, block/2] bytes (low nibble first), is row-major uint4 [N, n_blocks * block].
        added.append(_as_uint4(inits[q], f"{p}/B_uint4", [n, nb * block]))
        if zp:  # [N, ceil(n_blocks / 2)] bytes: the same as uint4 [N, n_blocks] only when each row fills its bytes
            if nb % 2:
                raise NotUnpackable(f"{node.name}: {nb} zero points a row do not fill whole bytes")
            added.append(_as_uint4(inits[zp], f"{p}/zp_uint4", [n, nb]))
        else:  # MatMulNBits' implicit zero point, 8, spelled out (two nibbles a byte)
            added.append(helper.make_tensor(f"{p}/zp_uint4", onnx.TensorProto.UINT4, [n, nb],
                                            np.full(-(-n * nb // 2), 0x88, np.uint8).tobytes(), raw=True))
        w = f"{p}/B"
        nodes.append(helper.make_node("DequantizeLinear", [f"{p}/B_uint4", scales, f"{p}/zp_uint4"], [w],
                                      name=f"{p}/DequantizeLinear", axis=1, block_size=block))
        if nb * block != k:  # the last block was zero-padded
            added.append(numpy_helper.from_array(np.array([0, 0], np.int64), f"{p}/c0"))
            added.append(numpy_helper.from_array(np.array([n, k], np.int64), f"{p}/c1"))
            nodes.append(helper.make_node("Slice", [w, f"{p}/c0", f"{p}/c1"], [f"{p}/Bk"], name=f"{p}/Slice"))
            w = f"{p}/Bk"
        # Gemm takes B as [N, K] (transB) so no transposed copy is folded; it wants a 2-D A.
        added.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}/rows"))
        added.append(numpy_helper.from_array(np.array([n], np.int64), f"{p}/n"))
        nodes += [helper.make_node("Reshape", [x, f"{p}/rows"], [f"{p}/x2"], name=f"{p}/Reshape"),
                  helper.make_node("Gemm", [f"{p}/x2", w] + ([bias] if bias else []), [f"{p}/y2"], name=node.name,
                                   transB=1),
                  helper.make_node("Shape", [x], [f"{p}/lead"], name=f"{p}/Shape", end=-1),
                  helper.make_node("Concat", [f"{p}/lead", f"{p}/n"], [f"{p}/shape"], name=f"{p}/Concat", axis=0),
                  helper.make_node("Reshape", [f"{p}/y2", f"{p}/shape"], list(node.output), name=f"{p}/Unflatten")]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for nd in nodes for i in nd.input}
    kept = [t for t in graph.initializer if t.name in used] + added
    del graph.initializer[:]
    graph.initializer.extend(kept)
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
    try:
        wasm = wasm_graph(model)
    except NotUnpackable as exc:
        return {"graph": None, "f32_bytes": f32, "why": f"{exc}: WASM runs the int4 graph"}
    onnx.save_model(wasm, str(Path(model_dir) / WASM_GRAPH))
    return {"graph": WASM_GRAPH, "f32_bytes": f32,
            "why": "onnxruntime-web's WASM has no int4 kernel; the int4 weights are unpacked to f32 at load"}
