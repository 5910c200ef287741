"""ggml quantization through ctypes (packager.kernels.ggml), against two oracles:
gguf-py's numpy quantizers (byte for byte, where it has them) and the bytes
llama.cpp's own quantizer writes into a GGUF.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gguf
import gguf.quants
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

import ggufview
from packager.kernels import ggml

pytest.importorskip("llama_cpp")  # ggml comes with it

# Every type gguf-py 0.19 can quantize in numpy (the others raise NotImplementedError).
NUMPY_QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                     QT.TQ1_0, QT.TQ2_0, QT.MXFP4]

# Relative RMS error on N(0, 1) weights, observed with ggml 0.25 plus ~25% headroom,
# listed from most bits to fewest: the error must also grow down the list.
ERROR_BOUNDS = [
    (QT.Q8_0, 0.007), (QT.Q6_K, 0.023), (QT.Q5_K, 0.045), (QT.Q4_K, 0.09),
    (QT.IQ4_XS, 0.096), (QT.Q3_K, 0.19), (QT.IQ3_S, 0.21), (QT.IQ3_XXS, 0.27),
    (QT.Q2_K, 0.37), (QT.IQ2_XS, 0.40), (QT.IQ2_XXS, 0.45),
]  # IQ1_S/IQ1_M left out: building their grids takes ggml ~10 s


def _weights(nrows: int = 64, ncols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Per-row scales over four decades, as real weight matrices have.
    return (rng.standard_normal((nrows, ncols)) * rng.uniform(0.01, 10, (nrows, 1))).astype(np.float32)


def _edge_rows(ncols: int = 256) -> np.ndarray:
    rng = np.random.default_rng(1)
    rows = [np.zeros(ncols), np.full(ncols, 0.5), np.full(ncols, -3.0),
            rng.standard_normal(ncols) * 1e-6, rng.standard_normal(ncols) * 1e4,
            np.where(np.arange(ncols) == 7, 100.0, rng.standard_normal(ncols)),  # one outlier
            rng.integers(-8, 8, ncols).astype(float), np.linspace(-1, 1, ncols),
            rng.standard_normal(ncols) * 1e-30]
    return np.stack(rows).astype(np.float32)


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


@pytest.mark.parametrize("qtype", NUMPY_QUANTIZABLE, ids=lambda t: t.name)
def test_byte_identical_to_gguf_py(qtype: QT) -> None:
    x = np.concatenate([_edge_rows(), _weights(200, 256)])
    ours = ggml.quantize_rows(qtype, x)
    ref = gguf.quants.quantize(x, qtype).reshape(-1).view(np.uint8)
    assert ours.dtype == np.uint8 and ours.shape == (x.shape[0] * ggml.row_size(qtype, 256),)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_float_specials_identical(qtype: QT) -> None:
    # NaN (both signs), infinities, subnormals, overflow and round-to-even ties.
    specials = [np.nan, -np.nan, np.inf, -np.inf, 1e-40, -1e-45, 3.4e38, 65519.9, 65520.0,
                1.00048828125, 1.5, 2.0**-24, 2.0**-25, 0.0, -0.0, 7e4]
    x = np.array([specials * 2], dtype=np.float32)
    with np.errstate(over="ignore"):
        ref = gguf.quants.quantize(x, qtype).reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(ggml.quantize_rows(qtype, x), ref)


def test_error_bounds_and_ordering() -> None:
    x = np.random.default_rng(2).standard_normal((64, 512)).astype(np.float32)
    imatrix = np.ones(512, dtype=np.float32)
    errors = []
    for qtype, bound in ERROR_BOUNDS:
        q = ggml.quantize_rows(qtype, x, imatrix=imatrix if ggml.requires_imatrix(qtype) else None)
        assert ggml.validate_rows(qtype, q)
        err = _rel_rms(gguf.quants.dequantize(q.reshape(64, -1), qtype), x)
        assert err < bound, f"{qtype.name}: relative RMS error {err:.4f} >= {bound}"
        errors.append(err)
    assert errors == sorted(errors), "more bits per weight must give less error"


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q5_K, QT.Q3_K, QT.Q2_K, QT.IQ4_NL, QT.IQ4_XS],
                         ids=lambda t: t.name)
def test_kquants_round_trip_on_scaled_rows(qtype: QT) -> None:
    # Error stays relative to each row's own scale, whatever that scale is.
    x = _weights()
    d = gguf.quants.dequantize(ggml.quantize_rows(qtype, x).reshape(x.shape[0], -1), qtype)
    per_row = np.sqrt(np.mean((d - x) ** 2, axis=1)) / np.sqrt(np.mean(x ** 2, axis=1))
    assert per_row.max() < 0.4
    assert np.all(np.isfinite(d))


def test_ctrl_c_waits_for_the_quantize_threads() -> None:
    """Regression: Ctrl-C while quantize_rows waited for its threads left them writing into
    freed arrays; a `pack model` interrupted mid-write died of SIGSEGV instead of exiting 130."""
    x = np.random.default_rng(0).standard_normal((2048, 4096), dtype=np.float32)
    start = time.monotonic()
    ggml.quantize_rows(QT.Q6_K, x[:256], n_threads=2)
    per_slice = time.monotonic() - start  # an eighth of the whole array's time
    timer = threading.Timer(per_slice, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        ggml.quantize_rows(QT.Q6_K, x, n_threads=2)
        time.sleep(5)  # finished before the signal: wait for it here (the test then fails below)
    timer.join()
    assert time.monotonic() - start < 8 * per_slice + 4, "the signal arrived after the quantization"
    # Every slice that had begun is done: what is left of the threads only exits.
    left = [t for t in threading.enumerate() if t.name.startswith("ggml-quantize")]
    for t in left:
        t.join(timeout=per_slice)
    assert not [t.name for t in left if t.is_alive()]


@pytest.mark.parametrize("qtype", [QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_K, QT.Q6_K, QT.IQ4_NL, QT.IQ3_S],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("n_threads", [2, 3, 7, 200])
def test_threads_byte_identical(qtype: QT, n_threads: int) -> None:
    x = _weights(nrows=37, ncols=256)  # 37 rows: slices of unequal length
    one = ggml.quantize_rows(qtype, x)
    np.testing.assert_array_equal(ggml.quantize_rows(qtype, x, n_threads=n_threads), one)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.IQ4_NL, QT.Q3_K, QT.IQ3_S], ids=lambda t: t.name)
def test_imatrix_changes_output_and_helps_weighted_columns(qtype: QT) -> None:
    x = np.random.default_rng(3).standard_normal((32, 256)).astype(np.float32)
    imatrix = np.ones(256, dtype=np.float32)
    imatrix[::8] = 100.0  # these columns matter most
    plain = ggml.quantize_rows(qtype, x)
    weighted = ggml.quantize_rows(qtype, x, imatrix=imatrix)
    assert not np.array_equal(plain, weighted)

    def weighted_error(q: np.ndarray) -> float:
        d = gguf.quants.dequantize(q.reshape(32, -1), qtype)
        return float(np.sum(imatrix * (d - x) ** 2))

    assert weighted_error(weighted) < weighted_error(plain)


def test_imatrix_required_types() -> None:
    x = _weights(4, 256)
    assert ggml.requires_imatrix(QT.IQ1_S)  # not quantized here: its grid takes ggml ~10 s to build
    for qtype in (QT.IQ2_XXS, QT.IQ2_XS):
        assert ggml.requires_imatrix(qtype)
        with pytest.raises(ValueError, match="importance matrix"):
            ggml.quantize_rows(qtype, x)
        assert ggml.quantize_rows(qtype, x, imatrix=np.ones(256, np.float32)).nbytes == 4 * ggml.row_size(qtype, 256)
    assert not ggml.requires_imatrix(QT.Q4_K)


def test_sizes_agree_with_gguf_py() -> None:
    for qtype in ggml.QUANTIZABLE:
        block, type_size = GGML_QUANT_SIZES[qtype]
        assert ggml.block_size(qtype) == block
        assert ggml.row_size(qtype, block * 3) == type_size * 3


def test_bad_input_raises_instead_of_aborting() -> None:
    x = _weights(4, 576)
    with pytest.raises(ValueError, match="256 weights per block.*576"):
        ggml.quantize_rows(QT.Q4_K, x)
    with pytest.raises(ValueError, match="32 weights per block"):
        ggml.quantize_rows(QT.Q8_0, _weights(4, 100))
    with pytest.raises(ValueError, match="2-D"):
        ggml.quantize_rows(QT.Q8_0, x.reshape(-1))
    with pytest.raises(ValueError, match="2-D"):
        ggml.quantize_rows(QT.Q8_0, x.reshape(2, 2, 576))
    with pytest.raises(ValueError, match="cannot quantize to Q8_K"):
        ggml.quantize_rows(QT.Q8_K, x)
    with pytest.raises(ValueError, match="cannot quantize to I32"):
        ggml.quantize_rows(QT.I32, x)
    with pytest.raises(ValueError, match="one weight per column"):
        ggml.quantize_rows(QT.Q8_0, x, imatrix=np.ones(10, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        ggml.quantize_rows(QT.Q4_0, x, imatrix=np.full(576, np.nan, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        ggml.quantize_rows(QT.Q8_0, x, out=np.empty(10, np.uint8))
    with pytest.raises(ValueError):
        ggml.row_size(QT.Q4_K, 100)


def test_out_buffer_and_input_conversion(tmp_path: Path) -> None:
    x = _weights(8, 256)
    n = 8 * ggml.row_size(QT.Q4_K, 256)
    mm = np.memmap(tmp_path / "q.bin", dtype=np.uint8, mode="w+", shape=(n,))
    got = ggml.quantize_rows(QT.Q4_K, x, out=mm, n_threads=2)
    assert np.shares_memory(got, mm)
    np.testing.assert_array_equal(mm, ggml.quantize_rows(QT.Q4_K, x))
    # Non-contiguous and float64 inputs are converted, not misread.
    np.testing.assert_array_equal(ggml.quantize_rows(QT.Q8_0, np.asfortranarray(x.astype(np.float64))),
                                  ggml.quantize_rows(QT.Q8_0, x))
    assert ggml.quantize_rows(QT.Q8_0, np.empty((0, 64), np.float32)).nbytes == 0


def test_missing_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    ggml._lib.cache_clear()
    try:
        with pytest.raises(ggml.LibraryMissing, match=r"edgepack\[gguf\]"):
            ggml.block_size(QT.Q8_0)
    finally:
        monkeypatch.undo()
        ggml._lib.cache_clear()
    assert ggml.block_size(QT.Q8_0) == 32


@pytest.fixture(scope="module")
def qwen2_f16() -> tuple[Path, dict]:
    import models
    import oracle

    f16 = oracle.reference_gguf(models.tiny_qwen2(), "f16")
    return f16, ggufview.tensors(f16)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["Q3_K_M", "IQ4_NL"])  # Q3_K..Q6_K, IQ4_NL between them
def test_identical_to_llama_quantize(qwen2_f16: tuple[Path, dict], quant: str) -> None:
    """Every tensor llama.cpp quantized from the F16 reference, we quantize to the same bytes."""
    import oracle

    f16, src = qwen2_f16
    checked = 0
    for t in ggufview.tensors(oracle.reference_quantize(f16, quant)).values():
        qtype = QT(t.tensor_type)
        s = src[t.name]
        if qtype == QT(s.tensor_type) or len(s.shape) < 2:
            continue  # copied, not quantized
        rows = np.asarray(s.data, dtype=np.float32).reshape(int(s.shape[1]), int(s.shape[0]))
        ours = ggml.quantize_rows(qtype, rows, n_threads=2)
        np.testing.assert_array_equal(ours, np.asarray(t.data).reshape(-1).view(np.uint8), err_msg=t.name)
        checked += 1
    assert checked >= 10


def test_bf16_widening_is_exact():
    from packager.kernels.ggml import bf16_to_f32

    bits = np.arange(0, 1 << 16, dtype=np.uint16).reshape(256, 256)
    want = (bits.astype(np.uint32) << 16).view(np.float32)
    got = bf16_to_f32(bits)
    assert got.dtype == np.float32 and got.shape == bits.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # NaN payloads included
