"""`pack model --format onnx`: an int4 ONNX bundle for onnxruntime-genai.

    <name>-<target>/
      manifest.json
      model/model.onnx, model/model.onnx.data, model/genai_config.json,
      model/tokenizer.json, model/tokenizer_config.json, ...   (genai reads them from one folder)
      LICENSE, README.md, SHIPPING.md, ship/<channel>/...
      web/index.html, app.js, ...                                (the web target's chat page)

Weights over the target's part size (or --part-size) go into model.onnx.data, model.onnx.data.2, ...

pipeline.py hands :func:`pack_onnx` a planned :class:`~packager.pack.options.PackJob`; the graph itself is written by
packager/convert/onnx/.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from packager.archs import supported
from packager.bundle.web import CONFIG_NAME, WEB_DIR, chat_prompt_parts, web_card_section, web_page_files
from packager.bundle.writer import BundleWriter
from packager.convert.onnx.converter import (GPTQ_REFUSAL, OnnxOptions, check_config, convert, execution_provider,
                                             onnx_exporter)
from packager.convert.onnx.optimum_export import convert_optimum, fallback_memory
from packager.convert.onnx.wasm_graph import write_wasm_graph
from packager.errors import UnsupportedArchitectureError, UsageError
from packager.formats.onnx import ALGORITHMS, BLOCK_SIZES, SCHEMES
from packager.pack.card import LICENSE_NAMES, bundle_manifest, generation_defaults, model_card, with_quality
from packager.pack.options import AutoJob, Candidate, PackJob, PackOptions, PackResult, ReadyFile, part_limit
from packager.pack.preflight import check_disk, check_memory
from packager.pack.shipping import add_shipping
from packager.plan.planner import Plan, plan
from packager.plan.targets import Target
from packager.progress import say
from packager.runtime.onnx import chat_renderer, check_loads, tokenizer_config
from packager.source.resolver import Source
from packager.spec.eos import resolve_eos
from packager.spec.model import ModelSpec

MODEL_DIR = "model"
# What the streaming converter holds beyond mapped weights: row blocks in flight (measured on a
# 3B model: benchmarks/onnx_pack.py) and the graph proto.
CONVERTER_RSS = 1 << 30


def onnx_options(opts: PackOptions, target: Target):
    block = opts.onnx_block_size
    if block not in BLOCK_SIZES:
        raise UsageError(f"--block-size {block} is not supported; use {', '.join(map(str, BLOCK_SIZES))}")
    hqq = opts.onnx_algorithm == "hqq"  # HQQ's zero points are its point: always asymmetric
    return OnnxOptions(block_size=block, symmetric=not (opts.onnx_asymmetric or hqq),
                       accuracy_level=opts.onnx_accuracy_level, algorithm=opts.onnx_algorithm,
                       execution_provider=execution_provider(target.backends, target.name))


# benchmarks/onnx_draft_probe.py: at every MatMulNBits accuracy level a batch's logits differ from single
# steps' (level 4 by up to 1.0, and one argmax in 45 flipped on SmolLM2)
DRAFT_REFUSAL = ("--draft needs --format gguf: onnxruntime gives a batch of tokens other logits than one token at a "
                 "time, so verifying drafts could change the greedy output")


def check_request(src: Source, spec: ModelSpec | None, opts: PackOptions) -> None:
    """What --format onnx cannot do with this source or these options (``spec``: None before it is read)."""
    if opts.onnx_algorithm == "gptq":
        raise UsageError(GPTQ_REFUSAL)
    if opts.onnx_algorithm not in ALGORITHMS:
        raise UsageError(f"--algorithm {opts.onnx_algorithm} is not one of {', '.join(ALGORITHMS)}")
    if opts.draft:
        raise UsageError(DRAFT_REFUSAL)
    if opts.quant:
        raise UsageError(f"--quant {opts.quant} picks a GGUF type; ONNX bundles are int4 (choose --block-size, "
                         "--asymmetric, --accuracy-level, --algorithm), or pass --format gguf")
    if src.kind != "hf":
        raise UsageError(f"{src.path.name} is a GGUF file; ONNX bundles are built from a Hugging Face checkpoint "
                         "(a directory or hub id), or pass --format gguf")
    if not src.weight_files:
        raise UsageError("ONNX bundles need safetensors weights; this source has pickle weights only")
    if spec is not None:
        check_architecture(spec)


def check_architecture(spec: ModelSpec) -> None:
    """An HF architecture class neither the streaming converter nor optimum-onnx's export takes: one line
    naming those it takes, and GGUF where that takes it (exit 2)."""
    onnx_exporter(spec.architecture, spec.model_type)


def auto_unavailable(src: Source, spec: ModelSpec) -> str | None:
    """Why --quant auto cannot make ONNX candidates of this source, if it cannot."""
    if src.kind == "gguf":
        return "ONNX bundles are converted from the HF checkpoint, not a GGUF"
    if spec.architecture not in supported("onnx"):
        return f"edgepack's streaming ONNX converter lacks {spec.architecture}"
    if not src.weight_files:
        return "ONNX bundles need safetensors weights; this source has pickle weights only"
    return None


def auto_options_for(name: str, opts: PackOptions, tgt: Target) -> OnnxOptions:
    """The converter's options for one ONNX scheme of the auto ladder, as pack model would set them."""
    w = SCHEMES[name]
    return OnnxOptions(block_size=w.block_size, symmetric=w.symmetric, algorithm=w.algorithm,
                       accuracy_level=opts.onnx_accuracy_level,
                       execution_provider=execution_provider(tgt.backends, tgt.name))


