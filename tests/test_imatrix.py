"""Importance matrices: the maths, collection in llama.cpp, llama.cpp's file format, and their effect on quantization.

Oracles: the activations transformers computes for the same tokens (what the
imatrix must average), llama.cpp's own quantizer given the same imatrix
(``llama_model_quantize``), and ggml's own GGUF reader walked the way
llama.cpp's imatrix loader walks it (common/imatrix-loader.cpp).
"""

from __future__ import annotations

import ctypes
import functools
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from packager.convert.gguf.converter import convert
from packager.errors import UsageError
from packager.convert.gguf.imatrix import (
    GGMLTensor,
    check_imatrix,
    collect_imatrix,
    compute_imatrix,
    default_calibration_text,
    load_imatrix,
    read_imatrix,
    save_imatrix,
)
from packager.kernels import ggml
from packager.kernels.imatrix import Entry, ImatrixStats
from packager.quants import get_quant
from packager.source.resolver import resolve

QWEN_CTX, QWEN_CHUNKS = 64, 2


def _f16(model_dir: Path, out: Path) -> Path:
    convert(resolve(model_dir, hash_files=False, quiet=True), get_quant("F16"), out, quiet=True)
    return out


def _tensors(path: Path) -> dict[str, tuple[QT, tuple[int, ...], np.ndarray]]:
    """name -> (type, ne, raw bytes) of a GGUF, parsed by ggml's own reader (gguf-py's is slow on big vocabularies)."""
    lib = _ggml_gguf_lib()
    g = lib.gguf_init_from_file(str(path).encode(), lib._InitParams(True, None))
    assert g, f"ggml cannot parse {path}"
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        base = lib.gguf_get_data_offset(g)
        out = {}
        for i in range(lib.gguf_get_n_tensors(g)):
            start = base + lib.gguf_get_tensor_offset(g, i)
            out[lib.gguf_get_tensor_name(g, i).decode()] = (
                QT(lib.gguf_get_tensor_type(g, i)), tuple(lib.gguf_get_tensor_ne(g, i)[:4]),
                raw[start:start + lib.gguf_get_tensor_size(g, i)],
            )
        return out
    finally:
        lib.gguf_free(g)


def _weights(path: Path) -> dict[str, np.ndarray]:
    """The 2-D block weights of a GGUF as float32 (rows, cols)."""
    return {
        name: gguf.quants.dequantize(data, qtype).reshape(ne[1], ne[0]).astype(np.float32)
        for name, (qtype, ne, data) in _tensors(path).items()
        if name.startswith("blk.") and ne[2:] == (1, 1) and ne[1] > 1
    }


@pytest.fixture(scope="module")
def qwen_f16(tiny_qwen2, tmp_path_factory) -> Path:
    return _f16(tiny_qwen2, tmp_path_factory.mktemp("imatrix") / "qwen-f16.gguf")


@pytest.fixture(scope="module")
def qwen_stats(qwen_f16) -> ImatrixStats:
    return collect_imatrix(qwen_f16, default_calibration_text(), n_ctx=QWEN_CTX, n_chunks=QWEN_CHUNKS,
                           dataset="calibration.txt", quiet=True)


# -- the maths (kernels/imatrix.py) -------------------------------------------------------

def test_dense_mean_is_mean_square_per_column():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 40, 8)).astype(np.float32)
    s = ImatrixStats()
    for part in x:  # three calls, as three chunks
        s.add_dense("blk.0.ffn_up.weight", part)
    e = s.entries["blk.0.ffn_up.weight"]
    assert e.counts.tolist() == [120]
    np.testing.assert_allclose(s.importance()["blk.0.ffn_up.weight"], (x.reshape(-1, 8) ** 2).mean(0), rtol=1e-6)


def test_merging_collections_equals_one_collection():
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((30, 16)).astype(np.float32) for _ in range(2))
    one = ImatrixStats(chunk_size=30)
    one.add_dense("w", a)
    one.add_dense("w", b)
    left = ImatrixStats(chunk_size=30, chunk_count=1, datasets=["a"])
    right = ImatrixStats(chunk_size=30, chunk_count=1, datasets=["b"])
    left.add_dense("w", a)
    right.add_dense("w", b)
    right.add_dense("only_right", a)
    left.merge(right)
    np.testing.assert_allclose(left.entries["w"].sums, one.entries["w"].sums)
    assert left.entries["w"].counts.tolist() == [60]
    assert (left.chunk_count, left.datasets) == (2, ["a", "b"])
    assert "only_right" in left.entries
    with pytest.raises(ValueError, match="chunks of"):
        left.merge(ImatrixStats(chunk_size=512))


