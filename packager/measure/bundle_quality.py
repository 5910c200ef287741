"""`pack quality`: measure a bundle against its reference and record the figures in the bundle.

The reference is an F16/BF16/F32 GGUF of the same source, or the source
checkpoint itself (converted to F16 in a temporary directory for the purpose).
The figures go into the manifest as ``quality`` and into the model card, through
``bundle.update_bundle`` so the bundle stays verified.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from packager.bundle.verify import read_bundle, verified
from packager.bundle.writer import update_bundle
from packager.convert.gguf.converter import convert
from packager.errors import UsageError
from packager.measure.quality import (DEFAULT_CTX, RunSettings, as_manifest, build_reference, check_compatible,
                                      check_ctx, measure, model_info, read_text)
from packager.progress import say
from packager.quants import get_quant
from packager.source.resolver import resolve

REFERENCE_TYPES = ("F32", "F16", "BF16")
CARD_START = "<!-- edgepack:quality -->"
CARD_END = "<!-- /edgepack:quality -->"


@dataclass(frozen=True)
class ReferenceFile:
    path: Path  # an F16/BF16/F32 GGUF
    label: str  # what the manifest calls it
    source_sha256: dict[str, str] | None = None  # checkpoint file hashes, when it was converted here


@contextmanager
def reference_gguf(ref: str | os.PathLike[str], *, n_threads: int | None = None, quiet: bool = False,
                   workdir: Path | None = None) -> Iterator[ReferenceFile]:
    """The reference as a high-precision GGUF: the file itself, or a checkpoint converted to F16 in a temp dir."""
    p = Path(ref)
    if p.is_file() and p.suffix == ".gguf":
        _, quant = model_info(p)
        if quant not in REFERENCE_TYPES:
            raise UsageError(f"--reference {p.name} is {quant or 'of an unknown type'}, not a high-precision "
                             f"reference; pass an {'/'.join(REFERENCE_TYPES)} GGUF or the source checkpoint directory")
        yield ReferenceFile(p, p.name)
        return
    if p.is_file():
        raise UsageError(f"--reference {p}: not a .gguf file; pass an F16/BF16 GGUF or a checkpoint directory")
    src = resolve(ref, quiet=quiet, hash_weights=False)
    if src.kind == "gguf":  # a hub id that resolved to a GGUF
        with reference_gguf(src.path, n_threads=n_threads, quiet=quiet) as r:
            yield r
        return

    with tempfile.TemporaryDirectory(prefix="edgepack-reference-", dir=workdir) as tmp:
        say(f"converting {src.name} to F16 as the reference", quiet=quiet)
        result = convert(src, get_quant("F16"), Path(tmp) / f"{src.name}-F16.gguf", n_threads=n_threads, quiet=quiet)
        yield ReferenceFile(result.path, f"{src.repo or src.name} (checkpoint, converted to F16)", result.source_sha256)


def same_model(candidate: Path, reference: Path) -> None:
    """Refuse a reference of another model (architecture, depth, width or vocabulary differ), from the headers."""
    ref_info, _ = model_info(reference)
    info, _ = model_info(candidate)
    check_compatible(ref_info, reference, info, candidate)


def card_section(q: dict[str, Any], quant: str) -> str:
    """The model card's quality section for a manifest ``quality`` entry."""
    return f"""{CARD_START}
## Quality

Measured by edgepack against {q['reference']} on {q['text']} ({q['n_tokens']} tokens scored: {q['n_chunks']} chunks
of {q['n_ctx']} tokens, each scored on its second half, as llama.cpp's `llama-perplexity` does).

| | this bundle ({quant}) | reference |
|---|---|---|
| perplexity | {q['ppl']:.4f} | {q['ppl_ref']:.4f} |
| KL divergence from the reference, mean | {q['kld_mean']:.6f} | 0 |
| KL divergence, 99th percentile | {q['kld_p99']:.6f} | 0 |
| top-1 token agreement | {100 * q['top1']:.2f}% | 100% |
{_mix_lines(q.get('mix'))}{CARD_END}
"""


def _mix_lines(mix: dict[str, Any] | None) -> str:
    """--quant mix: its size-KLD point against the uniform types it was measured with, and how it was chosen."""
    if not mix:
        return ""
    rows = [r for r in mix.get("table", []) if r.get("text") == "evaluation" and r.get("kld") is not None]
    lines = ["", f"A per-tensor mix ({', '.join(f'{k} x{v}' for k, v in mix['counts'].items())}), chosen on "
             f"{mix['decision_text']['name']}; the figures above are from a text no decision saw.", "",
             "| on the same text | size MB | mean KLD |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['size'] / 1e6:.2f} | {r['kld']:.6f} |" for r in sorted(rows, key=lambda r: r["size"])]
    return "\n".join(lines) + "\n"


def with_card_section(readme: str, section: str) -> str:
    """``readme`` with its quality section replaced (or appended when it has none)."""
    pattern = re.compile(re.escape(CARD_START) + r".*?" + re.escape(CARD_END) + r"\n?", re.S)
    if pattern.search(readme):
        return pattern.sub(lambda _m: section, readme, count=1)
    return readme.rstrip("\n") + "\n\n" + section


def assess_bundle(bundle: str | os.PathLike[str], reference: str | os.PathLike[str], *, text: Path | None = None,
                  n_ctx: int = DEFAULT_CTX, n_chunks: int | None = None, n_threads: int | None = None,
                  quiet: bool = False) -> dict[str, Any]:
    """Measure BUNDLE against REFERENCE, write the figures into its manifest and card; returns ``quality``."""
    check_ctx(n_ctx, n_chunks)
    b = verified(bundle)  # a changed bundle fails here, before minutes of work
    body, text_name = read_text(text)
    settings = RunSettings.from_runtime(b.meta.runtime, n_threads)
    with reference_gguf(reference, n_threads=settings.n_threads, quiet=quiet) as ref_file, \
            tempfile.TemporaryDirectory(prefix="edgepack-quality-") as tmp:
        same_model(b.model_file, ref_file.path)  # from the files' headers, before minutes of work
        say(f"reference pass: {ref_file.path.name} over {text_name}", quiet=quiet)
        ref = build_reference(ref_file.path, body, Path(tmp), n_ctx=n_ctx, n_chunks=n_chunks,
                              settings=RunSettings(settings.n_threads), text_name=text_name, quiet=quiet)
        result = measure(b.model_file, ref, settings=settings, text=body, quiet=quiet,
                         desc=f"measuring {b.meta.quant}".strip())
        quality = as_manifest(ref_file.label, ref, result.summary, n_ctx=n_ctx)
        del ref
    b = read_bundle(bundle)
    readme = b.file("README.md").read_text(encoding="utf-8") if b.file("README.md").is_file() else ""
    listed = any(f["path"] == "README.md" for f in b.files)
    texts = {"README.md": with_card_section(readme, card_section(quality, b.meta.quant or "?"))} if listed else {}
    update_bundle(bundle, {"quality": quality}, texts)
    return quality
