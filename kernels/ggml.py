"""Quantize float32 rows into GGUF tensor types with ggml's own C routines.

gguf-py's numpy quantizers (``gguf.quants``) are exact but slow and cover only
the simple block types; llama.cpp's k-quants and i-quants exist only in C.
llama-cpp-python ships ggml as a shared library (``llama_cpp/lib/libggml-base.so``),
so we call ``ggml_quantize_chunk`` on it through ctypes: the bytes are the ones
llama.cpp itself writes, at C speed.

The library is located with ``importlib.util.find_spec`` and loaded on first
use, so importing this module costs nothing and does not import llama_cpp.

ctypes releases the GIL around foreign calls, so ``quantize_rows(n_threads=N)``
runs N slices of rows truly in parallel, each writing its own byte range.

ggml aborts the whole process (``GGML_ASSERT``) on bad input: a type it cannot
quantize, a missing importance matrix, a row length that is not a multiple of
the block size. Every such case is checked here first and raised as
``ValueError`` instead.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
from typing import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT


__all__ = [
    "QUANTIZABLE",
    "bf16_to_f32",
    "block_size",
    "dequantize_rows",
    "quantize_rows",
    "requires_imatrix",
    "row_size",
    "validate_rows",
]

# The types ggml_quantize_chunk has a case for (ggml.c); any other type hits
# `assert(false)` and then a GGML_ASSERT abort, so it must never reach the C side.
QUANTIZABLE: frozenset[QT] = frozenset({
    QT.F32, QT.F16, QT.BF16,
    QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q1_0,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    QT.IQ1_S, QT.IQ1_M, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S,
    QT.IQ4_NL, QT.IQ4_XS,
    QT.TQ1_0, QT.TQ2_0, QT.MXFP4, QT.NVFP4,
})

class LibraryMissing(ImportError):
    """ggml's library is not there: llama-cpp-python, which ships it, is missing or incomplete.

    An ImportError of the kernels' own (they import nothing else of edgepack); the CLI prints it
    as one line, like edgepack's BackendMissingError.
    """


class _TypeTraits(ctypes.Structure):
    """ggml.h's struct ggml_type_traits (the fields up to to_float are all we read)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)),
        ("from_float_ref", ctypes.c_void_p),
    ]


_ggml_initialized: set[QT] = set()
_init_lock = threading.Lock()


@functools.cache
def _lib() -> ctypes.CDLL:
    """libggml-base from the installed llama-cpp-python, with the signatures we use."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise LibraryMissing("llama-cpp-python is not installed; install it with: pip install 'edgepack[gguf]'")
    libdir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    # libggml-base.so / .dylib on Unix, ggml-base.dll on Windows; versioned .so.N links last.
    found = sorted(libdir.glob("*ggml-base*")) if libdir.is_dir() else []
    found.sort(key=lambda p: (p.suffix not in (".so", ".dylib", ".dll"), len(p.name)))
    if not found:
        raise LibraryMissing(
            f"llama-cpp-python has no ggml-base library in {libdir}; "
            "reinstall it with: pip install --force-reinstall 'edgepack[gguf]'"
        )
    if hasattr(os, "add_dll_directory"):  # Windows resolves the DLL's own dependencies here
        os.add_dll_directory(str(libdir))
    lib = ctypes.CDLL(str(found[0]))

    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_bf16_to_fp32_row.restype = None
    lib.ggml_bf16_to_fp32_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return lib


def _check_type(qtype: QT) -> QT:
    qtype = QT(qtype)
    if qtype not in QUANTIZABLE:
        known = ", ".join(sorted(t.name for t in QUANTIZABLE))
        raise ValueError(f"ggml cannot quantize to {qtype.name}; use one of: {known}")
    return qtype


def bf16_to_f32(data: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) widened to a new float32 array by ggml's SIMD routine (~2x numpy's shift)."""
    src = np.ascontiguousarray(data, dtype=np.uint16)
    out = np.empty(src.shape, dtype=np.float32)
    if src.size:
        _lib().ggml_bf16_to_fp32_row(src.ctypes.data, out.ctypes.data, src.size)
    return out


def block_size(qtype: QT) -> int:
    """Number of weights in one block of ``qtype`` (1 for F32/F16/BF16, 32 or 256 for quants)."""
    return int(_lib().ggml_blck_size(int(QT(qtype))))


def row_size(qtype: QT, n_per_row: int) -> int:
    """Bytes one row of ``n_per_row`` weights takes in ``qtype`` (n_per_row must fill whole blocks)."""
    _check_row(QT(qtype), n_per_row)
    return int(_lib().ggml_row_size(int(QT(qtype)), int(n_per_row)))


def requires_imatrix(qtype: QT) -> bool:
    """True for the types ggml refuses to quantize without an importance matrix (IQ2_XXS, IQ2_XS, IQ1_S)."""
    return bool(_lib().ggml_quantize_requires_imatrix(int(QT(qtype))))


def _check_row(qtype: QT, n_per_row: int) -> None:
    blck = block_size(qtype)
    if n_per_row <= 0 or n_per_row % blck != 0:
        raise ValueError(
            f"{qtype.name} packs {blck} weights per block, but a row has {n_per_row}: "
            f"pick a type whose block size divides the row length (or keep this tensor as F16)"
        )


def _init_type(qtype: QT) -> None:
    # ggml_quantize_init builds the IQ grids lazily; do it once, before any worker
    # thread starts, so the threads never race into ggml's critical section.
    with _init_lock:
        if qtype not in _ggml_initialized:
            _lib().ggml_quantize_init(int(qtype))
            _ggml_initialized.add(qtype)


