"""packager.load: one Python API over every bundle format.

    with packager.load("dist/SmolLM2-135M-Instruct-laptop") as m:
        for piece in m.chat([{"role": "user", "content": "Hi"}], stream=True):
            print(piece, end="", flush=True)

A Model is safe to share between threads: calls are serialized inside it (a
stream holds the model until it is exhausted or closed).
"""

from __future__ import annotations

import os
from typing import Any

from packager.bundle import Bundle, verified
from packager.errors import VerificationError
from packager.runtime.model import Model

__all__ = ["Model", "load"]


def load(bundle: str | os.PathLike[str] | Bundle, *, verify: bool = False, **overrides: Any) -> Model:
    """Load a bundle for generation.

    Small files are always checked against the manifest; ``verify=True`` also
    re-hashes the weights. ``overrides`` (n_ctx, n_threads, n_gpu_layers, seed)
    replace the bundle's runtime settings for this process.
    """
    path = bundle.path if isinstance(bundle, Bundle) else bundle
    b = verified(path, weights=verify)
    fmt = b.manifest.get("format")
    if fmt == "gguf":
        from packager.runtime.llama import LlamaModel

        return LlamaModel(b, **overrides)
    raise VerificationError(f"{b.path}: format {fmt!r} has no runtime in this edgepack; upgrade edgepack")


