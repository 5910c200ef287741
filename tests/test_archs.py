"""Gemma-2 and Phi-3 (Phi-3.5's longrope included) against llama.cpp's converter, its quantizer and transformers.

The fixtures (tests/models.py) are tiny random checkpoints with real tokenizers:
Gemma-2 with a freshly trained Gemma-style SentencePiece model, Phi-3 with Phi-3's own
SentencePiece model rebuilt from llama.cpp's ggml-vocab-phi-3.gguf. Three kinds of check:

- Our F16 GGUF is byte-identical to convert_hf_to_gguf.py's (tensors, names, types,
  every hyper-parameter and tokenizer key; only general.* naming differs), and our
  Q8_0/Q4_K_M equal llama_model_quantize's output on that reference F16.
- llama.cpp running our F16 GGUF computes the logits transformers computes in f32 for
  the same token ids: proves the norm offset, softcapping, sliding window, fused
  qkv/gate-up and the longrope factors/attention factor are what llama.cpp expects.
- The tokenizer: the edgepack tokenizer gate, and llama.cpp's Phi-3 test vectors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest

import ggufview
import models
import oracle
from packager import archs
from packager.convert.gguf.converter import convert
from packager.source.safetensors import Checkpoint
from packager.errors import SourceError, UnsupportedArchitectureError
from packager.quants import get_quant
from packager.source.gguf_check import Layout, check_layout
from packager.source.resolver import resolve

FIXTURES: dict[str, Callable[[], Path]] = {
    "gemma2": models.tiny_gemma2, "phi3": models.tiny_phi3, "phi35": models.tiny_phi35,
}
GEMMA_PROMPT = ("<start_of_turn>user\nThe quick brown fox jumps over the lazy dog while small language models "
                "run on phones 12345<end_of_turn>\n<start_of_turn>model\n")  # 31 tokens: past the 16-token window
PHI_PROMPT = "<|user|>\nThe quick brown fox jumps over the lazy dog 12345<|end|>\n<|assistant|>\n"
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 30  # 361 tokens: past Phi-3.5 fixture's 256


@pytest.fixture(scope="session")
def fixture_dir() -> Callable[[str], Path]:
    return lambda name: FIXTURES[name]()


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """Our GGUF of a fixture, converted once per session."""
    out_dir = tmp_path_factory.mktemp("archs")
    done: dict[tuple[str, str], Path] = {}

    def get(name: str, quant: str) -> Path:
        if (name, quant) not in done:
            out = out_dir / f"{name}-{quant}.gguf"
            convert(resolve(FIXTURES[name](), hash_files=False, quiet=True), get_quant(quant), out, quiet=True)
            done[name, quant] = out
        return done[name, quant]

    return get


def _reader(path: Path) -> Layout:
    return check_layout(path)  # keys in the file's order, values decoded on demand (see ggufview)


def _fields(path: Path) -> dict[str, object]:
    return ggufview.fields(path, skip=("general.",))


def _tensors(path: Path) -> dict[str, ggufview.Tensor]:
    return ggufview.tensors(path)


def _assert_same_tensors(ours: Path, ref: Path) -> None:
    ot, rt = _tensors(ours), _tensors(ref)
    assert sorted(ot) == sorted(rt)
    for name, t in rt.items():
        assert ot[name].tensor_type == t.tensor_type, name
        assert list(ot[name].shape) == list(t.shape), name
        assert ot[name].data.tobytes() == t.data.tobytes(), f"{name} differs"


# -- against llama.cpp's converter and quantizer -----------------------------------------------

@pytest.mark.parametrize("name", list(FIXTURES))
def test_f16_is_byte_identical_to_convert_hf_to_gguf(name, fixture_dir, converted):
    ours, ref = converted(name, "F16"), oracle.reference_gguf(fixture_dir(name), "f16")
    _assert_same_tensors(ours, ref)
    # Every hyper-parameter and tokenizer key, same values. general.* differs on purpose
    # (name and size label from the source, see gguf.write_general_metadata).
    assert _fields(ours) == _fields(ref)


@pytest.mark.parametrize(("name", "quant"), [
    ("gemma2", "Q8_0"), ("gemma2", "Q4_K_M"), ("phi3", "Q4_K_M"), ("phi35", "Q4_K_M"),
])
def test_quantized_equals_llama_quantize(name, quant, fixture_dir, converted):
    """Types chosen per tensor (Phi-3's attn_qkv and fused ffn_up too, its rope factors kept f32) and the bytes."""
    ref = oracle.reference_quantize(oracle.reference_gguf(fixture_dir(name), "f16"), quant)
    _assert_same_tensors(converted(name, quant), ref)


def test_gemma2_norm_offset_is_added_in_f32(fixture_dir, converted):
    """Gemma's RMSNorm scales by (1 + w): the GGUF holds w + 1, computed in f32 from the bf16 w.

    Added in bf16 (as llama.cpp's converter did before it widened tensors first) it would
    round: the fixture's norms are random so that some of these sums are not bf16 numbers.
    """
    import torch

    model_dir = fixture_dir("gemma2")
    ours = _tensors(converted("gemma2", "F16"))
    cfg = json.loads((model_dir / "config.json").read_text())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2, cfg["num_hidden_layers"])
    ckpt = Checkpoint.open(model_dir)
    n_norms = n_rounded = 0
    for src in ckpt.refs:
        name = tmap.get_name(src, try_suffixes=(".weight",))
        if not name.endswith("norm.weight"):
            continue
        w = ckpt.f32(src)
        t = ours[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(t.data), w + np.float32(1.0), err_msg=name)
        in_bf16 = (torch.from_numpy(w).to(torch.bfloat16) + 1).float().numpy()
        n_rounded += int((in_bf16 != w + 1).sum())
        n_norms += 1
    assert n_norms == 2 * 4 + 1  # four norms per layer and the output norm
    assert n_rounded > 100  # the check above is not vacuous


