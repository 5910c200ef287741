"""LFM2 (Lfm2ForCausalLM): short-convolution layers mixed with attention, against llama.cpp's converter,
transformers' logits and llama.cpp's own allocation (KV cache and recurrent state).

The fixture (tests/models.tiny_lfm2) is a random 6-layer model built by transformers' own Lfm2Config
(conv, conv, attention, conv, attention, conv; FFN 768 adjusted to 512; tied), saved in f32. No LFM2
tokenizer is available offline, so it carries Llama-3's (tiny_llama's): the same pre-tokenizer structure
as LFM2's, which llama.cpp's converter then names "llama-bpe" where it names LFM2's own vocabulary "lfm2";
llama.cpp runs the two names alike (test_lfm2_pre_tokenizer_name_runs_as_llama_bpe). Checked here:

- the spec's layer kinds, the FFN width rule and its refusal, the plan's KV (attention layers only) and F32
  state (own line in the arithmetic, read in full in the decode roofline), the conv kernel kept F32;
- our F16 GGUF is byte-identical to convert_hf_to_gguf.py's (tensors, keys and their order);
- llama.cpp running it computes transformers' f32 logits;
- the plan's KV + state equals llama.cpp's logged KV and RS buffers within 3% at two contexts;
- a Q4_K_M bundle chats through packager.load, the same greedy reply twice;
- a config whose layer_types disagree with the weights is refused in one line, nothing written;
- ONNX (onnxruntime-genai 0.18's LFM2 runner, ONNX Runtime's CausalConvWithState): the f32 graph computes
  transformers' logits and carries each convolution's state as transformers' cache does, step by step, through
  plain onnxruntime and through genai; an int4 bundle chats through packager.load and decodes what its own graph
  picks; the ONNX plan counts a KV cache on the attention layers and a conv state on the others, as genai
  allocates them; pack plan / pack model --format onnx work.
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
from packager.convert.gguf.converter import convert
from packager.errors import UnsupportedConfigError
from packager.formats.base import kv_bytes, state_bytes
from packager.plan.planner import memory, scheme
from packager.quants import get_quant, tensor_types
from packager.source.resolver import resolve
from packager.spec.model import load_spec, spec_from_config
from test_archs import _assert_same_tensors, _cos, _fields, _hf_logits, _llama_logits, _reader, _tensors

ROOT = Path(__file__).resolve().parent.parent
QT = gguf.GGMLQuantizationType
PROMPT = ("<|start_header_id|>user<|end_header_id|>\n\nThe quick brown fox jumps over the lazy dog while small "
          "language models run on phones, 12345.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

LFM2_12B = dict(  # LiquidAI/LFM2-1.2B's config.json (the fields the converter and planner read)
    architectures=["Lfm2ForCausalLM"], model_type="lfm2", hidden_size=2048, intermediate_size=12288,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=128000,
    norm_eps=1e-5, rope_theta=1000000.0, conv_L_cache=3, conv_bias=False, block_multiple_of=256,
    block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=True, vocab_size=65536, tie_word_embeddings=True,
    layer_types=["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "conv",
                 "full_attention", "conv", "full_attention", "conv", "full_attention", "conv", "full_attention",
                 "conv"],
)


def _config() -> dict:
    return json.loads((models.tiny_lfm2() / "config.json").read_text())


# -- spec, plan and types, no engine ----------------------------------------------------------------

def test_layer_kinds_and_ffn_width_of_the_real_1_2b_config():
    spec = spec_from_config(LFM2_12B)
    kinds = spec.layer_kinds
    assert [k.kind for k in kinds] == ["full" if t == "full_attention" else "conv" for t in LFM2_12B["layer_types"]]
    assert spec.intermediate_size == 8192  # 12288 -> 2/3 -> rounded to 256: the width llama.cpp's 1.2B expects
    assert spec.kv_layers() == [2, 5, 8, 10, 12, 14] and spec.quant_kv_heads == 0  # layer 0 is a conv: n_gqa 0
    # each conv layer keeps its last L-1 = 2 inputs, F32: 16 KiB at hidden 2048, whatever the KV type
    assert state_bytes(spec) == 10 * 2048 * 2 * 4
    assert kv_bytes(spec, 4096, "f16") == 2 * 6 * 8 * 64 * 4096 * 2  # attention layers only
    assert kv_bytes(spec, 4096, "q8_0") < kv_bytes(spec, 4096, "f16") and state_bytes(spec) == 163840


def test_a_plain_transformer_s_kinds_follow_from_its_fields():
    """Behaviour-neutral for the other families: every layer attends and owns its cache, no state."""
    spec = load_spec(models.tiny_qwen2())
    assert not spec.layers and [k.kind for k in spec.layer_kinds] == ["full", "full"]
    assert spec.kv_layers() == [0, 1] and state_bytes(spec) == 0 and spec.quant_kv_heads == spec.n_kv_heads
    assert kv_bytes(spec, 1000, "f16") == 2 * spec.n_layers * spec.kv_dim * 1024 * 2  # today's formula


def test_the_fixture_s_spec_counts_transformers_parameters():
    from safetensors import safe_open

    spec = load_spec(models.tiny_lfm2())
    with safe_open(models.tiny_lfm2() / "model.safetensors", "np") as f:
        n = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert spec.n_params == n and spec.intermediate_size == 512
    # config.json leaves tie_word_embeddings out (Lfm2Config's default, True): tied, as llama.cpp sees it
    assert "tie_word_embeddings" not in _config() and spec.tied_embeddings


@pytest.mark.parametrize(("change", "match"), [
    ({"block_ffn_dim_multiplier": None, "intermediate_size": 1000}, "block_ffn_dim_multiplier is null"),
    ({"conv_bias": True}, "conv_bias is true"),
])
def test_configs_llama_cpp_would_run_differently_are_refused(change, match):
    with pytest.raises(UnsupportedConfigError, match=match) as e:
        spec_from_config(dict(LFM2_12B, **change))
    assert "\n" not in str(e.value)


def test_unrounded_width_that_is_a_multiple_needs_no_multiplier():
    # 2/3 of 768 is 512, a multiple of 256: transformers and llama.cpp agree without rounding
    assert spec_from_config(dict(LFM2_12B, block_ffn_dim_multiplier=None, intermediate_size=768)).intermediate_size == 512


def test_plan_shows_the_state_on_its_own_line_and_reads_it_per_token():
    from packager.plan.planner import Overrides, plan
    from packager.plan.targets import load_target as get_target

    spec = spec_from_config(LFM2_12B)
    p = plan(spec, get_target("laptop"), Overrides(n_ctx=4096))
    assert p.memory.state == state_bytes(spec) and p.memory.kv_cache == kv_bytes(spec, 4096, p.kv_type, windowed=True)
    assert p.memory.total == (p.memory.weights + p.memory.kv_cache + p.memory.compute + p.memory.overhead
                              + p.memory.state)
    lines = "\n".join(p.explain)
    assert "recurrent state: (10 conv layers x 4096 floats) x 4 B (f32, whatever the KV type)" in lines
    assert "KV cache: 2 x 6 attention layers (of 16; state layers hold none)" in lines
    assert "half the KV cache and the recurrent state) per token" in lines
    # the same model without state reads less per token: the roofline counts the state's bytes
    import dataclasses
    plain = plan(dataclasses.replace(spec, layers=tuple(dataclasses.replace(k, r_floats=0) for k in spec.layers)),
                 get_target("laptop"), Overrides(n_ctx=4096))
    assert plain.predicted_decode_tps >= p.predicted_decode_tps and plain.memory.state == 0


def test_on_a_discrete_gpu_the_state_follows_its_layers():
    """llama.cpp puts each recurrent layer's state on that layer's device, as it does the KV cache."""
    from packager.plan.planner import Overrides, plan
    from packager.plan.targets import load_target

    spec = spec_from_config(LFM2_12B)
    p = plan(spec, load_target("gpu-4gb"), Overrides(n_ctx=4096))
    assert p.vram is not None and p.n_gpu_layers == spec.n_layers + 1  # all of it fits: every state on the GPU
    assert p.vram.state == state_bytes(spec) and p.memory.state == 0


def test_conv_kernels_are_never_quantized():
    """llama.cpp keeps shortconv.conv and ssm_conv1d in F32 (converter and quantizer alike)."""
    tensors = [("blk.0.shortconv.conv.weight", (256, 3)), ("blk.0.shortconv.in_proj.weight", (768, 256)),
               ("blk.1.ssm_conv1d.weight", (512, 4)), ("blk.1.attn_v.weight", (128, 256))]
    for quant in ("F16", "Q8_0", "Q4_K_M"):
        types = tensor_types(get_quant(quant), tensors, n_head=4, n_head_kv=0)
        assert types["blk.0.shortconv.conv.weight"] == types["blk.1.ssm_conv1d.weight"] == QT.F32, quant
        assert types["blk.0.shortconv.in_proj.weight"] != QT.F32


def test_manifest_spec_round_trips_the_layer_kinds():
    import dataclasses

    from packager.spec.model import ModelSpec

    spec = load_spec(models.tiny_lfm2())
    again = ModelSpec(**json.loads(json.dumps(dataclasses.asdict(spec))))
    assert again.layers == spec.layers and isinstance(again.layers[0], type(spec.layers[0]))
    assert kv_bytes(again, 512, "f16") == kv_bytes(spec, 512, "f16") and state_bytes(again) == state_bytes(spec)


# -- against llama.cpp's converter and transformers ---------------------------------------------------

@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lfm2") / "lfm2-F16.gguf"
    convert(resolve(models.tiny_lfm2(), hash_files=False, quiet=True), get_quant("F16"), out, quiet=True)
    return out


@pytest.mark.slow  # GGUFReader parses a 128k-token vocabulary: ~15 s a file
def test_f16_is_byte_identical_to_convert_hf_to_gguf(f16):
    ref = oracle.reference_gguf(models.tiny_lfm2(), "f16")
    _assert_same_tensors(f16, ref)
    assert _fields(f16) == _fields(ref)  # general.* differs on purpose (name and size label from the source)
    # and LFM2's keys in the same order: the converter writes vocab_size and l_cache after general.file_type
    order = [k for k in _reader(f16).fields if k.startswith("lfm2.") or k == "general.file_type"]
    assert order == [k for k in _reader(ref).fields if k.startswith("lfm2.") or k == "general.file_type"]
    assert order[-3:] == ["general.file_type", "lfm2.vocab_size", "lfm2.shortconv.l_cache"]
    g = _fields(f16)
    assert g["lfm2.attention.head_count_kv"] == [0, 0, 2, 0, 2, 0] and g["lfm2.shortconv.l_cache"] == 3
    assert g["lfm2.feed_forward_length"] == 512
    tensors = _tensors(f16)
    conv = tensors["blk.0.shortconv.conv.weight"]
    assert conv.tensor_type == QT.F32 and list(conv.shape) == [3, 256]  # squeezed (H, 1, L) -> (H, L)
    assert "blk.0.attn_q.weight" not in tensors and "blk.2.shortconv.in_proj.weight" not in tensors
    # the planner implies exactly the tensors written (the checkpoint check and pack plan use it)
    from packager.formats.gguf import gguf_tensors

    assert dict(gguf_tensors(load_spec(models.tiny_lfm2()))) == {
        t.name: tuple(int(x) for x in reversed(t.shape)) for t in tensors.values()}
    # a GGUF source's spec (pack plan x.gguf, pack model x.gguf) knows the same layers as the config's
    from packager.spec.gguf import spec_from_gguf

    ours, want = spec_from_gguf(f16)[0], load_spec(models.tiny_lfm2())
    assert ours.layer_kinds == want.layer_kinds and ours.n_params == want.n_params


@pytest.mark.slow
def test_q4_k_m_equals_llama_quantize(tmp_path):
    """The types llama.cpp's quantizer picks with layer 0's n_gqa (0: a conv layer), conv kernels kept F32, and the
    bytes. The checkpoint is f32, which edgepack quantizes from directly: llama-quantize is given the converter's
    F32 file (from its F16 file, rounded to f16 first, the quantized bytes differ; from bf16 sources they do not)."""
    ref = oracle.reference_quantize(oracle.reference_gguf(models.tiny_lfm2(), "f32"), "Q4_K_M")
    ours = tmp_path / "ours.gguf"
    convert(resolve(models.tiny_lfm2(), hash_files=False, quiet=True), get_quant("Q4_K_M"), ours, quiet=True)
    _assert_same_tensors(ours, ref)


@pytest.mark.slow
def test_f16_logits_match_transformers(f16):
    ids, ours = _llama_logits(f16, 256, PROMPT)
    assert ids[0] == 128000 and len(ids) > 16
    hf = _hf_logits(models.tiny_lfm2(), ids)
    # Right: cosine ~0.99999 (f16 weights); a conv kernel read the wrong way round or a missing q/k norm: far below.
    assert _cos(ours, hf).min() > 0.9999
    assert np.abs(ours - hf).max() < 0.05


def test_lfm2_pre_tokenizer_name_runs_as_llama_bpe(tmp_path):
    """llama.cpp's converter names LFM2's vocabularies "lfm2" (by hashing their ids); the vocab module lists it
    as an alias of the structure's "llama-bpe", and llama.cpp tokenizes the fixture's texts identically under
    either name, as HF does."""
    from packager.convert.gguf.converter import write_vocab_gguf
    from packager.convert.gguf.tokenizer_gate import check_tokenizer
    from packager.convert.gguf.vocab import PRE_TOKENIZERS, load_vocab

    assert "lfm2" in next(p for p in PRE_TOKENIZERS if p.name == "llama-bpe").aliases
    src = resolve(models.tiny_lfm2(), hash_files=False, quiet=True)
    vocab = load_vocab(src.path)
    assert vocab.pre == "llama-bpe"
    import dataclasses

    for pre in ("llama-bpe", "lfm2"):
        path = write_vocab_gguf(src, get_quant("F16"), tmp_path / f"{pre}.gguf", dataclasses.replace(vocab, pre=pre))
        report = check_tokenizer(path, src.path)  # raises where llama.cpp and HF disagree on any text
        assert report.pre == pre


# -- the bundle: plan against llama.cpp's allocation, chat --------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    out = tmp_path_factory.mktemp("lfm2-dist")
    return pack_model(str(models.tiny_lfm2()), PackOptions(quant="Q4_K_M", n_ctx=4096, output=out, quiet=True)).path


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx", [1024, 4096])  # the KV line above 0.5 MiB: the log prints 2 decimals
def test_plan_kv_and_state_equal_what_llama_cpp_allocates_at_load(bundle, n_ctx):
    import packager

    with models.logged_buffers(models.KV_LINE, models.RS_LINE) as (kv, rs):
        model = packager.load(bundle, n_ctx=n_ctx)
    model.close()
    spec = load_spec(models.tiny_lfm2())
    mem = memory(spec, scheme("gguf", "Q4_K_M"), n_ctx, "f16")
    assert len(kv) == 1 and len(rs) == 1, (kv, rs)  # one hybrid memory: one KV cache, one recurrent buffer
    logged = kv[0] + rs[0]
    planned = (mem.kv_cache + mem.state) / (1 << 20)
    assert planned == pytest.approx(logged, rel=0.03), (planned, logged)
    # the state alone prints at 0.01 MiB resolution (4 conv layers x 256 x 2 floats x 4 B = 8 KiB)
    assert abs(mem.state / (1 << 20) - rs[0]) <= 0.01, (mem.state, rs)
    # and the KV cache is the two attention layers' alone, not six layers'
    assert mem.kv_cache / (1 << 20) == pytest.approx(kv[0], rel=0.03)
    print(f"n_ctx {n_ctx}: planned KV {mem.kv_cache / (1 << 20):.2f} + state {mem.state / (1 << 20):.4f} MiB; "
          f"llama.cpp KV {kv[0]:.2f} + RS {rs[0]:.2f} MiB")


@pytest.mark.slow
def test_chat_through_load_twice_the_same(bundle):
    import packager

    man = json.loads((bundle / "manifest.json").read_text())
    assert man["format"] == "gguf" and man["quant"] == "Q4_K_M" and len(man["spec"]["layers"]) == 6
    question = [{"role": "user", "content": "What is the capital of France?"}]
    replies = []
    for _ in range(2):
        with packager.load(bundle, n_threads=1, n_ctx=256) as m:
            reply = m.chat(question, stream=True, max_tokens=8)
            replies.append("".join(reply))
            assert reply.n_generated >= 1
            # the same again in the same session, and a next turn: llama.cpp cannot rewind a convolution's
            # state by a token as it rewinds a KV cache, so what the session reuses must still give a fresh
            # load's replies
            assert m.chat(question, max_tokens=8) == replies[-1]
            turn = question + [{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": "And Spain?"}]
            replies.append(m.chat(turn, max_tokens=8))
    with packager.load(bundle, n_threads=1, n_ctx=256) as m:
        fresh = m.chat(turn, max_tokens=8)
    assert replies[0] == replies[2] and replies[1] == replies[3] == fresh  # greedy: the same from a fresh load


# -- bad input through the CLI: one line, exit 2, nothing written ----------------------------------------

def _variant(tmp_path: Path, **change) -> Path:
    """The tiny checkpoint's weights and tokenizer (linked) under its config with ``change`` applied."""
    return models.linked_variant(models.tiny_lfm2(), tmp_path / "lfm2", **change)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *args], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


