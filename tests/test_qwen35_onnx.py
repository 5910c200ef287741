"""Qwen3.5 as an ONNX bundle (edgepack's own graph, onnxruntime-genai 0.18): gated delta-net layers through
ONNX Runtime's CausalConvWithState and LinearAttention (gated_delta) with their conv and recurrent states as the
graph's inputs and outputs, gated full-attention layers through GroupQueryAttention (q/k norms, partial rotary,
the output gate), against transformers 5's f32 logits, genai's own loop and the planner.

The fixture is tests/models.tiny_qwen35 (six delta-net layers, two attention layers, 4 key heads to 8 value
heads, a one-layer MTP head that the bundle leaves out). Needs transformers with Qwen3.5 (5.x) for the logits,
and onnxruntime-genai 0.18 (which holds recurrent state; 0.11 does not) for genai's loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import models
from packager.source.resolver import resolve

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
# 24 tokens of Qwen2.5's vocabulary (the fixture's tokenizer): "The quick brown fox ..." and random ids.
IDS = np.concatenate([[785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13],
                      np.random.default_rng(35).integers(200, 150000, 14)]).astype(np.int64)
PROMPT = 6  # the first call's tokens; then one token a call, carried through the states
LINEAR, FULL = [0, 1, 2, 4, 5, 6], [3, 7]


def _genai():
    og = pytest.importorskip("onnxruntime_genai")
    if tuple(int(x) for x in og.__version__.split(".")[:2]) < (0, 18):
        pytest.skip(f"onnxruntime-genai {og.__version__} holds no recurrent state (0.18 does)")
    return og


def _transformers():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3_5ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5")
    return transformers


@pytest.fixture(scope="module")
def onnx_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _genai()  # the graph's contrib ops are ONNX Runtime 1.32's, which genai 0.18 comes with
    from packager.convert.onnx.converter import OnnxOptions, convert

    out = tmp_path_factory.mktemp("qwen35-onnx") / "f32"
    convert(resolve(models.tiny_qwen35(), hash_files=False, quiet=True), out, OnnxOptions(int4=False), quiet=True)
    return out


@pytest.fixture(scope="module")
def hf() -> np.ndarray:
    """transformers 5's f32 logits of IDS, one forward pass."""
    transformers = _transformers()
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(str(models.tiny_qwen35()), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(IDS[None])).logits[0].numpy()


