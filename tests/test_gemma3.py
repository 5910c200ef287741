"""Gemma 3 text: against llama.cpp's converter, transformers' logits, and llama.cpp's own KV allocation;
edgepack's ONNX graph against transformers and onnxruntime-genai.

The fixture (tests/models.tiny_gemma3) is a random 7-layer model built from transformers'
Gemma3TextConfig with a real Gemma-style SentencePiece tokenizer: six layers slide over a
16-token window, one attends to everything, head_dim is twice hidden/heads, the embeddings
are tied and both RoPE bases are off their defaults. Checked here:

- our F16 GGUF is byte-identical to convert_hf_to_gguf.py's (tensors and every non-general key);
- llama.cpp running it computes transformers' f32 logits, past the window and with llama.cpp's
  windowed cache (swa_full=False) evicting cells;
- the plan's KV cache equals what llama.cpp allocates when packager.load opens the bundle
  (llama.cpp's "KV buffer size" log lines, summed), at several contexts;
- configs llama.cpp would compute differently, or that make no sense, are refused in one line;
- ONNX: the f32 graph computes transformers' logits over a prompt three windows long and step by step
  through onnxruntime-genai past the window (local_window_size is the config's sliding_window: one off
  either way moves the logits), the multimodal class converts to the same graph, an int4 bundle chats
  through packager.load, the plan sizes the data file and the KV buffers genai allocates (the whole
  context on every layer), and what the graph cannot compute is refused in one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import models
import oracle
from packager import archs
from packager.convert.gguf.converter import convert
from packager.errors import IncompleteConfigError, UnsupportedArchitectureError
from packager.formats.base import kv_bytes, window_cells
from packager.plan.planner import memory, scheme
from packager.quants import get_quant
from packager.source.resolver import resolve
from packager.spec.model import spec_from_config
from test_archs import GEMMA_PROMPT, _assert_same_tensors, _cos, _fields, _hf_logits, _tensors

ROOT = Path(__file__).resolve().parent.parent

GEMMA3_1B = dict(  # google/gemma-3-1b-it's config.json (the fields the converter and planner read)
    architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
    num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
    rope_scaling=None, sliding_window=512, sliding_window_pattern=6, final_logit_softcapping=None,
    attn_logit_softcapping=None, vocab_size=262144, tie_word_embeddings=True,
)
GEMMA3_4B_TEXT = dict(GEMMA3_1B, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, sliding_window=1024, vocab_size=262208,
                      max_position_embeddings=131072, rope_scaling={"rope_type": "linear", "factor": 8.0})


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gemma3") / "gemma3-F16.gguf"
    convert(resolve(models.tiny_gemma3(), hash_files=False, quiet=True), get_quant("F16"), out, quiet=True)
    return out


def _hparams(cfg: dict, tmp_path: Path) -> dict[str, object]:
    arch = archs.arch_for(cfg["architectures"][0])
    w = gguf.GGUFWriter(tmp_path / "h.gguf", arch.name)
    archs.write_hparams(arch, cfg, w)
    return {k: v.value for k, v in w.kv_data[0].items()}


# -- config and plan, no engine -----------------------------------------------------------------

def test_layers_of_the_real_1b_config():
    spec = spec_from_config(GEMMA3_1B)
    assert spec.sliding_window == 512 and len(spec.sliding_layers) == 26
    assert [i for i in range(26) if not spec.is_sliding(i)] == [5, 11, 17, 23]  # every sixth layer is global
    # transformers 4.5x writes layer_types instead: the same layers.
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)]
    assert spec_from_config(dict(GEMMA3_1B, layer_types=types)).sliding_layers == spec.sliding_layers


def test_plan_counts_windowed_cache_on_sliding_layers():
    """At 32k: 4 global layers x 32768 cells + 22 sliding layers x 1024 (512 window + 512 batch)."""
    spec = spec_from_config(GEMMA3_1B)
    assert window_cells(spec, 32768) == 1024 and window_cells(spec, 600) == 768 and window_cells(spec, 256) == 256
    kv = memory(spec, scheme("gguf", "Q4_K_M"), 32768, "f16").kv_cache
    assert kv == 2 * 256 * 2 * (4 * 32768 + 22 * 1024)
    full = 2 * 26 * 256 * 32768 * 2
    assert kv < full / 5
    assert kv_bytes(spec, 32768, "f16") == full  # unwindowed (ONNX Runtime GenAI's cache): every layer whole


def test_pack_plan_explains_the_windowed_cache(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_1B))
    r = subprocess.run([sys.executable, "-m", "packager.cli", "plan", str(tmp_path), "--ctx", "32768", "--explain"],
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                            "HOME": str(Path.home())})
    assert r.returncode == 0, r.stderr
    assert ("(4 full layers x 32768 ctx + 22 sliding layers x 1024 cells: window 512 + 512 batch, padded) = 0.16 GB"
            in r.stdout), r.stdout


def test_hparams_of_real_configs(tmp_path):
    h = _hparams(GEMMA3_1B, tmp_path)
    assert h["gemma3.attention.sliding_window"] == 512 and "gemma3.attention.sliding_window_pattern" not in h
    assert (h["gemma3.rope.freq_base"], h["gemma3.rope.freq_base_swa"]) == (1000000.0, 10000.0)
    assert (h["gemma3.attention.key_length"], h["gemma3.attention.value_length"]) == (256, 256)
    assert "gemma3.final_logit_softcapping" not in h and "gemma3.rope.scaling.type" not in h
    h = _hparams(GEMMA3_4B_TEXT, tmp_path)
    assert (h["gemma3.rope.scaling.type"], h["gemma3.rope.scaling.factor"]) == ("linear", 8.0)
    # Gemma3ForConditionalGeneration: the language model's config sits under text_config.
    wrapped = dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3",
                   text_config={k: v for k, v in GEMMA3_4B_TEXT.items() if k != "architectures"})
    assert _hparams(wrapped, tmp_path) == h
    assert spec_from_config(wrapped).sliding_window == 1024


def test_layers_off_llama_cpps_pattern_are_listed(tmp_path):
    """llama.cpp assumes every sixth layer global unless the GGUF lists them: another rule gets the list."""
    types = ["sliding_attention", "full_attention"] * 13
    h = _hparams(dict(GEMMA3_1B, layer_types=types), tmp_path)
    assert h["gemma3.attention.sliding_window_pattern"] == [t == "sliding_attention" for t in types]


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"layer_types": ["chunked_attention"] * 26}, IncompleteConfigError, r"layer_types\[0\] is 'chunked_attention'"),
    ({"layer_types": ["full_attention"] * 3}, IncompleteConfigError, "layer_types must list 26 entries"),
    ({"sliding_window": 65536}, IncompleteConfigError, "sliding_window 65536 is larger than the context"),
    ({"query_pre_attn_scalar": 144}, UnsupportedArchitectureError, r"query_pre_attn_scalar is 144.*1/sqrt\(256\)"),
    ({"attn_logit_softcapping": 50.0}, UnsupportedArchitectureError, "attn_logit_softcapping"),
])
def test_configs_refused_in_one_line(change, error, match, tmp_path):
    with pytest.raises(error, match=match) as exc:
        spec_from_config(dict(GEMMA3_1B, **change))
        _hparams(dict(GEMMA3_1B, **change), tmp_path)
    assert "\n" not in str(exc.value)


def _variant(tmp_path: Path, **change) -> Path:
    """The tiny checkpoint's weights and tokenizer (linked) under its config with ``change`` applied."""
    return models.linked_variant(models.tiny_gemma3(), tmp_path / "gemma3", **change)


