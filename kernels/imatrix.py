"""Importance-matrix arithmetic: per-column sums of squared activations.

For a weight matrix W (numpy shape (rows, cols)) applied as ``y = W @ x``, the
importance of column j is the mean over calibration tokens of ``x_j ** 2``: how
much rounding error in that column costs on real inputs. ggml's quantizers take
one such float per column and weigh each weight's rounding error by it.

This is the bookkeeping of llama.cpp's ``llama-imatrix`` (tools/imatrix), done
with numpy: a running sum of ``x_j ** 2`` and a token count per weight (per
expert for mixture-of-experts weights), sums that add when chunks or files are
combined, and the mean that the quantizer reads. Sums are kept in float64 here
(llama.cpp keeps float32) and written as float32, as llama.cpp's files hold them.
Nothing here knows about llama.cpp itself; packager/convert/gguf/imatrix.py feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Entry", "ImatrixStats"]


@dataclass
class Entry:
    """Collected activations of one weight.

    ``sums`` is (n_counts, width) float64: row k sums ``x ** 2`` over the tokens
    counted in ``counts[k]``. A dense weight has one row (width = its columns;
    a stack of n dense matrices has width n * columns and one shared count, as
    llama.cpp stores it); a mixture-of-experts weight has one row per expert.
    """

    sums: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        self.sums = np.array(self.sums, dtype=np.float64, ndmin=2)
        self.counts = np.array(self.counts, dtype=np.int64, ndmin=1)
        if self.sums.ndim != 2 or self.counts.shape != (self.sums.shape[0],):
            raise ValueError(
                "an imatrix entry needs one count per row of sums; "
                f"got sums {self.sums.shape}, counts {self.counts.shape}"
            )

    @classmethod
    def zeros(cls, width: int, n_counts: int = 1) -> Entry:
        return cls(np.zeros((n_counts, width)), np.zeros(n_counts, dtype=np.int64))

    def add(self, other: Entry) -> None:
        """Add another collection of the same weight (another chunk, another file)."""
        if other.sums.size != self.sums.size:
            raise ValueError(f"cannot combine imatrix entries of {self.sums.size} and {other.sums.size} values")
        if other.counts.shape != self.counts.shape:
            if self.counts.size == 1:  # a dense count broadcast to experts, as llama.cpp does
                self.sums = self.sums.reshape(other.sums.shape)
                self.counts = np.repeat(self.counts, other.counts.size)
            elif other.counts.size == 1:
                other = Entry(other.sums.reshape(self.sums.shape), np.repeat(other.counts, self.counts.size))
            else:
                raise ValueError(
                    f"cannot combine imatrix entries with {self.counts.size} and {other.counts.size} experts"
                )
        self.sums += other.sums.reshape(self.sums.shape)
        self.counts += other.counts

    def mean(self) -> np.ndarray:
        """Mean ``x ** 2`` per value, flattened to float32 (what the quantizer reads).

        A row that saw no token (an expert the calibration text never routed to)
        gets 1.0 everywhere, as llama-quantize does: no information, equal weights.
        """
        out = np.ones(self.sums.shape, dtype=np.float64)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen, None]
        return out.astype(np.float32).reshape(-1)


@dataclass
class ImatrixStats:
    """Every weight's collected activations, plus what llama.cpp's imatrix files record with them."""

    entries: dict[str, Entry] = field(default_factory=dict)
    chunk_size: int = 0  # tokens per chunk (llama-imatrix's n_ctx)
    chunk_count: int = 0  # chunks processed
    datasets: list[str] = field(default_factory=list)  # names of the calibration texts

    def add_dense(self, name: str, x: np.ndarray, n_mat: tuple[int, int] = (1, 1)) -> None:
        """Add the activations of one dense matrix multiplication by weight ``name``.

        ``x`` is the activation tensor in numpy order (i3, i2, tokens, cols), i.e.
        ggml's src1 with ``ne`` reversed (lower-rank arrays are padded in front).
        ``n_mat`` is (ne2, ne3) of the weight: a stack of matrices, each fed the
        activation slices that ggml broadcasts to it. Every token counts once.
        """
        x = np.asarray(x)
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
        ne3_x, ne2_x, n_rows, cols = x.shape
        w2, w3 = n_mat
        entry = self._entry(name, cols * w2 * w3, 1)
        acc = entry.sums.reshape(w3 * w2, cols)
        for i3 in range(ne3_x):
            for i2 in range(ne2_x):
                acc[(i3 % w3) * w2 + (i2 % w2)] += _sum_squares(x[i3, i2])
        entry.counts[0] += ne3_x * ne2_x * n_rows // (w2 * w3)
        _check_finite(name, entry.sums)

    def add_experts(self, name: str, x: np.ndarray, ids: np.ndarray, n_expert: int) -> None:
        """Add the activations of one mixture-of-experts multiplication (ggml_mul_mat_id).

        ``x`` is (tokens, n_x, cols): per token, either one activation for every
        chosen expert (n_x = experts used) or one shared by all (n_x = 1). ``ids``
        is (tokens, experts used): which expert each slot routed to. Each expert
        accumulates the activations it was given and counts them.
        """
        x = np.asarray(x)
        ids = np.asarray(ids)
        n_tokens, n_x, cols = x.shape
        if ids.shape[0] != n_tokens:
            raise ValueError(f"{name}: {ids.shape[0]} rows of expert ids for {n_tokens} tokens")
        if ids.size and (ids.min() < 0 or ids.max() >= n_expert):
            raise ValueError(f"{name}: expert ids outside 0..{n_expert - 1}")
        entry = self._entry(name, cols, n_expert)
        slots = np.arange(ids.shape[1]) % n_x
        chosen = x[:, slots, :].reshape(-1, cols)  # (tokens * used, cols)
        experts = ids.reshape(-1)
        for ex in np.unique(experts):
            entry.sums[ex] += _sum_squares(chosen[experts == ex])
        entry.counts += np.bincount(experts, minlength=n_expert).astype(np.int64)
        _check_finite(name, entry.sums)

    def merge(self, other: ImatrixStats) -> None:
        """Add another collection (more chunks, or a file made elsewhere) into this one."""
        if self.chunk_size and other.chunk_size and self.chunk_size != other.chunk_size:
            raise ValueError(
                f"cannot combine imatrices made with chunks of {self.chunk_size} and {other.chunk_size} tokens"
            )
        for name, e in other.entries.items():
            if name in self.entries:
                self.entries[name].add(e)
            else:
                self.entries[name] = Entry(e.sums.copy(), e.counts.copy())
        self.chunk_size = self.chunk_size or other.chunk_size
        self.chunk_count += other.chunk_count
        self.datasets.extend(other.datasets)

    def importance(self) -> dict[str, np.ndarray]:
        """Weight name -> float32 importance per column (flattened over experts): the quantizer's input."""
        return {name: e.mean() for name, e in sorted(self.entries.items()) if e.counts.any()}

    def _entry(self, name: str, width: int, n_counts: int) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = Entry.zeros(width, n_counts)
        elif entry.sums.size != width * n_counts:
            raise ValueError(
                f"{name}: activations of {width * n_counts} values, but earlier ones had {entry.sums.size}"
            )
        elif entry.counts.size != n_counts:
            if entry.counts.size != 1:
                raise ValueError(f"{name}: {n_counts} experts, but earlier activations had {entry.counts.size}")
            entry.sums = entry.sums.reshape(n_counts, width)
            entry.counts = np.repeat(entry.counts, n_counts)
        return entry


def _sum_squares(x: np.ndarray) -> np.ndarray:
    """Column sums of ``x ** 2`` for (rows, cols) float32 activations, as float64."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[0] == 0:
        return np.zeros(x.shape[-1])
    # One call's sum in float32 (512 tokens: relative error ~1e-6, and 6x faster than
    # float64 einsum), accumulated across calls in float64 by the caller.
    return np.einsum("ij,ij->j", x, x).astype(np.float64)


def _check_finite(name: str, sums: np.ndarray) -> None:
    if not np.all(np.isfinite(sums)):
        raise FloatingPointError(
            f"{name}: the activations hold NaN or infinite values; the model overflows on the calibration text "
            "(compute the imatrix from an F32 or BF16 GGUF, or use another text)"
        )
