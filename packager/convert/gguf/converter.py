"""Hugging Face checkpoint -> GGUF in one streaming pass.

Tensors are read one at a time from memory-mapped safetensors, widened to f32 a
block of rows at a time, quantized by ggml's own routines (kernels/ggml.py) into
the type llama.cpp's quantizer would choose for that tensor (packager.quants),
and written straight to the output: no F16 intermediate file, and memory that
does not grow with the model. Metadata keys are packed by gguf-py's GGUFWriter; the
file (or llama.cpp's split parts, for a store's part size) is laid out by parts.py.
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from packager import archs, quants
from packager.convert.gguf.imatrix import check_imatrix
from packager.convert.gguf.parts import GGUFParts, TensorInfo, plan_parts, split_record
from packager.convert.gguf.vocab import load_vocab
from packager.convert.result import ConvertResult
from packager.host import default_threads
from packager.kernels import ggml
from packager.progress import progress_bar
from packager.source.resolver import Source
from packager.source.safetensors import Checkpoint, FileHasher, row_blocks
from packager.spec.model import read_config, spec_from_config
from packager.spec.tensors import TensorJob, plan_tensors

CHUNK_ELEMENTS = 8 << 20  # rows are quantized in blocks of about 32 MB of f32
def _permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    # HF interleaves each head's rotary halves; llama.cpp expects them contiguous.
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _row_blocks(job: TensorJob) -> list[slice]:
    if job.transform:  # permutations move rows across the whole tensor: take it whole
        return [slice(0, job.shape[0] if len(job.shape) > 1 else 1)]
    return [slice(lo, hi) for lo, hi in row_blocks(job.shape, CHUNK_ELEMENTS)]


def _load_block(ckpt: Checkpoint, job: TensorJob, block: slice, cfg: dict, generated: dict,
                hasher: FileHasher, arch: archs.Arch) -> np.ndarray:
    if job.src is None:
        data = generated[job.name].astype(np.float32)
    else:
        data = ckpt.read_rows(job.src, block.start, block.stop, hasher)
    if job.transform == "permute_q":
        data = _permute_rows(data, int(cfg["num_attention_heads"]))
    elif job.transform == "permute_k":
        data = _permute_rows(data, int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    elif job.transform == "norm_offset":
        data = data + np.float32(1.0)
    elif job.transform == "arch":
        data = arch.tensor_transform(cfg, job.name)(data)
    return np.ascontiguousarray(data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(1, -1))


def _blocks(ckpt, jobs, cfg, generated, hasher, arch) -> Iterator[tuple[TensorJob, np.ndarray]]:
    """Each tensor's row blocks in order, the next one read (and hashed) while the current is quantized."""
    work = [(job, block) for job in jobs for block in _row_blocks(job)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgepack-read") as pool:
        pending = pool.submit(_load_block, ckpt, *work[0], cfg, generated, hasher, arch) if work else None
        for i, (job, _block) in enumerate(work):
            data = pending.result()
            if i + 1 < len(work):
                pending = pool.submit(_load_block, ckpt, *work[i + 1], cfg, generated, hasher, arch)
            yield job, data


def write_general_metadata(w: gguf.GGUFWriter, source: Source, n_params: int) -> None:
    """general.*: name, size label, license and where the weights came from."""
    meta = gguf.Metadata.load(None, source.path, source.name, n_params)
    from_name = gguf.Metadata.load(None, None, source.name, n_params)  # the dir may be a hub snapshot hash
    for field in ("name", "basename", "finetune", "version", "size_label"):
        setattr(meta, field, getattr(from_name, field))
    meta.size_label = meta.size_label or gguf.size_label(n_params, 0, 0, 0)
    if source.repo:
        meta.source_url = f"https://huggingface.co/{source.repo}"
        meta.source_repo_url = meta.source_url
    meta.set_gguf_meta_model(w)
    if source.revision:
        w.add_string("general.source.revision", source.revision)


_U64 = struct.Struct("<Q")
# numpy dtypes of the array item types packed in bulk (gguf-py packs each item with struct: seconds
# for a 150k-token vocabulary, on every pack's tokenizer gate)
_ARRAY_DTYPES = {
    gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1", gguf.GGUFValueType.UINT16: "<u2",
    gguf.GGUFValueType.INT16: "<i2", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
    gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.UINT64: "<u8", gguf.GGUFValueType.INT64: "<i8",
    gguf.GGUFValueType.FLOAT64: "<f8", gguf.GGUFValueType.BOOL: "?",
}
# the item type gguf-py's GGUFValueType.get_type infers for an array without sub_type, where every item has it
_INFERRED = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32,
             bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.INT32}