@pytest.mark.parametrize(("change", "field"), [
    ({"layer_types": ["sliding_attention"] * 6 + ["local_attention"]}, "layer_types[6]"),
    ({"sliding_window": 8192}, "sliding_window"),
])
@pytest.mark.parametrize("command", ["plan", "model"])
def test_cli_refuses_bad_layers_before_writing(change, field, command, tmp_path):
    """The tiny checkpoint (weights, tokenizer) under a config that says something nothing can run."""
    src = _variant(tmp_path, **change)
    out = tmp_path / "dist"
    args = ["plan", str(src)] if command == "plan" else ["model", str(src), "--output", str(out), "--quiet"]
    r = subprocess.run([sys.executable, "-m", "packager.cli", *args], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and field in lines[0], r.stderr
    assert not out.exists()


# -- against llama.cpp's converter and transformers ------------------------------------------------

@pytest.mark.slow
def test_f16_is_byte_identical_to_convert_hf_to_gguf(f16):
    ref = oracle.reference_gguf(models.tiny_gemma3(), "f16")
    _assert_same_tensors(f16, ref)
    assert _fields(f16) == _fields(ref)
    g = _fields(f16)
    # The fixture's values, read (not defaults): window, both RoPE bases, head size; no pattern list needed.
    assert g["gemma3.attention.sliding_window"] == 16
    assert (g["gemma3.rope.freq_base"], g["gemma3.rope.freq_base_swa"]) == (100000.0, 20000.0)
    assert g["gemma3.attention.key_length"] == 64 and "gemma3.attention.sliding_window_pattern" not in g
    tensors = _tensors(f16)
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in tensors  # tied
    # A GGUF source's spec (pack plan x.gguf) knows the same layers as the checkpoint's config.
    from packager.spec.gguf import spec_from_gguf
    from packager.spec.model import load_spec

    ours, want = spec_from_gguf(f16)[0], load_spec(models.tiny_gemma3())
    assert (ours.sliding_window, ours.sliding_layers) == (16, want.sliding_layers) and ours.is_sliding(6)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_equals_llama_quantize(quant, tmp_path):
    """Types chosen per tensor (q/k norms kept f32, the tied embedding's type) and the bytes."""
    ref = oracle.reference_quantize(oracle.reference_gguf(models.tiny_gemma3(), "f16"), quant)
    ours = tmp_path / f"gemma3-{quant}.gguf"
    convert(resolve(models.tiny_gemma3(), hash_files=False, quiet=True), get_quant(quant), ours, quiet=True)
    _assert_same_tensors(ours, ref)


@pytest.mark.slow
def test_conditional_generation_packs_its_language_model(f16, tmp_path):
    """Gemma3ForConditionalGeneration (language_model.model.*, a SigLIP tower, a projector): the GGUF is
    llama.cpp's converter's (its text model), the very tensors of the text-only checkpoint, and the pack
    says in one line that the vision tower was left out."""
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    src = models.tiny_gemma3_vision()
    ours = tmp_path / "vision-F16.gguf"
    convert(resolve(src, hash_files=False, quiet=True), get_quant("F16"), ours, quiet=True)
    ref = oracle.reference_gguf(src, "f16")
    _assert_same_tensors(ours, ref)
    assert _fields(ours) == _fields(ref)
    _assert_same_tensors(ours, f16)
    result = pack_model(str(src), PackOptions(quant="Q8_0", output=tmp_path / "dist", quiet=True))
    notes = [w for w in result.warnings if "vision tower" in w]
    assert len(notes) == 1 and "\n" not in notes[0] and "left out" in notes[0]


def _llama_logits(path: Path, n_ctx: int, ids: list[int] | None = None, text: str | None = None):
    import llama_cpp

    # swa_full=False: llama.cpp's windowed cache on sliding layers, as packager.load opens it.
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, swa_full=False)
    try:
        if ids is None:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        llm.eval(ids)
        return ids, np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize(("n_repeats", "n_ctx"), [(0, 256), (48, 1024)], ids=["past-window", "past-cache"])
