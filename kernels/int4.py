"""Round-to-nearest int4 block quantization in the layout of ONNX Runtime's MatMulNBits.

A weight ``W`` of shape [N, K] (Hugging Face's Linear layout: one row per output
feature) is cut along K into blocks of ``block_size``; each block gets one f32
scale (and, asymmetric, one 4-bit zero point). MatMulNBits (com.microsoft, bits=4)
stores:

- ``B``           uint8 [N, K/block, block/2]: two weights a byte, the even one in
                  the low nibble;
- ``scales``      f32 [N, K/block];
- ``zero_points`` uint8 [N, ceil(K/block / 2)]: two blocks a byte, low nibble
                  first. Absent means 8 (symmetric).

The rounding reproduces ONNX Runtime's C++ routine (MLAS ``MlasQuantizeBlockwise``,
reached from Python as ``quantize_matmul_4bits``): symmetric takes the signed value
of largest magnitude ``m`` and ``scale = m / -8``, so ``m`` maps to code 0 and the
grid spans -8..7 without clipping it; asymmetric widens [min, max] to contain 0,
``scale = (max - min) / 15`` and ``zp = round(-min / scale)``. tests/test_onnx.py
checks the bytes against that routine.

Rows are independent, so callers quantize a large matrix a block of rows at a time
and never hold it whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Int4Blocks:
    """One quantized [N, K] matrix (or a block of its rows), ready for MatMulNBits."""

    packed: np.ndarray  # uint8 [N, n_blocks, block_size // 2]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks / 2)], None when symmetric


def n_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def check_block_size(block_size: int) -> int:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size {block_size} is not supported; use one of {', '.join(map(str, BLOCK_SIZES))}")
    return block_size


def as_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """Float rows ``w`` [N, K] as float32 blocks [N, n_blocks, block_size] along K, K zero-padded to whole blocks."""
    check_block_size(block_size)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [N, K] matrix, got shape {w.shape}")
    n, k = w.shape
    nb = n_blocks(k, block_size)
    x = np.asarray(w, dtype=np.float32)
    if nb * block_size != k:
        x = np.pad(x, ((0, 0), (0, nb * block_size - k)))
    return x.reshape(n, nb, block_size)


def quantize_int4(w: np.ndarray, block_size: int = 32, symmetric: bool = True) -> Int4Blocks:
    """Quantize float rows ``w`` [N, K] to int4 blocks along K (K is zero-padded to whole blocks)."""
    x = as_blocks(w, block_size)
    n, nb = x.shape[:2]
    if symmetric:
        hi = x.max(axis=2)
        lo = x.min(axis=2)
        # The signed extreme; on a tie the negative one, as MLAS compares |max| > |min|.
        m = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scales = (m / np.float32(-8.0)).astype(np.float32)
        zp = np.full((n, nb), 8.0, dtype=np.float32)
    else:
        lo = np.minimum(x.min(axis=2), np.float32(0.0))
        hi = np.maximum(x.max(axis=2), np.float32(0.0))
        scales = ((hi - lo) / np.float32(15.0)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scales != 0, np.clip(_round_half_up(-lo / scales), 0, 15), 0).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scales != 0, np.float32(1.0) / scales, np.float32(0.0)).astype(np.float32)
    # In place: one temporary the size of the block of rows, not four.
    t = np.multiply(x, inv[:, :, None], dtype=np.float32)
    t += zp[:, :, None]
    t = _round_half_up(t)
    np.clip(t, 0, 15, out=t)
    q = t.astype(np.uint8)
    del t
    packed = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
    zero_points = None
    if not symmetric:
        zq = zp.astype(np.uint8)
        if nb % 2:  # the unused nibble of an odd count holds 8, as ONNX Runtime writes it
            zq = np.pad(zq, ((0, 0), (0, 1)), constant_values=8)
        zero_points = zq[:, 0::2] | (zq[:, 1::2] << 4)
    return Int4Blocks(np.ascontiguousarray(packed), np.ascontiguousarray(scales), zero_points)


def _round_half_up(t: np.ndarray) -> np.ndarray:
    """Round to nearest, halves away from zero for t >= 0 (C's roundf, which MLAS uses), in place.

    floor + the exact fraction: adding 0.5 first would itself round in float32.
    Negative values (clipped to 0 afterwards) may round differently: it does not matter.
    """
    f = np.floor(t)
    t -= f
    f += t >= 0.5
    return f


def dequantize_int4(q: Int4Blocks, k: int) -> np.ndarray:
    """The float [N, K] matrix the blocks stand for (a reference for tests)."""
    n, nb, half = q.packed.shape
    codes = np.empty((n, nb, half * 2), dtype=np.float32)
    codes[:, :, 0::2] = q.packed & 0x0F
    codes[:, :, 1::2] = q.packed >> 4
    if q.zero_points is None:
        zp = np.full((n, nb), 8.0, dtype=np.float32)
    else:
        both = np.empty((n, q.zero_points.shape[1] * 2), dtype=np.float32)
        both[:, 0::2] = q.zero_points & 0x0F
        both[:, 1::2] = q.zero_points >> 4
        zp = both[:, :nb]
    out = (codes - zp[:, :, None]) * q.scales[:, :, None]
    return out.reshape(n, nb * half * 2)[:, :k]
