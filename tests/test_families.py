"""Qwen3 and SmolLM3 in both formats, against llama.cpp's converter, llama.cpp, ONNX Runtime and transformers.

The fixtures (tests/models.py) are tiny random checkpoints built by transformers' own config
classes, with real tokenizers: Qwen3 (q/k RMSNorm per head, head_dim 32 where hidden/heads is 16,
no biases, tied) and SmolLM3 (Llama's layout, no RoPE on layer 3 of 4, head_dim 32, tied).

- GGUF: our F16 is byte-identical to convert_hf_to_gguf.py's (tensors and every key but general.*),
  and llama.cpp running it computes transformers' f32 logits.
- ONNX: our f32 graph computes transformers' logits (the q/k norms and NoPE layers included), and
  the planner sizes the q/k norms the converter writes. (The int4 graph computing its dequantized
  weights is checked for these fixtures too, in tests/test_onnx.py.)
- Both: a chat through packager.load; configs llama.cpp or the graph would run differently are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest

import models
import oracle
from packager.convert.gguf.converter import convert as convert_gguf
from packager.errors import SourceError, UnsupportedArchitectureError
from packager.quants import get_quant
from packager.source.resolver import resolve
from test_archs import _assert_same_tensors, _cos, _fields, _hf_logits, _llama_logits, _tensors

FIXTURES: dict[str, Callable[[], Path]] = {"qwen3": models.tiny_qwen3, "smollm3": models.tiny_smollm3}
PROMPTS = {
    "qwen3": "<|im_start|>user\nThe quick brown fox jumps over the lazy dog 12345<|im_end|>\n<|im_start|>assistant\n",
    "smollm3": "<|start_header_id|>user<|end_header_id|>\n\nThe quick brown fox jumps over the lazy dog 12345<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
IDS = np.array([[1, 400, 1200, 77, 9000, 31, 5, 600, 2048, 13, 99, 3, 151, 42, 4242, 7]], dtype=np.int64)


@pytest.fixture(scope="session")
def gguf_f16(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Our F16 GGUF of a fixture, converted once per session."""
    out_dir = tmp_path_factory.mktemp("families-gguf")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = out_dir / f"{name}-F16.gguf"
            convert_gguf(resolve(FIXTURES[name](), hash_files=False, quiet=True), get_quant("F16"), out, quiet=True)
            done[name] = out
        return done[name]

    return get


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Path]:
    """Our ONNX graph of a fixture (f32 or int4), converted once per session."""
    from packager.convert.onnx.converter import OnnxOptions, convert

    out_dir = tmp_path_factory.mktemp("families-onnx")
    done: dict[tuple[str, bool], Path] = {}

    def get(name: str, int4: bool) -> Path:
        if (name, int4) not in done:
            out = out_dir / f"{name}-{'int4' if int4 else 'f32'}"
            convert(resolve(FIXTURES[name](), hash_files=False, quiet=True), out, OnnxOptions(int4=int4), quiet=True)
            done[name, int4] = out
        return done[name, int4]

    return get


# -- GGUF: against llama.cpp's converter, and llama.cpp against transformers ----------------------

@pytest.mark.slow  # GGUFReader parses a 128k-150k token vocabulary: ~15 s a file
@pytest.mark.parametrize("name", list(FIXTURES))
def test_f16_is_byte_identical_to_convert_hf_to_gguf(name, gguf_f16):
    ours, ref = gguf_f16(name), oracle.reference_gguf(FIXTURES[name](), "f16")
    _assert_same_tensors(ours, ref)
    assert _fields(ours) == _fields(ref)  # general.* differs on purpose (name and size label from the source)


@pytest.mark.slow  # GGUFReader parses a 128k-150k token vocabulary: ~15 s a file
@pytest.mark.parametrize("name", list(FIXTURES))
def test_q4_k_m_equals_llama_quantize(name, tmp_path):
    """The type llama.cpp's quantizer picks for each tensor (the q/k norms kept f32), and the bytes."""
    ref = oracle.reference_quantize(oracle.reference_gguf(FIXTURES[name](), "f16"), "Q4_K_M")
    ours = tmp_path / "ours.gguf"
    convert_gguf(resolve(FIXTURES[name](), hash_files=False, quiet=True), get_quant("Q4_K_M"), ours, quiet=True)
    _assert_same_tensors(ours, ref)


