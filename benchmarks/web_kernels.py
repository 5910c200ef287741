"""Which weight layouts onnxruntime-web's WASM backend runs with real kernels (issue 29).

One decode-shaped matmul, x [1, K] times a weight [K, N], as a standalone ONNX graph per layout,
timed in headless Chromium (onnxruntime-web, WASM, page cross-origin isolated so threads work)
and in native ONNX Runtime (Python, CPU EP) with the same thread count, in alternating rounds
(browser, native, browser, native...) on the same machine. Only the ratios mean anything here.

Layouts:
  int4_nbits   MatMulNBits bits=4 block 32, accuracy_level 4: what the bundle ships today
  int8_nbits   MatMulNBits bits=8 block 32, accuracy_level 4
  int8_dqmm    DynamicQuantizeMatMul (int8 per-column weights, activations quantized per call)
  int8_mmi     DynamicQuantizeLinear + MatMulInteger + Cast + Mul (what quantize_dynamic writes)
  f32          plain MatMul on f32 weights
  int4_fold    the int4_nbits bytes read by DequantizeLinear (uint4, blocked) into a Gemm, which constant folding
               turns into one f32 weight at session start: the page's WASM graph (convert/onnx/wasm_graph.py;
               the first results/ records of it used a chain of float ops instead, folded the same way)

Shapes: Qwen2.5-0.5B's MLP up (896 -> 4864), the tiny Qwen2 fixture's lm_head (256 -> 151936, what
dominates its decode), SmolLM2-135M's gate+up (576 -> 3072) and lm_head (576 -> 49152).

    python benchmarks/web_kernels.py                     # ~6 min on 2 busy cores
    python benchmarks/web_kernels.py --threads 1 --rounds 2 --shapes qwen05b_up
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

import web_support as ws  # noqa: E402

from packager.convert.onnx.wasm_graph import WASM_SESSION_CONFIG, wasm_graph  # noqa: E402

SHAPES = {"qwen05b_up": (896, 4864), "tinyqwen_lm_head": (256, 151936), "smollm2_gate_up": (576, 3072),
          "smollm2_lm_head": (576, 49152)}
LAYOUTS = ("int4_nbits", "int8_nbits", "int8_dqmm", "int8_mmi", "f32", "int4_fold")
MS = "com.microsoft"
BLOCK = 32

HARNESS = b"""<!doctype html><title>kernels</title><script type="module">
const ort = await import('/_ort/ort.wasm.min.mjs');
ort.env.wasm.wasmPaths = '/_ort/';
ort.env.wasm.numThreads = Number(new URLSearchParams(location.search).get('threads')) || 1;
ort.env.logLevel = 'error';
const sessions = {};
window.kernels = {
  isolated: self.crossOriginIsolated,
  async load(names) {
    const createMs = {};
    for (const n of names) {
      const bytes = new Uint8Array(await (await fetch('/k/' + n + '.onnx')).arrayBuffer());
      const t = performance.now();
      sessions[n] = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'],
        graphOptimizationLevel: 'all', extra: { session: { disable_quant_qdq: '1' } } });  // as the page
      createMs[n] = performance.now() - t;
    }
    return createMs;
  },
  // median ms per run after warm-up, runs until minMs has passed (at least minRuns); the output's head
  async time(name, k, minMs, minRuns) {
    const s = sessions[name];
    const x = new Float32Array(k);
    for (let i = 0; i < k; i++) x[i] = Math.sin(i * 0.37);
    const feeds = { x: new ort.Tensor('float32', x, [1, k]) };
    let out;
    for (let i = 0; i < 2; i++) out = await s.run(feeds);
    const times = [];
    const t0 = performance.now();
    while (times.length < minRuns || performance.now() - t0 < minMs) {
      const t = performance.now();
      out = await s.run(feeds);
      times.push(performance.now() - t);
    }
    times.sort((a, b) => a - b);
    const y = out.y.data;
    return { ms: times[times.length >> 1], runs: times.length, head: Array.from(y.subarray(0, 64)) };
  },
};
window.kernelsReady = true;
</script>"""


def _x(k: int) -> np.ndarray:
    return np.sin(np.arange(k, dtype=np.float32) * np.float32(0.37))[None]


def build_graph(layout: str, k: int, n: int, seed: int = 0) -> bytes:
    """The ONNX model ``y = x @ W`` with W random, stored as ``layout``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    nb = k // BLOCK

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    if layout == "int4_fold":
        return wasm_graph(onnx.load_from_string(build_graph("int4_nbits", k, n, seed))).SerializeToString()
    if layout in ("int4_nbits", "int8_nbits"):
        bits = 4 if layout == "int4_nbits" else 8
        q = rng.integers(0, 256, (n, nb, BLOCK * bits // 8), dtype=np.uint8)
        scales = (rng.random((n, nb), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
        nodes.append(helper.make_node("MatMulNBits", ["x", init("w_q", q), init("w_s", scales)], ["y"], domain=MS,
                                      K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=4))
    elif layout == "int8_dqmm":
        w = rng.integers(-127, 128, (k, n), dtype=np.int8)
        s = (rng.random(n, dtype=np.float32) * 0.002 + 0.0001).astype(np.float32)
        nodes.append(helper.make_node("DynamicQuantizeMatMul", ["x", init("w_q", w), init("w_s", s)], ["y"],
                                      domain=MS))
    elif layout == "int8_mmi":
        w = rng.integers(-127, 128, (k, n), dtype=np.int8)
        s = (rng.random(n, dtype=np.float32) * 0.002 + 0.0001).astype(np.float32)
        nodes += [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
                  helper.make_node("MatMulInteger", ["xq", init("w_q", w), "xzp"], ["acc"]),
                  helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["xs", init("w_s", s)], ["scale"]),
                  helper.make_node("Mul", ["accf", "scale"], ["y"])]
    elif layout == "f32":
        w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float32)
        nodes.append(helper.make_node("MatMul", ["x", init("w", w)], ["y"]))
    else:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    graph = helper.make_graph(nodes, layout, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    return model.SerializeToString()


def native_time(session, k: int, min_s: float, min_runs: int) -> tuple[float, np.ndarray]:
    feeds = {"x": _x(k)}
    for _ in range(2):
        out = session.run(["y"], feeds)[0]
    times = []
    t0 = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - t0 < min_s:
        t = time.perf_counter()
        out = session.run(["y"], feeds)[0]
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out[0, :64]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--min-ms", type=float, default=400.0, help="time each layout at least this long per round")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "web_kernels.jsonl")
    args = ap.parse_args()

    import onnxruntime as ort
    from playwright.sync_api import sync_playwright

    exe = ws.find_browser()
    if exe is None:
        sys.exit("no Chromium found: apt-get install chromium, or set EDGEPACK_CHROMIUM")
    names = [f"{s}.{lay}" for s in args.shapes for lay in args.layouts]
    with tempfile.TemporaryDirectory(prefix="web-kernels-") as tmp:
        root = Path(tmp)
        (root / "k").mkdir()
        for name in names:
            shape, layout = name.split(".")
            (root / "k" / f"{name}.onnx").write_bytes(build_graph(layout, *SHAPES[shape]))
        overlay = {"harness.html": HARNESS}
        with ws.PageServer(root, overlay, ws.ort_web_dist(), isolated=True) as srv, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True, args=ws.BROWSER_ARGS)
            for threads in args.threads:
                page = browser.new_page()
                page.set_default_timeout(600_000)
                page.goto(f"{srv.url}harness.html?threads={threads}")
                page.wait_for_function("window.kernelsReady === true")
                assert page.evaluate("window.kernels.isolated"), "the harness is not cross-origin isolated"
                web_create = page.evaluate("(n) => window.kernels.load(n)", names)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
                for key, value in WASM_SESSION_CONFIG.items():
                    opts.add_session_config_entry(key, value)
                native, native_create = {}, {}
                for n in names:
                    t = time.perf_counter()
                    native[n] = ort.InferenceSession(str(root / "k" / f"{n}.onnx"), opts,
                                                     providers=["CPUExecutionProvider"])
                    native_create[n] = (time.perf_counter() - t) * 1e3
                samples: dict[str, dict[str, list[float]]] = {n: {"web_ms": [], "native_ms": []} for n in names}
                err: dict[str, float] = {}
                for r in range(args.rounds):
                    for n in names:  # A B A B: each layout's browser then native timing, back to back
                        k = SHAPES[n.split(".")[0]][0]
                        got = page.evaluate("([n, k, ms]) => window.kernels.time(n, k, ms, 5)", [n, k, args.min_ms])
                        ms, head = native_time(native[n], k, args.min_ms / 1e3, 5)
                        samples[n]["web_ms"].append(got["ms"])
                        samples[n]["native_ms"].append(ms)
                        web_head = np.array(got["head"], np.float32)
                        err[n] = float(np.abs(web_head - head).max() / (np.abs(head).max() + 1e-12))
                        print(f"threads={threads} round {r + 1} {n}: web {got['ms']:.2f} ms, native {ms:.2f} ms, "
                              f"ratio {ms / got['ms']:.3f}", file=sys.stderr)
                page.close()
                rows = {}
                for n in names:
                    ratios = [a / b for a, b in zip(samples[n]["native_ms"], samples[n]["web_ms"])]
                    rows[n] = {"web_ms": statistics.median(samples[n]["web_ms"]),
                               "native_ms": statistics.median(samples[n]["native_ms"]),
                               "ratio_web_vs_native": statistics.median(ratios),
                               "ratio_spread": [min(ratios), max(ratios)],
                               "web_ms_samples": samples[n]["web_ms"], "native_ms_samples": samples[n]["native_ms"],
                               "max_rel_diff_head": err[n], "web_session_ms": web_create[n],
                               "native_session_ms": native_create[n],
                               "graph_bytes": (root / "k" / f"{n}.onnx").stat().st_size}
                record = {"benchmark": "web_kernels", "threads": threads, "rounds": args.rounds,
                          "ort_web": ws.ORT_WEB_VERSION, "ort_native": ort.__version__,
                          "browser": browser.version, "host": platform.node(),
                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kernels": rows}
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"\nthreads={threads}: ratio = native ms / web ms (1.0 = native speed)", file=sys.stderr)
                for n, row in rows.items():
                    print(f"  {n:32s} web {row['web_ms']:8.2f} ms  native {row['native_ms']:8.2f} ms  "
                          f"ratio {row['ratio_web_vs_native']:.3f} [{row['ratio_spread'][0]:.3f}-"
                          f"{row['ratio_spread'][1]:.3f}]  head diff {row['max_rel_diff_head']:.1e}  "
                          f"session {row['web_session_ms']:.0f} ms, {row['graph_bytes'] / 1e6:.1f} MB", file=sys.stderr)
            browser.close()


if __name__ == "__main__":
    main()