def test_stacked_dense_weight_broadcasts_like_ggml():
    # src0 holds 2 matrices (ne2 = 2); activations with ne2 = 4 go to matrix i2 % 2.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 5, 3)).astype(np.float32)
    s = ImatrixStats()
    s.add_dense("w", x, n_mat=(2, 1))
    sums = s.entries["w"].sums.reshape(2, 3)
    np.testing.assert_allclose(sums[0], (x[0, 0] ** 2).sum(0) + (x[0, 2] ** 2).sum(0), rtol=1e-6)
    np.testing.assert_allclose(sums[1], (x[0, 1] ** 2).sum(0) + (x[0, 3] ** 2).sum(0), rtol=1e-6)
    assert s.entries["w"].counts.tolist() == [10]  # 20 rows over 2 matrices, one shared count


def test_experts_accumulate_what_they_were_routed():
    rng = np.random.default_rng(3)
    n_tokens, n_used, cols, n_expert = 7, 2, 4, 5
    x = rng.standard_normal((n_tokens, n_used, cols)).astype(np.float32)
    ids = np.array([[0, 1], [1, 2], [0, 2], [1, 0], [2, 1], [0, 1], [2, 0]], dtype=np.int32)
    s = ImatrixStats()
    s.add_experts("blk.0.ffn_up_exps.weight", x, ids, n_expert)
    s.add_experts("blk.0.ffn_down_exps.weight", x[:, :1], ids, n_expert)  # one activation shared by both slots
    want = np.zeros((n_expert, cols))
    count = np.zeros(n_expert)
    for t in range(n_tokens):
        for k in range(n_used):
            want[ids[t, k]] += x[t, k].astype(np.float64) ** 2
            count[ids[t, k]] += 1
    e = s.entries["blk.0.ffn_up_exps.weight"]
    np.testing.assert_allclose(e.sums, want, rtol=1e-6)
    assert e.counts.tolist() == count.tolist()
    imp = s.importance()["blk.0.ffn_up_exps.weight"].reshape(n_expert, cols)
    np.testing.assert_allclose(imp[:3], want[:3] / count[:3, None], rtol=1e-6)
    assert np.all(imp[3:] == 1.0)  # never routed: no information, equal weights (as llama-quantize)
    shared = s.entries["blk.0.ffn_down_exps.weight"].sums
    np.testing.assert_allclose(shared[0], sum(x[t, 0].astype(np.float64) ** 2 * (ids[t] == 0).sum() for t in range(7)),
                               rtol=1e-6)


def test_dense_count_broadcasts_to_experts():
    """An old file may hold one count for an expert weight; llama.cpp then gives every expert that count."""
    old = ImatrixStats()
    old.entries["e"] = Entry(np.full((1, 6), 2.0), [4])  # 3 experts x 2 columns, one count
    new = ImatrixStats()
    new.add_experts("e", np.ones((2, 1, 2), dtype=np.float32), np.array([[0], [2]]), n_expert=3)
    old.merge(new)
    assert old.entries["e"].counts.tolist() == [5, 4, 5]
    np.testing.assert_allclose(old.importance()["e"], [3 / 5, 3 / 5, 2 / 4, 2 / 4, 3 / 5, 3 / 5])
    old.add_experts("e", np.ones((1, 1, 2), dtype=np.float32), np.array([[1]]), n_expert=3)
    assert old.entries["e"].counts.tolist() == [5, 5, 5]


def test_non_finite_activations_are_refused():
    s = ImatrixStats()
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        s.add_dense("w", np.array([[1.0, np.inf]], dtype=np.float32))


def test_entry_shape_mismatch_is_refused():
    s = ImatrixStats()
    s.add_dense("w", np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="earlier ones"):
        s.add_dense("w", np.ones((2, 6), dtype=np.float32))
    with pytest.raises(ValueError):
        Entry(np.zeros((2, 3)), np.zeros(3))


# -- llama.cpp's files --------------------------------------------------------------------

def _stats() -> ImatrixStats:
    rng = np.random.default_rng(4)
    s = ImatrixStats(chunk_size=512, chunk_count=3, datasets=["calibration.txt"])
    s.add_dense("blk.0.attn_q.weight", rng.standard_normal((50, 32)).astype(np.float32))
    s.add_dense("blk.1.ffn_down.weight", rng.standard_normal((50, 64)).astype(np.float32))
    ids = rng.integers(0, 3, size=(50, 2)).astype(np.int32)
    s.add_experts("blk.0.ffn_gate_exps.weight", rng.standard_normal((50, 1, 32)).astype(np.float32), ids, 4)
    return s


