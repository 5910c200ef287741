"""The web page's WASM graph (packager/convert/onnx/wasm_graph.py, issue 29), in real ONNX Runtime: each
MatMulNBits read through DequantizeLinear into a Gemm gives the same numbers, and with the session option the
page sets, constant folding leaves plain f32 Gemms (no per-call dequantization) behind."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper, numpy_helper  # noqa: E402

from packager.convert.onnx.wasm_graph import (  # noqa: E402
    WASM_SESSION_CONFIG, NotUnpackable, wasm_graph, wasm_weight_bytes)

MS = "com.microsoft"


def _model(k: int, n: int, *, zp: bool, bias: bool, block: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    nb = -(-k // block)
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, nb, block // 2), dtype=np.uint8), "q"),
             numpy_helper.from_array(rng.random((n, nb), dtype=np.float32), "s")]
    ins = ["x", "q", "s"]
    if zp:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (n, -(-nb // 2)), dtype=np.uint8), "zp"))
        ins.append("zp")
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
        ins += [""] * (5 - len(ins)) + ["b"]
    node = helper.make_node("MatMulNBits", ins, ["y"], domain=MS, name="mm", K=k, N=n, bits=4, block_size=block,
                            accuracy_level=0)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", 1, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", 1, ["b", "s", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    return model


def _run(model, x: np.ndarray, tmp_path=None) -> tuple[np.ndarray, list[str]]:
    opts = ort.SessionOptions()
    for key, value in WASM_SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    ops: list[str] = []
    if tmp_path is not None:
        opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    out = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    if tmp_path is not None:
        ops = [nd.op_type for nd in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    return out[0], ops


@pytest.mark.parametrize("k,n,zp,bias", [(96, 40, False, False), (100, 33, True, True), (128, 64, True, False),
                                         (64, 24, False, True)])
def test_wasm_graph_computes_what_matmulnbits_computes(k, n, zp, bias, tmp_path):
    model = _model(k, n, zp=zp, bias=bias)
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    want, _ = _run(model, x)
    rewritten = wasm_graph(model)
    onnx.checker.check_model(rewritten)
    got, ops = _run(rewritten, x, tmp_path)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # folded at session start: what runs is a Gemm on an f32 weight, between the activations' reshapes
    assert "DequantizeLinear" not in ops and "Gemm" in ops and "MatMulNBits" not in ops, ops
    assert wasm_weight_bytes(model) == 4 * k * n


def test_zero_points_that_do_not_fill_whole_bytes_are_refused():
    # 3 blocks a row: MatMulNBits pads each row's zero points to 2 bytes, which no uint4 [N, 3] view matches
    with pytest.raises(NotUnpackable, match="zero points"):
        wasm_graph(_model(96, 8, zp=True, bias=False))
