"""`pack model --quant auto`: the smallest quant on the target's ladder that fits and keeps quality.

Where the target runs both formats (and ``--format`` does not pick one), the candidates are the
GGUF types of its ladder and the ONNX int4 schemes of formats.onnx.AUTO_LADDER, walked together
by size: an ONNX candidate is converted from the checkpoint by the streaming converter and scored
by ONNX Runtime against the same F16 reference (measure/quality.py), so both are on one scale.
Each format makes its own candidates (pack/gguf.py and pack/onnx.py, through pipeline.PACKERS):
this module only walks, measures and chooses.

1. The source is converted once to F16 (a GGUF source that is F16/BF16/F32 is
   used as it is): the reference, and what every candidate is quantized from.
2. The reference runs once over the evaluation text; its log-probabilities stay
   on disk (packager/measure/quality.py).
3. The target's ladder is filtered to the quants the planner says fit, sorted
   smallest file first, and walked upwards: each candidate is quantized from the
   F16 file by llama.cpp's quantizer (low-bit types with an importance matrix,
   computed once from the shipped calibration text; a user's ``--imatrix`` file
   is used instead, for every candidate as plain ``pack model`` does, after a
   check against the model's tensors), measured, and kept as soon as its mean
   KL divergence is under the bar. The first one under the bar is the smallest
   that qualifies. Each measurement is adaptive: it stops at the first chunk where
   the 95% interval of the mean KLD lies wholly under or over the bar (the
   reference's DEFAULT_CHUNKS chunks are the cap), so a clear verdict costs two chunks.
4. That very file is bundled by ``pack_model`` with the figures in its manifest;
   the table and the manifest name the importance matrix and its sha256.

Everything temporary lives in one directory removed on success, failure and
Ctrl-C. Nothing qualifies: a QualityError carrying the measured table, no bundle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from packager.convert.gguf.converter import convert
from packager.convert.gguf.imatrix import calibration_text, check_imatrix, compute_imatrix, user_imatrix
from packager.errors import DoesNotFit, QualityError, UsageError
from packager.formats import FORMATS, get_format
from packager.host import default_threads
from packager.kernels.quality import Summary
from packager.measure.quality import (DEFAULT_CTX, Reference, RunSettings, as_manifest, build_reference, measure,
                                      read_text)
from packager.pack.options import AutoJob, PackOptions, ReadyFile
from packager.pack.gguf import safetensors_view, source_vocab
from packager.pack.pipeline import PACKERS, check_architecture, default_source, pack_model, refuse_before_download
from packager.plan.planner import Overrides, plan
from packager.plan.targets import load_target
from packager.progress import say
from packager.quants import QuantType, get_quant
from packager.source.gguf_check import check_layout
from packager.source.resolver import resolve
from packager.spec.gguf import spec_from_gguf
from packager.spec.model import load_spec

DEFAULT_MAX_KLD = 0.05
DEFAULT_CHUNKS = 8
REFERENCE_TYPES = ("F32", "F16", "BF16")
LOW_BIT = ("IQ", "Q2_K", "Q3_K")  # llama.cpp: poor or unusable without an importance matrix
FIRST_FORMAT = next(iter(FORMATS))  # its rows are unlabelled in the table; the others say their format


def wants_imatrix(q: QuantType) -> bool:
    return q.needs_imatrix or q.name.startswith(LOW_BIT)


@dataclass
class Row:
    """One line of the table: a quant on the ladder and what was found about it."""

    quant: str
    format: str = "gguf"
    predicted_memory: int | None = None  # bytes; None: it does not fit
    n_ctx: int | None = None  # the plan's context (an ONNX candidate's genai_config carries it)
    size: int | None = None  # bytes of the quantized file
    ppl: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    quantize_s: float | None = None
    measure_s: float | None = None
    imatrix: bool = False  # quantized with an importance matrix
    verdict: str = ""


def describe_imatrix(info: dict[str, Any]) -> str:
    """Which importance matrix, in one line: the user's file or the text it was computed from, and a sha256."""
    if "file" in info:
        return f"{info['file']} (sha256 {info['sha256']})"
    return f"computed on the {info.get('model', 'F16')} reference from {info['text']} (text sha256 {info['sha256']})"


