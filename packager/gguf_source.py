"""A .gguf file as a source: its spec from metadata, and re-quantization.

Most users start from a GGUF someone else made. It is bundled as it is when it
fits the target; otherwise llama.cpp's quantizer re-quantizes it, from F32,
F16, BF16 or Q8_0 freely, from anything lower only when the user accepts the
loss of quality.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from packager.errors import ConversionError, CorruptFileError, UsageError, missing_backend
from packager.quants import QUANTS, QuantType
from packager.spec import ModelSpec

# Re-quantizing from these loses (almost) nothing.
HIGH_PRECISION = {"F32", "F16", "BF16", "Q8_0"}


def open_gguf(path: Path) -> gguf.GGUFReader:
    # GGUFReader trusts every count in the file (a lying array length makes it loop for
    # ages): the layout is checked against the file's size first (packager.gguf_layout).
    from packager.gguf_layout import check_layout

    check_layout(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{path}: not a readable GGUF file ({exc}); re-download it") from None


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, TypeError) as exc:  # e.g. a string that is not UTF-8
        raise CorruptFileError(f"{reader.data.filename}: field {key} is unreadable ({exc}); re-download the GGUF") from None


def _int(value, key: str, path: Path) -> int:
    """A metadata value that must be an integer (per-layer arrays count by their largest entry)."""
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = max(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorruptFileError(f"{path}: {key} must be an integer, got {value!r:.40}; the GGUF metadata is wrong")
    return value


def spec_from_gguf(path: Path) -> tuple[ModelSpec, str | None]:
    """The model's spec and its quant name (None when the file type is one edgepack does not list)."""
    r = open_gguf(path)
    arch = _field(r, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise CorruptFileError(f"{path}: no general.architecture; not a model GGUF")

    def hp(key: str, default=None) -> int:
        value = _field(r, key.format(arch=arch), default)
        if value is None:
            raise CorruptFileError(f"{path}: missing {key.format(arch=arch)}; the GGUF is incomplete")
        return _int(value, key.format(arch=arch), path)

    n_heads = hp(gguf.Keys.Attention.HEAD_COUNT)
    hidden = hp(gguf.Keys.LLM.EMBEDDING_LENGTH)
    if n_heads <= 0:
        raise CorruptFileError(f"{path}: {gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)} must be positive, got {n_heads}")
    tokens = r.fields.get(gguf.Keys.Tokenizer.LIST)
    names = {t.name for t in r.tensors}
    spec = ModelSpec(
        architecture=arch, model_type=arch, n_layers=int(hp(gguf.Keys.LLM.BLOCK_COUNT)), hidden_size=hidden,
        intermediate_size=int(hp(gguf.Keys.LLM.FEED_FORWARD_LENGTH)), n_heads=n_heads,
        n_kv_heads=int(hp(gguf.Keys.Attention.HEAD_COUNT_KV, n_heads)),
        head_dim=int(hp(gguf.Keys.Attention.KEY_LENGTH, hidden // n_heads)),
        vocab_size=int(hp(gguf.Keys.LLM.VOCAB_SIZE, len(tokens.data) if tokens else 0)),
        context_length=int(hp(gguf.Keys.LLM.CONTEXT_LENGTH, 2048)),
        tied_embeddings="output.weight" not in names,
        n_params=int(sum(int(t.n_elements) for t in r.tensors)),
    )
    ftype = _field(r, gguf.Keys.General.FILE_TYPE)
    quant = None
    if isinstance(ftype, int) and not isinstance(ftype, bool):
        for q in QUANTS.values():
            if int(q.ftype) == int(ftype):
                quant = q.name
    return spec, quant


def requantize(src: Path, src_quant: str | None, quant: QuantType, out: Path, *,
               allow_requantize: bool, n_threads: int) -> list[str]:
    """Re-quantize a GGUF with llama.cpp's quantizer; returns warnings for the user."""
    warnings = []
    if src_quant not in HIGH_PRECISION:
        if not allow_requantize:
            raise UsageError(
                f"{src.name} is already quantized ({src_quant or 'unknown type'}); re-quantizing it to {quant.name} "
                "loses quality: start from an F16/BF16/Q8_0 file or the HF checkpoint, or pass --allow-requantize"
            )
        warnings.append(f"re-quantizing {src_quant} to {quant.name}: quality will be worse than quantizing from F16")
    quantize_gguf(src, quant, out, n_threads=n_threads, allow_requantize=src_quant not in HIGH_PRECISION)
    return warnings


def quantize_gguf(src: Path, quant: QuantType, out: Path, *, n_threads: int,
                  imatrix: dict[str, np.ndarray] | None = None, allow_requantize: bool = False) -> None:
    """llama.cpp's quantizer (llama_model_quantize) on a GGUF, with an importance matrix if given."""
    try:
        import llama_cpp
    except ImportError:
        raise missing_backend("llama-cpp-python", "gguf") from None
    from packager.progress import quiet_llama_log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(quant.ftype)
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    keep: list[Any] = []  # the C side reads these during the call: keep them alive
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # ends with name == NULL
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            bname = name.encode()
            keep += [arr, bname]
            entries[i].name = bname
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    with quiet_llama_log():  # its loader dump and per-tensor lines are not for our users
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        _raise_if_out_of_space(out)
        raise ConversionError(f"llama.cpp's quantizer failed to make {quant.name} from {src} (code {rc}); "
                              "check that the file is a complete GGUF")


def _raise_if_out_of_space(out: Path) -> None:
    """Re-raise a full disk (or a file-size limit) as the OSError it is.

    llama.cpp's quantizer reports a failed write only as a non-zero code (its log
    says "iostream error"), which would read as a corrupt source. So the partial
    output, which is removed anyway, is grown by 1 MiB: where that fails for lack
    of space, the quantizer's write failed for the same reason, and the bundle
    writer turns the OSError into its "ran out of space" message.
    """
    try:
        with open(out, "ab") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
