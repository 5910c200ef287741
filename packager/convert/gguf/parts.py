"""GGUF files written tensor by tensor: one file, or llama.cpp's split parts.

The converter streams quantized rows here in file order; each file is hashed as it is
written, so a bundle never reads its weights back. Split parts are laid out exactly as
llama.cpp's ``llama-gguf-split --split`` lays them out from the whole file (the first part
holds every metadata key, each part ends with split.no, split.tensors.count and split.count,
tensor data is padded to 32 bytes), so any llama.cpp build loads them from the first part
and the parts are byte-identical to the tool's (tests/test_split.py checks both).
:func:`split_gguf` splits a GGUF that exists already (a bundled or re-quantized source) the same way.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
from gguf import GGUF_MAGIC, GGUF_VERSION, GGUFValueType, Keys

from packager.errors import ConversionError, CorruptFileError
from packager.formats.gguf import GGUF_ALIGNMENT, SplitLayout, padded, split_layout
from packager.progress import progress_bar
from packager.spec.gguf import open_gguf

HEADER_BYTES = 24  # magic, version, tensor count, key count
COPY_BYTES = 64 << 20  # split_gguf copies tensor data in pieces of this size


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a GGUF's table: numpy-order shape, ggml type, data bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    nbytes: int


def part_paths(path: Path, n_parts: int) -> list[Path]:
    """llama.cpp's names for the parts of ``path`` (llama_split_path): stem-00001-of-0000N.gguf."""
    if n_parts == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1:05d}-of-{n_parts:05d}.gguf") for i in range(n_parts)]


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _split_keys(i: int, n_parts: int, n_tensors: int) -> bytes:
    # In gguf-split's order: it sets split.count last (once the parts are counted), and
    # gguf_set_val moves a key it replaces to the end.
    return (_string(Keys.Split.LLM_KV_SPLIT_NO) + struct.pack("<IH", GGUFValueType.UINT16, i)
            + _string(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT) + struct.pack("<Ii", GGUFValueType.INT32, n_tensors)
            + _string(Keys.Split.LLM_KV_SPLIT_COUNT) + struct.pack("<IH", GGUFValueType.UINT16, n_parts))


def tensor_table(tensors: Sequence[TensorInfo]) -> bytes:
    out = bytearray()
    offset = 0
    for t in tensors:
        # ggml's n_dims (ggml_n_dims): trailing size-1 ggml dimensions are not written, as gguf-split writes them.
        ne = list(reversed(t.shape)) or [1]
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        out += _string(t.name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", t.ggml_type, offset)
        offset += padded(t.nbytes)
    return bytes(out)


def meta_bytes(kv_block: bytes, tensors: Sequence[TensorInfo]) -> int:
    """An upper bound of the first part's metadata: header, every key and split key, every tensor's entry, padding."""
    return HEADER_BYTES + len(kv_block) + len(_split_keys(0, 1, 0)) + len(tensor_table(tensors)) + GGUF_ALIGNMENT


def plan_parts(kv_block: bytes, tensors: Sequence[TensorInfo], part_bytes: int | None) -> SplitLayout | None:
    """The split layout for files of at most ``part_bytes``, or None where one file fits (or no limit)."""
    if not part_bytes:
        return None
    whole = padded(HEADER_BYTES + len(kv_block) + len(tensor_table(tensors))) + sum(padded(t.nbytes) for t in tensors)
    if whole <= part_bytes:
        return None
    return split_layout([(t.name, t.nbytes) for t in tensors], part_bytes, meta_bytes(kv_block, tensors))


class GGUFParts:
    """Write a GGUF, whole or in parts, as its tensors' bytes arrive in file order.

    ``kv_block`` is the packed metadata (every key, as GGUFWriter packs it) and ``n_kv`` its key
    count. Call :meth:`write` with each tensor's bytes in order (a tensor may come in several
    pieces), then :meth:`close`; ``sha256`` then maps each file to its digest.
    """

    def __init__(self, path: Path, kv_block: bytes, n_kv: int, tensors: Sequence[TensorInfo],
                 layout: SplitLayout | None = None) -> None:
        self.tensors = list(tensors)
        by_name = {t.name: t for t in self.tensors}
        names = layout.parts if layout else (tuple(by_name),)
        self.parts = [[by_name[n] for n in part] for part in names]
        self.paths = part_paths(Path(path), len(self.parts))
        self.kv_block, self.n_kv = kv_block, n_kv
        self.sha256: dict[Path, str] = {}
        self._order = [(i, t) for i, part in enumerate(self.parts) for t in part]
        self._next = 0  # index in _order of the tensor being written
        self._written = 0  # its bytes so far
        self._part = -1
        self._out: BinaryIO | None = None
        self._hash = hashlib.sha256()

    def _emit(self, data: bytes | np.ndarray) -> None:
        assert self._out is not None
        self._hash.update(data)
        self._out.write(data)

    def _open_part(self, i: int) -> None:
        self._finish_part()
        self._part = i
        n = len(self.parts)
        split = n > 1
        kv = self.kv_block if i == 0 else b""
        n_kv = (self.n_kv if i == 0 else 0) + (3 if split else 0)
        self._out = open(self.paths[i], "wb")
        self._hash = hashlib.sha256()
        self._emit(struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self.parts[i]), n_kv))
        self._emit(kv + (_split_keys(i, n, len(self.tensors)) if split else b""))
        self._emit(tensor_table(self.parts[i]))
        self._emit(bytes(-self._out.tell() % GGUF_ALIGNMENT))

    def _finish_part(self) -> None:
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self.sha256[self.paths[self._part]] = self._hash.hexdigest()
            self._out = None

    def write(self, name: str, data: bytes | np.ndarray) -> None:
        """Append ``data`` to tensor ``name``: the tensor being written, or the next one in file order."""
        if self._next >= len(self._order):
            raise ConversionError(f"{name}: written after the last tensor; this is a bug, please report it")
        part, t = self._order[self._next]
        n = memoryview(data).nbytes
        if t.name != name or self._written + n > t.nbytes:
            raise ConversionError(f"{name}: bytes arrived out of order (expected {t.name}, "
                                  f"{t.nbytes - self._written} bytes left); this is a bug, please report it")
        if part != self._part:
            self._open_part(part)
        self._emit(data)
        self._written += n
        if self._written == t.nbytes:
            self._emit(bytes(padded(t.nbytes) - t.nbytes))
            self._next += 1
            self._written = 0

    def close(self) -> None:
        """Finish the last file; every tensor must have been written in full."""
        if self._next < len(self._order):
            part, t = self._order[self._next]
            self.abort()
            raise ConversionError(f"{t.name}: wrote {self._written} of {t.nbytes} bytes; this is a bug, please report it")
        if not self._order:  # a model without tensors still gets its one file
            self._open_part(0)
        self._finish_part()

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def discard(self) -> None:
        """Abort and remove every file written so far: a failed or interrupted write leaves nothing."""
        self.abort()
        for p in self.paths:
            p.unlink(missing_ok=True)


