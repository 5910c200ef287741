"""llama.cpp's own tools as test oracles (run, never imported into edgepack).

``reference_gguf`` runs llama.cpp's convert_hf_to_gguf.py (from the sdist that
tests/models.py unpacks) on a fixture and caches the result per machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from models import CACHE, FIXTURE_VERSION, _atomic_build, llama_cpp_src


def reference_gguf(model_dir: Path, outtype: str = "f16", args: tuple[str, ...] = ()) -> Path:
    """The GGUF that convert_hf_to_gguf.py writes for ``model_dir`` (outtype f16/bf16/q8_0/f32), with
    its further ``args`` (e.g. ``--no-mtp``)."""
    model_dir = Path(model_dir)
    final = CACHE / f"ref-{model_dir.name}-{outtype}{''.join(args)}-v{FIXTURE_VERSION}"

    def build(tmp: Path) -> None:
        src = llama_cpp_src()
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), NO_LOCAL_GGUF="")
        subprocess.run(
            [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir),
             "--outtype", outtype, "--outfile", str(tmp / "model.gguf"), *args],
            check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    return _atomic_build(final, build) / "model.gguf"


def reference_quantize(f16_gguf: Path, quant: str, nthread: int = 2) -> Path:
    """llama.cpp's quantizer (llama_model_quantize through llama-cpp-python) on a reference F16 GGUF."""
    import ctypes

    import llama_cpp

    final = CACHE / f"refq-{f16_gguf.parent.name}-{quant}-v{FIXTURE_VERSION}"

    def build(tmp: Path) -> None:
        import gguf

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(getattr(gguf.LlamaFileType, f"MOSTLY_{quant}"))
        params.nthread = nthread
        out = tmp / "model.gguf"
        rc = llama_cpp.llama_model_quantize(str(f16_gguf).encode(), str(out).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed with {rc}")

    return _atomic_build(final, build) / "model.gguf"


def llama_quantize(src: Path, quant: str, out: Path, *, imatrix_file: Path | None = None, nthread: int = 2) -> Path:
    """llama_model_quantize called directly (none of edgepack's code), as llama-quantize calls it: with a
    GGUF imatrix file read the way tools/quantize/quantize.cpp reads it (sums / count per expert row,
    1 where a row was never seen)."""
    import ctypes

    import gguf
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, f"MOSTLY_{quant}"))
    params.nthread = nthread
    alive = []
    if imatrix_file is not None:
        tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in gguf.GGUFReader(imatrix_file).tensors}
        names = sorted(n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2"))
        entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        for i, name in enumerate(names):
            sums, counts = tensors[name + ".in_sum2"], tensors[name + ".counts"]
            rows = sums.reshape(counts.size, -1)
            values = np.where(counts[:, None] > 0, rows / np.maximum(counts[:, None], 1), 1.0).astype(np.float32).ravel()
            alive += [values, name.encode()]
            entries[i].name, entries[i].size = alive[-1], values.size
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        alive.append(entries)
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")
    return out
