"""`pack model --quant mix`: one GGUF type per tensor, chosen for the device's byte budget or a quality bar.

1. The source is converted once to F16 (the reference, and what every mix is quantized from), and
   an importance matrix is computed from the calibration text (or the user's --imatrix is checked
   against the model and used).
2. Each quantizable tensor's error under each candidate type (convert/gguf/mixes.py): the
   importance-weighted squared error of its weights, in seconds, without running the model.
3. That error is turned into KL divergence by a gain per tensor category (attn_q ... ffn_down,
   token_embd, output): one probe per category quantizes only that category to its smallest
   types, and the probe's measured mean KLD divided by the category's summed error is the gain.
   The probes, like every decision, are measured on the decision text (packager/data/decision.txt).
4. The allocation (plan/mix.py) takes upgrades in order of predicted KLD removed per byte:
   ``--max-size`` (default: what the target's plan leaves for the weights after the KV cache,
   compute buffers and overhead) gets the least predicted loss that fits, to the byte;
   ``--max-kld`` walks the same path and measures until it finds the smallest mix under the bar.
5. The chosen mix is measured once more on the evaluation text, which neither the importance
   matrix nor any decision saw: those are the figures the table, manifest and card report, next
   to the uniform k-quant types just below and above it in size, quantized with the same matrix.

Every measurement stops as soon as its confidence interval settles the comparison at hand
(measure.quality.measure's ``decided``). The two reference passes (decision, evaluation) are
paid once and shared by every probe and candidate; the chosen file is bundled as measured.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT

from packager import quants
from packager.convert.gguf.imatrix import calibration_text, compute_imatrix, user_imatrix
from packager.convert.gguf.mixes import ReferenceFile, candidate_types, open_reference, tensor_options, write_mix
from packager.convert.gguf.requantize import quantize_gguf
from packager.errors import QualityError, UsageError
from packager.formats.gguf import padded
from packager.host import default_threads
from packager.measure.quality import (DEFAULT_CTX, Estimate, Measured, Reference, RunSettings, as_manifest,
                                      build_reference, decision_text, measure, read_text)
from packager.pack.autoquant import check_user_imatrix, f16_reference, reference_source
from packager.pack.options import PackOptions, PackResult, ReadyFile
from packager.pack.pipeline import pack_model
from packager.plan.inputs import plan_input
from packager.plan.mix import Mix, TensorOptions, allocate, mix_at, path_totals, smallest_bytes, upgrade_path
from packager.plan.planner import Overrides, plan
from packager.plan.targets import load_target
from packager.progress import say
from packager.quants import get_quant

DEFAULT_MAX_CHUNKS = 16  # the cap of every adaptive measurement (chunks of n_ctx tokens)
PROBE_PRECISION = 0.25  # a probe stops when its KLD is known to +-25%: a gain, not a verdict
SEARCH_TRIES = 6  # --max-kld: mixes measured along the path at most
# The uniform types a mix is compared with and labelled by (its general.file_type, as llama-quantize
# leaves the base type's with per-tensor overrides).
UNIFORM = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")


@dataclass
class MixRow:
    """One line of the table: a probe, a candidate mix, or a uniform type for comparison."""

    what: str
    text: str  # "decision" or "evaluation"
    size: int | None = None  # bytes of the file
    bpw: float | None = None  # bits per weight of the whole file
    predicted: float | None = None  # predicted mean KLD (the allocation's model)
    kld: float | None = None
    kld_half: float | None = None  # 95% half-width over the chunks measured
    n_chunks: int | None = None
    ppl: float | None = None
    top1: float | None = None
    seconds: float | None = None
    verdict: str = ""


def format_table(rows: list[MixRow], n_params: int | None = None) -> str:
    head = ("candidate", "text", "size MB", "bpw", "pred. KLD", "KLD mean", "± 95%", "chunks", "ppl", "top-1", "s", "")
    lines: list[tuple] = [head]

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        if r.size and n_params and r.bpw is None:
            r.bpw = 8 * r.size / n_params
        lines.append((r.what, r.text, f(r.size and r.size / 1e6, ".2f"), f(r.bpw, ".3f"), f(r.predicted, ".5f"), f(r.kld, ".5f"),
                      f(r.kld_half if r.kld_half is not None and r.kld_half < float("inf") else None, ".5f"),
                      f(r.n_chunks, "d"), f(r.ppl, ".3f"), f(r.top1 and 100 * r.top1, ".1f"), f(r.seconds, ".1f"),
                      r.verdict))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _record(row: MixRow, m: Measured) -> MixRow:
    s, k = m.summary, m.kld
    row.kld, row.ppl, row.top1, row.seconds = s.kld_mean, s.ppl, s.top1, m.seconds
    if k is not None:
        row.kld_half, row.n_chunks = k.half, k.n_chunks
    return row


def weights_budget(spec, tgt, overrides: Overrides) -> int:
    """Bytes the target's plan leaves for the weights: its budget less KV cache, compute buffers and overhead."""
    p = plan(spec, tgt, overrides)
    return p.budget_bytes - (p.memory.total - p.memory.weights)


