"""Lazy, validated reads of safetensors checkpoints (sharded too), with numpy only.

The format is documented: 8-byte little-endian header length, a JSON header
mapping tensor names to {dtype, shape, data_offsets}, then raw little-endian data.
Files are memory-mapped, so a tensor costs memory only while it is converted.
safetensors' own numpy backend cannot read bf16, the dtype of most checkpoints:
bf16 is widened to f32 here by a 16-bit shift, which is exact.
Every header is checked against the file before anything is mapped, so a
truncated shard or a lying header is a clear error rather than a crash.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packager.errors import CorruptFileError
from packager.kernels.ggml import LibraryMissing, bf16_to_f32
from packager.source.resolver import sha256_file

_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
MAX_HEADER = 100 << 20  # the format's own reference implementation caps headers at 100 MB


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives."""

    name: str
    file: Path
    dtype: str  # safetensors dtype name: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorRef]:
    """Parse and validate one file's header (reads only the header)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: too short to be safetensors ({size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise CorruptFileError(
                f"{path}: header claims {n} bytes but the file has {size}; the file is truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: [[[[...
            raise CorruptFileError(f"{path}: header is not valid JSON ({type(exc).__name__}); re-download it") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: header is not a JSON object; re-download it")
    base = 8 + n
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        # Types are checked exactly: a list where a name belongs, or 1e400 where a size
        # belongs, is a malformed header, not a TypeError or OverflowError later.
        dtype, shape, offsets = (info.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(info, dict) else (None,) * 3
        if (not isinstance(shape, list) or not all(_is_int(d) for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
            raise CorruptFileError(f"{path}: tensor {name!r} has a malformed header entry; re-download it")
        shape, (lo, hi) = tuple(shape), offsets
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CorruptFileError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        count = 1
        for d in shape:
            if d < 0:
                raise CorruptFileError(f"{path}: tensor {name!r} has a negative dimension")
            count *= d
        if not 0 <= lo <= hi or hi - lo != count * _DTYPES[dtype].itemsize:
            raise CorruptFileError(f"{path}: tensor {name!r} offsets {lo}..{hi} do not match its shape {list(shape)}")
        if base + hi > size:
            raise CorruptFileError(
                f"{path}: tensor {name!r} ends at byte {base + hi} but the file has {size}; the file is truncated, re-download it"
            )
        refs[name] = TensorRef(name, path, dtype, shape, base + lo, hi - lo)
    return refs


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Checkpoint:
    """All tensors of a checkpoint directory, across shards, read lazily."""

    def __init__(self, files: list[Path]) -> None:
        if not files:
            raise CorruptFileError("no *.safetensors files to read")
        self.refs: dict[str, TensorRef] = {}
        for path in files:
            for name, ref in read_header(path).items():
                if name in self.refs:
                    raise CorruptFileError(f"tensor {name!r} appears in both {self.refs[name].file.name} and {path.name}")
                self.refs[name] = ref
        self._maps: dict[Path, np.memmap] = {}
        self._released: dict[Path, int] = {}

    @classmethod
    def open(cls, model_dir: Path) -> "Checkpoint":
        return cls(sorted(Path(model_dir).glob("*.safetensors")))

    def __contains__(self, name: str) -> bool:
        return name in self.refs

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16 as uint16), memory-mapped, in its own shape."""
        ref = self.refs[name]
        mm = self.mapped(ref.file)
        dt = _DTYPES[ref.dtype]
        return mm[ref.start:ref.start + ref.nbytes].view(dt).reshape(ref.shape)

    def f32(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or a slice of its rows) as a new float32 array."""
        return to_f32(self.raw(name) if rows is None else self.raw(name)[rows], self.refs[name].dtype)

    def read_rows(self, name: str, lo: int, hi: int, hasher: "FileHasher") -> np.ndarray:
        """Rows lo..hi of a tensor (a 1-D tensor: all of it) as a new float32 array; the bytes read are
        hashed, and released from this process, as they pass (both converters stream through this)."""
        ref = self.refs[name]
        raw = self.raw(name)
        first = lo * (ref.nbytes // ref.shape[0]) if raw.ndim > 1 else 0
        block = raw[lo:hi] if raw.ndim > 1 else raw
        data = to_f32(block, ref.dtype)
        hasher.read(ref.file, ref.start + first, ref.start + first + block.nbytes)
        return data

    def close(self) -> None:
        self._maps.clear()

    def release(self, path: Path, end: int) -> None:
        """Drop this process's mapped pages of ``path`` before byte ``end`` (they stay in the page cache).

        Mapped file pages count in RSS; without this, converting a 6 GB checkpoint would
        show 6 GB resident although nothing of it is needed twice.
        """
        mm = self._maps.get(path)
        start = self._released.get(path, 0)
        page = mmap.PAGESIZE
        stop = end - end % page
        if mm is None or stop <= start or not hasattr(mmap, "MADV_DONTNEED"):
            return
        mm._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)
        self._released[path] = stop

    def mapped(self, path: Path) -> np.memmap:
        mm = self._maps.get(path)
        if mm is None:
            mm = self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        return mm


class FileHasher:
    """sha256 of each checkpoint file, fed by the converter as it reads the tensors in file order.

    The bytes between tensors (header, padding) are hashed as they are passed over;
    a file read out of order is hashed again from the start when ``digests`` is called.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        import hashlib

        self.ckpt = ckpt
        self._h = {f: hashlib.sha256() for f in {r.file for r in ckpt.refs.values()}}
        self._pos = dict.fromkeys(self._h, 0)
        self._broken: set[Path] = set()

    def read(self, path: Path, start: int, end: int) -> None:
        """The converter has read bytes start..end of ``path``."""
        if path in self._broken:
            return
        if start < self._pos[path]:
            self._broken.add(path)
            return
        self._h[path].update(self.ckpt.mapped(path)[self._pos[path]:end])
        self._pos[path] = end
        self.ckpt.release(path, end)

    def digests(self) -> dict[Path, str]:
        out = {}
        for path, h in self._h.items():
            if path in self._broken:
                out[path] = sha256_file(path)
                continue
            h.update(self.ckpt.mapped(path)[self._pos[path]:])
            out[path] = h.hexdigest()
        return out


def row_blocks(shape: tuple[int, ...], max_elements: int) -> list[tuple[int, int]]:
    """Row ranges of about ``max_elements`` values each (a 1-D tensor is one block)."""
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    rows, cols = shape[0], int(np.prod(shape[1:]))
    step = max(1, max_elements // max(cols, 1))
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def to_f32(data: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored data to a new C-contiguous float32 array (bf16 by shifting into the high half)."""
    if dtype == "BF16":
        try:
            return bf16_to_f32(data)
        except LibraryMissing:  # no llama-cpp-python: numpy's shift, exact too
            out = np.empty(data.shape, dtype=np.uint32)
            np.left_shift(data, 16, out=out, dtype=np.uint32)
            return out.view(np.float32)
    return np.ascontiguousarray(data, dtype=np.float32)