def split_record(layout: SplitLayout, paths: Sequence[Path]) -> dict[str, object]:
    """The manifest's record of a split: what each part holds and how llama.cpp's tool would make the same."""
    return {"parts": [p.name for p in paths], "part_bytes": layout.part_bytes,
            "max_tensor_bytes": layout.max_tensor_bytes, "tensors_per_part": [len(p) for p in layout.parts],
            "gguf_split": layout.gguf_split_command,
            "load": "llama.cpp loads the first part; the others must sit beside it under these names"}


def split_gguf(src: Path, dst: Path, part_bytes: int, *, quiet: bool = False) -> tuple[GGUFParts, SplitLayout] | None:
    """Write ``src`` (one GGUF file) as parts named after ``dst``; None where it fits one part.

    The tensor data is copied piece by piece from the mapped file: memory stays flat.
    """
    kv_block, n_kv, tensors, offsets, data = read_table(src)
    layout = plan_parts(kv_block, tensors, part_bytes)
    if layout is None:
        return None
    out = GGUFParts(dst, kv_block, n_kv, tensors, layout)
    try:
        with progress_bar(total=sum(t.nbytes for t in tensors), desc=f"splitting into {len(layout.parts)} parts",
                          unit="B", quiet=quiet) as bar:
            for t, off in zip(tensors, offsets):
                for lo in range(0, t.nbytes, COPY_BYTES):
                    piece = data[off + lo: off + min(t.nbytes, lo + COPY_BYTES)]
                    out.write(t.name, piece)
                    bar.update(len(piece))
        out.close()
    except BaseException:
        out.discard()
        raise
    finally:
        del data  # unmaps src: the caller may remove it (Windows refuses to remove a mapped file)
    return out, layout


def read_table(path: Path) -> tuple[bytes, int, list[TensorInfo], list[int], np.memmap]:
    """A GGUF's packed metadata, key count, tensor table and data offsets (its data mapped, nothing copied)."""
    reader = open_gguf(path)
    if reader.alignment != GGUF_ALIGNMENT:
        raise CorruptFileError(f"{path}: alignment {reader.alignment}, not llama.cpp's default {GGUF_ALIGNMENT}: "
                               "it cannot be split as llama.cpp splits; pass --no-split")
    if any(k.startswith("split.") for k in reader.fields):
        raise CorruptFileError(f"{path} is already a part of a split GGUF; join the parts first (llama-gguf-split --merge)")
    if not reader.tensors:
        raise CorruptFileError(f"{path} has no tensors; not a model GGUF")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    kv_block = bytes(data[HEADER_BYTES:reader.table_offset])  # the tensor table starts where the keys end
    tensors = [TensorInfo(t.name, tuple(reversed(t.shape)), t.type, t.nbytes) for t in reader.tensors]
    return kv_block, reader.n_kv, tensors, [t.offset for t in reader.tensors], data
