"""Pickle checkpoints (*.bin, *.pt), only when the user passed --allow-pickle.

They are rewritten as safetensors one shard at a time, so the converter has a
single input format. ``torch.load(weights_only=True)`` refuses pickles that
would build anything but tensors and plain containers: it limits, not removes,
the risk the user accepted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from packager.errors import ConversionError, SourceError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def pickle_shards(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
                  and not p.name.startswith(("optimizer", "training_args", "scheduler", "rng_state")))


def to_safetensors(model_dir: Path, out_dir: Path) -> Path:
    """A copy of ``model_dir`` with its pickle weights as safetensors (the other files linked or copied)."""
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        raise SourceError("converting pickle weights needs torch and safetensors: pip install torch safetensors") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix not in PICKLE_SUFFIXES and not f.name.endswith(".index.json"):
            shutil.copyfile(f, out_dir / f.name)
    for i, shard in enumerate(pickle_shards(model_dir)):
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a hostile or broken pickle
            raise SourceError(f"{shard}: not a loadable weights-only checkpoint ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SourceError(f"{shard}: expected a dict of tensors (a state_dict)")
        # Tied weights share storage; safetensors wants each tensor once, contiguous.
        tensors = {k: v.contiguous().clone() if v.is_shared() else v.contiguous() for k, v in state.items()}
        try:
            save_file(tensors, str(out_dir / f"model-{i + 1:05d}.safetensors"))
        except Exception as exc:
            raise ConversionError(f"{shard}: could not be rewritten as safetensors ({exc})") from None
        del state, tensors
    return out_dir
