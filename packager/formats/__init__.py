"""Bundle formats as data that the planner and the converters share: each format is one
:class:`~packager.formats.base.Format` (its quant schemes, typed, with exact bytes; the layout of its
weights; the memory its runtime allocates), so a plan sizes exactly what a converter writes.

A new format is one module here declaring its ``FORMAT``, listed in :data:`FORMATS`; the later
stages register their side of it by name (see packager/formats/base.py).
"""

from __future__ import annotations

from packager.errors import UsageError
from packager.formats import gguf, onnx
from packager.formats.base import Format

FORMATS: dict[str, Format] = {f.name: f for f in (gguf.FORMAT, onnx.FORMAT)}


def get_format(name: str) -> Format:
    """The format called ``name``; a one-line UsageError naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown format {name!r}; use one of {', '.join(FORMATS)}") from None


def format_of_file(path: str) -> Format | None:
    """The format whose model files end like ``path`` (None: no format's)."""
    return next((f for f in FORMATS.values() if str(path).endswith(f.model_suffix)), None)


def format_of_scheme(name: str) -> Format | None:
    """The format whose quant schemes include ``name`` (case-insensitive; None: no format's)."""
    for f in FORMATS.values():
        try:
            f.scheme(name)
        except UsageError:
            continue
        return f
    return None


def all_schemes() -> list[str]:
    """Every format's scheme names, for a CLI's choices."""
    return [name for f in FORMATS.values() for name in f.schemes]