@pytest.mark.parametrize(("layer", "kind", "says"), [(2, "conv", "a conv layer"), (0, "full_attention", "an attention")])
def test_layer_types_against_the_weights_refused_before_writing(layer, kind, says, tmp_path):
    """layer_types calls an attention layer a convolution (or the reverse) while the weights say otherwise."""
    types = list(models.LFM2_LAYER_TYPES)
    types[layer] = kind
    src, out = _variant(tmp_path, layer_types=types), tmp_path / "dist"
    r = _cli("model", str(src), "--output", str(out), "--quiet")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"make layer {layer} a" in lines[0] and "layer_types" in lines[0], r.stderr
    assert not out.exists()


# -- ONNX: edgepack's graph with CausalConvWithState, run by onnxruntime and onnxruntime-genai 0.18 --------------

# BOS, then 11 random ids of Llama-3's vocabulary
IDS = np.concatenate([[128000], np.random.default_rng(0).integers(10, 128000, 11)]).astype(np.int64)


@pytest.fixture(scope="module")
def onnx_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.onnx_graph(models.tiny_lfm2(), tmp_path_factory.mktemp("lfm2-onnx") / "f32")


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(models.tiny_lfm2()), dtype=torch.float32).eval()


class _Graph:
    """The graph through plain onnxruntime, its caches carried by hand: KV on the attention layers (growing),
    the conv state on the others ([1, hidden, L - 1], zeros at the start, as genai starts it)."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort

        self.cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]
        self.reset()

    def reset(self) -> None:
        c, self.n, self.past = self.cfg, 0, {}
        for i, kind in enumerate(c["layer_types"]):
            if kind == "conv":
                self.past[f"past.{i}.conv"] = np.zeros((1, c["hidden_size"], c["conv_cache_size"]), np.float32)
            else:
                for kv in ("key", "value"):
                    self.past[f"past_key_values.{i}.{kv}"] = np.zeros((1, c["num_key_value_heads"], 0, c["head_size"]),
                                                                      np.float32)

    def __call__(self, ids) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self.n += ids.shape[1]
        out = dict(zip(self.names, self.sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, self.n), np.int64),
                                                          **self.past})))
        self.past = {name: out["present." + name.split(".", 1)[1]] for name in self.past}
        return out


def _hf_steps(hf_model, chunks):
    """transformers' logits for each chunk, its cache carried (DynamicCache: KV and the conv states)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_model.config)
    for chunk in chunks:
        with torch.no_grad():
            out = hf_model(torch.tensor(np.asarray(chunk)[None]), cache=cache, use_cache=True)
        yield out.logits[0].numpy(), cache


