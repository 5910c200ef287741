"""What both ONNX exporters (the streaming converter and the optimum fallback) hand back and
write besides the graph: their result, and the tokenizer files onnxruntime-genai reads."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packager.errors import SourceError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class ConvertResult:
    path: Path
    files: list[Path]
    quant: str
    source_sha256: dict[str, str]
    n_bytes: int
    details: dict[str, Any] = field(default_factory=dict)


def copy_tokenizer(src_dir: Path, out_dir: Path) -> list[Path]:
    """Copy the tokenizer files onnxruntime-genai reads into ``out_dir``; tokenizer.json is required."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
            copied.append(out_dir / name)
    if not (out_dir / "tokenizer.json").is_file():
        raise SourceError(f"{src_dir}: no tokenizer.json; onnxruntime-genai needs the fast tokenizer's file")
    return copied


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