def _pack_array(val, sub_type) -> bytes | None:
    """A homogeneous array packed as GGUFWriter._pack_val packs it, in bulk; None where only it knows how."""
    if not isinstance(val, (list, tuple)) or not val:
        return None
    if sub_type is None:
        kinds = set(map(type, val))
        sub_type = _INFERRED.get(kinds.pop()) if len(kinds) == 1 else None
        if sub_type is None:  # mixed, nested or bytes items: gguf-py's own checks and errors
            return None
    head = struct.pack("<IQ", int(sub_type), len(val))
    if sub_type == gguf.GGUFValueType.STRING and all(isinstance(v, str) for v in val):
        encoded = [v.encode("utf-8") for v in val]
        return head + b"".join([_U64.pack(len(e)) + e for e in encoded])
    dtype = np.dtype(_ARRAY_DTYPES.get(sub_type, "O"))
    if dtype.kind == "O" or not all(isinstance(v, (int, float)) for v in val):
        return None
    arr = np.asarray(val)
    if dtype.kind in "iu":  # struct refuses an int out of range, numpy would wrap it: let gguf-py say so
        info = np.iinfo(dtype)
        if arr.dtype.kind not in "iub" or arr.min() < info.min or arr.max() > info.max:
            return None
    # floats round to nearest float32 as struct's "f" does (a C cast), bools pack 0/1 as "?" does
    packed = arr.astype(dtype)
    if dtype.kind == "f" and np.isinf(packed).sum() != np.isinf(arr).sum():  # struct refuses the overflow
        return None
    return head + packed.tobytes()


def _pack_kv(w: gguf.GGUFWriter) -> bytes:
    """The writer's keys packed byte for byte as GGUFWriter.write_kv_data_to_file packs them."""
    out = bytearray()
    for key, val in w.kv_data[0].items():
        out += w._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False)
        packed = _pack_array(val.value, val.sub_type) if val.type == gguf.GGUFValueType.ARRAY else None
        if packed is None:
            packed = w._pack_val(val.value, val.type, add_vtype=False, sub_type=val.sub_type)
        out += struct.pack("<I", int(val.type)) + packed
    return bytes(out)


def packed_kv(vocab_gguf: Path) -> bytes:
    """The KV block of a file written by write_vocab_gguf (everything after its 24-byte header)."""
    data = Path(vocab_gguf).read_bytes()
    if data[:4] != b"GGUF" or int.from_bytes(data[8:16], "little") != 0:
        raise ValueError(f"{vocab_gguf} is not a vocab-only GGUF")
    return data[24:]