def auto_candidate(job: AutoJob, name: str, n_ctx: int | None) -> Candidate:
    """One int4 scheme, converted from the checkpoint (the F16 reference is llama.cpp's, not ONNX)."""
    out = job.work / f"candidate-{name}"
    result = convert(job.src, out, auto_options_for(name, job.opts, job.target), n_ctx=n_ctx or 4096,
                     n_threads=job.n_threads, quiet=job.opts.quiet, part_bytes=part_limit(job.opts, job.target))
    return Candidate(out, out / "model.onnx", details=result.details)


def auto_options(opts: PackOptions, name: str, ready: ReadyFile, quality: dict[str, Any]) -> PackOptions:
    """What pack_model is asked to bundle the chosen scheme as measured."""
    w = SCHEMES[name]
    return replace(opts, format="onnx", quant=None, onnx_block_size=w.block_size, onnx_asymmetric=not w.symmetric,
                   onnx_algorithm=w.algorithm, ready=ready, quality=quality)


def _add_web_page(bw: BundleWriter, model_dir: Path, name: str, p: Plan) -> dict[str, Any]:
    """The static chat page (packager/data/web/) and its config, prompt rendered as packager.load renders it;
    returns the config."""
    renderer = chat_renderer(tokenizer_config(model_dir), model_dir)
    prompt = chat_prompt_parts(renderer) if renderer is not None else ("", "")  # no template: raw completion
    files = web_page_files(model_dir, name=name, prompt=prompt, n_ctx=p.n_ctx, kv_type=p.kv_type, model_rel=MODEL_DIR)
    for rel, data in files.items():
        bw.path(rel).write_bytes(data)
    return json.loads(files[f"{WEB_DIR}/{CONFIG_NAME}"])


