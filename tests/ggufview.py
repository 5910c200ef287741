"""GGUF files as the tests compare them: metadata and tensors read by edgepack's header walk.

gguf-py's GGUFReader builds numpy views for every string of a vocabulary (15-30 s for a file with
Qwen's or Llama-3's 150k tokens and their merges, each time a test opens one); the walk in
packager.source.gguf_check takes a tenth of a second. test_hostile_sources holds the two readers
equal (every value, every tensor's type, shape and bytes) on a real GGUF, so comparing our file
with llama.cpp's converter's through the walk is comparing them as gguf-py sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from packager.source.gguf_check import check_layout

# element types GGUFReader hands out as numbers; every other type comes as uint8 rows of its blocks
_NUMERIC = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
            gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
            gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
            gguf.GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class Tensor:
    """A tensor with GGUFReader's ReaderTensor attributes that the tests use."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml's ne (columns first), as GGUFReader's
    n_bytes: int
    n_elements: int
    data: np.ndarray  # numbers for F32/F16/ints, uint8 block rows otherwise, in numpy order


def fields(path: Path, skip: tuple[str, ...] = ()) -> dict[str, object]:
    """Every metadata key's value (decoded as GGUFReader's contents()), but those starting with ``skip``."""
    return {k: f.contents() for k, f in check_layout(path).fields.items() if not k.startswith(skip)}


def tensors(path: Path) -> dict[str, Tensor]:
    """Each tensor by name, its data mapped read-only from the file."""
    layout = check_layout(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for t in layout.tensors:
        qtype = gguf.GGMLQuantizationType(t.type)
        raw = mm[t.offset:t.offset + t.nbytes]
        dims = tuple(reversed(t.shape))
        if qtype in _NUMERIC:
            data = raw.view(_NUMERIC[qtype]).reshape(dims)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = raw.reshape(*dims[:-1], dims[-1] // block * size)
        out[t.name] = Tensor(t.name, qtype, t.shape, t.nbytes, t.n_elements, data)
    return out
