"""packager.load: one Python API over every bundle format.

    with packager.load("dist/SmolLM2-135M-Instruct-laptop") as m:
        for piece in m.chat([{"role": "user", "content": "Hi"}], stream=True):
            print(piece, end="", flush=True)

A Model is safe to share between threads: generation is serialized inside it (a
stream holds the model until it is exhausted, closed or cancelled), and ``close()``
from any thread cancels a stream in progress at its next token. The full contract
is in packager/runtime/model.py.
"""

from __future__ import annotations

import os
from typing import Any

from packager.bundle.verify import Bundle, verified
from packager.errors import UsageError, VerificationError
from packager.runtime.limits import check_runtime
from packager.runtime.llama import LlamaModel
from packager.runtime.model import Model
from packager.runtime.onnx import OnnxModel

__all__ = ["Model", "load"]

# The runtime of each bundle format, and the load options it takes.
BACKENDS: dict[str, tuple[type[Model], tuple[str, ...]]] = {
    "gguf": (LlamaModel, ("n_ctx", "n_threads", "n_gpu_layers", "seed", "use_mmap", "n_batch", "flash_attn", "draft",
                          "draft_min", "draft_max", "deterministic", "prompt_cache")),
    "onnx": (OnnxModel, ("n_ctx", "n_threads", "seed", "execution_provider", "deterministic", "prompt_cache")),
}


def load(bundle: str | os.PathLike[str] | Bundle, *, verify: bool = False, **overrides: Any) -> Model:
    """Load a bundle for generation.

    Small files are always checked against the manifest; ``verify=True`` also
    re-hashes the weights. ``overrides`` (n_ctx, n_threads, n_gpu_layers, seed,
    use_mmap, n_batch, flash_attn) replace the bundle's runtime settings for this process;
    GGUF bundles also take ``draft`` ("lookup", a draft model's .gguf, False for none; default the
    bundle's own) and ``draft_min``/``draft_max`` (drafts per step; default: what pays, measured).
    A call reads only the prompt tokens the model has not read yet (a chat's earlier turns and
    replies stay in its cache); ``deterministic=True`` evaluates every prompt as a fresh load would
    instead, so the same prompt gives the same tokens whatever came before (also per call).
    ``prompt_cache=DIR`` saves a chat's system prompt, once read, to DIR and restores it on later
    loads (GGUF; ONNX Runtime GenAI cannot save its state, so ONNX bundles read it once per load).
    Threads default to the physical cores this process may use
    (packager.host.default_threads), never more.
    """
    path = bundle.path if isinstance(bundle, Bundle) else bundle
    b = verified(path, weights=verify)
    cls, options = backend(b)
    opts = _checked(overrides, options)
    check_runtime(b.meta, str(b.path), opts)  # before the engine allocates anything
    return cls(b, **opts)


def backend(bundle: Bundle) -> tuple[type[Model], tuple[str, ...]]:
    """The Model class that runs this bundle's format, and the load options it takes."""
    fmt = bundle.meta.format
    try:
        return BACKENDS[fmt]
    except KeyError:
        raise VerificationError(f"{bundle.path}: format {fmt!r} has no runtime in this edgepack; upgrade edgepack") from None


def _checked(overrides: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise UsageError(f"unknown load option(s) {', '.join(unknown)}; use {', '.join(known)}")
    return overrides
