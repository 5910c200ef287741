"""Per-tensor quant mixes from a high-precision GGUF: each tensor's error under each candidate type,
and the GGUF written with one type per tensor.

The error of a tensor W under a type is what the quantized weights change in its output,
weighted as llama.cpp's importance matrix weighs it: sum over rows and columns of
imatrix[j] * (W[i, j] - Q(W)[i, j])^2, where imatrix[j] is the mean square of input column j on
the calibration text. So it is the expected squared error of W @ x per token. Q(W) is quantized
and dequantized by ggml's own routines (kernels/ggml.py), with the same importance matrix the
file is quantized with. Rows quantize independently, so an evenly spaced sample of rows
(``sample_rows``) estimates the whole tensor's error; a 3B model's sensitivities take seconds.

The mix is written in one streaming pass from the reference GGUF (``write_mix``): every tensor is
read from the mapped file, quantized into its type and laid out by parts.py, so a mix's bytes are
those llama-quantize writes with the same types and importance matrix.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Collection, Mapping

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType

from packager import quants
from packager.convert.gguf.parts import HEADER_BYTES, GGUFParts, TensorInfo, plan_parts, split_record, tensor_table
from packager.convert.result import ConvertResult
from packager.errors import ConversionError
from packager.formats.gguf import GGUF_ALIGNMENT, padded
from packager.kernels import ggml
from packager.plan.mix import Option, TensorOptions
from packager.progress import progress_bar
from packager.source.gguf_check import check_layout

# The types a mix chooses from. Rows of a multiple of 256 take the k-quants (and IQ4_XS);
# rows of a multiple of 32 only take llama.cpp's own fallbacks for them (tensor_type_fallback).
# Q4_1 is left out, as llama.cpp's k-quant mixtures leave it out. A caution for anyone measuring on
# SmolLM2 (our only real weights): they were dequantized from Q4_1, whose grid Q5_1 contains, so
# Q5_1 can reproduce them (zero error measured on blk.0.ffn_gate) and flatters whatever uses it
# (uniform Q5_K_S/M use it as Q5_K's fallback). benchmarks/quality_mix.py reports mixes with and
# without Q5_1.
CANDIDATES_256 = (QT.Q2_K, QT.Q3_K, QT.IQ4_XS, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0)
CANDIDATES_32 = (QT.Q4_0, QT.IQ4_NL, QT.Q5_0, QT.Q5_1, QT.Q8_0)
SAMPLE_ROWS = 256
ROW_BLOCK_ELEMENTS = 8 << 20  # write_mix quantizes about 32 MB of f32 at a time

__all__ = ["CANDIDATES_256", "CANDIDATES_32", "ReferenceFile", "candidate_types", "open_reference", "tensor_options",
           "write_mix"]


def candidate_types(n_per_row: int) -> tuple[QT, ...]:
    """The types a mix may give a tensor whose rows hold ``n_per_row`` weights."""
    if n_per_row % 256 == 0:
        return CANDIDATES_256
    if n_per_row % 32 == 0:
        return CANDIDATES_32
    return ()


@dataclass
class ReferenceFile:
    """A high-precision GGUF, parsed once (a 150k-token vocabulary takes gguf-py seconds to parse): its
    packed keys, tensor table and mapped data, shared by the sensitivity pass and every mix written."""

    path: Path
    kv_block: bytes
    n_kv: int
    tensors: list[TensorInfo]  # numpy-order shapes, file order
    offsets: list[int]  # each tensor's data in ``data``
    data: np.memmap
    file_type_at: tuple[int, np.dtype] | None  # where general.file_type's value sits in kv_block

    @cached_property
    def index(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.tensors)}

    @property
    def overhead(self) -> int:
        """Bytes besides the tensors' padded data (header, keys, tensor table, padding): the same for every
        mix of this reference, since a table entry's size does not depend on its type."""
        return padded(HEADER_BYTES + len(self.kv_block) + len(tensor_table(self.tensors)))

    def rows(self, t: TensorInfo, lo: int, hi: int) -> np.ndarray:
        """Rows lo:hi of a float tensor as float32."""
        return self.take(t, slice(lo, hi))

    def take(self, t: TensorInfo, which) -> np.ndarray:
        """Rows of a float tensor (a slice or an index array) as float32; only those rows are read."""
        ncols = int(t.shape[-1]) if t.shape else 1
        dtype = {QT.F32: np.float32, QT.F16: np.float16, QT.BF16: np.uint16}[QT(t.ggml_type)]
        off = self.offsets[self.index[t.name]]
        rows = self.data[off:off + t.nbytes].view(dtype).reshape(-1, ncols)[which]
        if t.ggml_type == QT.BF16:
            return ggml.bf16_to_f32(np.ascontiguousarray(rows))
        return np.asarray(rows, dtype=np.float32)


def open_reference(path: Path) -> ReferenceFile:
    """Parse ``path`` once; it must hold only F32/F16/BF16 tensors (a mix is quantized from high precision)."""
    layout = check_layout(path)  # edgepack's own header walk: no GGUFReader decoding the whole vocabulary
    if layout.alignment != GGUF_ALIGNMENT:
        raise ConversionError(f"{path.name}: alignment {layout.alignment}, not llama.cpp's default {GGUF_ALIGNMENT}; "
                              f"convert it again with llama.cpp's converter or edgepack")
    bad = next((t for t in layout.tensors if t.type not in (QT.F32, QT.F16, QT.BF16)), None)
    if bad is not None:
        raise ConversionError(f"{path.name}: {bad.name} is {QT(bad.type).name}; a mix is quantized from an "
                              f"F32/F16/BF16 GGUF: give the F16 file or the checkpoint")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    kv_block = bytes(data[HEADER_BYTES:layout.table_offset])
    tensors = [TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape)), t.type, t.nbytes) for t in layout.tensors]
    return ReferenceFile(path, kv_block, layout.n_kv, tensors, [t.offset for t in layout.tensors], data,
                         _file_type_offset(kv_block))


