"""Hugging Face checkpoint -> GGUF in one streaming pass.

Tensors are read one at a time from memory-mapped safetensors, widened to f32 a
block of rows at a time, quantized by ggml's own routines (kernels/ggml.py) into
the type llama.cpp's quantizer would choose for that tensor (packager.quants),
and written straight to the output: no F16 intermediate file, and memory that
does not grow with the model. Metadata is written with gguf-py's GGUFWriter.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from packager import archs, quants
from packager.convert.gguf.imatrix import check_imatrix
from packager.convert.gguf.vocab import load_vocab
from packager.convert.result import ConvertResult
from packager.errors import ConversionError
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
                hasher: FileHasher) -> np.ndarray:
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
    return np.ascontiguousarray(data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(1, -1))


def _blocks(ckpt, jobs, cfg, generated, hasher) -> Iterator[tuple[TensorJob, np.ndarray]]:
    """Each tensor's row blocks in order, the next one read (and hashed) while the current is quantized."""
    work = [(job, block) for job in jobs for block in _row_blocks(job)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgepack-read") as pool:
        pending = pool.submit(_load_block, ckpt, *work[0], cfg, generated, hasher) if work else None
        for i, (job, _block) in enumerate(work):
            data = pending.result()
            if i + 1 < len(work):
                pending = pool.submit(_load_block, ckpt, *work[i + 1], cfg, generated, hasher)
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


class _Writer(gguf.GGUFWriter):
    """A GGUFWriter that can write a KV block packed earlier instead of packing it again.

    The vocab-only GGUF of the tokenizer gate has exactly the model file's keys;
    packing a 150k-token vocabulary takes seconds, so the model file reuses them.
    """

    packed_kv: bytes | None = None

    def write_kv_data_to_file(self) -> None:
        if self.packed_kv is None or len(self.fout or ()) != 1:
            return super().write_kv_data_to_file()
        if self.state is not WriterState.HEADER:
            raise ValueError(f"Expected output file to contain the header, got {self.state}")
        self.fout[0].write(self.packed_kv)
        self.flush()
        self.state = WriterState.KV_DATA


def packed_kv(vocab_gguf: Path) -> bytes:
    """The KV block of a file written by write_vocab_gguf (everything after its 24-byte header)."""
    data = Path(vocab_gguf).read_bytes()
    if data[:4] != b"GGUF" or int.from_bytes(data[8:16], "little") != 0:
        raise ValueError(f"{vocab_gguf} is not a vocab-only GGUF")
    return data[24:]


def _metadata_writer(path: Path, source: Source, cfg: dict, quant: quants.QuantType, vocab) -> _Writer:
    """A GGUFWriter holding every key the model file will have, no tensors yet."""
    spec = spec_from_config(cfg)
    arch = archs.arch_for(spec.architecture)
    w = _Writer(path, arch.name)
    write_general_metadata(w, source, spec.n_params)
    archs.write_hparams(arch, cfg, w)
    w.add_file_type(int(quant.ftype))
    vocab.write(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w


def write_vocab_gguf(source: Source, quant: quants.QuantType, path: Path, vocab=None) -> Path:
    """The model file's metadata without its tensors: enough for llama.cpp to load its tokenizer.

    The tokenizer gate runs on this before the (long) conversion, so a tokenizer
    llama.cpp would get wrong is refused in seconds, not after minutes.
    """
    w = _metadata_writer(path, source, read_config(source.path), quant, vocab or load_vocab(source.path))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
    finally:
        w.close()
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
) -> ConvertResult:
    """Convert an HF checkpoint directory to one GGUF file at ``out_path``.

    ``vocab`` (from load_vocab) and ``kv_block`` (packed_kv of the write_vocab_gguf
    file made from the same source and quant) save reading and packing them again.
    """
    cfg = read_config(source.path)
    spec = spec_from_config(cfg)
    arch = archs.arch_for(spec.architecture)
    vocab = vocab or load_vocab(source.path)  # before any writing: a bad tokenizer fails fast
    ckpt = Checkpoint.open(source.path)
    jobs, generated = plan_tensors(ckpt, cfg, arch, quant, has_imatrix=imatrix is not None)
    n_threads = n_threads or default_threads()
    if imatrix is not None:
        check_imatrix(imatrix, {job.name: job.shape for job in jobs}, "imatrix")

    w = _metadata_writer(out_path, source, cfg, quant, vocab)
    w.packed_kv = kv_block

    sizes = {job.name: quants.tensor_bytes(job.qtype, job.shape) for job in jobs}
    for job in jobs:
        w.add_tensor_info(job.name, job.shape, np.dtype(np.float32), sizes[job.name], raw_dtype=job.qtype)
    total = sum(sizes.values())
    hasher = FileHasher(ckpt)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        fout.flush()
        # The output's sha256, computed as it is written: the bundle need not read it back.
        out_hash = hashlib.sha256(Path(out_path).read_bytes()[: fout.tell()])
        align = w.data_alignment

        def emit(data: bytes | np.ndarray) -> None:
            out_hash.update(data)
            fout.write(data)

        written: dict[str, int] = {}
        with progress_bar(total=total, desc=f"converting to {quant.name}", unit="B", quiet=quiet) as bar:
            for job, rows in _blocks(ckpt, jobs, cfg, generated, hasher):
                if job.name not in written:
                    emit(bytes(-fout.tell() % align))
                    written[job.name] = 0
                im = imatrix.get(job.name) if imatrix else None
                data = ggml.quantize_rows(job.qtype, rows, imatrix=im, n_threads=n_threads)
                emit(data)
                written[job.name] += data.nbytes
                if written[job.name] == sizes[job.name]:
                    emit(bytes(-sizes[job.name] % align))
                bar.update(data.nbytes)
        for job in jobs:
            if written.get(job.name) != sizes[job.name]:
                raise ConversionError(
                    f"{job.name}: wrote {written.get(job.name)} bytes, expected {sizes[job.name]}; this is a bug, please report it"
                )
        fout.flush()
        os.fsync(fout.fileno())
        sha256s = {str(path.relative_to(source.path)): digest for path, digest in hasher.digests().items()}
    finally:
        w.close()
        ckpt.close()
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.qtype.name] = counts.get(job.qtype.name, 0) + 1
    return ConvertResult(out_path, total, sha256s, sha256=out_hash.hexdigest(), files=[out_path],
                         details={"n_tensors": len(jobs), "tensor_types": counts})
