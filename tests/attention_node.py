"""One GroupQueryAttention node, as packager/convert/onnx/graph.py writes it (packed qkv, do_rotary, an empty
cache on the first pass), run in onnxruntime-web and in ONNX Runtime (Python) on the same inputs.

test_web_page.py uses it to pin why the page caps its WebGPU passes (app.js, webgpuMaxPass): bisecting the
page's whole graph showed only this node's output off, and one node tells which pass lengths are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# The tiny Qwen2's attention (tests/models.py): 4 query heads over 2 KV heads of 64, Qwen2's rope base.
HEADS, KV_HEADS, HEAD_DIM, ROPE_THETA, MAX_POSITIONS = 4, 2, 64, 1e6, 256

# A page that runs /gqa.onnx on the feeds it is handed, on the execution provider named, and returns every
# output as a flat list.
RUNNER_HTML = b"""<!doctype html><script type="module">
const ort = await import("/_ort/ort.webgpu.min.mjs");
ort.env.logLevel = "error";
window.runNode = async (feeds, ep) => {
  const bytes = new Uint8Array(await (await fetch("/gqa.onnx")).arrayBuffer());
  const session = await ort.InferenceSession.create(bytes, { executionProviders: [ep], logSeverityLevel: 3 });
  const tensors = {};
  for (const [name, f] of Object.entries(feeds)) {
    tensors[name] = new ort.Tensor(f.type, f.type === "int32" ? Int32Array.from(f.data) : Float32Array.from(f.data),
                                   f.dims);
  }
  const out = await session.run(tensors);
  const got = {};
  for (const [name, t] of Object.entries(out)) got[name] = { dims: t.dims, data: Array.from(await t.getData()) };
  return got;
};
window.runnerReady = true;
</script>"""


def write_node(path: Path, seq_len: int) -> None:
    """The node over one pass of ``seq_len`` tokens after an empty cache, cos/sin caches as initializers."""
    import onnx
    from onnx import TensorProto, helper

    half = np.outer(np.arange(MAX_POSITIONS), ROPE_THETA ** -(np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    caches = [helper.make_tensor(name, TensorProto.FLOAT, half.shape, fn(half).astype(np.float32).ravel())
              for name, fn in (("cos_cache", np.cos), ("sin_cache", np.sin))]
    kv_shape = [1, KV_HEADS, 0, HEAD_DIM]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, seq_len, (HEADS + 2 * KV_HEADS) * HEAD_DIM]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, kv_shape),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, kv_shape),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
        ["output", "present_key", "present_value"], domain="com.microsoft",
        num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HEAD_DIM ** -0.5, do_rotary=1, rotary_interleaved=0)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("output", "present_key", "present_value")]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs, caches), opset_imports=opsets,
                              ir_version=9)
    onnx.save(model, path)


def feeds(seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    empty = np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
    return {"qkv": rng.standard_normal((1, seq_len, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32),
            "past_key": empty, "past_value": empty, "seqlens_k": np.array([seq_len - 1], np.int32),
            "total_sequence_length": np.array(seq_len, np.int32)}


def run_in_page(page, inputs: dict[str, np.ndarray], ep: str) -> np.ndarray:
    """The node's attention output [1, seq_len, HEADS * HEAD_DIM] from onnxruntime-web in ``page`` (RUNNER_HTML)."""
    js: dict[str, Any] = {name: {"type": "int32" if a.dtype == np.int32 else "float32", "dims": list(a.shape),
                                 "data": a.ravel().tolist()} for name, a in inputs.items()}
    got = page.evaluate("([feeds, ep]) => window.runNode(feeds, ep)", [js, ep])["output"]
    return np.array(got["data"], np.float32).reshape(got["dims"])


def run_native(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], inputs)[0]


def off_by_position(got: np.ndarray, ref: np.ndarray) -> list[float]:
    """Each position's largest difference relative to that position's largest reference value."""
    return [float(np.abs(got[0, s] - ref[0, s]).max() / np.abs(ref[0, s]).max()) for s in range(ref.shape[1])]
