"""Gemma 4 E2B/E4B (issue 27): sliding and full layers of two head dims, shared-KV layers, per-layer input
embeddings; against llama.cpp's converter, its quantizer and its allocation; packed, loaded and chatted with;
what it cannot be, refused.

The fixture (tests/models.tiny_gemma4) is a random 6-layer Gemma 4 text model (sliding, full, x3; sliding heads
of 32, full heads of 64; layers 4 and 5 read the caches of layers 2 and 3 and have a double-wide FFN; 16-wide
per-layer inputs) with Gemma 4's real 262k vocabulary. Its config is transformers 5.25's save of
Gemma4TextConfig written out, so the fixture builds on transformers 4.57 (no Gemma 4 class) too.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import models
import oracle
from packager.convert.gguf.converter import convert
from packager.convert.gguf.vocab import load_vocab
from packager.errors import UnsupportedArchitectureError
from packager.formats.base import kv_bytes
from packager.quants import get_quant
from packager.source.resolver import resolve
from packager.spec.model import load_spec, spec_from_config


ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
QT = gguf.GGMLQuantizationType
T5_PYTHON = Path("/work/venv-t5/bin/python")  # transformers 5, where this machine has it (for the logits)


# gguf-py's GGUFReader takes ~50 s on a file with Gemma 4's 262k tokens and 515k merges (an object per
# string); this reads the same layout directly: the keys with their raw values, then the tensor table.
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _read_gguf(path: Path) -> tuple[list[tuple[str, bytes]], dict[str, tuple[int, tuple[int, ...], bytes]]]:
    """(each key with its type and value as raw bytes, in file order; each tensor's type, ggml shape, data)."""
    data = path.read_bytes()
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n:pos].decode("utf-8")

    def skip(vtype: int) -> None:
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            sub, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if sub in _SCALAR:
                pos += count * _SCALAR[sub]
            else:
                for _ in range(count):
                    skip(sub)
        else:
            pos += _SCALAR[vtype]

    kv = []
    for _ in range(n_kv):
        key = string()
        start = pos
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        skip(vtype)
        kv.append((key, data[start:pos]))
    table = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        shape = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        table.append((name, qtype, shape, offset))
    base = -(-pos // 32) * 32
    ends = [t[3] for t in table[1:]] + [len(data) - base]
    tensors = {name: (qtype, shape, data[base + off: base + end]) for (name, qtype, shape, off), end in zip(table, ends)}
    return kv, tensors


def _assert_same(ours: Path, ref: Path, *, keys: bool = True) -> None:
    """The same tensors (type, shape, bytes, padding included) and, with ``keys``, in the same order and with the
    same keys in the same order and values, apart from general.* (named from the directory by each tool its own
    way). llama-quantize writes its tensors in an order of its own and keys of its own."""
    (okv, ot), (rkv, rt) = _read_gguf(ours), _read_gguf(ref)
    assert (list(ot) if keys else sorted(ot)) == (list(rt) if keys else sorted(rt))
    for name in rt:
        assert ot[name][:2] == rt[name][:2], name
        assert ot[name][2].rstrip(b"\0") == rt[name][2].rstrip(b"\0"), f"{name} differs"
    if keys:
        assert [kv for kv in okv if not kv[0].startswith("general.")] == [kv for kv in rkv if not kv[0].startswith("general.")]


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gemma4") / "gemma4-F16.gguf"
    convert(resolve(models.tiny_gemma4(), hash_files=False, quiet=True), get_quant("F16"), out, quiet=True)
    return out


# -- spec and plan, no engine ---------------------------------------------------------------------------

def test_layers_have_their_kind_s_head_dim_and_shared_layers_no_cache():
    spec = load_spec(models.tiny_gemma4())
    kinds = spec.layer_kinds
    assert [(k.kind, k.head_dim, k.kv_source) for k in kinds] == [
        ("sliding", 32, None), ("full", 64, None), ("sliding", 32, None), ("full", 64, None),
        ("sliding", 32, 2), ("full", 64, 3)]  # llama.cpp's reuse: n_kv_from_start - 2 (sliding), - 1 (full)
    assert spec.kv_layers() == [0, 1, 2, 3] and spec.sliding_window == 32
    assert spec.n_params == sum(int(np.prod(s)) for _, s in spec.tensors)
    names = dict(spec.tensors)
    assert "blk.4.attn_k.weight" not in names and names["blk.3.attn_k.weight"] == (64, 64)
    assert names["blk.5.ffn_up.weight"] == (256, 64) and names["per_layer_token_embd.weight"] == (262144, 96)


def test_kv_counts_owned_caches_and_pads_v_without_flash_attention():
    """Sliding layers cache the window (32 + 512 -> 768 cells), full ones the context; the shared layers none.
    With flash attention off (edgepack's f16 default) llama.cpp stores every V at the widest layer's width."""
    spec = load_spec(models.tiny_gemma4())
    cells, window = 4096, 768
    k = 2 * 64 * cells + 2 * 32 * window  # full layers 1, 3; sliding 0, 2 (one KV head each)
    assert kv_bytes(spec, cells, "f16", windowed=True, flash_attn=True) == 2 * 2 * k
    assert kv_bytes(spec, cells, "f16", windowed=True) == 2 * (k + 2 * 64 * cells + 2 * 64 * window)
    assert kv_bytes(spec, cells, "q8_0", windowed=True) == int(2 * k * 34 / 32)  # quantized V: flash attention on


@pytest.mark.parametrize(("change", "match"), [
    ({"layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention",
                      "sliding_attention", "full_attention"]}, "sliding then full"),
    ({"enable_moe_block": True}, "mixture of experts"),
    ({"attention_k_eq_v": True}, "attention_k_eq_v"),
])
def test_configs_llama_cpp_would_run_otherwise_are_refused(change, match):
    with pytest.raises(UnsupportedArchitectureError, match=match) as exc:
        spec_from_config(dict(models.GEMMA4_TINY_CONFIG, **change))
    assert "\n" not in str(exc.value)