def pack_onnx(job: PackJob) -> PackResult:
    """Convert the job's source to an ONNX int4 bundle for its target; everything is checked before any work."""
    src, spec, tgt, opts, warnings = job.src, job.spec, job.target, job.opts, job.warnings
    check_request(src, spec, opts)
    # An unsupported architecture or target fails before any work.
    exporter = onnx_exporter(spec.architecture, spec.model_type)
    if exporter == "edgepack":  # and a config the graph would compute otherwise (e.g. Gemma 3's attention softcap)
        check_config(src.path)
    states = {k.kind for k in spec.layer_kinds} & {"conv", "linear"}
    if tgt.distribution.channel == "web" and states:
        # the page (data/web/app.js) feeds ONNX Runtime Web a KV cache on every layer and nothing else
        what = "convolution" if states == {"conv"} else "linear-attention"
        raise UnsupportedArchitectureError(
            f"{spec.architecture}'s {what} layers carry a state between tokens, which onnxruntime-genai holds "
            f"but the web page's own decoding loop does not; pack it for another target than {tgt.name}")
    oo = onnx_options(opts, tgt)
    p = plan(spec, tgt, replace(job.overrides, quant=oo.quant_name, format="onnx"))  # sized as written
    final = job.final
    check_disk(final.parent, p.memory.weights)
    if exporter == "optimum":
        check_memory(fallback_memory(spec.n_params), f"optimum-onnx's export of {spec.architecture} (edgepack's "
                     "streaming ONNX converter lacks it; the fallback's peak is about 5x the f32 model)")
        warnings.append(f"{spec.architecture} is exported by optimum-onnx, not edgepack's streaming converter: "
                        "packing held the whole f32 model in memory")
    else:
        check_memory(CONVERTER_RSS, "the conversion")
    eos = resolve_eos(src.path)  # once: the converter writes its ids into genai_config.json
    eos_ids = eos.eog_ids if eos is not None else []  # []: generation_config's, as the converter would
    if eos is not None and eos.disagreed:
        say(f"the checkpoint's eos sources disagree ({', '.join(eos.disagreed)} name another token): "
            f"using {eos.describe()}", quiet=opts.quiet)
    with BundleWriter(final, force=opts.force) as bw:
        say(f"bundling the ONNX {oo.quant_name} model --quant auto measured" if opts.ready is not None else
            f"converting {src.name} to ONNX {oo.quant_name} ({oo.execution_provider}) for {tgt.name}", quiet=opts.quiet)
        model_dir = bw.path(f"{MODEL_DIR}/model.onnx").parent
        if opts.ready is not None:  # --quant auto: the very folder it measured
            result = opts.ready.install(model_dir)
        elif exporter == "optimum":
            result = convert_optimum(src, model_dir, oo, n_ctx=p.n_ctx, quiet=opts.quiet, eos_ids=eos_ids)
        else:
            result = convert(src, model_dir, oo, n_ctx=p.n_ctx, n_threads=opts.n_threads, quiet=opts.quiet,
                             eos_ids=eos_ids, part_bytes=job.part_bytes)
        src = src.with_hashes(result.source_sha256)
        if tgt.distribution.channel == "web":  # the page's WASM fallback: same bytes, f32 kernels (wasm_graph.py)
            result.details["onnx"]["web_wasm"] = write_wasm_graph(model_dir)
        too_big = [f.name for f in model_dir.iterdir() if job.part_bytes and f.stat().st_size > job.part_bytes]
        if too_big:  # optimum's export, or --quant auto's candidate, writes one data file
            warnings.append(f"{', '.join(too_big)} is over the {job.part_bytes / 1e6:.0f} MB part size of "
                            f"{tgt.name}'s channel and was not split (only edgepack's streaming converter splits)")
        for name in LICENSE_NAMES:
            if (src.path / name).is_file():
                bw.add_file(name, src.path / name)
        model_rel = f"{MODEL_DIR}/model.onnx"
        card = with_quality(model_card(src, tgt, p, model_rel), opts.quality, oo.quant_name)
        model_files = sorted(f"{MODEL_DIR}/{f.name}" for f in model_dir.iterdir() if f.is_file())
        if tgt.distribution.channel == "web":
            config = _add_web_page(bw, model_dir, src.name, p)
            card += web_card_section(config, result.details["onnx"]["web_wasm"])
        bw.add_text("README.md", card)
        add_shipping(bw, src.name, tgt, p, "onnx", model_rel, model_files)
        manifest = bundle_manifest(
            src, spec, tgt, p, quant=oo.quant_name, model_file=model_rel, warnings=warnings,
            generation=generation_defaults(src.path), execution_provider=oo.execution_provider,
            onnx=result.details["onnx"],
            tokenizer_check={"status": "not applicable", "reason": "onnxruntime-genai runs the source's own tokenizer.json"},
            **({"eos": eos.as_manifest()} if eos is not None else {}),
            **({"quality": opts.quality} if opts.quality is not None else {}))
        say("checking that the runtime loads it", quiet=opts.quiet)
        check_loads(model_dir)  # never publish a bundle its own runtime cannot open
        path = bw.commit(manifest.as_json(), quiet=opts.quiet)
    return PackResult(path, bw.manifest, warnings)