@pytest.mark.parametrize("prompt", [1, 5], ids=["from-bos", "prompt-5"])
def test_onnx_f32_graph_carries_the_conv_state_as_transformers(prompt, onnx_f32, hf_model):
    """A prompt in one call, then one token a call: every call's logits are transformers' (cached, and its
    uncached full forward's), and after every call each convolution layer's present state is the last L-1
    inputs transformers' cache keeps (a 1-token prompt: zero-padded). Measured: logits within 1e-5 of 4."""
    import torch

    g = _Graph(onnx_f32)
    kinds = g.cfg["layer_types"]
    with torch.no_grad():
        full = hf_model(torch.tensor(IDS[None])).logits[0].numpy()
    tol = 2e-4 * np.abs(full).max()
    chunks = [IDS[:prompt], *IDS[prompt:, None]]
    n = 0
    for chunk, (ref, cache) in zip(chunks, _hf_steps(hf_model, chunks)):
        out = g(chunk)
        n += len(chunk)
        np.testing.assert_allclose(out["logits"][0], ref, atol=tol)
        np.testing.assert_allclose(out["logits"][0], full[n - len(chunk):n], atol=tol)
        for i in (i for i, kind in enumerate(kinds) if kind == "conv"):
            want = cache.get_conv_state(i).numpy()[..., -g.cfg["conv_cache_size"]:]  # transformers keeps L
            np.testing.assert_allclose(out[f"present.{i}.conv"], want, atol=1e-5 * max(1.0, np.abs(want).max()))
    assert n == len(IDS) and sum(k == "conv" for k in kinds) == 4