def _file_type_offset(kv_block: bytes) -> tuple[int, np.dtype] | None:
    """Where general.file_type's value is in the packed keys (a uint32 right after the key and its type)."""
    key = b"general.file_type"
    needle = struct.pack("<Q", len(key)) + key + struct.pack("<I", GGUFValueType.UINT32)
    at = kv_block.find(needle)
    return None if at < 0 else (at + len(needle), np.dtype("<u4"))


def tensor_options(ref: ReferenceFile, imatrix: Mapping[str, np.ndarray] | None, *, n_threads: int = 1,
                   sample_rows: int = SAMPLE_ROWS, quiet: bool = False,
                   exclude: Collection[str] = ()) -> tuple[list[TensorOptions], dict[str, QT]]:
    """Every quantizable tensor's candidate types (less ``exclude``) with their bytes and importance-weighted
    error; and the types of the tensors a mix keeps as they are (norms stay F32, as llama-quantize keeps them)."""
    out: list[TensorOptions] = []
    kept: dict[str, QT] = {}
    work = []
    for t in ref.tensors:
        if quants.quantizable(t.name, t.shape) and candidate_types(int(t.shape[-1])):
            work.append(t)
        else:
            kept[t.name] = QT(t.ggml_type)
    with progress_bar(total=len(work), desc="measuring tensor sensitivity", unit="tensor", quiet=quiet) as bar:
        for t in work:
            nrows, ncols = int(np.prod(t.shape[:-1])), int(t.shape[-1])
            idx = np.unique(np.linspace(0, nrows - 1, min(nrows, sample_rows)).round().astype(np.int64))
            sample = ref.take(t, idx)
            im = imatrix.get(t.name) if imatrix else None
            weight = np.asarray(im, dtype=np.float64) if im is not None else np.ones(ncols)
            scale = nrows / len(idx)
            options = []
            for q in (q for q in candidate_types(ncols) if q.name not in exclude):
                data = ggml.quantize_rows(q, sample, imatrix=im, n_threads=n_threads)
                back = ggml.dequantize_rows(q, data, ncols, n_threads=n_threads)
                err = float((np.square((back - sample).astype(np.float64)) @ weight).sum() * scale)
                options.append(Option(q.name, padded(quants.tensor_bytes(q, t.shape)), err))
            power = float((np.square(sample.astype(np.float64)) @ weight).sum() * scale)
            out.append(TensorOptions(t.name, quants.category(t.name), tuple(options), power))
            bar.update(1)
    return out, kept


def write_mix(ref: ReferenceFile, types: Mapping[str, QT], out_path: Path, *, file_type: int,
              imatrix: Mapping[str, np.ndarray] | None = None, n_threads: int = 1, part_bytes: int | None = None,
              quiet: bool = False, desc: str = "writing the mix") -> ConvertResult:
    """Write the reference with each tensor in ``types[name]`` (others as they are) to ``out_path``, or to
    llama.cpp's split parts beside it when the file would exceed ``part_bytes``."""
    kv_block = bytearray(ref.kv_block)
    if ref.file_type_at is not None:  # the same 4 bytes, rewritten in place
        at, dtype = ref.file_type_at
        kv_block[at:at + dtype.itemsize] = np.asarray([file_type], dtype=dtype).tobytes()
    new = [TensorInfo(t.name, t.shape, int(types.get(t.name, QT(t.ggml_type))),
                      quants.tensor_bytes(types.get(t.name, QT(t.ggml_type)), t.shape)) for t in ref.tensors]
    layout = plan_parts(bytes(kv_block), new, part_bytes)
    out = GGUFParts(out_path, bytes(kv_block), ref.n_kv, new, layout)
    try:
        with progress_bar(total=sum(t.nbytes for t in new), desc=desc, unit="B", quiet=quiet) as bar:
            for src, dst, off in zip(ref.tensors, new, ref.offsets):
                if dst.ggml_type == src.ggml_type:
                    out.write(dst.name, ref.data[off:off + src.nbytes])
                    bar.update(dst.nbytes)
                    continue
                ncols = int(src.shape[-1])
                nrows = int(np.prod(src.shape[:-1]))
                step = max(1, ROW_BLOCK_ELEMENTS // ncols)
                im = imatrix.get(dst.name) if imatrix else None
                for lo in range(0, nrows, step):
                    block = ref.rows(src, lo, min(nrows, lo + step))
                    q = ggml.quantize_rows(QT(dst.ggml_type), block, imatrix=im, n_threads=n_threads)
                    out.write(dst.name, q)
                    bar.update(q.nbytes)
        out.close()
    except BaseException:
        out.discard()
        raise
    counts: dict[str, int] = {}
    for t in new:
        name = QT(t.ggml_type).name
        counts[name] = counts.get(name, 0) + 1
    details: dict = {"n_tensors": len(new), "tensor_types": dict(sorted(counts.items()))}
    if layout is not None:
        details["split"] = split_record(layout, out.paths)
    return ConvertResult(out.paths[0], sum(t.nbytes for t in new), {}, sha256=out.sha256[out.paths[0]],
                         files=out.paths, details=details, file_sha256={p.name: out.sha256[p] for p in out.paths})
