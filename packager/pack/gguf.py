"""`pack model` for GGUF: the checkpoint converted (or a GGUF source bundled or re-quantized) for llama.cpp.

    <name>-<target>/
      manifest.json, model/<name>-<QUANT>.gguf, LICENSE, README.md, SHIPPING.md, ship/<channel>/...

A model larger than the target's part size (a store's asset-pack limit, or --part-size) is written
as llama.cpp's split GGUF instead, model/<name>-<QUANT>-00001-of-0000N.gguf, ... (convert/gguf/parts.py),
and ``model_file`` names the first part. SHIPPING.md and ship/ hold the store glue (pack/shipping.py).

pipeline.py hands :func:`pack_gguf` a planned :class:`~packager.pack.options.PackJob`; the file
itself is written by packager/convert/gguf/.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from packager.archs import arch_for
from packager.bundle.writer import BundleWriter
from packager.convert.gguf.converter import convert, packed_kv, write_vocab_gguf
from packager.convert.gguf.parts import split_gguf, split_record
from packager.convert.gguf.imatrix import calibration_text, compute_imatrix, user_imatrix
from packager.convert.gguf.requantize import quantize_gguf, requantize
from packager.convert.gguf.tokenizer_gate import check_tokenizer
from packager.convert.gguf.vocab import GGUFVocab, load_vocab, with_eos
from packager.errors import TokenizerMismatchError, UsageError
from packager.host import default_threads
from packager.pack.card import LICENSE_NAMES, bundle_manifest, generation_defaults, model_card, with_quality
from packager.pack.draft import (DRAFT_HELP, DraftRequest, add_draft, check_pairing, check_self, check_tokenizers,
                                 draft_file, parse_draft)
from packager.pack.options import AutoJob, Candidate, PackJob, PackOptions, PackResult, ReadyFile
from packager.pack.preflight import check_disk, check_memory
from packager.pack.shipping import add_shipping
from packager.plan.inputs import plan_input
from packager.plan.planner import Plan, memory, scheme
from packager.progress import say
from packager.quants import QuantType, get_quant
from packager.runtime.llama import check_loads
from packager.source.gguf_check import check_layout
from packager.source.pickle import to_safetensors
from packager.source.remote_code import refuse_remote_code
from packager.source.resolver import Source, resolve
from packager.spec.eos import EosChoice, resolve_eos
from packager.spec.model import ModelSpec, load_spec

# Memory the streaming converter itself needs beyond the mapped weights (row blocks in flight).
CONVERTER_RSS = 1 << 30


def check_request(src: Source, spec: ModelSpec, opts: PackOptions) -> None:
    """What GGUF cannot do with this source: an architecture the converter lacks fails before any work."""
    if src.kind == "hf":
        check_architecture(spec)


def check_architecture(spec: ModelSpec) -> None:
    """An HF architecture class the GGUF converter lacks: one line naming those it takes (exit 2)."""
    arch_for(spec.architecture)


def auto_unavailable(src: Source, spec: ModelSpec) -> str | None:
    """Why --quant auto cannot make GGUF candidates of this source (never: any source converts or is a GGUF)."""
    return None


def auto_candidate(job: AutoJob, name: str, n_ctx: int | None) -> Candidate:
    """One GGUF type, quantized from the F16 reference by llama.cpp's quantizer."""
    q = get_quant(name)
    out = job.work / f"candidate-{q.name}.gguf"
    imatrix = job.imatrix_for(q)
    quantize_gguf(job.f16, q, out, imatrix=imatrix, n_threads=job.n_threads)
    return Candidate(out, out, imatrix is not None)


def auto_options(opts: PackOptions, name: str, ready: ReadyFile, quality: dict[str, Any]) -> PackOptions:
    """What pack_model is asked to bundle the chosen GGUF type as measured."""
    return replace(opts, format="gguf", quant=name, ready=ready, quality=quality)