def test_onnx_conv_state_is_what_the_next_step_reads(onnx_f32, hf_model):
    """The state matters: the same decode step from a zeroed conv state (the KV kept) leaves transformers'
    logits far behind; from the carried one it is within the tolerance."""
    g = _Graph(onnx_f32)
    g(IDS[:6])
    carried = dict(g.past)
    ref = list(_hf_steps(hf_model, [IDS[:6], IDS[6:7]]))[-1][0]
    tol = 2e-4 * np.abs(ref).max()
    np.testing.assert_allclose(g(IDS[6:7])["logits"][0], ref, atol=tol)
    g.past, g.n = {k: (np.zeros_like(v) if k.endswith(".conv") else v) for k, v in carried.items()}, 6
    assert np.abs(g(IDS[6:7])["logits"][0] - ref).max() > 20 * tol


def test_onnx_graph_and_genai_config(onnx_f32):
    """Four convolution layers (CausalConvWithState, kernel (H, 1, 3) kept f32, past.N.conv -> present.N.conv),
    two attention layers with q/k norms (GroupQueryAttention over past_key_values.2/4 only); genai_config
    names LFM2's runner and declares the layer kinds and the conv state as genai 0.18's builder does."""
    import onnx

    m = onnx.load(str(onnx_f32 / "model.onnx"), load_external_data=False)
    convs = [n for n in m.graph.node if n.op_type == "CausalConvWithState"]
    assert [n.input[3] for n in convs] == [f"past.{i}.conv" for i in (0, 1, 3, 5)]
    assert [n.output[1] for n in convs] == [f"present.{i}.conv" for i in (0, 1, 3, 5)]
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert [n.input[3] for n in gqa] == ["past_key_values.2.key", "past_key_values.4.key"]
    weights = {t.name: list(t.dims) for t in m.graph.initializer}
    assert weights["model.layers.0.conv.conv.weight"] == [256, 1, 3] and "model.layers.2.attn.q_norm.weight" in weights
    assert not any(name.startswith("model.layers.0.attn.") for name in weights)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert inputs["past.0.conv"] == ["batch_size", 256, 2] and "past_key_values.0.key" not in inputs
    model = json.loads((onnx_f32 / "genai_config.json").read_text())["model"]
    dec = model["decoder"]
    assert model["type"] == "lfm2" and dec["layer_types"] == models.LFM2_LAYER_TYPES and dec["conv_cache_size"] == 2
    assert dec["inputs"]["past_conv_names"] == "past.%d.conv" and dec["outputs"]["present_conv_names"] == "present.%d.conv"


