"""What `pack model` is asked to do (PackOptions), a file made for it already (ReadyFile), what the
pipeline hands a format's packer (PackJob), and what it hands back (PackResult); what --quant auto
hands a format to make one candidate (AutoJob) and gets back (Candidate)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from packager.convert.result import ConvertResult
from packager.plan.planner import Overrides, Plan
from packager.plan.targets import Target
from packager.quants import QuantType
from packager.source.resolver import Source, sha256_file
from packager.spec.model import ModelSpec


@dataclass(frozen=True)
class ReadyFile:
    """A model file already made for this bundle (--quant auto's chosen candidate): bundled, not converted again."""

    path: Path  # a GGUF file, or an ONNX model folder
    source_sha256: dict[str, str]
    imatrix_info: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)  # the converter's own (ONNX: its options)
    types: dict[str, int] | None = None  # --quant mix: every tensor's ggml type, which the planner sizes as they are

    def install(self, dst: Path) -> ConvertResult:
        """Copy the file (or the folder's files) to ``dst``, as the converter would have written them there."""
        if self.path.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            files = [Path(shutil.copyfile(f, dst / f.name)) for f in sorted(self.path.iterdir()) if f.is_file()]
            return ConvertResult(dst, sum(f.stat().st_size for f in files), self.source_sha256, files=files,
                                 details=self.details)
        shutil.copyfile(self.path, dst)
        return ConvertResult(dst, dst.stat().st_size, self.source_sha256, sha256=sha256_file(dst), files=[dst],
                             details=self.details)


@dataclass(frozen=True)
class PackOptions:
    target: str = "laptop"
    quant: str | None = None
    format: str | None = None
    output: Path = Path("dist")
    force: bool = False
    revision: str | None = None
    allow_pickle: bool = False
    allow_requantize: bool = False
    skip_tokenizer_check: bool = False
    imatrix: Path | None = None  # a llama.cpp imatrix file
    imatrix_text: Path | None = None  # calibration text to compute one from
    n_ctx: int | None = None
    ram_bytes: int | None = None
    vram_bytes: int | None = None
    n_threads: int | None = None
    quiet: bool = False
    onnx_block_size: int = 32  # --format onnx: int4 block size (32, 64, 128)
    onnx_asymmetric: bool = False  # --format onnx: int4 with zero points
    onnx_accuracy_level: int = 4  # --format onnx: MatMulNBits accuracy_level (4: int8 compute, fastest on CPU)
    onnx_algorithm: str = "rtn"  # --format onnx: rtn or hqq (convert/onnx/converter.py's ALGORITHMS)
    part_size: int | None = None  # --part-size: largest file in the bundle (default: the target's part size)
    no_split: bool = False  # --no-split: one model file whatever the target's part size
    draft: str | None = None  # --draft: "lookup" (prompt n-gram drafting, measured at pack time)
    ready: ReadyFile | None = None  # --quant auto: the quantized file it measured, bundled as it is
    quality: dict[str, Any] | None = None  # --quant auto: its measured figures, for the manifest and card


def part_limit(opts: PackOptions, target: Target) -> int | None:
    """The largest model file a bundle may hold (None: no limit): --part-size, else the target channel's part
    size; none with --no-split. The planner's shipping (plan.Overrides.part_bytes) reads the same options."""
    if opts.no_split:
        return None
    return opts.part_size or target.distribution.part_bytes or None


@dataclass(frozen=True)
class PackResult:
    path: Path
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class PackJob:
    """One bundle to write, as the pipeline has checked and planned it: what a format's packer gets."""

    src: Source
    spec: ModelSpec
    target: Target
    plan: Plan
    overrides: Overrides
    opts: PackOptions
    warnings: list[str]
    source_quant: str | None = None  # a GGUF source's own type

    @property
    def final(self) -> Path:
        return Path(self.opts.output) / f"{self.src.name}-{self.target.name}"

    @property
    def part_bytes(self) -> int | None:
        return part_limit(self.opts, self.target)


@dataclass(frozen=True)
class AutoJob:
    """What --quant auto gives a format's packer to make its candidates."""

    src: Source
    opts: PackOptions
    target: Target
    work: Path  # a temporary directory beside the output
    n_threads: int
    f16: Path  # the F16 GGUF every candidate is measured against (GGUF candidates are quantized from it)
    imatrix_for: Callable[[QuantType], Any]  # the importance matrix a GGUF type is quantized with, or None


@dataclass(frozen=True)
class Candidate:
    """One candidate --quant auto made: what to bundle if chosen, and the model file to measure."""

    keep: Path
    model: Path
    imatrix: bool = False  # quantized with an importance matrix
    details: dict[str, Any] = field(default_factory=dict)  # the converter's own (ONNX: its options)