def test_vocab_is_the_converter_s_gemma4_kind():
    """Gemma 4's tokenizer.json as llama.cpp's converter reads it: its own tokenizer model, no pre, the special
    tokens CONTROL and the seven "visible" ones USER_DEFINED, byte tokens BYTE, scores -1000, BOS always added."""
    vocab = load_vocab(models.tiny_gemma4())
    t = gguf.TokenType
    assert (vocab.model, vocab.pre, vocab.n_vocab, vocab.force_add_bos) == ("gemma4", None, 262144, True)
    types = dict(zip(vocab.tokens, vocab.token_types))
    assert types["<bos>"] == types["<|turn>"] == t.CONTROL and types["<|channel>"] == types['<|"|>'] == t.USER_DEFINED
    assert types["<0x0A>"] == t.BYTE and types["\u2581the"] == t.NORMAL and set(vocab.scores) == {-1000.0}


# -- against llama.cpp's converter and quantizer ---------------------------------------------------------

def test_f16_is_byte_identical_to_convert_hf_to_gguf(f16):
    """Every tensor (rope_freqs generated first, no attn_k/attn_v on the shared layers, the per-layer input
    tensors, layer_output_scale) and every key in its order, against convert_hf_to_gguf.py --outtype f16."""
    _assert_same(f16, oracle.reference_gguf(models.tiny_gemma4(), "f16"))
    kv, tensors = _read_gguf(f16)
    kv = dict(kv)
    # an int32 array (type 9 of 5) of each layer's width: twice as wide on the shared layers
    assert kv["gemma4.feed_forward_length"] == struct.pack("<IIQ6I", 9, 5, 6, 128, 128, 128, 128, 256, 256)
    assert kv["gemma4.attention.key_length"] == struct.pack("<II", 4, 64)
    assert kv["gemma4.attention.key_length_swa"] == struct.pack("<II", 4, 32)
    assert "blk.4.attn_k.weight" not in tensors and tensors["per_layer_token_embd.weight"][:2] == (QT.F16, (96, 262144))
    freqs = np.frombuffer(tensors["rope_freqs.weight"][2], dtype=np.float32)  # 0.25 of the 64 dims turn
    assert freqs.tolist() == np.array([1.0] * 8 + [1e30] * 24, dtype=np.float32).tolist()


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_equals_llama_quantize(quant, tmp_path):
    """Types per tensor (per_layer_token_embd as token_embd, per_layer_model_proj kept, attn_v counted on the
    layers that have one) and bytes, against llama_model_quantize on the converter's F16 file."""
    ref = oracle.reference_quantize(oracle.reference_gguf(models.tiny_gemma4(), "f16"), quant)
    ours = tmp_path / f"gemma4-{quant}.gguf"
    convert(resolve(models.tiny_gemma4(), hash_files=False, quiet=True), get_quant(quant), ours, quiet=True)
    _assert_same(ours, ref, keys=False)