@pytest.mark.parametrize("prompt", [1, 5], ids=["from-bos", "prompt-5"])
def test_onnx_decodes_through_genai_token_by_token(prompt, onnx_f32, hf_model):
    """onnxruntime-genai 0.18 driving the f32 graph (its LFM2 runner carries the conv states, its shared
    buffer the KV): each step's logits are transformers' for that position."""
    import torch

    rows = models.genai_steps(onnx_f32, IDS, prompt, max_length=64)
    with torch.no_grad():
        ref = hf_model(torch.tensor(IDS[None])).logits[0].numpy()[prompt - 1:]
    np.testing.assert_allclose(rows, ref, atol=2e-4 * np.abs(ref).max())


def test_onnx_plan_counts_state_not_kv_for_conv_layers():
    """LFM2-1.2B under genai: f32 KV of max_length positions on the 6 attention layers alone, and 10 conv
    states of hidden x (L - 1) f32 floats each (16 KiB), the same whatever the context."""
    spec = spec_from_config(LFM2_12B)
    for n_ctx in (4096, 32768):
        mem = memory(spec, scheme("onnx", "INT4_B32"), n_ctx, "f32", fmt="onnx")
        assert mem.kv_cache == 2 * 6 * 8 * 64 * n_ctx * 4
        assert mem.state == state_bytes(spec) == 10 * 2048 * 2 * 4
        assert mem.total == mem.weights + mem.kv_cache + mem.compute + mem.overhead + mem.state


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    out = tmp_path_factory.mktemp("lfm2-onnx-dist")
    return pack_model(str(models.tiny_lfm2()), PackOptions(format="onnx", output=out, quiet=True)).path