@pytest.mark.slow  # GGUFReader parses a 128k-150k token vocabulary: ~15 s a file
def test_gguf_carries_each_family_s_structure(gguf_f16):
    q = _fields(gguf_f16("qwen3"))
    assert (q["qwen3.attention.key_length"], q["qwen3.attention.value_length"]) == (32, 32)  # not 64 / 4
    tensors = _tensors(gguf_f16("qwen3"))
    for i in range(3):
        for norm in ("attn_q_norm", "attn_k_norm"):
            t = tensors[f"blk.{i}.{norm}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [32]
    assert "output.weight" not in tensors  # tied
    s = _fields(gguf_f16("smollm3"))
    assert s["smollm3.rope.dimension_count"] == 32 and s["smollm3.attention.key_length"] == 32
    assert not [k for k in s if "rope" in k and "layer" in k]  # llama.cpp reads no NoPE key: it is fixed


@pytest.mark.slow  # GGUFReader parses a 128k-150k token vocabulary: ~15 s a file
@pytest.mark.parametrize("name", list(FIXTURES))
def test_planner_implies_the_tensors_written(name, gguf_f16):
    """`pack plan` sizes (and checks the checkpoint against) the tensor list the converter writes: q/k norms too."""
    from packager.formats.gguf import gguf_tensors
    from packager.spec.model import load_spec

    want = dict(gguf_tensors(load_spec(FIXTURES[name]())))
    got = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in _tensors(gguf_f16(name)).values()}
    assert want == got


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FIXTURES))
def test_f16_logits_match_transformers(name, gguf_f16):
    ids, ours = _llama_logits(gguf_f16(name), 256, PROMPTS[name])
    hf = _hf_logits(FIXTURES[name](), ids)
    assert len(ids) > 16
    # Measured: cosine > 0.999999, |diff| < 0.002 (f16 weights). A skipped q/k norm or a rotated NoPE layer
    # moves the logits by far more (see test_onnx_nope_layer_matters for the size of the latter).
    assert _cos(ours, hf).min() > 0.9999
    assert np.abs(ours - hf).max() < 0.05


# -- ONNX: the graph against transformers --------------------------------------------------------

def _ort_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    from test_onnx import _ort_logits as run

    return run(model_dir, ids)


def _hf(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    from test_onnx import _hf_logits as run

    return run(model_dir, ids)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_onnx_f32_graph_computes_what_transformers_computes(name, onnx_dir):
    ours, ref = _ort_logits(onnx_dir(name, False), IDS), _hf(FIXTURES[name](), IDS)
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())


def test_onnx_graph_structure(onnx_dir):
    import onnx

    def gqa(name: str) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
        m = onnx.load(str(onnx_dir(name, False) / "model.onnx"), load_external_data=False)
        return m, [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]

    m, nodes = gqa("qwen3")
    norms = [n for n in m.graph.node if n.name.endswith(("q_norm/SimplifiedLayerNormalization",
                                                         "k_norm/SimplifiedLayerNormalization"))]
    assert len(norms) == 2 * 3 and all(n.input[1].endswith(("q_norm.weight", "k_norm.weight")) for n in norms)
    assert all(n.input[1] and n.input[2] for n in nodes)  # q, k, v apart: the norms sit between
    _, nodes = gqa("smollm3")
    rotary = [next(a.i for a in n.attribute if a.name == "do_rotary") for n in nodes]
    assert rotary == [1, 1, 1, 0]
    assert [len(n.input) for n in nodes] == [9, 9, 9, 7]  # the NoPE layer reads no cos/sin cache


def _variant(name: str, tmp_path: Path, **config) -> Path:
    """A copy of a fixture (weights linked) with some config.json fields changed."""
    src = FIXTURES[name]()
    out = tmp_path / f"{name}-variant"
    out.mkdir()
    for f in src.iterdir():
        if f.name == "config.json":
            (out / f.name).write_text(json.dumps({**json.loads(f.read_text()), **config}))
        elif f.is_file():
            os.symlink(f, out / f.name)
    return out


def test_onnx_nope_layer_matters(onnx_dir, tmp_path):
    """The check above is not vacuous: rotating layer 3 as well moves the logits well past its tolerance."""
    from packager.convert.onnx.converter import OnnxOptions, convert

    variant = _variant("smollm3", tmp_path, no_rope_layers=[1, 1, 1, 1])
    convert(resolve(variant, hash_files=False, quiet=True), tmp_path / "out", OnnxOptions(int4=False), quiet=True)
    wrong, ref = _ort_logits(tmp_path / "out", IDS), _hf(FIXTURES["smollm3"](), IDS)
    assert np.abs(wrong - ref).max() > 20 * 2e-4 * np.abs(ref).max()


def test_plan_sizes_the_q_k_norms_as_written(onnx_dir):
    from packager.formats.onnx import SCHEMES, weight_layout
    from packager.spec.model import load_spec

    layout = weight_layout(load_spec(FIXTURES["qwen3"]()), SCHEMES["INT4_B32"])
    assert layout.file_bytes == (onnx_dir("qwen3", True) / "model.onnx.data").stat().st_size


# -- configs refused, one line naming the field ----------------------------------------------------

def _hparams(cfg: dict, tmp_path: Path) -> dict[str, object]:
    from packager import archs

    arch = archs.arch_for(cfg["architectures"][0])
    w = gguf.GGUFWriter(tmp_path / "h.gguf", arch.name)
    archs.write_hparams(arch, cfg, w)
    return {k: v.value for k, v in w.kv_data[0].items()}