def test_f16_logits_match_transformers(n_repeats, n_ctx, f16):
    """31 tokens over a 16-token window; then ~900 tokens, two micro-batches, more than the 768 cells the
    sliding layers' windowed cache holds, so cells are reused (evicted) while llama.cpp decodes."""
    prompt = GEMMA_PROMPT + "The quick brown fox jumps over the lazy dog, 12345. " * n_repeats
    ids, ours = _llama_logits(f16, n_ctx, text=prompt)
    assert ids[0] == 2 and len(ids) > 16 and (n_repeats == 0 or 768 < len(ids) <= n_ctx)
    hf = _hf_logits(models.tiny_gemma3(), ids)
    # Right: cosine ~0.99999 (f16 weights); wrong by a detail (a RoPE base, the window, a norm offset,
    # the query scale): far below.
    assert _cos(ours, hf).min() > 0.9999
    assert np.abs(ours - hf).max() < 0.05


@pytest.mark.slow
def test_layers_off_llama_cpps_pattern_compute_as_transformers(f16, tmp_path):
    """The fixture's weights under layer_types that alternate (not every sixth global): the GGUF lists
    the layers, llama.cpp reads the list, and its logits past the window are transformers' again."""
    from packager.spec.gguf import spec_from_gguf

    types = ["sliding_attention", "full_attention"] * 3 + ["sliding_attention"]
    src = _variant(tmp_path, layer_types=types)
    out = tmp_path / "alternating.gguf"
    convert(resolve(src, hash_files=False, quiet=True), get_quant("F16"), out, quiet=True)
    assert spec_from_gguf(out)[0].sliding_layers == tuple(t == "sliding_attention" for t in types)
    ids, ours = _llama_logits(out, 256, text=GEMMA_PROMPT)
    hf = _hf_logits(src, ids)
    assert _cos(ours, hf).min() > 0.9999 and np.abs(ours - hf).max() < 0.05
    # The same weights without the list (llama.cpp's every-sixth rule) compute something else: the list counts.
    _, default = _llama_logits(f16, 256, ids=ids)
    assert _cos(default, hf).min() < 0.9999