@pytest.mark.slow
def test_onnx_int4_bundle_chats_through_load(onnx_bundle):
    """pack model --format onnx: an int4 bundle genai runs. Greedy replies are the same twice in a session (genai
    cannot rewind a conv state: each call reads its prompt afresh), a next turn the same as from a fresh load;
    and the plan sized the data file the converter wrote."""
    import packager
    from packager.formats.onnx import SCHEMES, weight_layout

    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["quant"] == "INT4_B32" and len(manifest["spec"]["layers"]) == 6
    data = onnx_bundle / "model" / "model.onnx.data"
    assert weight_layout(load_spec(models.tiny_lfm2()), SCHEMES["INT4_B32"]).file_bytes == data.stat().st_size
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with packager.load(onnx_bundle, n_threads=1, n_ctx=256) as m:
        reply = m.chat(question, stream=True, max_tokens=8)
        first = "".join(reply)
        assert reply.n_generated >= 1
        assert m.chat(question, max_tokens=8) == first
        turn = question + [{"role": "assistant", "content": first}, {"role": "user", "content": "And Spain?"}]
        second = m.chat(turn, max_tokens=8)
    with packager.load(onnx_bundle, n_threads=1, n_ctx=256) as m:
        assert m.chat(turn, max_tokens=8) == second and m.chat(question, max_tokens=8) == first


