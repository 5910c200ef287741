"""Qwen3.5 (issue 27): gated delta-net layers between gated attention layers, against llama.cpp's converter,
its quantizer and transformers 5's logits; packed, loaded and chatted with; what it cannot be, refused
(the ONNX bundle: tests/test_qwen35_onnx.py).

The fixture (tests/models.tiny_qwen35) is a random 8-layer Qwen3.5 text model: six linear-attention layers,
two full-attention ones, 4 key heads to 8 value heads (so the V-head reorder runs), an explicit mrope section,
an untied lm_head and a one-layer MTP head as the hub's checkpoints carry. Its config is transformers 5.25's
save of Qwen3_5TextConfig, written out so that the fixture builds on transformers 4.57 too (which has no
Qwen3.5 class); the tests that need transformers' own Qwen3.5 skip where it is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import models
import oracle
from packager.archs import qwen35
from packager.convert.gguf.converter import convert
from packager.errors import IncompleteConfigError, UnsupportedArchitectureError
from packager.quants import get_quant
from packager.source.resolver import resolve
from packager.spec.model import load_spec, spec_from_config
from test_archs import _assert_same_tensors, _cos, _fields, _tensors

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
PROMPT = "The quick brown fox jumps over the lazy dog. Qwen3.5 mixes gated delta-net layers with attention."
NO_MTP = ("--no-mtp",)  # the converter's flag that edgepack always follows (its MTP head is not packed)


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen35") / "qwen35-F16.gguf"
    convert(resolve(models.tiny_qwen35(), hash_files=False, quiet=True), get_quant("F16"), out, quiet=True)
    return out


# -- config, no engine --------------------------------------------------------------------------------

def test_the_fixture_config_is_what_transformers_5_saves(tmp_path):
    """The written-out config is transformers 5's own save of the tiny Qwen3_5TextConfig."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3_5TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5")
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=64,
        linear_value_head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8, max_position_embeddings=4096,
        eos_token_id=151645, rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                              "mrope_section": [3, 3, 2], "mrope_interleaved": True})
    cfg.architectures = ["Qwen3_5ForCausalLM"]
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    ours = {k: v for k, v in models.QWEN35_TINY_CONFIG.items() if k != "mtp_num_hidden_layers"}
    skip = ("transformers_version",)
    assert {k: v for k, v in saved.items() if k not in skip} == {k: v for k, v in ours.items() if k not in skip}


def test_spec_counts_each_layer_kind():
    spec = load_spec(models.tiny_qwen35())
    names = dict(spec.tensors)
    assert names["blk.0.ssm_conv1d.weight"] == (1024, 4) and "blk.0.attn_q.weight" not in names
    assert names["blk.3.attn_q.weight"] == (512, 256)  # query and its gate: 2 x 4 heads x 64
    assert "blk.3.ssm_a" not in names and "output.weight" in names
    assert spec.n_params == sum(int(np.prod(s)) for _, s in spec.tensors)
    # The hub's default layout where layer_types is absent: every fourth layer attends to everything.
    cfg = {k: v for k, v in models.QWEN35_TINY_CONFIG.items() if k != "layer_types"}
    assert qwen35.layer_kinds(cfg) == tuple(models.QWEN35_TINY_CONFIG["layer_types"])


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"linear_value_head_dim": 32}, UnsupportedArchitectureError, "linear_key_head_dim"),
    ({"linear_num_value_heads": 6}, IncompleteConfigError, "linear_num_value_heads"),
    ({"layer_types": ["linear_attention"] * 7 + ["sliding_attention"]}, IncompleteConfigError, r"layer_types\[7\]"),
    ({"linear_conv_kernel_dim": None}, IncompleteConfigError, "linear_conv_kernel_dim"),
])
def test_configs_refused_in_one_line(change, error, match):
    cfg = {k: v for k, v in dict(models.QWEN35_TINY_CONFIG, **change).items() if v is not None}
    with pytest.raises(error, match=match) as exc:
        spec_from_config(cfg)
    assert "\n" not in str(exc.value)