def quantize_rows(
    qtype: QT,
    rows: np.ndarray,
    *,
    imatrix: np.ndarray | None = None,
    n_threads: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize a 2-D float32 array row by row into ``qtype``'s GGUF bytes.

    ``rows`` is (nrows, n_per_row) in numpy order, i.e. a GGUF tensor's ``ne``
    reversed; it is converted to C-contiguous float32 if it is not already.
    ``imatrix`` holds one importance weight per column (n_per_row,), as
    llama.cpp's imatrix files store them; the types that use it weigh the
    rounding error by it, the others ignore it. ``out``, if given, is a
    C-contiguous uint8 buffer of exactly ``nrows * row_size`` bytes that is
    filled and returned (so a caller can quantize into a memory map).

    Returns a 1-D uint8 array of ``nrows * row_size(qtype, n_per_row)`` bytes,
    byte-identical to what llama.cpp's quantizer writes for that tensor.
    """
    qtype = _check_type(qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"quantize_rows wants a 2-D (rows, columns) array, got shape {rows.shape}")
    nrows, n_per_row = rows.shape
    _check_row(qtype, n_per_row)
    rsize = row_size(qtype, n_per_row)
    nbytes = nrows * rsize

    if out is None:
        out = np.empty(nbytes, dtype=np.uint8)
    elif out.dtype != np.uint8 or not out.flags.c_contiguous or out.nbytes != nbytes:
        raise ValueError(
            f"out must be a C-contiguous uint8 array of {nbytes} bytes "
            f"({nrows} rows x {rsize} bytes of {qtype.name}); got {out.dtype} {out.shape}"
        )
    out = out.reshape(-1)

    imatrix_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise ValueError(f"imatrix must have one weight per column, shape ({n_per_row},); got {imatrix.shape}")
        if not np.all(np.isfinite(imatrix)):
            raise ValueError("imatrix holds NaN or infinite values; recompute it")
        imatrix_ptr = imatrix.ctypes.data
    elif requires_imatrix(qtype):
        raise ValueError(f"{qtype.name} cannot be quantized without an importance matrix; pass imatrix=")
    if nrows == 0:
        return out

    _init_type(qtype)
    lib = _lib()
    src, dst = rows.ctypes.data, out.ctypes.data

    def work(first: int, count: int) -> None:
        # `start` is an element offset into src; ggml derives the dst offset
        # (first * row_size) from it, so every slice lands in its own bytes.
        done = lib.ggml_quantize_chunk(int(qtype), src, dst, first * n_per_row, count, n_per_row, imatrix_ptr)
        if done != count * rsize:
            raise RuntimeError(f"ggml_quantize_chunk wrote {done} bytes, expected {count * rsize}")

    n_threads = max(1, min(int(n_threads), nrows))
    if n_threads == 1:
        work(0, nrows)
        return out

    # Contiguous, near-equal slices of rows: one per thread.
    bounds = [nrows * i // n_threads for i in range(n_threads + 1)]
    _run_slices(work, [(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a])
    return out


def _run_slices(work: Callable[[int, int], None], slices: list[tuple[int, int]]) -> None:
    """Run ``work(first, count)`` for each slice in a thread of its own; return (or raise) only
    when no thread can touch the arrays any more, Ctrl-C included.

    The threads read and write numpy arrays through raw pointers: returning while one
    runs lets the caller free those arrays under it, and an interrupted `pack model` died
    of SIGSEGV instead of exiting 130 (tests/test_interrupted.py). So on an interrupt no
    new slice begins, the running ones finish (milliseconds), and then it is re-raised.
    """
    cond = threading.Condition()
    running = [0]
    cancelled = [False]
    errors: list[BaseException] = []

    def run(first: int, count: int) -> None:
        with cond:
            if cancelled[0]:  # interrupted before this thread got going
                return
            running[0] += 1
        try:
            work(first, count)
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)
        finally:
            with cond:
                running[0] -= 1
                cond.notify_all()

    threads = [threading.Thread(target=run, args=s, name=f"ggml-quantize-{i}") for i, s in enumerate(slices)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException:
        with cond:
            cancelled[0] = True
        while True:
            try:
                with cond:
                    cond.wait_for(lambda: running[0] == 0)
                break
            except KeyboardInterrupt:  # pressed again: the arrays are still in use, keep waiting
                continue
        raise
    if errors:
        raise errors[0]


def dequantize_rows(qtype: QT, data: np.ndarray, n_per_row: int, *, n_threads: int = 1) -> np.ndarray:
    """GGUF bytes of ``qtype`` back to float32 rows (nrows, n_per_row), by ggml's own ``to_float``:
    the weights llama.cpp computes with, so a quantization's error is measured on what runs."""
    qtype = _check_type(qtype)
    rsize = row_size(qtype, n_per_row)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.nbytes % rsize:
        raise ValueError(f"{raw.nbytes} bytes are not whole rows of {n_per_row} {qtype.name} weights ({rsize} bytes each)")
    nrows = raw.nbytes // rsize
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    if nrows == 0:
        return out
    to_float = _lib().ggml_get_type_traits(int(qtype)).contents.to_float
    if not to_float:
        raise ValueError(f"ggml has no to_float for {qtype.name}")
    src, dst = raw.ctypes.data, out.ctypes.data

    def work(first: int, count: int) -> None:
        to_float(src + first * rsize, dst + first * n_per_row * 4, count * n_per_row)

    n_threads = max(1, min(int(n_threads), nrows))
    bounds = [nrows * i // n_threads for i in range(n_threads + 1)]
    _run_slices(work, [(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a])
    return out


def validate_rows(qtype: QT, data: np.ndarray) -> bool:
    """ggml's own check of quantized bytes (finite scales, sane values), as llama.cpp runs on load."""
    qtype = QT(qtype)
    data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return bool(_lib().ggml_validate_row_data(int(qtype), data.ctypes.data, data.nbytes))