def _session(model_dir: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def _ort_steps(sess, chunks: list[list[int]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits of every position through plain ONNX Runtime, the chunks fed one call each, the KV cache and the
    delta-net states (zeros at first) carried from each call's present outputs into the next call's past inputs."""
    names = [o.name for o in sess.get_outputs()]
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith(("past_key_values.", "past.")):
            past[i.name] = np.zeros([1 if n == "batch_size" else (n if isinstance(n, int) else 0) for n in i.shape],
                                    np.float32)
    rows, total, out = [], 0, {}
    for chunk in chunks:
        total += len(chunk)
        feed = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, total), np.int64), **past}
        out = dict(zip(names, sess.run(None, feed)))
        rows.append(out["logits"][0])
        past = {n: out["present." + n.split(".", 1)[1]] for n in past}
    return np.concatenate(rows), out


def test_onnx_graph_holds_state_on_linear_layers_and_kv_on_attention_layers(onnx_f32):
    """The delta-net layers take past.N.conv [B, 1024 channels, K-1] and past.N.recurrent [B, 8 value heads, 64, 64]
    and no KV; the attention layers take past_key_values.N.*; genai_config binds both, as genai 0.18's builder
    names them."""
    import onnx

    m = onnx.load(str(onnx_f32 / "model.onnx"), load_external_data=False)
    shape = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
    inputs = {v.name: shape(v) for v in m.graph.input}
    assert {n for n in inputs if n.startswith("past_key_values.")} == {
        f"past_key_values.{i}.{kv}" for i in FULL for kv in ("key", "value")}
    assert {n: s for n, s in inputs.items() if n.startswith("past.")} == {
        **{f"past.{i}.conv": ["batch_size", 1024, 3] for i in LINEAR},
        **{f"past.{i}.recurrent": ["batch_size", 8, 64, 64] for i in LINEAR}}
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("CausalConvWithState") == ops.count("LinearAttention") == 6
    assert ops.count("GroupQueryAttention") == 2
    la = next(n for n in m.graph.node if n.op_type == "LinearAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in la.attribute}
    assert attrs["update_rule"] == b"gated_delta" and (attrs["q_num_heads"], attrs["kv_num_heads"]) == (4, 8)
    cfg = json.loads((onnx_f32 / "genai_config.json").read_text())["model"]
    assert cfg["type"] == "qwen3_5_text"
    assert cfg["decoder"]["inputs"]["past_conv_names"] == "past.%d.conv"
    assert cfg["decoder"]["inputs"]["past_recurrent_names"] == "past.%d.recurrent"
    assert cfg["decoder"]["outputs"]["present_recurrent_names"] == "present.%d.recurrent"
    assert not [t for t in m.graph.initializer if "mtp" in t.name]  # the MTP head is left out


def test_onnx_f32_graph_computes_transformers_through_its_states(onnx_f32, hf):
    """The f32 graph through ONNX Runtime: the 24 tokens in one call, and 6 then one a call (18 decode steps
    carried through the conv and recurrent states and the KV cache), each position transformers 5's f32 logits.
    Measured: 1e-5 of the largest logit."""
    sess = _session(onnx_f32)
    whole, _ = _ort_steps(sess, [list(IDS)])
    steps, out = _ort_steps(sess, [list(IDS[:PROMPT])] + [[int(t)] for t in IDS[PROMPT:]])
    tol = 2e-4 * np.abs(hf).max()
    np.testing.assert_allclose(whole, hf, atol=tol)
    np.testing.assert_allclose(steps, hf, atol=tol)
    assert out["present.0.conv"].shape == (1, 1024, 3) and out["present.0.recurrent"].shape == (1, 8, 64, 64)
    assert np.abs(out["present.0.recurrent"]).max() > 0


def test_onnx_states_matter(onnx_f32, hf):
    """The decode steps read the states: fed zeros instead of the carried conv state, the logits leave
    transformers' far behind (the test above is not passing on the attention layers alone)."""
    sess = _session(onnx_f32)
    _, out = _ort_steps(sess, [list(IDS[:PROMPT])])
    names = [o.name for o in sess.get_outputs()]
    feed = {"input_ids": IDS[None, PROMPT:PROMPT + 1], "attention_mask": np.ones((1, PROMPT + 1), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith(("past_key_values.", "past.")):
            feed[i.name] = out["present." + i.name.split(".", 1)[1]]
    right = dict(zip(names, sess.run(None, feed)))["logits"][0, -1]
    for i in LINEAR:
        feed[f"past.{i}.recurrent"] = np.zeros_like(feed[f"past.{i}.recurrent"])
    wrong = dict(zip(names, sess.run(None, feed)))["logits"][0, -1]
    tol = 2e-4 * np.abs(hf).max()
    assert np.abs(right - hf[PROMPT]).max() < tol < np.abs(wrong - hf[PROMPT]).max() / 50


@pytest.mark.parametrize("prompt", [1, PROMPT, 20])
def test_onnx_decodes_through_genai(prompt, onnx_f32, hf):
    """onnxruntime-genai 0.18 driving the graph (its RecurrentState holding past.N.conv / past.N.recurrent, its KV
    buffer the attention layers'): a prompt, then one token a call, each step transformers' logits."""
    _genai()
    rows = models.genai_steps(onnx_f32, IDS, prompt, max_length=64)
    ref = hf[prompt - 1:]
    np.testing.assert_allclose(rows, ref, atol=2e-4 * np.abs(ref).max())


def test_onnx_conditional_generation_converts_to_the_same_graph(onnx_f32, tmp_path):
    """Qwen3_5ForConditionalGeneration (model.language_model.*, a vision tower, the MTP head): the very graph and
    weights of the text-only checkpoint."""
    from packager.convert.onnx.converter import OnnxOptions, convert

    ours = tmp_path / "vision"
    convert(resolve(models.tiny_qwen35_vision(), hash_files=False, quiet=True), ours, OnnxOptions(int4=False),
            quiet=True)
    for name in ("model.onnx", "model.onnx.data"):
        assert (ours / name).read_bytes() == (onnx_f32 / name).read_bytes(), name


# -- the plan ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_ctx", [256, 4096])
def test_onnx_plan_counts_state_not_kv_on_linear_layers(n_ctx):
    """KV (f32, the whole context: genai's buffer) on the two attention layers only; the six delta-net layers'
    conv (3 x 1024) and recurrent (8 x 64 x 64) state, F32, once per sequence."""
    from packager.plan.planner import memory, scheme
    from packager.spec.model import load_spec

    spec = load_spec(models.tiny_qwen35())
    plan = memory(spec, scheme("onnx", "INT4_B32"), n_ctx, "f32", fmt="onnx")
    assert plan.kv_cache == 2 * 2 * 2 * 64 * n_ctx * 4
    assert plan.state == 4 * 6 * (3 * 1024 + 8 * 64 * 64)


def test_onnx_plan_from_a_manifest_spec_sizes_the_same_weights():
    """A bundle's manifest keeps no tensor list: its spec's delta-net head layout comes from the layers' state sizes
    and the parameter count, and the weights are sized the same as from the config."""
    import dataclasses

    from packager.formats.onnx import SCHEMES, Dims, weight_layout
    from packager.spec.model import load_spec

    spec = load_spec(models.tiny_qwen35())
    bare = dataclasses.replace(spec, tensors=())
    assert Dims.from_spec(bare).linear == Dims.from_spec(spec).linear == (4, 8, 64, 64, 4)
    assert weight_layout(bare, SCHEMES["INT4_B32"]) == weight_layout(spec, SCHEMES["INT4_B32"])


@pytest.mark.parametrize("command", ["plan", "model"])
def test_pack_cli_with_format_onnx(command, tmp_path):
    """`pack plan --format onnx` says the recurrent state; `pack model --format onnx` writes the bundle."""
    out = tmp_path / "dist"
    args = (["plan", str(models.tiny_qwen35()), "--format", "onnx", "--explain"] if command == "plan" else
            ["model", str(models.tiny_qwen35()), "--format", "onnx", "--output", str(out), "--quiet"])
    r = subprocess.run([sys.executable, "-m", "packager.cli", *args], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    if command == "plan":
        assert "recurrent state: (6 linear layers x 35840 floats)" in r.stdout, r.stdout
        assert "2 attention layers (of 8; state layers hold none)" in r.stdout, r.stdout
    else:
        (bundle,) = out.iterdir()
        assert json.loads((bundle / "manifest.json").read_text())["format"] == "onnx"


# -- the int4 bundle through packager.load --------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _genai()
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    out = tmp_path_factory.mktemp("qwen35-onnx-dist")
    result = pack_model(str(models.tiny_qwen35()), PackOptions(format="onnx", output=out, quiet=True))
    assert [w for w in result.warnings if "multi-token-prediction" in w]
    return result.path


def test_onnx_int4_bundle_sized_as_planned(onnx_bundle):
    from packager.formats.onnx import SCHEMES, weight_layout
    from packager.spec.model import load_spec

    data = onnx_bundle / "model" / "model.onnx.data"
    assert weight_layout(load_spec(models.tiny_qwen35()), SCHEMES["INT4_B32"]).file_bytes == data.stat().st_size


def test_onnx_int4_bundle_chats_through_load(onnx_bundle):
    """An int4 bundle chats through packager.load: the same question twice gets the same greedy answer, a second
    turn a fresh load's, and a sampled call after them runs. A call that extends the previous prompt rewinds the kept
    Generator to its snapshot (genai rewinds a recurrent state only to a snapshot): the second turn reads the answer
    and the new message, not the question again."""
    import packager

    question = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. Why?"}]
    with packager.load(onnx_bundle, n_threads=1, n_ctx=256) as m, \
            packager.load(onnx_bundle, n_threads=1, n_ctx=256, deterministic=True) as fresh:
        kept, real = [], m._generator

        def spy(ids, opts):
            out = real(ids, opts)
            kept.append(out[1])
            return out

        m._generator = spy
        reply = m.chat(question, stream=True, max_tokens=10, temperature=0)
        one = "".join(reply)
        assert one and reply.n_prompt > 10
        assert m.chat(question, max_tokens=10, temperature=0) == one
        turn = question + [{"role": "assistant", "content": one}, {"role": "user", "content": "And then?"}]
        two = m.chat(turn, max_tokens=10, temperature=0)
        assert two == fresh.chat(turn, max_tokens=10, temperature=0)
        asked = len(m._chat_prompt(question)[0])
        assert kept == [0, 0, asked], kept  # the same question afresh (its last token's logits); the turn after it
        again = m.chat(question, max_tokens=10, temperature=0)
        assert again == one == fresh.chat(question, max_tokens=10, temperature=0)
        m.chat(turn, max_tokens=4, temperature=0.8)  # the kept generator is not rewound: a sampled call runs
        m.chat(turn, max_tokens=4, temperature=0.8)


def test_onnx_int4_greedy_equals_its_own_graph(onnx_bundle):
    """genai's loop (a prompt, then steps carried through the states) picks, 10 tokens long, the argmax of the
    int4 graph's own full forward pass over the tokens so far (plain ONNX Runtime, zero states)."""
    import packager

    sess = _session(onnx_bundle / "model")
    with packager.load(onnx_bundle, n_threads=1, n_ctx=256) as m:
        prompt = m.tokenize("The quick brown fox jumps over the lazy dog.", add_special=False)
        s = m.stream(prompt, max_tokens=10, temperature=0)
        text = "".join(s)
        assert s.n_generated == 10 and s.finish_reason == "length"
        ids = list(prompt)
        for _ in range(10):
            logits, _ = _ort_steps(sess, [ids])
            ids.append(int(logits[-1].argmax()))
        assert m.detokenize(ids[len(prompt):]) == text