def pack_gguf(job: PackJob) -> PackResult:
    """Write the GGUF bundle ``job`` plans."""
    src, spec, tgt, p, opts, warnings, src_quant = (job.src, job.spec, job.target, job.plan, job.opts, job.warnings,
                                                   job.source_quant)
    quant = get_quant(p.quant)
    final = job.final
    check_disk(final.parent, p.memory.weights)
    if src.kind == "hf":
        check_memory(CONVERTER_RSS, "the conversion")
    model_rel = f"model/{src.name}-{quant.name}.gguf"
    threads = opts.n_threads or default_threads()
    part_bytes = job.part_bytes
    tok_check: dict[str, Any]
    imatrix_info: dict[str, Any] | None = None
    split: dict[str, Any] | None = None
    draft = parse_draft(opts.draft) if opts.draft else None
    draft_imatrix = draft_src = None  # draft_src: a checkpoint draft's source and vocabulary
    if draft is not None:  # a draft that cannot work fails before any conversion
        check_self(draft, quant, spec, tgt, p, src.name, from_gguf=src.kind == "gguf")
        if src.kind == "gguf":
            draft, draft_src = _draft_pairing(draft, quant, check_layout(src.path).tokenizer, src.name, p, opts,
                                              warnings)
    with BundleWriter(final, force=opts.force) as bw:
        gguf_path = bw.path(model_rel)
        if src.kind == "gguf":
            if opts.ready is not None:  # --quant auto: the very file it measured
                opts.ready.install(gguf_path)
                imatrix_info = opts.ready.imatrix_info
            elif src_quant == quant.name:
                say(f"bundling {src.path.name} as it is ({quant.name} fits {tgt.name})", quiet=opts.quiet)
                shutil.copyfile(src.path, gguf_path)
            else:
                say(f"re-quantizing {src.path.name} to {quant.name}", quiet=opts.quiet)
                warnings += requantize(src.path, src_quant, quant, gguf_path,
                                       allow_requantize=opts.allow_requantize, n_threads=threads)
            tok_check = {"status": "not applicable", "reason": "GGUF source carries its own tokenizer"}
            eos = None
            model_rel, split = _split_file(bw, model_rel, part_bytes, opts.quiet)
        else:
            vocab, eos = source_vocab(src)  # read once: the gate and the converter share it
            if eos is not None and eos.disagreed:
                say(f"the checkpoint's eos sources disagree ({', '.join(eos.disagreed)} name another token): "
                    f"using {eos.describe()}", quiet=opts.quiet)
            tok_check, kv_block, tokenizer = _tokenizer_gate(src, quant, vocab, eos, opts.skip_tokenizer_check, warnings)
            if draft is not None:
                draft, draft_src = _draft_pairing(draft, quant, tokenizer, src.name, p, opts, warnings)
            how = "mix" if opts.ready is not None and opts.ready.types else "auto"
            say(f"bundling the {quant.name} file --quant {how} measured" if opts.ready is not None
                else f"converting {src.name} to {quant.name} for {tgt.name}", quiet=opts.quiet)
            with safetensors_view(src, opts.quiet) as work:
                if opts.ready is not None:  # --quant auto: the very file it measured
                    result, imatrix_info = opts.ready.install(gguf_path), opts.ready.imatrix_info
                    bw.record_hash(model_rel, result.sha256)
                    model_rel, split = _split_file(bw, model_rel, part_bytes, opts.quiet)
                else:
                    imatrix, imatrix_info = _importance(work, quant, opts, threads)
                    if draft is not None and draft.kind == "self" and imatrix is not None:
                        draft_imatrix = imatrix  # the same model and text: computed once
                    result = convert(work, quant, gguf_path, imatrix=imatrix, n_threads=threads, quiet=opts.quiet,
                                     vocab=vocab, kv_block=kv_block, part_bytes=part_bytes)
                    for name, digest in result.file_sha256.items():
                        bw.record_hash(f"model/{name}", digest)
                    model_rel, split = f"model/{result.path.name}", result.details.get("split")
                if draft is not None and draft.kind == "self":  # the same weights once more, at the draft's type
                    say(f"converting {src.name} to {draft.quant.name} for the draft", quiet=opts.quiet)
                    if draft_imatrix is None:
                        draft_imatrix, _ = _importance(work, draft.quant, opts, threads)
                    convert(work, draft.quant, bw.path(draft_file(draft, src.name)), imatrix=draft_imatrix,
                            n_threads=threads, quiet=opts.quiet, vocab=vocab)  # its own metadata: another file type
            if work is src:
                src = src.with_hashes(result.source_sha256)
        if split is not None:
            say(f"wrote the model as {len(split['parts'])} parts of at most {part_bytes / 1e6:.0f} MB "
                f"(llama.cpp loads {split['parts'][0]})", quiet=opts.quiet)
        for name in LICENSE_NAMES:
            if src.kind == "hf" and (src.path / name).is_file():
                bw.add_file(name, src.path / name)
        label = f"mix ~{quant.name}" if opts.ready is not None and opts.ready.types else quant.name
        bw.add_text("README.md", with_quality(model_card(src, tgt, p, model_rel), opts.quality, label))
        add_shipping(bw, src.name, tgt, p, "gguf", model_rel,
                     [f"model/{n}" for n in split["parts"]] if split is not None else [model_rel])
        manifest = bundle_manifest(
            src, spec, tgt, p, quant=quant.name, model_file=model_rel, warnings=warnings,
            generation=generation_defaults(src.path) if src.kind == "hf" else {},
            tokenizer_check=tok_check, imatrix=imatrix_info, **({"eos": eos.as_manifest()} if eos is not None else {}),
            **({"split": split} if split is not None else {}),
            **({"quality": opts.quality} if opts.quality is not None else {}))
        say("checking that the runtime loads it", quiet=opts.quiet)
        check_loads(bw.path(model_rel))  # never publish a bundle its own runtime cannot open
        if draft is not None:
            def write_draft(path: Path) -> dict[str, Any] | None:
                if draft.kind == "gguf":
                    shutil.copyfile(draft.path, path)
                elif draft.kind == "hf":
                    return _convert_draft(*draft_src, draft.quant, path, opts, threads)
                elif src.kind == "gguf":
                    say(f"re-quantizing {src.path.name} to {draft.quant.name} for the draft", quiet=opts.quiet)
                    quantize_gguf(src.path, draft.quant, path, n_threads=threads, allow_requantize=True)
                # an HF source's self: draft was converted above, with the model
                return None

            manifest = add_draft(bw, manifest, draft, tgt=tgt, p=p, spec=spec, model_rel=model_rel, write=write_draft,
                                 n_threads=opts.n_threads, quiet=opts.quiet, warnings=warnings)
        path = bw.commit(manifest.as_json(), quiet=opts.quiet)
    return PackResult(path, bw.manifest, warnings)


