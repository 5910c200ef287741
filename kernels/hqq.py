"""Half-Quadratic Quantization (HQQ) of int4 blocks, in the layout of ONNX Runtime's MatMulNBits.

HQQ (Badri & Shaji, 2023) needs no calibration data: starting from each block's min/max
grid, it refines the zero point by alternating a sparsity-promoting shrinkage of the
rounding error (an lp norm, p = 0.7, so a few outliers do not drag the grid) with a
closed-form zero-point update. The zero points stay floats: rounding them to 4 bits
gives back about what round-to-nearest gets (measured: all of HQQ's gain is in the
fractional zero point).

MatMulNBits accepts float zero points, but ONNX Runtime 1.32's CPU kernel then dequantizes
the whole weight on every call (measured on one 896x4864 layer, M = 1: 18 ms against 54 us
with uint8 zero points). So :func:`split_zero_points` writes each float zero point ``z`` as
its rounded 4-bit part ``zr`` (MatMulNBits' fast path) plus a per-block correction
``c = (zr - z) * scale``, exactly: ``(q - z) * s = (q - zr) * s + c``. The graph adds
``c`` times each block's sum of the activations (convert/onnx/graph.py), a matrix 1/block_size the
size of the weight.

This is a numpy port of ONNX Runtime 1.32's own routine
(``onnxruntime.quantization.matmul_nbits_quantizer.HQQWeightOnlyQuantizer.quantize_internal``,
which needs torch and the whole MatMul initializer): the same initial grid, the same
proximal iterations (20 at most, beta 10, kappa 1.01) and the same early stop, so a
block of rows quantized here equals what ONNX Runtime writes for that block
(tests/test_onnx.py compares them). The early stop looks at the mean error over the
rows passed in, so callers that stream a matrix a block of rows at a time may stop at
another iteration than a whole-matrix call would; every block still only improves.
"""

from __future__ import annotations

import numpy as np

from packager.kernels.int4 import Int4Blocks, as_blocks

LP_NORM, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 20  # ONNX Runtime's (and HQQ's) defaults


def quantize_int4_hqq(w: np.ndarray, block_size: int = 32) -> Int4Blocks:
    """Quantize float rows ``w`` [N, K] to asymmetric int4 blocks along K with HQQ-refined float zero points.

    ``zero_points`` comes back as float32 [N, n_blocks] (MatMulNBits' float form), not packed nibbles.
    """
    x = as_blocks(w, block_size)
    lo = x.min(axis=2, keepdims=True)
    span = x.max(axis=2, keepdims=True) - lo
    span[span == 0] = 15.0  # a constant block: scale 1, as ONNX Runtime does
    # HQQ works with the inverse scale: codes = round(w * inv + zero).
    inv = np.minimum(np.float32(15.0) / span, np.float32(2e4)).astype(np.float32)
    zero = np.round(-lo * inv).astype(np.float32)
    zero = _refine_zero(x, inv, zero)
    codes = _codes(x, inv, zero).astype(np.uint8)
    packed = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)
    scales = (np.float32(1.0) / inv[:, :, 0]).astype(np.float32)
    return Int4Blocks(np.ascontiguousarray(packed), np.ascontiguousarray(scales),
                      np.ascontiguousarray(zero[:, :, 0], dtype=np.float32))


def split_zero_points(q: Int4Blocks) -> tuple[np.ndarray, np.ndarray]:
    """HQQ's float zero points as MatMulNBits' packed uint8 nibbles [N, ceil(n_blocks / 2)] plus the
    f32 correction [N, n_blocks] that restores the float zero exactly."""
    z = q.zero_points
    if z is None or z.dtype != np.float32:
        raise ValueError("expected HQQ's float32 zero points")
    zr = np.clip(np.round(z), 0.0, 15.0)
    correction = ((zr - z) * q.scales).astype(np.float32)
    zq = zr.astype(np.uint8)
    if zq.shape[1] % 2:  # the unused nibble of an odd count holds 8, as ONNX Runtime writes it
        zq = np.pad(zq, ((0, 0), (0, 1)), constant_values=8)
    return np.ascontiguousarray(zq[:, 0::2] | (zq[:, 1::2] << 4)), np.ascontiguousarray(correction)


def _codes(x: np.ndarray, inv: np.ndarray, zero: np.ndarray) -> np.ndarray:
    t = x * inv
    t += zero
    np.round(t, out=t)  # half to even, as torch.round
    return np.clip(t, 0.0, 15.0, out=t)


def _refine_zero(x: np.ndarray, inv: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """The proximal solver of min ||w - dequantize(quantize(w))||_p^p over the zero points."""
    beta, best = BETA, 1e4
    for _ in range(ITERS):
        q = _codes(x, inv, zero)
        err = x - (q - zero) / inv  # w - its reconstruction
        current = float(np.abs(err).mean())
        # Shrink the error towards 0 (the lp proximal step); what is left is treated as outliers.
        mag = np.abs(err)
        shrunk = np.sign(err) * np.maximum(mag - (np.float32(1.0 / beta) * np.power(mag + np.float32(1e-8),
                                                                                     np.float32(LP_NORM - 1))), 0)
        # The zero point that best explains the codes given the weights minus their outliers.
        zero = np.mean(q - (x - shrunk) * inv, axis=2, keepdims=True, dtype=np.float32)
        beta *= KAPPA
        # ONNX Runtime's order: the zero is updated before the stop test, which looks at the previous grid.
        if current < best:
            best = current
        else:
            break
    return zero
