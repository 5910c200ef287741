"""The GGUF converter against llama.cpp's own converter and quantizer (oracles), and on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ggufview
import oracle
from packager.convert.gguf.converter import convert
from packager.errors import CorruptFileError, SourceError, UnsupportedArchitectureError
from packager.quants import get_quant
from packager.source.resolver import resolve

HPARAM_SKIP = ("general.", "GGUF.")


def _fields(path: Path) -> dict[str, object]:
    return ggufview.fields(path, skip=HPARAM_SKIP)


def _tensors(path: Path) -> dict[str, ggufview.Tensor]:
    return ggufview.tensors(path)


def _convert(model_dir: Path, quant: str, out: Path) -> Path:
    convert(resolve(model_dir, hash_files=False, quiet=True), get_quant(quant), out, quiet=True)
    return out


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_f16_is_byte_identical_to_convert_hf_to_gguf(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    ours = _convert(model_dir, "F16", tmp_path / "ours.gguf")
    ref = oracle.reference_gguf(model_dir, "f16")
    ot, rt = _tensors(ours), _tensors(ref)
    assert sorted(ot) == sorted(rt)
    for name, t in rt.items():
        assert ot[name].tensor_type == t.tensor_type, name
        assert list(ot[name].shape) == list(t.shape), name
        assert bytes(ot[name].data.tobytes()) == bytes(t.data.tobytes()), f"{name} differs"
    of, rf = _fields(ours), _fields(ref)
    assert of == rf  # every hyper-parameter and tokenizer key, same values


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "IQ4_NL"])
def test_one_pass_quantization_equals_llama_quantize(quant, tiny_qwen2, tmp_path):
    """One pass from bf16 gives the bytes of convert_hf_to_gguf (F16) + llama_model_quantize."""
    ours = _convert(tiny_qwen2, quant, tmp_path / "ours.gguf")
    ref = oracle.reference_quantize(oracle.reference_gguf(tiny_qwen2, "f16"), quant)
    ot, rt = _tensors(ours), _tensors(ref)
    assert {n: t.tensor_type for n, t in ot.items()} == {n: t.tensor_type for n, t in rt.items()}
    # bf16 weights of this size are exact in F16, so skipping the F16 copy changes no byte.
    for n in rt:
        assert bytes(ot[n].data.tobytes()) == bytes(rt[n].data.tobytes()), n


def test_q4_k_m_runs_in_llama_cpp_and_agrees_with_f16(tiny_llama, tmp_path):
    import llama_cpp

    f16 = _convert(tiny_llama, "F16", tmp_path / "f16.gguf")
    q4 = _convert(tiny_llama, "Q4_K_M", tmp_path / "q4.gguf")
    logits = []
    for path in (f16, q4):
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog")
        llm.eval(toks)
        logits.append(np.array(llm.scores[llm.n_tokens - 1]))
        llm.close()
    a, b = logits
    assert np.isfinite(b).all()
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos > 0.9, cos


def test_sharded_checkpoint_converts_like_a_single_file(tiny_qwen2, tmp_path):
    from safetensors.numpy import save_file

    from packager.source.safetensors import Checkpoint

    d = _copy(tiny_qwen2, tmp_path / "sharded")
    ck = Checkpoint.open(d)
    names = list(ck.refs)
    # numpy has no bf16: store the raw uint16 bits and patch the dtype in the header.
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate(halves):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: np.ascontiguousarray(ck.raw(n)) for n in part}, str(d / fname))
        raw = (d / fname).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for key, info in header.items():
            if key != "__metadata__":
                info["dtype"] = "BF16"
        new = json.dumps(header).encode()
        new += b" " * (-len(new) % 8)
        (d / fname).write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
        index["weight_map"].update({name: fname for name in part})
    ck.close()
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    one = _convert(tiny_qwen2, "Q8_0", tmp_path / "one.gguf")
    two = _convert(d, "Q8_0", tmp_path / "two.gguf")
    a, b = _tensors(one), _tensors(two)
    assert sorted(a) == sorted(b)
    assert all(bytes(a[n].data.tobytes()) == bytes(b[n].data.tobytes()) for n in a)


def _copy(model_dir: Path, dst: Path) -> Path:
    shutil.copytree(model_dir, dst, ignore=shutil.ignore_patterns(".complete"))
    return dst


def test_unknown_architecture_lists_supported(tiny_qwen2, tmp_path):
    d = _copy(tiny_qwen2, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2ForCausalLM"):
        _convert(d, "F16", tmp_path / "out.gguf")


def test_corrupt_safetensors_header(tiny_qwen2, tmp_path):
    d = _copy(tiny_qwen2, tmp_path / "m")
    with open(d / "model.safetensors", "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    with pytest.raises(CorruptFileError, match="header claims"):
        _convert(d, "F16", tmp_path / "out.gguf")


def test_truncated_shard(tiny_qwen2, tmp_path):
    d = _copy(tiny_qwen2, tmp_path / "m")
    p = d / "model.safetensors"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)
    with pytest.raises(CorruptFileError, match="truncated"):
        _convert(d, "F16", tmp_path / "out.gguf")


def test_missing_config(tiny_qwen2, tmp_path):
    d = _copy(tiny_qwen2, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(SourceError, match="config.json"):
        _convert(d, "F16", tmp_path / "out.gguf")


def test_reused_kv_block_gives_the_same_file(tiny_qwen2, tmp_path):
    """pack/pipeline.py hands the converter the vocab-only GGUF's packed metadata: the model file must not change."""
    from packager.convert.gguf.converter import packed_kv, write_vocab_gguf

    src, quant = resolve(tiny_qwen2, hash_files=False, quiet=True), get_quant("Q4_K_M")
    plain = convert(src, quant, tmp_path / "plain.gguf", quiet=True)
    kv = packed_kv(write_vocab_gguf(src, quant, tmp_path / "vocab.gguf"))
    reused = convert(src, quant, tmp_path / "reused.gguf", quiet=True, kv_block=kv)
    assert (tmp_path / "plain.gguf").read_bytes() == (tmp_path / "reused.gguf").read_bytes()
    assert plain.sha256 == reused.sha256
    with pytest.raises(ValueError):
        packed_kv(tmp_path / "plain.gguf")  # a model file is not a vocab-only GGUF