# -- the bundle: plan, llama.cpp's allocation, chat ---------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    out = tmp_path_factory.mktemp("gemma3-dist")
    return pack_model(str(models.tiny_gemma3()), PackOptions(quant="Q8_0", n_ctx=4096, output=out, quiet=True)).path


def _kv_logged(bundle: Path, n_ctx: int) -> tuple[float, object]:
    """MiB of KV buffers llama.cpp logs while packager.load opens the bundle (its log, caught at the source)."""
    import packager

    with models.logged_kv_buffers() as found:
        model = packager.load(bundle, n_ctx=n_ctx)
    assert len(found) == 2, found  # the global layers' cache and the sliding layers'
    return sum(found), model


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx", [512, 1024, 4096])
def test_plan_kv_equals_what_llama_cpp_allocates_at_load(bundle, n_ctx):
    from packager.spec.model import load_spec

    logged, model = _kv_logged(bundle, n_ctx)
    try:
        spec = load_spec(models.tiny_gemma3())
        planned = memory(spec, scheme("gguf", "Q8_0"), n_ctx, "f16").kv_cache / (1 << 20)
        assert planned == pytest.approx(logged, rel=0.03), (planned, logged)
        # and the windowed cache is what was allocated: the sliding layers' 768 cells, not n_ctx
        full = 2 * spec.n_layers * spec.kv_dim * n_ctx * 2 / (1 << 20)
        assert n_ctx < 1024 or logged < 0.8 * full
    finally:
        model.close()