def test_v_heads_move_from_grouped_to_tiled_order():
    """Key head k's value heads (k0v0 k0v1 | k1v0 k1v1) become (k0v0 k1v0 | k0v1 k1v1), rows of d each."""
    rows = np.arange(2 * 2 * 3)[:, None]  # 2 key heads x 2 value heads each x d=3
    out = qwen35._tiled(rows, 0, 2, 2, 3)[:, 0]
    assert out.tolist() == [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]


# -- against llama.cpp's converter, its quantizer and transformers -----------------------------------

@pytest.mark.slow
def test_f16_is_byte_identical_to_convert_hf_to_gguf(f16):
    ref = oracle.reference_gguf(models.tiny_qwen35(), "f16", NO_MTP)
    _assert_same_tensors(f16, ref)
    assert _fields(f16) == _fields(ref)
    g, t = _fields(f16), _tensors(f16)
    assert g["qwen35.attention.recurrent_layers"] == [True] * 3 + [False] + [True] * 3 + [False]
    assert g["qwen35.rope.dimension_sections"] == [3, 3, 2, 0] and g["qwen35.ssm.time_step_rank"] == 8
    assert t["blk.0.ssm_conv1d.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not [n for n in t if int(n.split(".")[1] if n.startswith("blk.") else 0) >= 8]  # no MTP block
    # A GGUF source's spec (pack plan x.gguf) knows the same layers, and so the same KV and state.
    from packager.spec.gguf import spec_from_gguf

    ours = spec_from_gguf(f16)[0]
    assert ours.layers == load_spec(models.tiny_qwen35()).layers and ours.kv_layers() == [3, 7]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_equals_llama_quantize(quant, tmp_path):
    """Types chosen per tensor (conv kernels and ssm_a kept F32, the delta-net's qkv counted as attn_v) and bytes."""
    ref = oracle.reference_quantize(oracle.reference_gguf(models.tiny_qwen35(), "f16", NO_MTP), quant)
    ours = tmp_path / f"qwen35-{quant}.gguf"
    convert(resolve(models.tiny_qwen35(), hash_files=False, quiet=True), get_quant(quant), ours, quiet=True)
    _assert_same_tensors(ours, ref)


@pytest.mark.slow
def test_conditional_generation_packs_its_language_model(f16, tmp_path):
    """Qwen3_5ForConditionalGeneration (model.language_model.*, a vision tower, the MTP head): the GGUF is
    llama.cpp's converter's and the very tensors of the text-only checkpoint; the pack says what it left out."""
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    src = models.tiny_qwen35_vision()
    ours = tmp_path / "vision-F16.gguf"
    convert(resolve(src, hash_files=False, quiet=True), get_quant("F16"), ours, quiet=True)
    ref = oracle.reference_gguf(src, "f16", NO_MTP)
    _assert_same_tensors(ours, ref)
    assert _fields(ours) == _fields(ref)
    _assert_same_tensors(ours, f16)
    result = pack_model(str(src), PackOptions(quant="Q8_0", output=tmp_path / "dist", quiet=True))
    notes = [w for w in result.warnings if "vision tower" in w]
    assert len(notes) == 1 and "\n" not in notes[0] and "mtp" in notes[0]


@pytest.mark.slow
def test_f16_logits_match_transformers(f16):
    """llama.cpp's qwen35 (delta-net recurrence, conv state, gated attention, M-RoPE) computes transformers 5's
    f32 logits of the checkpoint."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3_5ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5")
    import llama_cpp
    import torch

    llm = llama_cpp.Llama(str(f16), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    model = transformers.AutoModelForCausalLM.from_pretrained(models.tiny_qwen35(), dtype=torch.float32)
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    assert len(ids) > 16
    assert _cos(ours, hf).min() > 0.999, _cos(ours, hf)
    assert (ours.argmax(-1) == hf.argmax(-1)).mean() >= 0.9


# -- the plan against llama.cpp's allocation ------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    out = tmp_path_factory.mktemp("qwen35-dist")
    return pack_model(str(models.tiny_qwen35()), PackOptions(quant="Q4_K_M", n_ctx=4096, output=out, quiet=True)).path


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx", [1024, 4096])
def test_plan_kv_and_state_equal_what_llama_cpp_allocates(bundle, n_ctx):
    """KV on the two attention layers only (f16, n_ctx cells) and the six delta-net layers' F32 state (conv rows
    of 3 x 1024 channels, an 8 x 64 x 64 matrix): the plan's figures against llama.cpp's KV and RS buffer logs,
    within 3% (the log's resolution is 0.01 MiB)."""
    import packager
    from packager.plan.planner import memory, scheme

    with models.logged_buffers(models.KV_LINE, models.RS_LINE) as (kv, rs):
        model = packager.load(bundle, n_ctx=n_ctx)
    model.close()
    spec = load_spec(models.tiny_qwen35())
    plan = memory(spec, scheme("gguf", "Q4_K_M"), n_ctx, "f16")
    assert len(kv) == 1 and len(rs) == 1, (kv, rs)
    assert plan.kv_cache == 2 * 2 * 2 * 64 * n_ctx * 2  # 2 layers x K,V x 2 heads x 64 x cells x f16
    assert plan.state == 4 * 6 * (3 * 1024 + 64 * 8 * 64)
    mib = 1 << 20
    assert abs((plan.kv_cache + plan.state) / mib - (kv[0] + rs[0])) <= 0.03 * (kv[0] + rs[0])
    assert abs(plan.state / mib - rs[0]) <= 0.01 and abs(plan.kv_cache / mib - kv[0]) <= 0.01


# -- packed, loaded, refused -------------------------------------------------------------------------

@pytest.mark.slow
def test_pack_and_chat_reuse_what_the_state_holds(tmp_path):
    """A Q4_K_M bundle chats through packager.load; a second turn continues from the recurrent state, and a
    history rewritten behind it (which a recurrent state cannot rewind to) still gets a fresh load's reply."""
    import packager
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    result = pack_model(str(models.tiny_qwen35()), PackOptions(quant="Q4_K_M", output=tmp_path / "dist", quiet=True))
    assert [w for w in result.warnings if "multi-token-prediction" in w]
    first = [{"role": "user", "content": "Hello there, who are you?"}]
    with packager.load(result.path) as m, packager.load(result.path, deterministic=True) as fresh:
        one = m.chat(first, max_tokens=12)
        two_msgs = first + [{"role": "assistant", "content": one}, {"role": "user", "content": "And then?"}]
        two = m.chat(two_msgs, max_tokens=12)
        again = m.chat(first, max_tokens=12)  # shorter than what the state has read
        assert one and two != one
        assert two == fresh.chat(two_msgs, max_tokens=12)
        assert again == one == fresh.chat(first, max_tokens=12)


def _variant(tmp_path: Path, **change) -> Path:
    """The tiny checkpoint's weights and tokenizer (linked) under its config with ``change`` applied."""
    return models.linked_variant(models.tiny_qwen35(), tmp_path / "qwen35", **change)


@pytest.mark.parametrize("command", ["plan", "model"])
def test_layer_kinds_that_disagree_with_the_weights_are_refused(command, tmp_path):
    """Layer 0 called full attention while it holds a delta-net's weights: one line naming the layer, nothing
    written, at `pack plan` as at `pack model`."""
    types = list(models.QWEN35_TINY_CONFIG["layer_types"])
    types[0] = "full_attention"
    src, out = _variant(tmp_path, layer_types=types), tmp_path / "dist"
    args = ["plan", str(src)] if command == "plan" else ["model", str(src), "--output", str(out), "--quiet"]
    r = subprocess.run([sys.executable, "-m", "packager.cli", *args], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "make layer 0 an attention layer, but its weights hold blk.0." in lines[0], r.stderr
    assert not out.exists()