def format_table(rows: list[Row], max_kld: float, imatrix_info: dict[str, Any] | None = None) -> str:
    """The table --quant auto prints (and puts in its error when nothing qualifies)."""
    head = ("quant", "size MB", "pred. mem GB", "ppl", "KLD mean", "KLD p99", "top-1", "quantize s", "measure s", "")
    lines = [head]
    for r in rows:
        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)
        lines.append((r.quant if r.format == FIRST_FORMAT else f"{r.quant} ({r.format})", f(r.size and r.size / 1e6, ".1f"), f(r.predicted_memory and r.predicted_memory / 1e9, ".2f"),
                      f(r.ppl, ".3f"), f(r.kld_mean, ".5f"), f(r.kld_p99, ".4f"),
                      f(r.top1 and 100 * r.top1, ".1f") + ("%" if r.top1 is not None else ""),
                      f(r.quantize_s, ".1f"), f(r.measure_s, ".1f"), r.verdict))
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    used = imatrix_info is not None and any(r.imatrix for r in rows)
    return ("\n".join(out) + f"\n(bar: mean KLD <= {max_kld:g})"
            + (f"\n(imatrix: {describe_imatrix(imatrix_info)})" if used and imatrix_info else ""))


def ladder_rows(spec, tgt, overrides: Overrides, *, unavailable: dict[str, str | None] | None = None) -> list[Row]:
    """Every candidate, smallest weights first, with its predicted memory when it fits: each format's
    auto ladder where the target runs it (the target's GGUF ladder, formats.onnx.AUTO_LADDER);
    ``unavailable``: why a format's candidates cannot be made from this source."""
    fits, other = [], []
    formats = [overrides.format] if overrides.format else list(tgt.formats)
    for fmt in formats:
        names = get_format(fmt).auto(tgt.quant_ladder)
        why = (unavailable or {}).get(fmt)
        for name in dict.fromkeys(names):
            if why:
                other.append(Row(name, fmt, verdict=f"not tried: {why}"))
                continue
            try:
                p = plan(spec, tgt, replace(overrides, quant=name, format=fmt))
            except DoesNotFit:
                other.append(Row(name, fmt, verdict="does not fit"))
                continue
            gpu = p.vram.total if p.vram is not None else 0
            weights = p.memory.weights + (p.vram.weights if p.vram is not None else 0)
            fits.append((weights, Row(name, fmt, predicted_memory=p.memory.total + gpu, n_ctx=p.n_ctx)))
    return [r for _, r in sorted(fits, key=lambda x: x[0])] + other


def walk(rows: list[Row], make: Callable[[Row], tuple[Path, Path]], ref: Reference, *, max_kld: float,
         settings: RunSettings, quiet: bool) -> tuple[Row | None, Path | None, Summary | None]:
    """Make and measure the fitting rows, smallest first, until one is under the bar.

    ``make(row)`` writes the candidate: (what to keep if chosen, the model file to measure).
    """
    for row in rows:
        if row.predicted_memory is None:
            continue
        say(f"--quant auto: trying {row.quant}" + (f" ({row.format})" if row.format != FIRST_FORMAT else ""), quiet=quiet)
        t0 = time.perf_counter()
        out, model = make(row)
        row.quantize_s = time.perf_counter() - t0
        row.size = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
        # Adaptive: stop as soon as the interval is wholly under or over the bar (the reference's chunks cap it).
        m = measure(model, ref, settings=settings, quiet=quiet, desc=f"measuring {row.quant}",
                    decided=lambda e: e.high <= max_kld or e.low > max_kld)
        s = m.summary
        row.ppl, row.kld_mean, row.kld_p99, row.top1, row.measure_s = s.ppl, s.kld_mean, s.kld_p99, s.top1, m.seconds
        imatrix = " (imatrix)" if row.imatrix else ""
        if s.kld_mean <= max_kld:
            row.verdict = "chosen: smallest under the bar" + imatrix
            for later in rows:
                if later.predicted_memory is not None and later.kld_mean is None and later is not row:
                    later.verdict = "not measured: a smaller quant qualified"
            return row, out, s
        row.verdict = "KLD over the bar" + imatrix
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    return None, None, None