SMOLLM3_3B = dict(  # HuggingFaceTB/SmolLM3-3B's config.json (the fields the converters read)
    architectures=["SmolLM3ForCausalLM"], model_type="smollm3", hidden_size=2048, intermediate_size=11008,
    num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=65536,
    rms_norm_eps=1e-6, rope_theta=5000000.0, vocab_size=128256, tie_word_embeddings=True,
    use_sliding_window=False, sliding_window=None, no_rope_layer_interval=4,
    no_rope_layers=[int((i + 1) % 4 != 0) for i in range(36)],
)
QWEN3_06B = dict(  # Qwen/Qwen3-0.6B's config.json
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rms_norm_eps=1e-6, rope_theta=1000000, vocab_size=151936, tie_word_embeddings=True, attention_bias=False,
    use_sliding_window=False, sliding_window=None, max_window_layers=28,
)


def test_real_configs(tmp_path):
    from packager import archs

    h = _hparams(SMOLLM3_3B, tmp_path)
    assert h["smollm3.rope.dimension_count"] == 128 and h["smollm3.vocab_size"] == 128256
    cfg = {k: v for k, v in SMOLLM3_3B.items() if k != "no_rope_layers"}  # transformers' default, rebuilt
    assert archs.smollm3_rope_layers(cfg) == tuple(bool(f) for f in SMOLLM3_3B["no_rope_layers"])
    h = _hparams(QWEN3_06B, tmp_path)
    assert (h["qwen3.attention.key_length"], h["qwen3.embedding_length"], h["qwen3.attention.head_count"]) == \
        (128, 1024, 16)


@pytest.mark.parametrize(("name", "change", "error", "match"), [
    ("smollm3", {"no_rope_layers": [1, 0, 1, 1]}, UnsupportedArchitectureError,
     r"no_rope_layers skips RoPE on layers \[1\].*--format onnx"),
    ("smollm3", {"no_rope_layers": [1, 1, 1]}, SourceError, "no_rope_layers must list one 0 or 1 per layer"),
    ("smollm3", {"no_rope_layers": None, "no_rope_layer_interval": 0}, SourceError, "no_rope_layer_interval"),
    ("smollm3", {"use_sliding_window": True, "sliding_window": 16}, UnsupportedArchitectureError, "use_sliding_window"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16}, UnsupportedArchitectureError, "use_sliding_window"),
])
def test_gguf_refuses_what_llama_cpp_would_run_differently(name, change, error, match, tmp_path):
    cfg = json.loads((FIXTURES[name]() / "config.json").read_text())
    with pytest.raises(error, match=match):
        _hparams({**cfg, **change}, tmp_path)


@pytest.mark.parametrize(("name", "change", "match"), [
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
    ("smollm3", {"no_rope_layers": [1, 1]}, "no_rope_layers must list"),
])
def test_onnx_refuses_what_the_graph_would_run_differently(name, change, match, tmp_path):
    from packager.convert.onnx.converter import OnnxOptions, convert

    variant = _variant(name, tmp_path, **change)
    with pytest.raises(SourceError, match=match):
        convert(resolve(variant, hash_files=False, quiet=True), tmp_path / "out", OnnxOptions(int4=False), quiet=True)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_onnx_takes_any_nope_pattern(tmp_path):
    """The graph rotates per layer as no_rope_layers says, where llama.cpp cannot (refused above)."""
    from packager.convert.onnx.converter import OnnxOptions, convert

    variant = _variant("smollm3", tmp_path, no_rope_layers=[1, 0, 1, 1])
    convert(resolve(variant, hash_files=False, quiet=True), tmp_path / "out", OnnxOptions(int4=False), quiet=True)
    np.testing.assert_allclose(_ort_logits(tmp_path / "out", IDS), ref := _hf(variant, IDS),
                               atol=2e-4 * np.abs(ref).max())


# -- a chat through packager.load, both formats ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_chat_through_packager_load(name, fmt, tmp_path):
    import packager
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    result = pack_model(FIXTURES[name](), PackOptions(format=fmt, output=tmp_path, quiet=True))
    assert result.manifest["format"] == fmt
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with packager.load(result.path, n_threads=1, n_ctx=256) as m:
        reply = m.chat(question, stream=True, max_tokens=6)
        text = "".join(reply)
        assert reply.n_generated >= 1 and reply.n_prompt > len(m.tokenize(question[0]["content"], add_special=False))
        assert m.chat(question, max_tokens=6) == text  # greedy: the same again
    shutil.rmtree(result.path)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("cfg", [QWEN3_06B, SMOLLM3_3B], ids=["qwen3-0.6b", "smollm3-3b"])
def test_pack_plan_reads_the_config_alone(cfg, fmt, tmp_path):
    """`pack plan` on a folder holding only the real config.json: a plan in each format, the q/k norms counted."""
    import subprocess
    import sys

    from packager.formats.gguf import gguf_tensors
    from packager.spec.model import spec_from_config

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "packager.cli", "plan", str(tmp_path), "--target", "laptop",
                        "--format", fmt, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert plan["format"] == fmt and plan["memory"]["weights"] > 0
    norms = [n for n, _ in gguf_tensors(spec_from_config(cfg)) if n.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))]
    assert len(norms) == (2 * cfg["num_hidden_layers"] if cfg is QWEN3_06B else 0)
