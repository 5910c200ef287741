"""What a converter hands back, the same for every format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ConvertResult:
    """What a converter wrote: the model (a GGUF file, or an ONNX folder), its size, and what it read."""

    path: Path
    n_bytes: int
    source_sha256: dict[str, str]  # checkpoint file (relative path) -> sha256, hashed while read
    sha256: str | None = None  # of a single-file model, hashed as it was written (GGUF)
    files: list[Path] = field(default_factory=list)  # every file written
    details: dict[str, Any] = field(default_factory=dict)  # the format's own: tensor types (GGUF), options (ONNX)
    file_sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256, for files hashed as written