def pack_auto(source: str | os.PathLike[str] | None, opts, *, max_kld: float = DEFAULT_MAX_KLD,
              text: Path | None = None, n_ctx: int = DEFAULT_CTX, n_chunks: int | None = DEFAULT_CHUNKS):
    """``pack model --quant auto``: returns pack_model's PackResult for the chosen quant."""
    assert isinstance(opts, PackOptions)
    if not 0 < max_kld < float("inf"):
        raise UsageError(f"--max-kld {max_kld}: give a positive bar such as 0.05 (mean KL divergence in nats)")
    body, text_name = read_text(text)
    tgt = load_target(opts.target)
    src, spec = reference_source(source, opts, "--quant auto")
    overrides = Overrides(format=opts.format, n_ctx=opts.n_ctx, ram_bytes=opts.ram_bytes, vram_bytes=opts.vram_bytes,
                          n_threads=opts.n_threads)
    plan(spec, tgt, overrides)  # nothing fits: DoesNotFit with the numbers, before any work
    unavailable = {fmt: packer.auto_unavailable(src, spec) for fmt, packer in PACKERS.items()}
    rows = ladder_rows(spec, tgt, overrides, unavailable=unavailable)
    threads = opts.n_threads or default_threads()
    Path(opts.output).mkdir(parents=True, exist_ok=True)
    imatrix_state: dict[str, Any] = {}
    if opts.imatrix is not None:  # the user's file: read before any long work, so a bad one fails at once
        imatrix_state["data"], imatrix_state["info"] = user_imatrix(opts.imatrix)
    # Next to the output: the F16 file is as big as the model, /tmp is often a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=".edgepack-auto-", dir=opts.output) as tmp:
        work = Path(tmp)
        f16, source_sha256, label = f16_reference(src, work, threads, opts.quiet, "--quant auto")
        if opts.imatrix is not None:
            check_user_imatrix(imatrix_state["data"], f16, opts.imatrix)
        ref = build_reference(f16, body, work, n_ctx=n_ctx, n_chunks=n_chunks, settings=RunSettings(threads),
                              text_name=text_name, quiet=opts.quiet)

        def imatrix_for(q: QuantType) -> dict[str, np.ndarray] | None:
            if opts.imatrix is None and opts.imatrix_text is None and not wants_imatrix(q):
                return None
            if "data" not in imatrix_state:
                imatrix_state["data"], imatrix_state["info"] = _imatrix(opts, f16, threads)
            if not imatrix_state.get("announced"):
                imatrix_state["announced"] = True
                say(f"--quant auto: importance matrix {describe_imatrix(imatrix_state['info'])}", quiet=opts.quiet)
            return imatrix_state["data"]

        job = AutoJob(src, opts, tgt, work, threads, f16, imatrix_for)
        details: dict[tuple[str, str], dict[str, Any]] = {}

        def make(row: Row) -> tuple[Path, Path]:
            made = PACKERS[row.format].auto_candidate(job, row.quant, row.n_ctx)
            row.imatrix, details[(row.format, row.quant)] = made.imatrix, made.details
            return made.keep, made.model

        settings = RunSettings(threads, 0, tgt.kv_cache_type)
        chosen, path, summary = walk(rows, make, ref, max_kld=max_kld, settings=settings, quiet=opts.quiet)
        table = format_table(rows, max_kld, imatrix_state.get("info"))
        if chosen is None:
            raise QualityError(f"no quant on {tgt.name}'s ladder both fits and has a mean KLD <= {max_kld:g}; "
                               f"raise --max-kld, choose a bigger target, or pass --quant. Measured:\n{table}")
        say(table, quiet=opts.quiet)
        say(f"--quant auto: {chosen.quant} is the smallest quant that fits {tgt.name} with a mean KLD of "
            f"{chosen.kld_mean:.5f} <= {max_kld:g}", quiet=opts.quiet)
        assert path is not None and summary is not None
        quality = as_manifest(label, ref, summary, n_ctx=n_ctx)
        # Which imatrix the rows marked imatrix were quantized with (even when the chosen file used none).
        quality["auto"] = {"max_kld": max_kld, "table": [asdict(r) for r in rows],
                           "imatrix": imatrix_state.get("info") if any(r.imatrix for r in rows) else None}
        ready = ReadyFile(path, source_sha256, imatrix_state.get("info") if chosen.imatrix else None,
                          details.get((chosen.format, chosen.quant), {}))
        del ref
        return pack_model(source, PACKERS[chosen.format].auto_options(opts, chosen.quant, ready, quality))


