"""Re-quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize).

Most users start from a GGUF someone else made. It is bundled as it is when it
fits the target; otherwise it is re-quantized, from F32, F16, BF16 or Q8_0
freely, from anything lower only when the user accepts the loss of quality.
`--quant auto` makes its candidates with the same call.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

import numpy as np

from packager.errors import ConversionError, UsageError, missing_backend
from packager.progress import quiet_llama_log
from packager.quants import QuantType

# Re-quantizing from these loses (almost) nothing.
HIGH_PRECISION = {"F32", "F16", "BF16", "Q8_0"}



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
