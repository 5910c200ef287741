"""A .gguf file as a source: its spec from metadata, and re-quantization.

Most users start from a GGUF someone else made. It is bundled as it is when it
fits the target; otherwise llama.cpp's quantizer re-quantizes it, from F32,
F16, BF16 or Q8_0 freely, from anything lower only when the user accepts the
loss of quality.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf

from packager.errors import ConversionError, CorruptFileError, UsageError, missing_backend
from packager.quants import QUANTS, QuantType
from packager.spec import ModelSpec

# Re-quantizing from these loses (almost) nothing.
HIGH_PRECISION = {"F32", "F16", "BF16", "Q8_0"}


def open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{path}: not a readable GGUF file ({exc}); re-download it") from None


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def spec_from_gguf(path: Path) -> tuple[ModelSpec, str | None]:
    """The model's spec and its quant name (None when the file type is one edgepack does not list)."""
    r = open_gguf(path)
    arch = _field(r, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise CorruptFileError(f"{path}: no general.architecture; not a model GGUF")

    def hp(key: str, default=None):
        value = _field(r, key.format(arch=arch), default)
        if value is None:
            raise CorruptFileError(f"{path}: missing {key.format(arch=arch)}; the GGUF is incomplete")
        return value

    n_heads = int(hp(gguf.Keys.Attention.HEAD_COUNT))
    hidden = int(hp(gguf.Keys.LLM.EMBEDDING_LENGTH))
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
    if ftype is not None:
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
    try:
        import llama_cpp
    except ImportError:
        raise missing_backend("llama-cpp-python", "gguf") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(quant.ftype)
    params.nthread = n_threads
    params.allow_requantize = src_quant not in HIGH_PRECISION
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise ConversionError(f"llama.cpp's quantizer failed on {src} (code {rc}); check that the file is a complete GGUF")
    return warnings