def _draft_pairing(req: DraftRequest, quant: QuantType, target_tokenizer: dict[str, str], target_name: str,
                   p: Plan, opts: PackOptions,
                   warnings: list[str]) -> tuple[DraftRequest, tuple[Source, GGUFVocab] | None]:
    """A model draft shares the target's tokenizer and is smaller than its planned weights: checked before any
    conversion.

    A .gguf is read as it is (pack/draft.check_tokenizers). A checkpoint (a directory or hub id) is
    resolved, and its tokenizer written as the draft's GGUF will carry it (a vocab-only file,
    seconds) and compared field by field with the target's; its weights are counted at the bundle's
    type. Returns the request with a checkpoint's name and type filled in, and its source and
    vocabulary for the conversion.
    """
    check_tokenizers(req, target_tokenizer, target_name, p.memory.weights)
    if req.kind != "hf" or req.ref is None:
        return req, None
    dsrc = resolve(req.ref, allow_pickle=opts.allow_pickle, hash_weights=False, quiet=opts.quiet)
    if dsrc.kind != "hf":
        raise UsageError(f"--draft {req.ref}: {DRAFT_HELP}")
    dspec = load_spec(dsrc.path)
    check_request(dsrc, dspec, opts)  # an architecture the converter lacks
    warnings += refuse_remote_code(dsrc.path, dspec.architecture)
    vocab, _ = source_vocab(dsrc)
    with tempfile.TemporaryDirectory(prefix="edgepack-draft-vocab-") as tmp:
        tokenizer = check_layout(write_vocab_gguf(dsrc, quant, Path(tmp) / "vocab.gguf", vocab=vocab)).tokenizer
    draft_bytes = memory(dspec, scheme("gguf", quant.name), p.n_ctx, p.kv_type,
                         tensors=plan_input(dsrc.path).tensors).weights
    check_pairing(req.ref, tokenizer, draft_bytes, target_tokenizer, target_name, p.memory.weights)
    return replace(req, quant=quant, name=dsrc.name), (dsrc, vocab)


def _convert_draft(dsrc: Source, vocab: GGUFVocab, quant: QuantType, path: Path, opts: PackOptions,
                   threads: int) -> dict[str, Any]:
    """A checkpoint draft converted at the bundle's type; its source record (with the weights' sha256)."""
    say(f"converting {dsrc.name} to {quant.name} for the draft", quiet=opts.quiet)
    with safetensors_view(dsrc, opts.quiet) as work:
        # the user's --imatrix is the target's; the draft gets its own where its type needs one
        imatrix, _ = _importance(work, quant, replace(opts, imatrix=None), threads)
        result = convert(work, quant, path, imatrix=imatrix, n_threads=threads, quiet=opts.quiet, vocab=vocab)
    return (dsrc.with_hashes(result.source_sha256) if work is dsrc else dsrc).manifest()