def reference_source(source: str | os.PathLike[str] | None, opts: PackOptions, flag: str):
    """The source resolved, and its spec; a GGUF source must be high precision (it is the reference), a
    checkpoint one the GGUF converter takes (the reference is its F16 GGUF), refused before any download."""
    refuse_before_download(source, opts.revision, "gguf")
    src = resolve(source if source is not None else default_source(), revision=opts.revision,
                  allow_pickle=opts.allow_pickle, hash_weights=False, quiet=opts.quiet)
    if src.kind != "gguf":
        spec = load_spec(src.path)
        check_architecture(spec, "gguf")
        return src, spec
    spec, src_quant = spec_from_gguf(src.path)
    if src_quant not in REFERENCE_TYPES:
        raise UsageError(f"{flag} needs a high-precision source to measure against; {src.path.name} is "
                         f"{src_quant or 'of an unknown type'}: give the F16/BF16 GGUF or the HF checkpoint")
    return src, spec


def f16_reference(src, work: Path, threads: int, quiet: bool, flag: str) -> tuple[Path, dict[str, str], str]:
    """The F16 GGUF every candidate is measured against (a high-precision GGUF source is used as it is): its
    path, the checkpoint's sha256s hashed while converting, and its label for the manifest."""
    if src.kind == "gguf":
        return src.path, {}, src.path.name
    say(f"{flag}: converting {src.name} to F16 once (the reference, and the source of every candidate)", quiet=quiet)
    with safetensors_view(src, quiet) as view:
        result = convert(view, get_quant("F16"), work / f"{src.name}-F16.gguf", n_threads=threads,
                         quiet=quiet, vocab=source_vocab(src)[0])  # eos as pack_model resolves it
    return (result.path, result.source_sha256 if view is src else {},
            f"{src.repo or src.name} (checkpoint, converted to F16)")


def check_user_imatrix(imatrix: dict[str, np.ndarray], f16: Path, path: Path) -> None:
    """The user's imatrix is for this model (else llama.cpp's quantizer fails with a bare error code)."""
    # The header walk alone (fast): GGUFReader would also decode the whole vocabulary.
    shapes = {t.name: tuple(reversed(t.shape)) for t in check_layout(f16).tensors}
    check_imatrix(imatrix, shapes, f"--imatrix {path}")


def _imatrix(opts, f16: Path, threads: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An importance matrix computed from the F16 reference over the calibration text (--imatrix-text or ours)."""
    text, origin = calibration_text(opts.imatrix_text)
    say(f"--quant auto: computing an importance matrix from {origin}", quiet=opts.quiet)
    data = compute_imatrix(f16, text, n_threads=threads, quiet=opts.quiet)
    return data, {"text": origin, "sha256": hashlib.sha256(text.encode()).hexdigest(), "model": "F16"}