def _metadata_writer(path: Path, source: Source, cfg: dict, quant: quants.QuantType, vocab) -> gguf.GGUFWriter:
    """A GGUFWriter holding every key the model file will have, no tensors yet."""
    spec = spec_from_config(cfg)
    arch = archs.arch_for(spec.architecture)
    w = gguf.GGUFWriter(path, arch.name)
    write_general_metadata(w, source, spec.n_params)
    archs.write_hparams(arch, cfg, w)
    w.add_file_type(int(quant.ftype))
    if arch.after_file_type:
        arch.after_file_type(archs.text_config(cfg), w)
    vocab.write(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w


def write_vocab_gguf(source: Source, quant: quants.QuantType, path: Path, vocab=None) -> Path:
    """The model file's metadata without its tensors: enough for llama.cpp to load its tokenizer.

    The tokenizer gate runs on this before the (long) conversion, so a tokenizer
    llama.cpp would get wrong is refused in seconds, not after minutes.
    """
    w = _metadata_writer(path, source, read_config(source.path), quant, vocab or load_vocab(source.path))
    header = struct.pack("<IIQQ", gguf.GGUF_MAGIC, gguf.GGUF_VERSION, 0, len(w.kv_data[0]))
    Path(path).write_bytes(header + _pack_kv(w))  # GGUFWriter's header and KV block, packed in bulk
    return path


def convert(
    source: Source,
    quant: quants.QuantType,
    out_path: Path,
    *,
    imatrix: dict[str, np.ndarray] | None = None,
    n_threads: int | None = None,
    quiet: bool = False,
    vocab=None,
    kv_block: bytes | None = None,
    part_bytes: int | None = None,
) -> ConvertResult:
    """Convert an HF checkpoint directory to one GGUF file at ``out_path``, or to parts beside it.

    ``vocab`` (from load_vocab) and ``kv_block`` (packed_kv of the write_vocab_gguf
    file made from the same source and quant) save reading and packing them again.
    With ``part_bytes``, a model whose file would be larger is written as llama.cpp's split
    GGUF (out_path's stem-00001-of-0000N.gguf, ...), no file over ``part_bytes``: the result's
    path is the first part, which llama.cpp loads.
    """
    cfg = archs.text_config(read_config(source.path))
    spec = spec_from_config(cfg)
    arch = archs.arch_for(spec.architecture)
    vocab = vocab or load_vocab(source.path)  # before any writing: a bad tokenizer fails fast
    ckpt = Checkpoint.open(source.path)
    jobs, generated = plan_tensors(ckpt, cfg, arch, quant, has_imatrix=imatrix is not None, n_vocab=vocab.n_vocab)
    n_threads = n_threads or default_threads()
    if imatrix is not None:
        check_imatrix(imatrix, {job.name: job.shape for job in jobs}, "imatrix")

    w = _metadata_writer(out_path, source, cfg, quant, vocab)
    kv_block = kv_block if kv_block is not None else _pack_kv(w)
    tensors = [TensorInfo(job.name, tuple(job.shape), int(job.qtype), quants.tensor_bytes(job.qtype, job.shape))
               for job in jobs]
    layout = plan_parts(kv_block, tensors, part_bytes)
    out = GGUFParts(out_path, kv_block, len(w.kv_data[0]), tensors, layout)
    total = sum(t.nbytes for t in tensors)
    hasher = FileHasher(ckpt)
    desc = f"converting to {quant.name}" + (f" ({len(layout.parts)} parts)" if layout else "")
    try:
        with progress_bar(total=total, desc=desc, unit="B", quiet=quiet) as bar:
            for job, rows in _blocks(ckpt, jobs, cfg, generated, hasher, arch):
                im = imatrix.get(job.name) if imatrix else None
                data = ggml.quantize_rows(job.qtype, rows, imatrix=im, n_threads=n_threads)
                out.write(job.name, data)
                bar.update(data.nbytes)
        out.close()  # checks that every tensor was written in full
        sha256s = {str(path.relative_to(source.path)): digest for path, digest in hasher.digests().items()}
    except BaseException:
        out.abort()
        raise
    finally:
        ckpt.close()
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.qtype.name] = counts.get(job.qtype.name, 0) + 1
    details = {"n_tensors": len(jobs), "tensor_types": counts}
    if layout is not None:
        details["split"] = split_record(layout, out.paths)
    return ConvertResult(out.paths[0], total, sha256s, sha256=out.sha256[out.paths[0]], files=out.paths,
                         details=details, file_sha256={p.name: out.sha256[p] for p in out.paths})