@pytest.mark.slow
def test_onnx_int4_generation_is_a_greedy_loop_over_its_own_graph(onnx_bundle):
    """packager.load's 10 tokens (genai: the prompt, then conv states and KV carried) are the argmax of the int4
    graph's full forward pass over the text so far, each step from empty caches."""
    import packager

    g = _Graph(onnx_bundle / "model")
    with packager.load(onnx_bundle, n_threads=1, n_ctx=256) as m:
        prompt = m.tokenize("The quick brown fox jumps over the lazy dog", add_special=False)
        s = m.stream(prompt, max_tokens=10)
        text = "".join(s)
        assert s.n_generated == 10 and s.finish_reason == "length"
        ids = list(prompt)
        for _ in range(10):
            g.reset()
            ids.append(int(g(ids)["logits"][0, -1].argmax()))
        assert m.detokenize(ids[len(prompt):]) == text


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx", [256, 1000])
def test_onnx_plan_equals_what_genai_allocates(onnx_bundle, n_ctx):
    """The plan's KV and state against the buffers genai hands the graph: present.N.key/value of max_length
    (n_ctx) positions on the two attention layers, present.N.conv [1, 256, 2] on the four others."""
    import packager

    spec = load_spec(models.tiny_lfm2())
    with packager.load(onnx_bundle, n_threads=1, n_ctx=n_ctx) as m:
        m.chat([{"role": "user", "content": "Hi"}], max_tokens=1)
        gen = m._kept.gen
        kv = [np.asarray(gen.get_output(f"present.{i}.{x}")).shape for i in spec.kv_layers() for x in ("key", "value")]
        conv = [np.asarray(gen.get_output(f"present.{i}.conv")).shape
                for i, k in enumerate(spec.layer_kinds) if k.kind == "conv"]
    assert set(kv) == {(1, 2, n_ctx, 64)} and len(kv) == 4 and set(conv) == {(1, 256, 2)} and len(conv) == 4
    mem = memory(spec, scheme("onnx", "INT4_B32"), n_ctx, "f32", fmt="onnx")
    assert mem.kv_cache == sum(int(np.prod(s)) * 4 for s in kv)
    assert mem.state == sum(int(np.prod(s)) * 4 for s in conv)


def test_onnx_plan_and_pack_through_the_cli(tmp_path):
    """pack plan --format onnx shows the state on its own line; pack model --format onnx writes the bundle."""
    r = _cli("plan", str(models.tiny_lfm2()), "--format", "onnx", "--target", "laptop")
    assert r.returncode == 0, r.stderr
    assert "onnx INT4_B32" in r.stdout and "recurrent state" in r.stdout, r.stdout
    out = tmp_path / "dist"
    r = _cli("model", str(models.tiny_lfm2()), "--format", "onnx", "--output", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    (bundle,) = out.iterdir()
    assert json.loads((bundle / "manifest.json").read_text())["format"] == "onnx"
    assert json.loads((bundle / "model" / "genai_config.json").read_text())["model"]["type"] == "lfm2"


def test_onnx_for_the_web_target_is_refused_in_one_line(tmp_path):
    """The web page's own decoding loop (data/web/app.js) feeds a KV cache on every layer and no conv state."""
    out = tmp_path / "dist"
    r = _cli("model", str(models.tiny_lfm2()), "--format", "onnx", "--target", "web", "--output", str(out), "--quiet")
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "convolution layers carry a state" in lines[0] and "web" in lines[0], r.stderr
    assert not out.exists()
