"""Checkpoints that ship their own Python code (``auto_map``, ``trust_remote_code``).

edgepack never imports a checkpoint's code: conversion reads config.json and the
weights as data, and the tokenizer check loads tokenizers with
``trust_remote_code=False``. A checkpoint whose architecture edgepack converts
natively is packed as usual (its ``auto_map`` is ignored, as Phi-3.5's must be);
one that only its own code could load is refused here, with a message that says so,
before anything else reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from packager.archs import arch_for
from packager.errors import RemoteCodeRefusedError, UnsupportedArchitectureError


def custom_code(model_dir: Path) -> list[str]:
    """The modules a checkpoint's auto_map points at (config.json and tokenizer_config.json)."""
    refs: list[str] = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((Path(model_dir) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        for value in auto_map.values():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and ref not in refs:
                    refs.append(ref)
    return refs


def refuse_remote_code(model_dir: Path, architecture: str) -> list[str]:
    """Raise RemoteCodeRefusedError when only the checkpoint's own code could load it;
    otherwise the warnings to record (custom code present and ignored)."""
    refs = custom_code(model_dir)
    if not refs:
        return []
    try:
        arch_for(architecture)
    except UnsupportedArchitectureError:
        raise RemoteCodeRefusedError(
            f"{model_dir}: {architecture!r} is defined by the checkpoint's own code ({', '.join(refs[:3])}), "
            "which edgepack never runs (no trust_remote_code); use a checkpoint of a supported architecture"
        ) from None
    return [f"the checkpoint ships its own code ({', '.join(refs[:3])}); it was ignored, never run: "
            f"{architecture} is converted natively"]