def test_more_context_than_planned_is_checked_against_the_windowed_cache(bundle, tmp_path):
    """A manifest asking for more context than its plan is checked against the cache llama.cpp allocates
    (sliding layers hold their window), as the plan counts it: a full-context formula refused a Gemma 3
    context that fits the budget."""
    import packager
    from packager.formats.base import kv_bytes
    from packager.spec.model import ModelSpec

    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)  # the module's bundle stays as packed
    man = json.loads((copy / "manifest.json").read_text())
    spec, kv_type, mem = ModelSpec(**man["spec"]), man["runtime"]["kv_type"], man["plan"]["memory"]
    small, big = (kv_bytes(spec, n, kv_type, windowed=True) for n in (512, 4096))
    # The rest of the plan made small (8 MB, not the tiny model's 114 MB of compute buffers), so that the
    # budget's 10% slack cannot hide the difference between the two formulas.
    rest = 8 << 20
    mem.update(total=rest + small, kv_cache=small)
    man["plan"].update(n_ctx=512, budget_bytes=rest + big)  # a 512-token plan whose budget holds 4096 windowed
    man["runtime"]["n_ctx"] = 4096
    assert rest + kv_bytes(spec, 4096, kv_type) > (rest + big) * 1.10  # what the full-context formula refused
    (copy / "manifest.json").write_text(json.dumps(man))
    with packager.load(copy) as model:
        assert model.generate("Hello", max_tokens=2, temperature=0.0) is not None


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx", [1024, 4096])  # above 0.5 MiB: the log prints 2 decimals
def test_gemma2_plan_kv_equals_llama_cpps_windowed_cache(n_ctx, tmp_path):
    """Gemma-2 slides too (even layers, llama.cpp's pattern 2): its plan counts the same windowed cache."""
    import llama_cpp

    path = tmp_path / "gemma2.gguf"
    convert(resolve(models.tiny_gemma2(), hash_files=False, quiet=True), get_quant("Q8_0"), path, quiet=True)
    with models.logged_kv_buffers() as found:
        llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, swa_full=False, verbose=False).close()
    logged = sum(found)
    spec = spec_from_config(json.loads((models.tiny_gemma2() / "config.json").read_text()))
    assert [spec.is_sliding(i) for i in range(spec.n_layers)] == [True, False]
    planned = memory(spec, scheme("gguf", "Q8_0"), n_ctx, "f16").kv_cache / (1 << 20)
    assert planned == pytest.approx(logged, rel=0.03), (planned, logged)


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [True, False])
def test_chat_through_load_past_the_window(bundle, deterministic):
    """Greedy replies through packager.load give what a fresh load gives for the same messages: a turn
    that continues the conversation, and one that departs from it ~1300 tokens back, just past the
    first 512-token block, where the sliding layers' cache (768 cells) has already dropped the
    16 positions the departing tokens attend to (a resumed cache must not be trusted there).
    By default a turn continues from the cache (its batches differ from a fresh load's, so only the
    departing turn, read afresh, must give the fresh load's tokens bit for bit); deterministic=True
    gives them for both."""
    import packager

    a = "The quick brown fox jumps over the lazy dog. " * 46 + "Yes yes "  # 514 tokens with the turn's header
    b = "Small language models run on phones and laptops. " * 120
    turn1 = [{"role": "user", "content": a + b}]
    fork = [{"role": "user", "content": a + "Hi."}]  # 521 tokens: every one past 512 looks back before it
    with packager.load(bundle, deterministic=deterministic) as model:
        reply = model.chat(turn1, max_tokens=16, temperature=0)
        assert isinstance(reply, str) and reply
        turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Hello world."}]
        replies = [model.chat(turn2, max_tokens=16, temperature=0), model.chat(fork, max_tokens=16, temperature=0)]
    for messages, want in list(zip((turn2, fork), replies))[0 if deterministic else 1:]:
        with packager.load(bundle) as fresh:
            assert fresh.chat(messages, max_tokens=16, temperature=0) == want


# -- ONNX: edgepack's own graph against transformers and onnxruntime-genai ------------------------------

# 48 tokens (BOS, then random ids of the 699-token vocabulary): three windows of the sliding layers.
LONG_IDS = np.concatenate([[2], np.random.default_rng(0).integers(3, 699, 47)]).reshape(1, -1).astype(np.int64)