@functools.cache
def _ggml_gguf_lib() -> ctypes.CDLL:
    """ggml's GGUF reader (gguf.h), the one llama.cpp's tools use."""
    lib = ggml._lib()

    class InitParams(ctypes.Structure):  # struct gguf_init_params
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    for name, res, args in [
        ("gguf_free", None, [ctypes.c_void_p]),
        ("gguf_find_key", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
        ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_arr_n", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_arr_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
        ("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
        ("gguf_get_data_offset", ctypes.c_size_t, [ctypes.c_void_p]),
        ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_tensor_ne", ctypes.POINTER(ctypes.c_int64), [ctypes.c_void_p, ctypes.c_int64]),
        ("ggml_get_first_tensor", ctypes.c_void_p, [ctypes.c_void_p]),
        ("ggml_get_next_tensor", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]),
        ("ggml_free", None, [ctypes.c_void_p]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    lib._InitParams = InitParams
    return lib


def _llama_cpp_reads(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """What llama-quantize gets from the file: ggml's GGUF reader walked as common_imatrix_load walks it,
    then normalized as tools/quantize load_imatrix does (sums / count per expert, 1 where count is 0)."""
    lib = _ggml_gguf_lib()
    ctx = ctypes.c_void_p()
    g = lib.gguf_init_from_file(str(path).encode(), lib._InitParams(False, ctypes.pointer(ctx)))
    assert g, "ggml cannot parse the file"
    try:
        keys = (gguf.Keys.IMatrix.DATASETS, gguf.Keys.IMatrix.CHUNK_COUNT, gguf.Keys.IMatrix.CHUNK_SIZE,
                gguf.Keys.General.TYPE)
        k_ds, k_n, k_size, k_type = (lib.gguf_find_key(g, k.encode()) for k in keys)
        assert min(k_ds, k_n, k_size, k_type) >= 0  # llama-quantize refuses a file without this metadata
        meta = {
            "datasets": [lib.gguf_get_arr_str(g, k_ds, i).decode() for i in range(lib.gguf_get_arr_n(g, k_ds))],
            "chunk_count": lib.gguf_get_val_u32(g, k_n),
            "chunk_size": lib.gguf_get_val_u32(g, k_size),
            "type": lib.gguf_get_val_str(g, k_type).decode(),
            "has_arch": lib.gguf_find_key(g, gguf.Keys.General.ARCHITECTURE.encode()) >= 0,
        }
        pairs: dict[str, list] = {}
        t = lib.ggml_get_first_tensor(ctx)
        while t:
            tt = GGMLTensor.from_address(t)
            name = tt.name.decode()
            for i, suffix in enumerate((".in_sum2", ".counts")):
                if name.endswith(suffix):  # anything else (ggml's data blob tensor) is skipped, as the loader does
                    assert tt.type == 0, name  # F32
                    n = int(np.prod(list(tt.ne)))
                    data = np.ctypeslib.as_array((ctypes.c_float * n).from_address(tt.data)).copy()
                    pairs.setdefault(name[: -len(suffix)], [None, None])[i] = data
            t = lib.ggml_get_next_tensor(ctx, t)
    finally:
        lib.gguf_free(g)
        lib.ggml_free(ctx)
    out = {}
    for name, (sums, counts) in pairs.items():
        counts = np.rint(counts)
        per = sums.reshape(counts.size, -1)
        out[name] = np.where(counts[:, None] > 0, per / np.maximum(counts, 1)[:, None], 1.0).reshape(-1)
    return meta, out


def test_saved_file_is_what_llama_cpp_reads(tmp_path):
    s = _stats()
    path = save_imatrix(s, tmp_path / "imatrix.gguf")
    meta, theirs = _llama_cpp_reads(path)
    assert meta == {"datasets": ["calibration.txt"], "chunk_count": 3, "chunk_size": 512, "type": "imatrix",
                    "has_arch": False}
    ours = s.importance()
    assert sorted(theirs) == sorted(ours)
    for name in ours:
        np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-6)
    # the tensor layout llama-imatrix writes: in_sum2 ne = [values per count, n_counts], counts ne = [1, n_counts]
    shapes = {t.name: [int(x) for x in t.shape] for t in gguf.GGUFReader(path).tensors}
    assert shapes["blk.0.attn_q.weight.in_sum2"] == [32, 1]
    assert shapes["blk.0.attn_q.weight.counts"] == [1, 1]
    assert shapes["blk.0.ffn_gate_exps.weight.in_sum2"] == [32, 4]
    assert shapes["blk.0.ffn_gate_exps.weight.counts"] == [1, 4]


def test_save_read_round_trip(tmp_path):
    s = _stats()
    back = read_imatrix(save_imatrix(s, tmp_path / "imatrix.gguf"))
    assert (back.chunk_size, back.chunk_count, back.datasets) == (512, 3, ["calibration.txt"])
    for name, e in s.entries.items():
        np.testing.assert_allclose(back.entries[name].sums, e.sums, rtol=1e-6)
        assert back.entries[name].counts.tolist() == e.counts.tolist()
    loaded = load_imatrix(tmp_path / "imatrix.gguf")
    for name, v in s.importance().items():
        np.testing.assert_allclose(loaded[name], v, rtol=1e-6)
        assert loaded[name].dtype == np.float32


def test_reads_legacy_dat_files(tmp_path):
    """The .dat layout of imatrix.cpp save_imatrix_legacy: means times ncall, then chunk count and dataset."""
    means = {"blk.0.attn_k.weight": np.array([0.5, 2.0, 1.0], dtype=np.float32),
             "blk.0.ffn_up.weight": np.array([4.0, 0.25], dtype=np.float32)}
    ncall = 10
    raw = struct.pack("<i", len(means))
    for name, m in means.items():
        raw += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, m.size)
        raw += (m * ncall).astype("<f4").tobytes()
    raw += struct.pack("<i", ncall) + struct.pack("<i", 9) + b"wiki.text"
    path = tmp_path / "imatrix.dat"
    path.write_bytes(raw)
    s = read_imatrix(path)
    assert (s.chunk_count, s.datasets) == (10, ["wiki.text"])
    loaded = s.importance()
    for name, m in means.items():
        np.testing.assert_allclose(loaded[name], m, rtol=1e-6)


def test_unreadable_files_say_so(tmp_path):
    with pytest.raises(UsageError, match="no such imatrix file"):
        read_imatrix(tmp_path / "missing.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\x01\x00")
    with pytest.raises(UsageError, match="not a readable importance matrix"):
        read_imatrix(tmp_path / "junk.dat")
    whole = save_imatrix(_stats(), tmp_path / "imatrix.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:200])
    with pytest.raises(UsageError, match="cut.gguf: not a readable importance matrix"):
        read_imatrix(tmp_path / "cut.gguf")


def test_a_model_gguf_is_not_an_imatrix(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "model.gguf", arch="llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UsageError, match="no importance matrix entries"):
        read_imatrix(tmp_path / "model.gguf")


def test_check_imatrix_names_the_mismatch():
    shapes = {"blk.0.attn_q.weight": (64, 32), "blk.0.attn_norm.weight": (32,)}
    assert check_imatrix({"blk.0.attn_q.weight": np.ones(32)}, shapes, "x.gguf") == 1
    with pytest.raises(UsageError, match="x.gguf: blk.0.attn_q.weight has 48 importance values"):
        check_imatrix({"blk.0.attn_q.weight": np.ones(48)}, shapes, "x.gguf")
    with pytest.raises(UsageError, match="none of its 1 entries"):
        check_imatrix({"blk.9.other.weight": np.ones(32)}, shapes, "x.gguf")


# -- collecting it in llama.cpp -----------------------------------------------------------

def test_one_vector_per_block_weight(qwen_f16, qwen_stats):
    im = qwen_stats.importance()
    weights = {name: ne for name, (_, ne, _) in _tensors(qwen_f16).items() if name.startswith("blk.") and ne[1] > 1}
    assert sorted(im) == sorted(weights)  # token_embd is a lookup; the (tied) output is left out, as llama-imatrix does
    for name, ne in weights.items():
        v = im[name]
        assert v.dtype == np.float32 and v.shape == (ne[0],), name  # one per column (ne[0])
        assert np.all(np.isfinite(v)) and np.all(v >= 0) and v.max() > 0, name
    assert qwen_stats.chunk_count == QWEN_CHUNKS and qwen_stats.chunk_size == QWEN_CTX
    assert {int(e.counts[0]) for e in qwen_stats.entries.values()} == {QWEN_CTX * QWEN_CHUNKS}
    # q, k and v multiply the same normed input; gate and up too. Layers and roles differ.
    np.testing.assert_array_equal(im["blk.0.attn_q.weight"], im["blk.0.attn_k.weight"])
    np.testing.assert_array_equal(im["blk.1.ffn_gate.weight"], im["blk.1.ffn_up.weight"])
    assert not np.allclose(im["blk.0.attn_q.weight"], im["blk.1.attn_q.weight"], rtol=0.05)
    assert not np.allclose(im["blk.0.ffn_up.weight"], im["blk.1.ffn_up.weight"], rtol=0.05)
    assert not np.allclose(im["blk.0.attn_q.weight"], im["blk.0.ffn_up.weight"], rtol=0.05)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_matches_the_activations_transformers_computes(fixture, request, tmp_path):
    """The mean x_j^2 at the input of every Linear, computed by transformers on the same chunks.

    Qwen2 adds no BOS; Llama-3 does, so each of its chunks starts with BOS in place of its first token.
    """
    torch = pytest.importorskip("torch")
    import llama_cpp
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(fixture)
    if fixture == "tiny_qwen2":
        f16, stats = request.getfixturevalue("qwen_f16"), request.getfixturevalue("qwen_stats")
    else:
        f16 = _f16(model_dir, tmp_path / "f16.gguf")
        stats = collect_imatrix(f16, default_calibration_text(), n_ctx=QWEN_CTX, n_chunks=QWEN_CHUNKS, quiet=True)
    text = default_calibration_text()
    vocab = llama_cpp.Llama(str(f16), vocab_only=True, verbose=False)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(vocab.model)))
    assert add_bos == (fixture == "tiny_llama")
    tokens = vocab.tokenize(text.encode(), add_bos=add_bos, special=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    roles = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return pre

    for i, layer in enumerate(model.model.layers):
        for hf, role in roles.items():
            layer.get_submodule(hf).register_forward_pre_hook(hook(f"blk.{i}.{role}.weight"))
    with torch.no_grad():
        for c in range(QWEN_CHUNKS):
            chunk = tokens[c * QWEN_CTX:(c + 1) * QWEN_CTX]
            if add_bos:
                chunk[0] = vocab.token_bos()
            model(torch.tensor([chunk]))
    im = stats.importance()
    assert sorted(sums) == sorted(im)
    for name, s in sums.items():
        ref = (s / (QWEN_CTX * QWEN_CHUNKS)).numpy()
        # llama.cpp runs F16 weights (and rounds activations to F16 for the F16 matmul): agree to ~1e-3
        np.testing.assert_allclose(im[name], ref, rtol=0, atol=2e-3 * ref.max(), err_msg=name)


def test_a_q8_0_model_gives_nearly_the_same_imatrix(tiny_qwen2, qwen_stats, tmp_path):
    """pack computes the imatrix from a Q8_0 copy (half the memory of F16); its activations barely move."""
    q8 = tmp_path / "q8.gguf"
    convert(resolve(tiny_qwen2, hash_files=False, quiet=True), get_quant("Q8_0"), q8, quiet=True)
    im = compute_imatrix(q8, default_calibration_text(), n_ctx=QWEN_CTX, n_chunks=QWEN_CHUNKS, quiet=True)
    ref = qwen_stats.importance()
    assert sorted(im) == sorted(ref)
    for name, v in ref.items():
        np.testing.assert_allclose(im[name], v, rtol=0, atol=0.03 * v.max(), err_msg=name)


def test_compute_imatrix_is_the_mean(qwen_f16, qwen_stats):
    im = compute_imatrix(qwen_f16, default_calibration_text(), n_ctx=QWEN_CTX, n_chunks=1, quiet=True)
    assert sorted(im) == sorted(qwen_stats.importance())
    assert all(v.shape == qwen_stats.importance()[k].shape for k, v in im.items())


def test_short_text_is_a_usage_error(qwen_f16):
    with pytest.raises(UsageError, match="less than one chunk"):
        compute_imatrix(qwen_f16, "Too short to calibrate anything.", n_ctx=64, quiet=True)
    with pytest.raises(UsageError, match="at least"):
        compute_imatrix(qwen_f16, default_calibration_text(), n_ctx=4, quiet=True)


def test_default_text_is_shipped_and_long_enough():
    text = default_calibration_text()
    assert "CC0" in text.splitlines()[0]
    assert len(text) > 20_000
    for kind in ("```python", "```c", "```sql", "User:", '"', "|"):
        assert kind in text


# -- using it ------------------------------------------------------------------------------

@pytest.mark.parametrize("qname", ["Q4_K", "IQ4_NL"])
def test_imatrix_changes_quantized_bytes(qwen_f16, qwen_stats, qname):
    qtype = QT[qname]
    im = qwen_stats.importance()
    w = _weights(qwen_f16)["blk.0.ffn_down.weight"]
    plain = ggml.quantize_rows(qtype, w)
    weighted = ggml.quantize_rows(qtype, w, imatrix=im["blk.0.ffn_down.weight"])
    assert plain.nbytes == weighted.nbytes
    assert not np.array_equal(plain, weighted)


@pytest.mark.parametrize("quant", ["Q4_K_M", "IQ4_NL"])
def test_convert_with_imatrix_equals_llama_quantize(quant, tiny_qwen2, qwen_f16, qwen_stats, tmp_path):
    """convert(imatrix=...) from the checkpoint writes the bytes llama_model_quantize writes from the F16 GGUF."""
    import llama_cpp

    im = qwen_stats.importance()
    ours = tmp_path / "ours.gguf"
    convert(resolve(tiny_qwen2, hash_files=False, quiet=True), get_quant(quant), ours, imatrix=im, quiet=True)

    keep = [(name.encode(), np.ascontiguousarray(v, dtype=np.float32)) for name, v in im.items()]
    table = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()  # zeroed last entry ends the list
    for i, (name, v) in enumerate(keep):
        table[i].name, table[i].size = name, v.size
        table[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, f"MOSTLY_{quant}"))
    params.nthread = 2
    params.imatrix = table
    ref = tmp_path / "ref.gguf"
    assert llama_cpp.llama_model_quantize(str(qwen_f16).encode(), str(ref).encode(), ctypes.byref(params)) == 0

    a, b = _tensors(ours), _tensors(ref)
    assert sorted(a) == sorted(b)
    for name, (qtype, ne, data) in b.items():
        assert a[name][:2] == (qtype, ne), name
        assert np.array_equal(a[name][2], data), f"{name} differs from llama.cpp's"


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_hf, tmp_path_factory) -> Path:
    return _f16(smollm2_hf, tmp_path_factory.mktemp("imatrix-smollm2") / "smollm2-f16.gguf")


@pytest.fixture(scope="module")
def smollm2_imatrix(smollm2_f16) -> dict[str, np.ndarray]:
    # 3 chunks of 512 tokens: enough to tell columns apart, ~20 s on 2 cores
    return compute_imatrix(smollm2_f16, default_calibration_text(), n_chunks=3, quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize("qname", ["Q4_K", "IQ4_NL"])
def test_imatrix_lowers_activation_weighted_error_on_smollm2(smollm2_f16, smollm2_imatrix, qname):
    """On real weights: sum_ij imatrix_j * (w_ij - q_ij)^2 is lower when the quantizer is given the imatrix."""
    qtype = QT[qname]
    im = smollm2_imatrix
    weights = _weights(smollm2_f16)
    # Q4_K's 256-weight blocks fit only ffn_down's 1536 columns (hidden size 576): take every layer's.
    # IQ4_NL fits every weight: take all seven of every fifth layer.
    block = ggml.block_size(qtype)
    layers = range(0, 30, 1 if qtype == QT.Q4_K else 5)
    names = sorted(n for n in weights if int(n.split(".")[1]) in layers and weights[n].shape[1] % block == 0)
    assert len(names) == (30 if qtype == QT.Q4_K else 6 * 7)
    better, total_plain, total_weighted = 0, 0.0, 0.0
    for name in names:
        w, imp = weights[name], im[name].astype(np.float64)
        errs = []
        for given in (None, im[name]):
            q = ggml.quantize_rows(qtype, w, imatrix=given, n_threads=2)
            deq = gguf.quants.dequantize(q.reshape(w.shape[0], -1), qtype).reshape(w.shape)
            errs.append(float((((w.astype(np.float64) - deq) ** 2) * imp).sum()))
        plain, weighted = errs
        better += weighted < plain
        total_plain += plain
        total_weighted += weighted
    assert better >= 0.9 * len(names), f"the imatrix helped only {better} of {len(names)} weights"
    print(f"{qname}: imatrix helped {better}/{len(names)} weights; weighted error x{total_weighted / total_plain:.3f}")
    assert total_weighted < 0.9 * total_plain, (total_weighted, total_plain)

