"""ONNX int4 bundles: the int4 kernel against ONNX Runtime's, the graph against transformers,
`pack model --format onnx` end to end through onnxruntime-genai, and the errors.

Default run (~40 s): tiny random Qwen2 (qkv bias, tied) and Llama (llama3 RoPE scaling)
fixtures. Slow: the real SmolLM2-135M-Instruct, whose int4 greedy answers must agree with
transformers' f32 ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import models
import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from packager.convert.onnx.converter import OnnxOptions, convert  # noqa: E402
from packager.errors import UnsupportedArchitectureError, UsageError  # noqa: E402
from packager.kernels.int4 import dequantize_int4, quantize_int4  # noqa: E402
from packager.pack.options import PackOptions  # noqa: E402
from packager.pack.pipeline import pack_model  # noqa: E402
from packager.source.resolver import resolve  # noqa: E402

ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")


# -- the int4 kernel ---------------------------------------------------------------------------

def _ort_quantize(w: np.ndarray, block: int, symmetric: bool):
    """ONNX Runtime's own C++ routine (what MatMulNBitsQuantizer calls), on the same [N, K] matrix."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = w.shape
    nb = -(-k // block)
    wt = np.ascontiguousarray(np.pad(w, ((0, 0), (0, nb * block - k))).T)  # it wants MatMul's [K, N]
    packed = np.zeros((n, nb, block // 2), np.uint8)
    zp = np.zeros((n, -(-nb // 2)), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    quantize_matmul_4bits(packed, wt, scales, zp, block, n, nb * block, symmetric)
    return packed, scales, zp


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_blocks_equal_onnxruntime_quantizer(block, symmetric):
    rng = np.random.default_rng(block + symmetric)
    w = (rng.standard_normal((48, 3 * block + block // 2)) * 0.05).astype(np.float32)  # K padded to whole blocks
    w[0, :block] = 0.0  # an all-zero block
    w[1, 0], w[1, 1] = 0.25, -0.25  # a tie between the extremes: MLAS takes the negative one
    w[2, :block] = np.abs(w[2, :block]) + 0.1  # all positive: asymmetric widens the range to 0
    packed, scales, zp = _ort_quantize(w, block, symmetric)
    q = quantize_int4(w, block, symmetric)
    np.testing.assert_array_equal(q.packed, packed)
    np.testing.assert_array_equal(q.scales, scales)
    if symmetric:
        assert q.zero_points is None
    else:
        np.testing.assert_array_equal(q.zero_points, zp)  # the odd count's spare nibble included


def test_int4_dequantized_error_is_within_a_step():
    # Rounding costs at most half a step; the end of the range opposite the block's extreme may
    # clip by up to one (symmetric: codes -8..7 with -8 on the extreme; asymmetric: the zero
    # point is rounded).
    w = (np.random.default_rng(3).standard_normal((16, 256)) * 0.1).astype(np.float32)
    for symmetric in (True, False):
        q = quantize_int4(w, 32, symmetric)
        err = np.abs(dequantize_int4(q, 256) - w).reshape(16, 8, 32)
        step = np.abs(q.scales)[:, :, None]
        assert (err <= step * 1.0001).all()
        assert err.mean() < 0.3 * step.mean()


def test_hqq_blocks_equal_onnxruntime_hqq():
    """kernels/hqq.py is ONNX Runtime's own HQQ routine (torch, whole tensor) ported to streaming numpy."""
    torch = pytest.importorskip("torch")
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    from packager.kernels.hqq import quantize_int4_hqq, split_zero_points

    rng = np.random.default_rng(5)
    for block in (32, 128):
        w = (rng.standard_t(5, (64, 3 * block + block // 2)) * 0.02).astype(np.float32)  # heavy tails, padded K
        w[0, :block] = 0.0
        ref_q, ref_scales, ref_zero = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block)) \
            .quantize_internal(torch.from_numpy(w), bits=4, group_size=block)
        q = quantize_int4_hqq(w, block)
        codes = np.empty(q.packed.shape[:2] + (block,), np.uint8)
        codes[:, :, 0::2], codes[:, :, 1::2] = q.packed & 0x0F, q.packed >> 4
        np.testing.assert_array_equal(codes.reshape(64, -1), ref_q.numpy())
        np.testing.assert_allclose(q.scales, ref_scales.numpy(), rtol=1e-6)
        np.testing.assert_allclose(q.zero_points, ref_zero.numpy(), atol=1e-5)  # float zeros: summation order
        # What the bundle stores: rounded uint8 zero points + a per-block correction, the same weights.
        zp, correction = split_zero_points(q)
        exact = (codes - q.zero_points[:, :, None]) * q.scales[:, :, None]
        stored = _dequantize_hqq(q, zp, correction, codes.shape[1] * block).reshape(exact.shape)
        np.testing.assert_allclose(stored, exact, rtol=0, atol=1e-6 * np.abs(exact).max())


def test_bad_block_size_is_refused():
    with pytest.raises(ValueError, match="block size 48"):
        quantize_int4(np.zeros((2, 96), np.float32), 48)


# -- the graph against transformers --------------------------------------------------------------

def _ort_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """One forward pass of the graph with an empty KV cache, through plain onnxruntime."""
    import onnxruntime as ort

    cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "position_ids" in cfg["inputs"]:  # optimum's graphs take them
        feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    for i in range(cfg["num_hidden_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((ids.shape[0], cfg["num_key_value_heads"], 0,
                                                           cfg["head_size"]), np.float32)
    return sess.run(["logits"], feeds)[0]


def _hf_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_f32_graph_computes_what_transformers_computes(fixture, request, tmp_path):
    """The graph itself (qkv bias, tied lm_head, GQA with RoPE caches incl. llama3 scaling), unquantized."""
    src = request.getfixturevalue(fixture)
    convert(resolve(src, hash_files=False, quiet=True), tmp_path, OnnxOptions(int4=False), quiet=True)
    ids = np.array([[1, 400, 1200, 77, 9000, 31, 5, 600, 2048, 13, 99, 3]], dtype=np.int64)
    ours, ref = _ort_logits(tmp_path, ids), _hf_logits(src, ids)
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())


def _external(model_dir: Path) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """name -> (offset, length, shape) of every initializer in model.onnx.data."""
    import onnx

    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            kv = {e.key: e.value for e in t.external_data}
            out[t.name] = (int(kv["offset"]), int(kv["length"]), tuple(t.dims))
    return out


@pytest.mark.parametrize("algorithm, block, fixture", [
    ("rtn", 32, "tiny_qwen2"), ("hqq", 32, "tiny_qwen2"),
    ("rtn", 32, "tiny_qwen3"), ("rtn", 32, "tiny_smollm3"),  # q/k norms (f32) beside the blocks; NoPE layers
    # 576 = 4.5 blocks of 128: the correction pads the activations' last block (and the embedding stays f32)
    pytest.param("hqq", 128, "smollm2_hf", marks=pytest.mark.slow, id="hqq-128-ragged-smollm2")])
def test_int4_graph_computes_its_dequantized_weights(algorithm, block, fixture, request, tmp_path):
    """MatMulNBits and GatherBlockQuantized read our blocks as we meant them: the int4 graph equals
    the f32 graph whose weights are replaced by the dequantized int4 blocks (layout, packed q/k/v
    rows, nibble order, scales, the tied embedding's shared blocks; HQQ: rounded zero points plus
    the graph's per-block corrections, in the linears and the embedding)."""
    from packager.kernels.int4 import Int4Blocks

    hqq = algorithm == "hqq"
    src = resolve(request.getfixturevalue(fixture), hash_files=False, quiet=True)
    convert(src, tmp_path / "f32", OnnxOptions(int4=False), quiet=True)
    convert(src, tmp_path / "int4", OnnxOptions(block_size=block, accuracy_level=0, symmetric=not hqq,
                                                algorithm=algorithm), quiet=True)
    q_inits, f_inits = _external(tmp_path / "int4"), _external(tmp_path / "f32")
    q_data = np.memmap(tmp_path / "int4" / "model.onnx.data", dtype=np.uint8, mode="r")
    f_data = np.memmap(tmp_path / "f32" / "model.onnx.data", dtype=np.uint8, mode="r+")

    def read(name: str, dtype) -> np.ndarray:
        off, length, shape = q_inits[name]
        return np.frombuffer(q_data[off:off + length].tobytes(), dtype=dtype).reshape(shape)

    replaced = 0
    for name, (off, length, shape) in f_inits.items():
        base = name.removesuffix(".weight")
        if base == "model.embed_tokens":
            if "model.embed_tokens.qdata" not in q_inits:
                continue  # an f32 embedding (rows are not whole blocks)
            base = "lm_head"  # tied: the embedding is gathered from lm_head's blocks
        if f"{base}.weight_Q4" not in q_inits:
            continue
        blocks = Int4Blocks(read(f"{base}.weight_Q4", np.uint8), read(f"{base}.weight_scales", np.float32), None)
        deq = _dequantize_hqq(blocks, read(f"{base}.weight_zp", np.uint8), read(f"{base}.weight_zc", np.float32),
                              shape[1]) if hqq else dequantize_int4(blocks, shape[1])
        f_data[off:off + length] = np.ascontiguousarray(deq, dtype=np.float32).view(np.uint8).ravel()
        replaced += 1
    f_data.flush()
    genai = json.loads((tmp_path / "int4" / "genai_config.json").read_text())
    n_layers = genai["model"]["decoder"]["num_hidden_layers"]
    # qkv, o, gate_up, down in each layer; lm_head; the embedding when it is int4
    assert replaced == 4 * n_layers + 1 + ("model.embed_tokens.qdata" in q_inits)
    ids = np.array([[1, 400, 1200, 77, 9000, 31, 5, 600]], dtype=np.int64)
    ref, q = _ort_logits(tmp_path / "f32", ids), _ort_logits(tmp_path / "int4", ids)
    np.testing.assert_allclose(q, ref, atol=1e-4 * np.abs(ref).max())
    if fixture != "tiny_qwen2":
        return
    data = (tmp_path / "int4" / "model.onnx.data").stat().st_size
    # int4 + f32 scales: ~5/32 of f32; HQQ adds uint8 zero points and an f32 correction per block: ~6.1/32.
    assert data < (0.22 if hqq else 0.2) * (tmp_path / "f32" / "model.onnx.data").stat().st_size


def _dequantize_hqq(blocks, zp: np.ndarray, correction: np.ndarray, k: int) -> np.ndarray:
    """HQQ's stored form: uint8 zero points as RTN's, plus the per-block f32 correction."""
    from packager.kernels.int4 import Int4Blocks

    n, nb, half = blocks.packed.shape
    rtn = dequantize_int4(Int4Blocks(blocks.packed, blocks.scales, zp), nb * 2 * half).reshape(n, nb, 2 * half)
    return (rtn + correction[:, :, None]).reshape(n, -1)[:, :k]


def _source_tensor(model_dir: Path, name: str) -> np.ndarray:
    from packager.source.safetensors import Checkpoint, to_f32

    ckpt = Checkpoint.open(model_dir)
    try:
        return np.array(to_f32(ckpt.raw(name), ckpt.refs[name].dtype), dtype=np.float32)
    finally:
        ckpt.close()


def test_hqq_weights_reconstruct_better_than_rtn(tiny_qwen2, tmp_path):
    """What HQQ is for: the bundle's int4 blocks are closer to the checkpoint's weights than round to
    nearest's at the same block size, symmetric or not (mean squared error over a whole layer)."""
    from packager.kernels.int4 import Int4Blocks

    src = resolve(tiny_qwen2, hash_files=False, quiet=True)
    weight = _source_tensor(tiny_qwen2, "model.layers.1.mlp.down_proj.weight")
    errors = {}
    for name, opts in (("hqq", OnnxOptions(symmetric=False, algorithm="hqq")), ("rtn", OnnxOptions()),
                       ("rtn_asym", OnnxOptions(symmetric=False))):
        convert(src, tmp_path / name, opts, quiet=True)
        inits = _external(tmp_path / name)
        data = np.memmap(tmp_path / name / "model.onnx.data", dtype=np.uint8, mode="r")

        def read(key: str, dtype) -> np.ndarray:
            off, length, shape = inits[f"model.layers.1.mlp.down_proj.{key}"]
            return np.frombuffer(data[off:off + length].tobytes(), dtype=dtype).reshape(shape)

        packed, scales = read("weight_Q4", np.uint8), read("weight_scales", np.float32)
        if name == "hqq":
            deq = _dequantize_hqq(Int4Blocks(packed, scales, None), read("weight_zp", np.uint8),
                                  read("weight_zc", np.float32), weight.shape[1])
        else:
            zp = read("weight_zp", np.uint8) if name == "rtn_asym" else None
            deq = dequantize_int4(Int4Blocks(packed, scales, zp), weight.shape[1])
        errors[name] = float(np.mean((deq - weight) ** 2))
    assert errors["hqq"] < 0.95 * errors["rtn_asym"] and errors["hqq"] < errors["rtn"], errors


# -- pack model --format onnx -------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_onnx(tiny_qwen2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-onnx")
    return pack_model(tiny_qwen2, PackOptions(format="onnx", output=out, quiet=True)).path


def test_onnx_bundle_is_complete_and_verified(qwen_onnx, tiny_qwen2):
    from packager.bundle.verify import verify

    man = json.loads((qwen_onnx / "manifest.json").read_text())
    assert man["format"] == "onnx" and man["quant"] == "INT4_B32" and man["model_file"] == "model/model.onnx"
    assert man["onnx"]["block_size"] == 32 and man["onnx"]["execution_provider"] == "cpu"
    assert man["onnx"]["algorithm"] == "rtn"
    files = {f["path"] for f in man["files"]}
    assert {"model/model.onnx", "model/model.onnx.data", "model/genai_config.json", "model/tokenizer.json",
            "model/tokenizer_config.json", "README.md", "LICENSE"} <= files
    assert man["source"]["files"] and all(len(f["sha256"]) == 64 for f in man["source"]["files"])
    assert verify(qwen_onnx) == []
    genai = json.loads((qwen_onnx / "model" / "genai_config.json").read_text())
    assert genai["model"]["type"] == "qwen2" and genai["model"]["eos_token_id"] == [151645, 151643]
    assert genai["search"]["max_length"] == man["runtime"]["n_ctx"]
    # Only the small graph is in model.onnx; every weight is external data.
    assert (qwen_onnx / "model" / "model.onnx").stat().st_size < 100_000


def test_onnx_bundle_generates_through_packager_load(qwen_onnx):
    import packager

    with packager.load(qwen_onnx) as m:
        ids = m.tokenize("Hello world", add_special=False)
        assert m.detokenize(ids) == "Hello world"
        s = m.stream("The quick brown fox", max_tokens=8)
        text = "".join(s)
        assert text and s.n_generated == 8 and s.finish_reason == "length"
        assert m.generate("The quick brown fox", max_tokens=8) == text  # greedy: the same again
        reply = m.chat([{"role": "user", "content": "Hi"}], stream=True, max_tokens=4)
        text = "".join(reply)
        assert reply.n_generated >= 1 and reply.n_prompt > len(m.tokenize("Hi", add_special=False)) + 2
        assert m.chat([{"role": "user", "content": "Hi"}], max_tokens=4) == text  # greedy: the same again
        a = m.generate("Once", max_tokens=6, temperature=1.0, seed=7)
        assert a == m.generate("Once", max_tokens=6, temperature=1.0, seed=7)  # seeded sampling repeats


def test_onnx_bundle_greedy_equals_its_own_graph(qwen_onnx):
    """genai's loop (prompt, then KV-cached steps) picks the argmax of the graph's full forward pass."""
    import packager

    model_dir = qwen_onnx / "model"
    with packager.load(qwen_onnx) as m:
        prompt = m.tokenize("The capital of France is", add_special=False)
        generated = m.tokenize(m.generate(prompt, max_tokens=3), add_special=False)
        ids = list(prompt)
        for _ in range(3):
            ids.append(int(_ort_logits(model_dir, np.array([ids], dtype=np.int64))[0, -1].argmax()))
        assert m.detokenize(ids[len(prompt):]) == m.detokenize(generated)


# -- the planner sizes what the converter writes --------------------------------------------------

@pytest.mark.parametrize("fixture, block, asymmetric, algorithm", [
    ("tiny_qwen2", 32, False, "rtn"), ("tiny_qwen2", 64, True, "rtn"), ("tiny_qwen2", 128, False, "hqq"),
    ("tiny_llama", 32, False, "hqq"), ("tiny_llama", 128, True, "rtn"),
])
def test_plan_sizes_every_onnx_scheme_as_written(fixture, block, asymmetric, algorithm, request, tmp_path):
    from packager.formats import onnx
    from packager.plan.planner import Overrides, plan
    from packager.plan.targets import load_target
    from packager.spec.model import load_spec

    src = request.getfixturevalue(fixture)
    man = pack_model(src, PackOptions(format="onnx", onnx_block_size=block, onnx_asymmetric=asymmetric,
                                      onnx_algorithm=algorithm, output=tmp_path, quiet=True)).manifest
    scheme = onnx.SCHEMES[man["quant"]]
    assert (scheme.block_size, scheme.algorithm) == (block, algorithm)
    data = (tmp_path / f"{man['name']}-laptop" / "model" / "model.onnx.data").stat().st_size
    weights = man["plan"]["memory"]["weights"]
    assert abs(weights - data) <= 0.01 * data, (weights, data)  # the alignment padding is all that differs
    assert man["plan"]["quant"] == man["quant"]
    # `pack plan` sees the same: the scheme's layout, from the config alone
    p = plan(load_spec(src), load_target("laptop"), Overrides(format="onnx", quant=man["quant"]))
    assert p.memory.weights == weights


def test_pack_plan_takes_onnx_schemes_and_refuses_mixed_formats(tiny_qwen2):
    def plan_json(*args):
        r = subprocess.run([sys.executable, "-m", "packager.cli", "plan", str(tiny_qwen2), *args], capture_output=True,
                           text=True)
        return r, (json.loads(r.stdout)["plan"] if r.returncode == 0 else None)

    sizes = {}
    for q in ("INT4_B32", "INT4_B32_ASYM", "INT4_B32_HQQ", "INT4_B128"):
        r, p = plan_json("--quant", q, "--json")
        assert r.returncode == 0 and p["format"] == "onnx" and p["quant"] == q, r.stderr
        sizes[q] = p["memory"]["weights"]
    # zero points, then HQQ's correction, cost bytes; bigger blocks save them
    assert sizes["INT4_B128"] < sizes["INT4_B32"] < sizes["INT4_B32_ASYM"] < sizes["INT4_B32_HQQ"]
    r, _ = plan_json("--quant", "INT4_B32", "--format", "gguf")
    assert r.returncode == 2 and "is an ONNX int4 scheme" in r.stderr
    r, _ = plan_json("--quant", "Q4_K_M", "--format", "onnx")
    assert r.returncode == 2 and "is a GGUF type" in r.stderr


# -- pack bench on ONNX bundles ---------------------------------------------------------------------

def test_engine_is_the_loaded_model_and_refuses_an_open_stream(qwen_onnx):
    import packager
    from packager.errors import UsageError

    man = json.loads((qwen_onnx / "manifest.json").read_text())
    with packager.load(qwen_onnx, n_threads=1, n_ctx=64) as m:
        s = m.stream("Hello", max_tokens=4)
        next(s)
        with pytest.raises(UsageError, match="a stream is open"):
            m.engine()
        s.close()
        engine = m.engine()
        info = engine.info
        assert (info.n_ctx, info.n_threads, info.backends, info.type_k) == (64, 1, "CPU", "f32")
        assert info.model_n_params == man["spec"]["n_params"] > 0
        data = [f for f in man["files"] if f["path"].startswith("model/model.onnx")]
        assert info.model_size == sum(f["bytes"] for f in data)
        assert info.engine.startswith("onnxruntime-genai ")
        for _ in range(2):  # reset empties the cache: the same 40 tokens fit a 64-token context again
            engine.reset()
            engine.eval(list(range(1, 41)))
        # the model still generates after measuring, as an app would use it next: as it did before
        s = m.stream("The quick brown fox", max_tokens=4)
        assert "".join(s) and s.n_generated == 4


def test_bench_measures_an_onnx_bundle_with_the_records_gguf_gets(qwen_onnx):
    r = subprocess.run([sys.executable, "-m", "packager.cli", "bench", str(qwen_onnx), "-p", "16", "-n", "8",
                        "--threads", "1", "-r", "2", "-o", "jsonl"], capture_output=True, text=True,
                       env=dict(os.environ, EDGEPACK_NO_PROGRESS="1"))
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    man = json.loads((qwen_onnx / "manifest.json").read_text())
    assert [x["test"] for x in records] == ["pp16", "tg8"]
    for x in records:
        assert x["status"] == "ok" and x["format"] == "onnx" and x["quant"] == "INT4_B32"
        assert x["backends"] == "CPU" and x["n_threads"] == 1 and x["type_k"] == "f32"
        assert x["model_n_params"] == man["spec"]["n_params"] and x["model_type"].startswith("qwen2 ")
        assert x["n_ctx"] == man["runtime"]["n_ctx"] and x["n_ctx_from"] == "bundle"
        assert len(x["samples_ts"]) == 2 and x["avg_ts"] > 0 and 0 < x["ttft_s"] < 60
        assert x["engine"].startswith("onnxruntime-genai ")
        # the planner's figures sit beside the measured ones, as for GGUF
        assert x["predicted_rss_bytes"] == man["predicted"]["memory_bytes"]
        assert x["peak_rss_bytes"] > x["model_size"]
    assert records[1]["predicted_ts"] == man["predicted"]["decode_tokens_per_s"]


def test_pack_onnx_cli_with_options(tiny_llama, tmp_path):
    r = subprocess.run([sys.executable, "-m", "packager.cli", "model", str(tiny_llama), "--format", "onnx",
                        "--block-size", "64", "--asymmetric", "-o", str(tmp_path), "--json"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    man = json.loads(r.stdout)
    assert man["quant"] == "INT4_B64_ASYM" and man["onnx"]["symmetric"] is False
    import packager

    with packager.load(man["path"]) as m:
        s = m.stream("Hello", max_tokens=4)
        assert "".join(s) and (s.n_generated, s.finish_reason) == (4, "length")


def test_hqq_bundle_generates_and_records_its_algorithm(tiny_qwen2, tmp_path):
    import packager

    bundle = pack_model(tiny_qwen2, PackOptions(format="onnx", onnx_algorithm="hqq", output=tmp_path, quiet=True)).path
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["quant"] == "INT4_B32_HQQ"
    assert man["onnx"]["algorithm"] == "hqq" and man["onnx"]["symmetric"] is False  # HQQ implies zero points
    with packager.load(bundle) as m:
        text = m.generate("The quick brown fox", max_tokens=8)
        assert text and m.generate("The quick brown fox", max_tokens=8) == text


def test_optimum_fallback_hqq_keeps_onnxruntime_hqq_weights_on_the_fast_path(tiny_neox, onnx_export_python,
                                                                            tmp_path, monkeypatch):
    """ONNX Runtime's HQQ writes f32 zero points (its CPU MatMulNBits' slow path); the fallback rewrites them
    as uint8 + a per-block correction: no f32 zero points are left, and the logits are ONNX Runtime's own."""
    import onnx
    import onnxruntime as ort

    import packager.convert.onnx.optimum_export as oo

    # optimum's export in its own environment (what _optimum runs in the packing process's), the rest here
    r = subprocess.run([str(onnx_export_python), "-c", oo._EXPORT, str(tiny_neox), str(tmp_path / "export"), oo.TASK],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    opts = OnnxOptions(symmetric=False, algorithm="hqq", accuracy_level=0)
    logits = {}
    for split in (True, False):
        if not split:
            monkeypatch.setattr(oo, "_split_float_zero_points", lambda graph: None)
        model, _ = oo._quantize(tmp_path / "export" / "model.onnx", opts)
        path = tmp_path / f"split-{split}.onnx"
        model.save_model_to_file(str(path), use_external_data_format=True)
        graph = onnx.load(str(path)).graph
        zero_points = {n.input[3] for n in graph.node if n.op_type == "MatMulNBits"}
        dtypes = {t.data_type for t in graph.initializer if t.name in zero_points}
        assert dtypes == ({onnx.TensorProto.UINT8} if split else {onnx.TensorProto.FLOAT})
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ids = np.array([[1, 400, 1200, 77, 9000, 31, 5, 600]], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(8)[None]}
        for i in sess.get_inputs():
            if i.name.startswith("past_key_values."):
                feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        logits[split] = sess.run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-5 * np.abs(logits[False]).max())


def test_help_explains_each_algorithm():
    r = subprocess.run([sys.executable, "-m", "packager.cli", "model", "--help"], capture_output=True, text=True,
                       env=ENV, timeout=120)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and all(f"{name}:" in text for name in ("rtn", "hqq", "gptq")), r.stdout


def test_gptq_is_refused_with_the_reason_and_an_alternative(tiny_qwen2, tmp_path):
    r = subprocess.run([sys.executable, "-m", "packager.cli", "model", str(tiny_qwen2), "--format", "onnx",
                        "--algorithm", "gptq", "-o", str(tmp_path)], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "whole f32" in r.stderr and "--algorithm hqq" in r.stderr, r.stderr
    assert not any(p for p in tmp_path.iterdir() if not p.name.startswith("."))


def test_target_preferring_onnx_gets_an_onnx_bundle_for_its_provider(tiny_qwen2, tmp_path):
    """web lists formats = ["onnx"] and backends = ["webgpu"]: no --format needed; the bundle names
    WebGPU, and this CPU-only onnxruntime-genai runs it when asked for the CPU."""
    import packager
    from packager.errors import BackendMissingError

    bundle = pack_model(tiny_qwen2, PackOptions(target="web", output=tmp_path, quiet=True)).path
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["format"] == "onnx" and man["runtime"]["execution_provider"] == "webgpu"
    genai = json.loads((bundle / "model" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [{"webgpu": {}}]
    try:
        packager.load(bundle).close()
    except BackendMissingError as exc:  # the usual CPU-only wheel
        assert "execution_provider='cpu'" in str(exc) and "\n" not in str(exc)
    with packager.load(bundle, execution_provider="cpu") as m:
        s = m.stream("Hello", max_tokens=4)
        assert "".join(s) and (s.n_generated, s.finish_reason) == (4, "length")


# -- bad input: clear errors, no bundle -----------------------------------------------------------

def test_architecture_neither_path_supports_is_refused_before_any_work(tiny_qwen2, tmp_path):
    """Qwen2's weights under a model type nobody knows: not ours, not optimum-onnx's."""
    src = tmp_path / "foo-model"
    src.mkdir()
    for f in tiny_qwen2.iterdir():
        if f.is_file() and f.name != "config.json":
            (src / f.name).symlink_to(f)
    cfg = json.loads((tiny_qwen2 / "config.json").read_text())
    cfg.update(architectures=["FooForCausalLM"], model_type="foo")
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "dist"
    refusal = "ONNX converter; supported: .*Qwen2ForCausalLM.*(optimum-onnx does not export model_type 'foo'|needs optimum)"
    with pytest.raises(UnsupportedArchitectureError, match=refusal):
        pack_model(src, PackOptions(format="onnx", output=out, quiet=True))
    assert not out.exists() or not any(out.iterdir())


def test_optimum_beside_a_transformers_it_does_not_take_is_refused_in_one_line(monkeypatch):
    """optimum-onnx 0.1 pins transformers < 4.58; installed beside transformers 5 (pip warns, or --no-deps) the
    fallback is refused before any work, in one line read off optimum-onnx's own metadata."""
    import importlib.metadata as md

    import packager.convert.onnx.converter as conv

    have, version, requires = {"optimum-onnx": "0.1.0", "transformers": "5.25.0"}, md.version, md.requires
    pins = ["optimum~=2.1.0", "transformers<4.58.0,>=4.36", 'pytest; extra == "tests"']
    monkeypatch.setattr(md, "version", lambda name: have.get(name) or version(name))
    monkeypatch.setattr(md, "requires", lambda name: pins if name == "optimum-onnx" else requires(name))
    monkeypatch.setattr(conv, "optimum_installed", lambda: True)
    with pytest.raises(UnsupportedArchitectureError) as e:
        conv.onnx_exporter("GPTNeoXForCausalLM", "gpt_neox")
    msg = str(e.value)
    assert "\n" not in msg and "optimum-onnx 0.1.0 needs transformers<4.58.0,>=4.36" in msg and "5.25.0" in msg
    have["transformers"] = "4.57.6"  # the versions it takes: no clash (the refusal below is optimum's own answer)
    from packager.convert.onnx.optimum_export import optimum_transformers_clash
    assert optimum_transformers_clash() == ""


# -- the optimum-onnx fallback (architectures the streaming converter lacks) -----------------------

@pytest.fixture(scope="module")
def onnx_export_python() -> Path:
    """optimum-onnx's environment of its own (transformers < 4.58; models.onnx_export_python): pip builds it once
    per machine from the package registry. Without one the fallback's tests skip, except on CI (CI=true)."""
    try:
        return models.onnx_export_python()
    except (subprocess.CalledProcessError, OSError) as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip(f"no environment for optimum-onnx ({exc}): pip needs the package registry")


_TINY_NEOX = """
import sys

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

config = GPTNeoXConfig(vocab_size=49152, max_position_embeddings=512, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=256, bos_token_id=1, eos_token_id=2)
config.architectures = ["GPTNeoXForCausalLM"]
torch.manual_seed(0)
model = GPTNeoXForCausalLM(config)
with torch.no_grad():  # larger than the default init: logits that are not all noise-level
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.05)
model.to(torch.bfloat16).save_pretrained(sys.argv[1], safe_serialization=True)
"""


@pytest.fixture(scope="module")
def tiny_neox(smollm2_hf, onnx_export_python, tmp_path_factory) -> Path:
    """A random 2-layer GPT-NeoX (not in edgepack's ONNX converter; optimum exports it) with SmolLM2's tokenizer,
    saved by the transformers optimum-onnx runs on (a config in its own form)."""
    import shutil

    out = tmp_path_factory.mktemp("tiny-neox")
    r = subprocess.run([str(onnx_export_python), "-c", _TINY_NEOX, str(out)], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(smollm2_hf / name, out / name)
    return out


def test_fallback_without_optimum_here_says_where_to_install_it(tiny_neox, tmp_path):
    """Beside transformers 5 (the test environment) optimum-onnx is not installed: `pack model --format onnx` of an
    architecture only the fallback exports says, in one line, that it wants an environment of its own."""
    from packager.convert.onnx.optimum_export import optimum_installed

    if optimum_installed():
        pytest.skip("optimum-onnx is installed beside the suite's transformers")
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "packager.cli", "model", str(tiny_neox), "--format", "onnx",
                        "-o", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "pip install 'edgepack[onnx-export]'" in line and "environment of its own" in line, line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("algorithm", ["rtn", "hqq"])
def test_optimum_fallback_bundle_generates_through_packager_load(algorithm, tiny_neox, onnx_export_python, tmp_path):
    """optimum's export + MatMulNBitsQuantizer: every linear layer int4, and genai's KV-cached loop picks
    the argmax of the bundle graph's own full forward pass (position_ids, unshared KV buffers). Packed by
    `pack model` in optimum-onnx's environment, loaded here (transformers 5): as a user keeps the two."""
    import onnx

    import packager

    r = subprocess.run([str(onnx_export_python), "-m", "packager.cli", "model", str(tiny_neox), "--format", "onnx",
                        "--algorithm", algorithm, "-o", str(tmp_path)], capture_output=True, text=True, env=ENV,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    (bundle,) = (p.parent for p in tmp_path.glob("*/manifest.json"))
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["quant"] == ("INT4_B32_HQQ" if algorithm == "hqq" else "INT4_B32")
    assert man["onnx"]["algorithm"] == algorithm and man["onnx"]["exporter"].startswith("optimum-onnx 0.1")
    assert any("optimum-onnx" in w for w in man["warnings"])
    from packager.bundle.verify import verify

    assert verify(bundle) == []
    graph = onnx.load(str(bundle / "model" / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 4 + 1  # qkv, dense, 2 MLP a layer; embed_out
    with packager.load(bundle) as m:
        prompt = m.tokenize("The quick brown fox", add_special=False)
        generated = m.tokenize(m.generate(prompt, max_tokens=4), add_special=False)
        ids = list(prompt)
        for _ in range(4):
            ids.append(int(_ort_logits(bundle / "model", np.array([ids], dtype=np.int64))[0, -1].argmax()))
        assert m.detokenize(ids[len(prompt):]) == m.detokenize(generated)


def test_target_without_onnx_execution_provider_is_refused(tiny_qwen2, tmp_path):
    laptop = (Path(__file__).parents[1] / "targets" / "laptop.toml").read_text()
    metal = tmp_path / "metal-only.toml"
    metal.write_text(laptop.replace('name = "laptop"', 'name = "metal-only"')
                     .replace('backends = ["cpu"]', 'backends = ["metal"]'))
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "packager.cli", "model", str(tiny_qwen2), "--format", "onnx",
                        "--target", str(metal), "-o", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no ONNX Runtime execution provider" in r.stderr, r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_gguf_quant_or_source_with_onnx_format_is_a_usage_error(tiny_qwen2, smollm2_gguf, tmp_path):
    with pytest.raises(UsageError, match="--quant Q4_K_M picks a GGUF type"):
        pack_model(tiny_qwen2, PackOptions(format="onnx", quant="Q4_K_M", output=tmp_path, quiet=True))
    with pytest.raises(UsageError, match="Hugging Face checkpoint"):
        pack_model(smollm2_gguf, PackOptions(format="onnx", output=tmp_path, quiet=True))
    assert not any(p for p in tmp_path.iterdir() if not p.name.startswith("."))


# -- the real SmolLM2-135M-Instruct -------------------------------------------------------------

PROMPTS = ["What is the boiling point of water in Celsius?", "What is the capital of France?"]


@pytest.mark.slow
def test_smollm2_int4_greedy_answers_agree_with_transformers_f32(smollm2_hf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import packager

    bundle = pack_model(smollm2_hf, PackOptions(format="onnx", output=tmp_path, quiet=True)).path
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    with packager.load(bundle) as m:
        for q in PROMPTS:
            # return_dict=False: transformers 5 returns a BatchEncoding by default, 4.x the ids
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=False)
            with torch.no_grad():
                ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
            ref_text = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
            assert m.tokenize(tok.decode(ids[0]), add_special=False) == ids[0].tolist()  # same prompt tokens
            ours = m.chat([{"role": "user", "content": q}], max_tokens=6, temperature=0.0)
            assert ours == ref_text, (q, ours, ref_text)
        answer = m.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=24, temperature=0.0)
    assert "100" in answer, answer