def smallest_file(tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """Tensor bytes of the smallest mix from shapes alone (overhead not included): before any work."""
    total = 0
    kept = quants.tensor_types(get_quant("F16"), tensors, n_head=1, n_head_kv=1)
    for name, shape in tensors:
        types = candidate_types(int(shape[-1])) if quants.quantizable(name, shape) else ()
        total += min((padded(quants.tensor_bytes(q, shape)) for q in types),
                     default=padded(quants.tensor_bytes(kept[name], shape)))
    return total


def _too_small(budget: int, floor: int, what: str) -> UsageError:
    return UsageError(f"{what} of {budget / 1e6:.1f} MB is below the smallest mix of this model, {floor / 1e6:.1f} MB "
                      f"({floor} bytes); give --max-size {floor // 1_000_000 + 1}MB or more, or a bigger target")


def relative_errors(options: list[TensorOptions]) -> list[TensorOptions]:
    """Each tensor's errors divided by its own importance-weighted power: noise-to-signal ratios, a
    probe-free stand-in for the measured gains (benchmarks/quality_mix.py --gains nsr compares them)."""
    return [replace(t, options=tuple(replace(o, error=o.error / max(t.power, 1e-30)) for o in t.options))
            for t in options]


class Mixer:
    """The state of one --quant mix run: the reference, the tensors' options, what it measured."""

    def __init__(self, ref: ReferenceFile, work: Path, spec, imatrix: dict[str, np.ndarray],
                 options: list[TensorOptions], kept: dict[str, QT], threads: int, quiet: bool) -> None:
        self.ref, self.work, self.spec, self.imatrix = ref, work, spec, imatrix
        self.options, self.kept, self.threads, self.quiet = options, kept, threads, quiet
        self.tensors = [(t.name, t.shape) for t in ref.tensors]  # (name, numpy shape) in file order
        self.overhead = ref.overhead
        self.kept_bytes = sum(padded(t.nbytes) for t in ref.tensors if t.name in kept)
        self.rows: list[MixRow] = []
        self.settings = RunSettings(threads)
        self._n = 0

    def file_bytes(self, mix: Mix) -> int:
        return self.overhead + self.kept_bytes + mix.nbytes

    @cached_property
    def uniform_sizes(self) -> dict[str, int]:
        """File bytes of each uniform type, from llama.cpp's per-tensor choices (quants.tensor_types)."""
        spec, sizes = self.spec, {}
        for q in UNIFORM:
            types = quants.tensor_types(get_quant(q), self.tensors, n_head=spec.n_heads, n_head_kv=spec.quant_kv_heads,
                                        has_imatrix=True, tied_embeddings=spec.tied_embeddings)
            sizes[q] = self.overhead + sum(padded(quants.tensor_bytes(types[n], s)) for n, s in self.tensors)
        return sizes

    def label(self, nbytes: int) -> str:
        """The uniform type nearest in size to a file of ``nbytes`` (a mix's general.file_type and manifest quant)."""
        return min(UNIFORM, key=lambda q: abs(self.uniform_sizes[q] - nbytes))

    def write(self, types: dict[str, str], label: str, desc: str) -> Path:
        self._n += 1
        out = self.work / f"mix-{self._n}.gguf"
        write_mix(self.ref, {n: QT[t] for n, t in types.items()}, out, file_type=int(get_quant(label).ftype),
                  imatrix=self.imatrix, n_threads=self.threads, quiet=self.quiet, desc=desc)
        return out

    def gains(self, ref: Reference) -> dict[str, float]:
        """KLD per unit of error for each category, from one probe each on the decision text."""
        cats = sorted({t.category for t in self.options})
        gains: dict[str, float] = {}
        for cat in cats:
            members = [t for t in self.options if t.category == cat]
            low = {t.name: min(t.options, key=lambda o: o.nbytes) for t in members}
            error = sum(o.error for o in low.values())
            path = self.write({n: o.qtype for n, o in low.items()}, "Q8_0", f"probe {cat}")
            m = measure(path, ref, settings=self.settings, quiet=self.quiet, desc=f"probe {cat}",
                        decided=lambda e: e.half <= PROBE_PRECISION * abs(e.mean))
            row = _record(MixRow(f"probe {cat} (smallest types)", "decision", size=path.stat().st_size), m)
            row.verdict = "gain measured"
            self.rows.append(row)
            path.unlink()
            gains[cat] = max(m.summary.kld_mean, 1e-9) / max(error, 1e-30)
        return gains


def pack_mix(source: str | os.PathLike[str] | None, opts: PackOptions, *, max_size: int | None = None,
             max_kld: float | None = None, n_ctx: int = DEFAULT_CTX, max_chunks: int = DEFAULT_MAX_CHUNKS,
             compare: bool = True) -> PackResult:
    """``pack model --quant mix``: returns pack_model's PackResult for the chosen mix."""
    if max_kld is not None and not 0 < max_kld < float("inf"):
        raise UsageError(f"--max-kld {max_kld}: give a positive bar such as 0.05 (mean KL divergence in nats)")
    if max_size is not None and max_size <= 0:
        raise UsageError(f"--max-size {max_size}: give a size such as 1.8GB")
    tgt = load_target(opts.target)
    if "gguf" not in tgt.formats or opts.format not in (None, "gguf"):
        raise UsageError(f"--quant mix makes GGUF files; {tgt.name} runs {', '.join(tgt.formats)}"
                         + (" (drop --format)" if opts.format else ""))
    src, spec = reference_source(source, opts, "--quant mix")
    overrides = Overrides(format="gguf", n_ctx=opts.n_ctx, ram_bytes=opts.ram_bytes, vram_bytes=opts.vram_bytes,
                          n_threads=opts.n_threads)
    inp = plan_input(src.path)
    tensors = list(inp.tensors or [])
    budget_from = "--max-size"
    if max_size is None and max_kld is None:
        max_size = weights_budget(spec, tgt, overrides)  # DoesNotFit, with the numbers, when nothing fits
        budget_from = f"{tgt.name}'s weight budget"
    if max_size is not None and tensors and max_size < smallest_file(tensors):  # before any long work
        raise _too_small(max_size, smallest_file(tensors), budget_from)
    user_im: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None
    if opts.imatrix is not None:  # read first: a bad file fails at once
        user_im = user_imatrix(opts.imatrix)
    threads = opts.n_threads or default_threads()
    t_start = time.perf_counter()
    phases: dict[str, float] = {}  # seconds per step, in the manifest: where a run's time went

    def lap(name: str) -> None:
        phases[name] = round(time.perf_counter() - t_start - sum(phases.values()), 1)

    Path(opts.output).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgepack-mix-", dir=opts.output) as tmp:
        work = Path(tmp)
        f16, source_sha256, label = f16_reference(src, work, threads, opts.quiet, "--quant mix")
        lap("f16")
        if user_im is not None:
            check_user_imatrix(user_im[0], f16, opts.imatrix)
            imatrix, im_info = user_im
        else:
            text, origin = calibration_text(opts.imatrix_text)
            say(f"--quant mix: computing an importance matrix from {origin}", quiet=opts.quiet)
            imatrix = compute_imatrix(f16, text, n_threads=threads, quiet=opts.quiet)
            im_info = {"text": origin, "sha256": hashlib.sha256(text.encode()).hexdigest(), "model": "F16"}
        lap("imatrix")
        ref_file = open_reference(f16)
        options, kept = tensor_options(ref_file, imatrix, n_threads=threads, quiet=opts.quiet)
        mixer = Mixer(ref_file, work, spec, imatrix, options, kept, threads, opts.quiet)
        floor = mixer.overhead + mixer.kept_bytes + smallest_bytes(options)
        if max_size is not None and max_size < floor:
            raise _too_small(max_size, floor, budget_from)
        lap("sensitivity")
        dec_body, dec_name = decision_text()
        say(f"--quant mix: reference pass over {dec_name} (the decisions)", quiet=opts.quiet)
        dec_ref = build_reference(f16, dec_body, work / "decision", n_ctx=n_ctx, n_chunks=max_chunks,
                                  settings=mixer.settings, text_name=dec_name, quiet=opts.quiet)
        lap("decision_reference")
        gains = mixer.gains(dec_ref)
        lap("probes")
        chosen, chosen_path = _choose(mixer, gains, dec_ref, max_size=max_size, max_kld=max_kld,
                                      budget_from=budget_from)
        lap("choose_and_write")
        ev_body, ev_name = read_text(None)
        say(f"--quant mix: reference pass over {ev_name} (the reported figures)", quiet=opts.quiet)
        ev_ref = build_reference(f16, ev_body, work / "evaluation", n_ctx=n_ctx, n_chunks=max_chunks,
                                 settings=mixer.settings, text_name=ev_name, quiet=opts.quiet)
        lap("evaluation_reference")
        final = measure(chosen_path, ev_ref, settings=mixer.settings, quiet=opts.quiet, desc="measuring the mix")
        lap("evaluation")
        mix_label = mixer.label(chosen_path.stat().st_size)
        row = _record(MixRow("mix (chosen)", "evaluation", size=chosen_path.stat().st_size,
                             predicted=chosen.predicted), final)
        row.verdict = "reported"
        mixer.rows.append(row)
        if compare:
            _compare(mixer, ev_ref, chosen_path.stat().st_size, final.kld)
            lap("compare")
        table = format_table(mixer.rows, mixer.spec.n_params)
        say(table, quiet=opts.quiet)
        why = (f"the least predicted KLD within {budget_from} of {max_size / 1e6:.1f} MB" if max_kld is None else
               f"the smallest mix measured under --max-kld {max_kld:g}"
               + (f" within {max_size / 1e6:.1f} MB" if max_size is not None else ""))
        say(f"--quant mix: chose {why}: {chosen_path.stat().st_size / 1e6:.1f} MB, mean KLD {final.summary.kld_mean:.5f} "
            f"on {ev_name} ({', '.join(f'{k} x{v}' for k, v in chosen.counts().items())})", quiet=opts.quiet)
        quality = as_manifest(label, ev_ref, final.summary, n_ctx=n_ctx)
        quality["mix"] = {
            "recipe": dict(sorted(chosen.types.items())), "counts": chosen.counts(), "label": mix_label,
            "max_size": max_size, "max_kld": max_kld, "budget_from": budget_from if max_size is not None else None,
            "predicted_kld": chosen.predicted, "gains": gains,
            "imatrix": im_info, "decision_text": {"name": dec_name, "sha256": dec_ref.text_sha256},
            "table": [asdict(r) for r in mixer.rows], "seconds": round(time.perf_counter() - t_start, 1), "phases": phases,
            "method": "importance-weighted quantization error per tensor and type, scaled to KLD by one probe per "
                      "tensor category; greedy allocation over each tensor's convex hull of (bytes, predicted KLD)",
        }
        types = {n: int(QT[t]) for n, t in chosen.types.items()} | {n: int(q) for n, q in kept.items()}
        ready = ReadyFile(chosen_path, source_sha256, im_info, {"tensor_types": chosen.counts()}, types=types)
        return pack_model(source, replace(opts, format="gguf", quant=mix_label, ready=ready, quality=quality))


def _measure_mix(mixer: Mixer, mix: Mix, ref: Reference, label: str, what: str, bar: float | None) -> tuple[Path, MixRow]:
    path = mixer.write(mix.types, label, f"writing {what}")
    decided = None if bar is None else (lambda e: e.high <= bar or e.low > bar)
    m = measure(path, ref, settings=mixer.settings, quiet=mixer.quiet, desc=f"measuring {what}", decided=decided)
    row = _record(MixRow(what, "decision", size=path.stat().st_size, predicted=mix.predicted), m)
    mixer.rows.append(row)
    return path, row


def _choose(mixer: Mixer, gains: dict[str, float], ref: Reference, *, max_size: int | None, max_kld: float | None,
            budget_from: str) -> tuple[Mix, Path]:
    """The mix to ship, written: the least predicted KLD under the budget, or the smallest under the bar."""
    label = "Q8_0"
    if max_size is not None:
        at_budget = allocate(mixer.options, gains, max_size - mixer.overhead - mixer.kept_bytes)
        label = mixer.label(mixer.file_bytes(at_budget))
        if max_kld is None:
            path = mixer.write(at_budget.types, label, "writing the mix")
            return at_budget, path
        path, row = _measure_mix(mixer, at_budget, ref, label, f"mix at {max_size / 1e6:.1f} MB", max_kld)
        if row.kld is not None and row.kld > max_kld:
            row.verdict = "over the bar"
            raise QualityError(f"no mix within {budget_from} of {max_size / 1e6:.1f} MB has a mean KLD <= {max_kld:g} "
                               f"(the best measured {row.kld:.5f}); raise --max-kld or --max-size. Measured:\n"
                               f"{format_table(mixer.rows, mixer.spec.n_params)}")
        row.verdict = "under the bar"
        best: tuple[Mix, Path] | None = (at_budget, path)
        best_row, limit = row, at_budget.nbytes
    else:
        best, limit = None, None
    assert max_kld is not None
    path = upgrade_path(mixer.options, gains)
    nbytes, predicted = path_totals(mixer.options, gains, path)
    lo, hi = 0, len(path[1])
    if limit is not None:
        hi = max(k for k in range(len(nbytes)) if nbytes[k] <= limit)
    factor = 1.0  # measured / predicted, refined by every measurement
    tried: set[int] = set()
    for _ in range(SEARCH_TRIES):
        if lo > hi:
            break
        want = max_kld / factor
        k = next((k for k in range(lo, hi + 1) if predicted[k] <= want), hi)
        if k in tried:
            break
        tried.add(k)
        mix = mix_at(mixer.options, gains, k, path)
        written, row = _measure_mix(mixer, mix, ref, label if limit is not None else
                                    mixer.label(mixer.file_bytes(mix)),
                                    f"mix of {mixer.file_bytes(mix) / 1e6:.1f} MB", max_kld)
        factor = max(row.kld or 0.0, 1e-12) / max(mix.predicted, 1e-12)
        if row.kld is not None and row.kld <= max_kld:
            row.verdict = "under the bar"
            if best is not None:
                best[1].unlink(missing_ok=True)
            best, best_row, hi = (mix, written), row, k - 1
        else:
            row.verdict = "over the bar"
            written.unlink(missing_ok=True)
            lo = k + 1
    if best is None:
        raise QualityError(f"no mix of this model has a mean KLD <= {max_kld:g} on the decision text; raise --max-kld. "
                           f"Measured:\n{format_table(mixer.rows, mixer.spec.n_params)}")
    best_row.verdict = "chosen: smallest under the bar"
    return best


def _compare(mixer: Mixer, ref: Reference, size: int, mix_kld: Estimate) -> None:
    """The uniform types just below and above the mix in size, with the same importance matrix, on the same text;
    each measured until its interval and the mix's no longer overlap (the comparison at hand), or to the cap."""
    sizes = mixer.uniform_sizes
    below = [q for q in UNIFORM if sizes[q] <= size]
    above = [q for q in UNIFORM if sizes[q] > size]
    for q in ([max(below, key=sizes.get)] if below else []) + ([min(above, key=sizes.get)] if above else []):
        out = mixer.work / f"uniform-{q}.gguf"
        quantize_gguf(mixer.ref.path, get_quant(q), out, imatrix=mixer.imatrix, n_threads=mixer.threads)
        m = measure(out, ref, settings=mixer.settings, quiet=mixer.quiet, desc=f"measuring uniform {q}",
                    decided=lambda e: e.high < mix_kld.low or e.low > mix_kld.high)
        row = _record(MixRow(f"uniform {q}", "evaluation", size=out.stat().st_size), m)
        row.verdict = "for comparison"
        mixer.rows.append(row)
        out.unlink()