def _kv(fields: dict[str, object], arch: str, key: str) -> object:
    return fields.get(key.format(arch=arch))


def test_hparams_come_from_the_config(converted):
    g = _fields(converted("gemma2", "F16"))
    # The fixture's values differ from Gemma-2's defaults (50, 30, 4096): they were read, not assumed.
    assert g["gemma2.attn_logit_softcapping"] == 2.0 and g["gemma2.final_logit_softcapping"] == 5.0
    assert g["gemma2.attention.sliding_window"] == 16
    assert (g["gemma2.attention.key_length"], g["gemma2.attention.value_length"]) == (64, 64)
    assert not [k for k in g if ".rope." in k]  # llama.cpp's defaults are Gemma-2's
    assert g["tokenizer.ggml.add_space_prefix"] is False

    p = _fields(converted("phi3", "F16"))
    assert p["phi3.rope.scaling.original_context_length"] == 4096 and p["phi3.attention.sliding_window"] == 2047
    assert p["phi3.rope.dimension_count"] == 64 and "phi3.rope.scaling.attn_factor" not in p
    assert "rope_factors_long.weight" not in _tensors(converted("phi3", "F16"))

    p35 = _fields(converted("phi35", "F16"))
    assert p35["phi3.context_length"] == 8192 and p35["phi3.rope.scaling.original_context_length"] == 256
    assert p35["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(256)))
    rope = json.loads((models.tiny_phi35() / "config.json").read_text())["rope_scaling"]
    tensors = _tensors(converted("phi35", "F16"))
    for kind in ("long", "short"):
        t = tensors[f"rope_factors_{kind}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(t.data), np.array(rope[f"{kind}_factor"], dtype=np.float32))


# -- llama.cpp running our GGUF against transformers ---------------------------------------------

def _llama_logits(path: Path, n_ctx: int, text: str | None = None, ids: list[int] | None = None):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    try:
        if ids is None:  # BOS as the GGUF's add_bos says (Gemma: yes, Phi-3: no), special tokens parsed
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        llm.eval(ids)
        return ids, np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    # f32 from the bf16 checkpoint (exact); eager attention, the one that implements Gemma-2's softcapping.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each position's logits."""
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize(("name", "prompt", "n_ctx"), [
    ("gemma2", GEMMA_PROMPT, 256),
    ("phi3", PHI_PROMPT, 256),
    ("phi35", PHI_PROMPT, 256),  # context within the original 256: short factors on both sides
    ("phi35", LONG_PROMPT, 512),  # past it: long factors on both sides
], ids=["gemma2", "phi3", "phi35-short", "phi35-long"])
def test_f16_logits_match_transformers(name, prompt, n_ctx, fixture_dir, converted):
    ids, ours = _llama_logits(converted(name, "F16"), n_ctx, prompt)
    hf = _hf_logits(fixture_dir(name), ids)
    assert len(ids) > 16 and (name != "gemma2" or ids[0] == 2)
    # Right: cosine >= 0.999998 and |diff| <= 0.006 on logits of magnitude ~4 (f16 weights, f16 GELU
    # table). Wrong by one detail (a window, a softcap, swapped long/short factors, no attention
    # factor): cosine 0.59-0.998 and |diff| 0.5-3.2. The two bounds sit between.
    assert _cos(ours, hf).min() > 0.9999
    assert np.abs(ours - hf).max() < 0.05


def test_llama_cpp_picks_longrope_factors_by_context_size(fixture_dir, converted):
    """llama.cpp uses the long factors for every position once n_ctx exceeds the original context;
    transformers switches by sequence length. A short prompt in a long context therefore differs:
    a property of llama.cpp's runtime, not of the conversion (the factors are live in both)."""
    ids, ours = _llama_logits(converted("phi35", "F16"), 512, PHI_PROMPT)
    assert len(ids) < 256
    assert _cos(ours, _hf_logits(fixture_dir("phi35"), ids)).min() < 0.99


@pytest.mark.parametrize(("quant", "min_cos"), [("Q8_0", 0.99), ("Q4_K_M", 0.9)])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_quantized_logits_close_to_f16(name, quant, min_cos, converted):
    prompt = GEMMA_PROMPT if name == "gemma2" else PHI_PROMPT
    ids, f16 = _llama_logits(converted(name, "F16"), 256, prompt)
    _, q = _llama_logits(converted(name, quant), 256, ids=ids)
    assert np.isfinite(q).all()
    cos = _cos(f16, q)
    assert cos.min() > min_cos, cos.min()


# -- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_gate_passes_on_gemma2(fixture_dir, converted):
    from packager.convert.gguf.tokenizer_gate import check_tokenizer

    report = check_tokenizer(converted("gemma2", "F16"), fixture_dir("gemma2"))
    assert report.chat_checked and report.add_bos and report.n_special == 8
    assert report.eos_id == 1 and 7 in report.eog_ids  # <end_of_turn> ends generation


def test_tokenizer_gate_on_phi3(fixture_dir, converted, tmp_path):
    """Phi-3's generation_config ends generation at <|endoftext|>, <|assistant|> and <|end|>.
    llama.cpp never treats <|assistant|> as end-of-generation (no GGUF key can make it one),
    and need not: it is the role marker that opens the assistant's turn, which the gate
    recognises from the chat template and does not demand."""
    from packager.convert.gguf.tokenizer_gate import check_tokenizer

    model_dir = fixture_dir("phi3")
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [32000, 32001, 32007]
    report = check_tokenizer(converted("phi3", "F16"), model_dir)
    assert report.chat_checked and not report.add_bos and report.n_special == 14
    assert report.eog_ids == [32000, 32001, 32007]


def test_phi3_vectors_through_our_gguf(converted):
    """llama.cpp's own Phi-3 tokenizer test vectors (made by the HF tokenizer) through our GGUF."""
    from test_vocab import llama_cpp_ids, vectors

    cases = vectors("phi-3")
    got = llama_cpp_ids(converted("phi3", "F16"), [text for text, _ in cases])
    bad = [text for (text, want), ids in zip(cases, got) if ids != want]
    assert not bad, f"{len(bad)}/{len(cases)} vectors differ, first {bad[0]!r}"


# -- configs the converter must refuse or handle ---------------------------------------------------

def _hparams(cfg: dict, tmp_path: Path) -> dict[str, object]:
    """The keys write_hparams writes for a config, as {key: value}."""
    arch = archs.arch_for(cfg["architectures"][0])
    w = gguf.GGUFWriter(tmp_path / "h.gguf", arch.name)
    archs.write_hparams(arch, cfg, w)
    return {k: v.value for k, v in w.kv_data[0].items()}


GEMMA2_2B = dict(  # google/gemma-2-2b-it's config.json (the fields the converter reads)
    architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, vocab_size=256000,
)
GEMMA2_27B = dict(GEMMA2_2B, hidden_size=4608, num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16,
                  head_dim=128, query_pre_attn_scalar=144, intermediate_size=36864)


def test_gemma2_real_configs(tmp_path):
    h = _hparams(GEMMA2_2B, tmp_path)
    assert (h["gemma2.attention.key_length"], h["gemma2.attn_logit_softcapping"]) == (256, 50.0)
    assert "gemma2.rope.freq_base" not in h
    # 27B: llama.cpp scales queries by 1/sqrt(hidden/heads) = 1/sqrt(144), which is its query_pre_attn_scalar.
    assert _hparams(GEMMA2_27B, tmp_path)["gemma2.attention.key_length"] == 128
    # Softcapping absent from config.json: transformers' defaults, as llama.cpp's.
    cfg = {k: v for k, v in GEMMA2_2B.items() if not k.endswith("softcapping")}
    h = _hparams(cfg, tmp_path)
    assert (h["gemma2.attn_logit_softcapping"], h["gemma2.final_logit_softcapping"]) == (50.0, 30.0)
    assert _hparams(dict(GEMMA2_2B, rope_theta=100000.0), tmp_path)["gemma2.rope.freq_base"] == 100000.0


@pytest.mark.parametrize(("change", "match"), [
    ({"query_pre_attn_scalar": 144}, r"query_pre_attn_scalar is 144.*1/sqrt\(256\)"),
    ({"final_logit_softcapping": None}, "final_logit_softcapping is null"),
])
def test_gemma2_configs_llama_cpp_cannot_run_are_refused(change, match, tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        _hparams(dict(GEMMA2_2B, **change), tmp_path)


PHI35_MINI = dict(  # microsoft/Phi-3.5-mini-instruct's config.json, factors shortened to their count
    architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072, intermediate_size=8192,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
    original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=262144,
    rope_scaling={"type": "longrope", "long_factor": [1.0 + i for i in range(48)],
                  "short_factor": [1.0 + i / 48 for i in range(48)]}, vocab_size=32064,
)


def test_phi3_real_configs(tmp_path):
    h = _hparams(PHI35_MINI, tmp_path)
    assert h["phi3.rope.dimension_count"] == 96 and h["phi3.rope.scaling.original_context_length"] == 4096
    assert h["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    long, short = (t for _, t in archs.phi3_rope_factors(PHI35_MINI))
    assert long.dtype == np.float32 and long.shape == short.shape == (48,)
    # transformers spells the type rope_type since 4.4x; an explicit attention_factor wins there.
    rope = dict(PHI35_MINI["rope_scaling"], rope_type="longrope", attention_factor=1.5)
    del rope["type"]
    assert _hparams(dict(PHI35_MINI, rope_scaling=rope), tmp_path)["phi3.rope.scaling.attn_factor"] == 1.5
    # Phi-4-mini: Phi3ForCausalLM with RoPE on 3/4 of each head, no window, no scaling.
    phi4 = dict(PHI35_MINI, hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
                partial_rotary_factor=0.75, sliding_window=None, rope_scaling=None,
                max_position_embeddings=4096)
    h = _hparams(phi4, tmp_path)
    assert (h["phi3.rope.dimension_count"], h["phi3.attention.sliding_window"]) == (96, 0)
    assert archs.phi3_rope_factors(phi4) == []


@pytest.mark.parametrize(("rope", "error", "match"), [
    ({"type": "longrope", "long_factor": [1.0] * 47, "short_factor": [1.0] * 48}, SourceError, "must both have 48"),
    ({"type": "dynamic", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}, UnsupportedArchitectureError,
     "'dynamic'"),
])
def test_phi3_bad_rope_scaling_is_refused(rope, error, match, tmp_path):
    with pytest.raises(error, match=match):
        _hparams(dict(PHI35_MINI, rope_scaling=rope), tmp_path)