@pytest.fixture(scope="module")
def onnx_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.onnx_graph(models.tiny_gemma3(), tmp_path_factory.mktemp("gemma3-onnx") / "f32")


@pytest.fixture(scope="module")
def hf_long() -> np.ndarray:
    from test_onnx import _hf_logits

    return _hf_logits(models.tiny_gemma3(), LONG_IDS)


def _ort(model_dir: Path) -> np.ndarray:
    from test_onnx import _ort_logits

    return _ort_logits(model_dir, LONG_IDS)


def test_onnx_f32_graph_computes_transformers_past_the_window(onnx_f32, hf_long):
    """Every position of a 48-token prompt, 32 of them past the sliding layers' 16-token window: the scaled
    embedding, the four (1 + w) norms and q/k norms, GELU, the query scale, both RoPE bases. Measured: 3e-6."""
    ours = _ort(onnx_f32)
    np.testing.assert_allclose(ours, hf_long, atol=2e-4 * np.abs(hf_long).max())


@pytest.mark.parametrize("prompt", [1, 5, 40], ids=["from-bos", "before-window", "past-window"])
def test_onnx_decodes_through_genai_past_the_window(prompt, onnx_f32, hf_long):
    """onnxruntime-genai driving the graph (genai_config's gemma3_text, its shared KV buffer): a prompt, then
    one token at a time past the window, each step's logits transformers' for that position."""
    ours = models.genai_steps(onnx_f32, LONG_IDS[0], prompt)
    ref = hf_long[0, prompt - 1:]
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())
    cfg = json.loads((onnx_f32 / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "gemma3_text"


def _gqa(model_dir: Path) -> list:
    import onnx

    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    return [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]


def test_onnx_window_and_caches_per_layer(onnx_f32):
    """Only the sliding layers (all but 5) take the window and the local caches (rope_local_base_freq)."""
    nodes = _gqa(onnx_f32)
    windows = [next((a.i for a in n.attribute if a.name == "local_window_size"), None) for n in nodes]
    assert windows == [16, 16, 16, 16, 16, None, 16]
    assert [n.input[-1] for n in nodes] == ["sin_cache_local"] * 5 + ["sin_cache"] + ["sin_cache_local"]


@pytest.mark.parametrize("shift", [-1, 1])
def test_onnx_window_off_by_one_moves_the_logits(shift, onnx_f32, hf_long, tmp_path):
    """ONNX Runtime's local_window_size counts as transformers' sliding_window does (the query itself
    included): one less or one more, and the logits past the window leave the tolerance far behind."""
    import onnx

    m = onnx.load(str(onnx_f32 / "model.onnx"), load_external_data=False)
    for node in m.graph.node:
        for a in node.attribute:
            if a.name == "local_window_size":
                a.i += shift
    onnx.save_model(m, str(tmp_path / "model.onnx"))
    for f in onnx_f32.iterdir():  # copied: ONNX Runtime refuses external data through a link out of the folder
        if f.name != "model.onnx":
            shutil.copyfile(f, tmp_path / f.name)
    wrong = _ort(tmp_path)
    tol = 2e-4 * np.abs(hf_long).max()
    assert np.abs(wrong - hf_long)[0, :15].max() < tol  # before position 15 no window is full yet
    assert np.abs(wrong - hf_long).max() > 50 * tol


def test_onnx_conditional_generation_converts_to_the_same_graph(onnx_f32, tmp_path):
    """Gemma3ForConditionalGeneration's language_model.model.* tensors, its config under text_config: the
    very graph and weights of the text-only checkpoint (the vision tower is not read)."""
    ours = models.onnx_graph(models.tiny_gemma3_vision(), tmp_path / "vision")
    for name in ("model.onnx", "model.onnx.data"):
        assert (ours / name).read_bytes() == (onnx_f32 / name).read_bytes(), name
    text, vision = (json.loads((d / "genai_config.json").read_text())["model"] for d in (onnx_f32, ours))
    assert vision == text


@pytest.mark.parametrize(("change", "field"), [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
])
def test_onnx_refuses_what_the_graph_would_compute_otherwise(change, field, tmp_path):
    """pack model --format onnx: one line naming the field, exit 2, nothing written."""
    src = _variant(tmp_path, **change)
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "packager.cli", "model", str(src), "--format", "onnx", "--output",
                        str(out), "--quiet"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and field in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("change", [
    {"final_logit_softcapping": 1.5},  # cap * tanh(logits / cap): the logits stay under 1.5
    {"query_pre_attn_scalar": 144},  # the fixture's equals head_dim: another one must be read
    {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},  # Gemma 3 4B's: the full layers' RoPE only
], ids=["final-softcap", "query-scalar", "linear-rope"])
def test_onnx_config_variants_compute_as_transformers(change, tmp_path):
    from test_onnx import _hf_logits

    src = _variant(tmp_path, **change)
    ours, ref = _ort(models.onnx_graph(src, tmp_path / "out")), _hf_logits(src, LONG_IDS)
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())
    if "final_logit_softcapping" in change:
        assert np.abs(ref).max() < 1.5


def test_onnx_plan_counts_genai_s_full_cache_on_every_layer():
    """onnxruntime-genai's KV buffer holds the whole context on every layer, sliding ones too: the ONNX
    plan counts that (f32), not llama.cpp's windowed cache."""
    spec = spec_from_config(GEMMA3_1B)
    kv = memory(spec, scheme("onnx", "INT4_B32"), 32768, "f32", fmt="onnx").kv_cache
    assert kv == 2 * 26 * 256 * 32768 * 4


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    out = tmp_path_factory.mktemp("gemma3-onnx-dist")
    return pack_model(str(models.tiny_gemma3()), PackOptions(format="onnx", output=out, quiet=True)).path


@pytest.mark.slow
def test_onnx_int4_bundle_chats_through_load(onnx_bundle):
    """pack model --format onnx: an int4 bundle onnxruntime-genai runs; greedy replies are the same twice,
    and the plan sized the data file the converter wrote (four norms, q/k norms, two pairs of caches)."""
    import packager
    from packager.formats.onnx import SCHEMES, weight_layout
    from packager.spec.model import load_spec

    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    assert manifest["format"] == "onnx"
    data = onnx_bundle / "model" / "model.onnx.data"
    assert weight_layout(load_spec(models.tiny_gemma3()), SCHEMES["INT4_B32"]).file_bytes == data.stat().st_size
    question = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 4 + "Why?"}]
    with packager.load(onnx_bundle, n_threads=1, n_ctx=256) as m:
        reply = m.chat(question, stream=True, max_tokens=8, temperature=0)
        text = "".join(reply)
        assert reply.n_prompt > 16 and reply.n_generated >= 1  # the prompt alone is past the window
        assert m.chat(question, max_tokens=8, temperature=0) == text


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx", [256, 1000])
def test_onnx_plan_kv_equals_what_genai_allocates(onnx_bundle, n_ctx):
    """The plan's ONNX KV cache against the present buffers onnxruntime-genai hands the graph: max_length
    (n_ctx) positions on every layer, exactly (no padding, no window)."""
    import packager
    from packager.spec.model import load_spec

    spec = load_spec(models.tiny_gemma3())
    with packager.load(onnx_bundle, n_threads=1, n_ctx=n_ctx) as m:
        m.chat([{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0)
        gen = m._kept.gen
        shapes = [np.asarray(gen.get_output(f"present.{i}.{kv}")).shape
                  for i in range(spec.n_layers) for kv in ("key", "value")]
    assert set(shapes) == {(1, spec.n_kv_heads, n_ctx, spec.head_dim)}
    allocated = sum(int(np.prod(s)) * 4 for s in shapes)
    assert memory(spec, scheme("onnx", "INT4_B32"), n_ctx, "f32", fmt="onnx").kv_cache == allocated