def _split_file(bw: BundleWriter, model_rel: str, part_bytes: int | None, quiet: bool) -> tuple[str, dict | None]:
    """Split a GGUF already in the bundle into parts of at most ``part_bytes``; its new model_file and split record.

    For files made whole (a GGUF source bundled or re-quantized, --quant auto's candidate); a
    checkpoint is converted straight into its parts.
    """
    whole = bw.path(model_rel)
    done = split_gguf(whole, whole, part_bytes, quiet=quiet) if part_bytes else None
    if done is None:
        return model_rel, None
    parts, layout = done
    whole.unlink()
    bw.forget_hash(model_rel)
    for p in parts.paths:
        bw.record_hash(f"model/{p.name}", parts.sha256[p])
    return f"model/{parts.paths[0].name}", split_record(layout, parts.paths)


def _importance(src: Source, quant: QuantType, opts: PackOptions, threads: int) -> tuple[dict | None, dict | None]:
    """The importance matrix to quantize with, and what the manifest says about it.

    A user's llama.cpp imatrix file, or one computed by running a Q8_0 copy of the
    model over a calibration text: the user's, or the one edgepack ships, which is
    used by default for the types llama.cpp calls unusable without one.
    """
    if opts.imatrix is not None:
        return user_imatrix(opts.imatrix)
    if opts.imatrix_text is None and not quant.needs_imatrix:
        return None, None
    text, origin = calibration_text(opts.imatrix_text)

    say(f"computing an importance matrix from {origin}", quiet=opts.quiet)
    with tempfile.TemporaryDirectory(prefix="edgepack-imatrix-", dir=opts.output if Path(opts.output).is_dir() else None) as tmp:
        model = convert(src, get_quant("Q8_0"), Path(tmp) / "imatrix-model.gguf", n_threads=threads, quiet=opts.quiet).path
        imatrix = compute_imatrix(model, text, n_threads=threads, quiet=opts.quiet)
    return imatrix, {"text": origin, "sha256": hashlib.sha256(text.encode()).hexdigest(), "model": "Q8_0"}


@contextmanager
def safetensors_view(src: Source, quiet: bool) -> Iterator[Source]:
    """The source itself, or (pickle weights, allowed by the user) a temporary safetensors copy."""
    if src.weight_files:
        yield src
        return
    say("rewriting pickle weights as safetensors (--allow-pickle)", quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="edgepack-pickle-") as tmp:
        yield replace(src, path=to_safetensors(src.path, Path(tmp)))


def source_vocab(src: Source) -> tuple[GGUFVocab, EosChoice | None]:
    """The checkpoint's vocabulary as the GGUF gets it: its eos resolved from every source (spec/eos.py)."""
    vocab, eos = load_vocab(src.path), resolve_eos(src.path)
    if eos is not None:
        vocab = with_eos(vocab, eos.eos_id, eos.tokenizer_ids)
    return vocab, eos


def _tokenizer_gate(src: Source, quant: QuantType, vocab: Any, eos: EosChoice | None, skip: bool,
                    warnings: list[str]) -> tuple[dict[str, Any], bytes, dict[str, str]]:
    """Check the GGUF's tokenizer against the source's before converting (it takes seconds).

    Returns the manifest's record of the check, the packed metadata of the vocab-only GGUF it ran
    on, which the model file reuses as it is, and its tokenizer fields (a draft must match them).
    """
    with tempfile.TemporaryDirectory(prefix="edgepack-vocab-") as tmp:
        vocab_gguf = write_vocab_gguf(src, quant, Path(tmp) / "vocab.gguf", vocab=vocab)
        kv_block, tokenizer = packed_kv(vocab_gguf), check_layout(vocab_gguf).tokenizer
        try:
            report = check_tokenizer(vocab_gguf, src.path, eos=eos)
        except TokenizerMismatchError as exc:
            if not skip:
                raise
            warnings.append(f"tokenizer check failed and was skipped: {exc}")
            return {"status": "skipped", "error": str(exc)}, kv_block, tokenizer
    return ({"status": "passed", **{k: v for k, v in report.__dict__.items() if isinstance(v, (int, str, list))}},
            kv_block, tokenizer)

