"""`pack model`: pack a model into a bundle for a target."""

from __future__ import annotations

import json
from pathlib import Path

import click

from packager.cli.options import quiet_option, size_callback as _size
from packager.formats import FORMATS
from packager.pack.autoquant import DEFAULT_MAX_KLD, pack_auto
from packager.pack.mixquant import pack_mix
from packager.pack.options import PackOptions
from packager.pack.pipeline import pack_model
from packager.quants import QUANTS


@click.command("model")
@click.argument("source", required=False)
@click.option("-t", "--target", default="laptop", show_default=True,
              help="Device class: a name from `pack targets`, an alias (android), or a path to a .toml profile.")
@click.option("--quant", type=click.Choice(sorted(QUANTS) + ["auto", "mix"], case_sensitive=False),
              help="Quant type. Default: the best one on the target's ladder that fits. auto: the smallest "
                   "one that fits and whose measured mean KL divergence is under --max-kld, among the GGUF ladder "
                   "and, where the target runs ONNX (and --format does not say otherwise), the ONNX int4 schemes. "
                   "mix: a GGUF type per tensor, the lowest measured KLD that fits --max-size (default: what the "
                   "target leaves for weights), or with --max-kld the smallest mix under that bar.")
@click.option("--max-kld", type=float,
              help="With --quant auto or mix: the quality bar, mean KL divergence from F16 in nats (auto's "
                   "default 0.05; mix has none unless given).")
@click.option("--max-size", callback=_size,
              help="With --quant mix: the largest model file, e.g. 1.8GB (default: the target's RAM budget less "
                   "KV cache, compute buffers and overhead at the planned context).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)),
              help="Bundle format. Default: the target's first. onnx: int4 for onnxruntime-genai, streamed for "
                   "Llama, Mistral, Qwen2, Phi-3; other architectures go through optimum-onnx, which holds the "
                   "whole f32 model (peak about 5x its f32 size in RAM).")
@click.option("--block-size", "onnx_block_size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="With --format onnx: weights per int4 block (smaller: more accurate, a little larger).")
@click.option("--asymmetric", "onnx_asymmetric", is_flag=True,
              help="With --format onnx: int4 blocks with a zero point (default: symmetric, faster).")
@click.option("--accuracy-level", "onnx_accuracy_level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="With --format onnx: MatMulNBits compute precision (4: int8 dot products, fastest on CPU; 0: f32).")
@click.option("--algorithm", "onnx_algorithm", type=click.Choice(["rtn", "hqq", "gptq"]), default="rtn",
              show_default=True,
              help="With --format onnx: how weights become int4. rtn: round to nearest per block (fastest to pack). "
                   "hqq: half-quadratic quantization, refined zero points: lower error, no calibration data "
                   "(asymmetric; packs ~8x slower, decodes ~15% slower). gptq: not offered (it needs the whole "
                   "f32 model in memory for calibration); the error says what to use instead.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("dist"),
              show_default=True, help="Directory the bundle directory is written into.")
@click.option("--force", is_flag=True, help="Replace an existing bundle of the same name.")
@click.option("--revision", help="Hub branch, tag or commit to pack (hub ids only). Recorded in the manifest.")
@click.option("--ctx", "n_ctx", type=int, help="Context length. Default: the target's maximum that fits.")
@click.option("--ram", callback=_size, help="Override the target's RAM, e.g. 6GB.")
@click.option("--vram", callback=_size, help="Override the target's VRAM, e.g. 4GB.")
@click.option("--threads", "n_threads", type=int, help="Threads for conversion. Default: this machine's physical cores.")
@click.option("--allow-pickle", is_flag=True, help="Accept *.bin/*.pt weights (pickle can run code: only for sources you trust).")
@click.option("--allow-requantize", is_flag=True, help="Accept re-quantizing an already low-bit GGUF (loses quality).")
@click.option("--skip-tokenizer-check", is_flag=True,
              help="Bundle even if the GGUF tokenizer disagrees with the source's (recorded in the manifest).")
@click.option("--imatrix", "imatrix", type=click.Path(dir_okay=False, path_type=Path),
              help="Quantize with this importance matrix (a llama-imatrix .gguf or .dat file).")
@click.option("--imatrix-text", type=click.Path(dir_okay=False, path_type=Path),
              help="Compute an importance matrix from this calibration text first (used by default, with "
                   "edgepack's own text, for IQ1-IQ3 and Q2_K_S).")
@click.option("--part-size", callback=_size,
              help="Largest model file in the bundle, e.g. 512MB: a larger model is written as llama.cpp's split "
                   "GGUF (name-00001-of-0000N.gguf, ...; llama.cpp loads the first part), or its ONNX weights as "
                   "model.onnx.data, model.onnx.data.2, ... Default: the target's [distribution] part_size (a "
                   "store's asset-pack limit), if any.")
@click.option("--draft", metavar="DRAFT",
              help="Speculative decoding in the bundle: lookup (the next tokens guessed from the text's own earlier "
                   "n-grams, no second model: pays where replies repeat their input, as code edits and summaries "
                   "do), self:QUANT (this model again at a lower-bit type, e.g. self:Q4_0), or a smaller model "
                   "with the same tokenizer: its .gguf, or its checkpoint directory or hub id, converted at the "
                   "bundle's type (e.g. Qwen/Qwen2.5-0.5B-Instruct for Qwen2.5-3B-Instruct). Measured "
                   "at pack time (greedy, with and without, on the evaluation text) and enabled only where the "
                   "output stays identical and the plan says it pays off on the target. GGUF only.")
@click.option("--no-split", is_flag=True, help="Write one model file even where the target's part size is smaller.")
@click.option("--json", "as_json", is_flag=True, help="Print the bundle's manifest as JSON on stdout.")
@quiet_option
def model_cmd(source: str | None, target: str, quant: str | None, fmt: str | None, output: Path, force: bool,
              revision: str | None, n_ctx: int | None, ram: int | None, vram: int | None, n_threads: int | None,
              allow_pickle: bool, allow_requantize: bool, skip_tokenizer_check: bool, imatrix: Path | None,
              imatrix_text: Path | None, as_json: bool, quiet: bool, max_kld: float | None = None,
              max_size: int | None = None,
              onnx_block_size: str = "32", onnx_asymmetric: bool = False, onnx_accuracy_level: int = 4,
              onnx_algorithm: str = "rtn", part_size: int | None = None, no_split: bool = False,
              draft: str | None = None) -> None:
    """Pack SOURCE into a verified bundle for a target.

    SOURCE is a local Hugging Face checkpoint directory, a hub id (downloaded through
    your HF cache; HF_TOKEN and HF_HUB_OFFLINE apply) or a .gguf file. Without SOURCE,
    the embedded SmolLM2-135M-Instruct is packed (no network needed).

    \b
    Examples:
      pack model
      pack model Qwen/Qwen2.5-3B-Instruct --target android
      pack model ./Llama-3.2-1B-Instruct --quant Q4_K_M --ctx 4096
      pack model model-f16.gguf --quant Q4_0 -o out/
      pack model ./Qwen2.5-0.5B-Instruct --quant IQ4_NL --imatrix-text my-domain.txt
      pack model ./Qwen2.5-3B-Instruct --target android --quant auto --max-kld 0.05
      pack model ./Qwen2.5-3B-Instruct --target android --quant mix      # per-tensor types for the phone
      pack model ./Qwen2.5-3B-Instruct --quant mix --max-size 1.9GB      # the lowest KLD in 1.9 GB
      pack model ./Qwen2.5-3B-Instruct --format onnx --block-size 32     # int4 for onnxruntime-genai
      pack model ./Qwen2.5-3B-Instruct --format onnx --algorithm hqq     # int4, lower error, no calibration
      pack model ./Qwen2.5-3B-Instruct --target android --part-size 1GB  # parts of at most 1 GB
      pack model ./Qwen2.5-3B-Instruct --draft lookup                    # faster replies that quote the prompt
      pack model ./Qwen2.5-3B-Instruct --draft qwen2.5-0.5b-q8_0.gguf    # a small model drafts, the 3B verifies
      pack model Qwen/Qwen2.5-3B-Instruct --draft Qwen/Qwen2.5-0.5B-Instruct
    """
    auto = quant is not None and quant.lower() == "auto"
    mix = quant is not None and quant.lower() == "mix"
    if max_kld is not None and not (auto or mix):
        raise click.UsageError("--max-kld applies to --quant auto and --quant mix only")
    if max_size is not None and not mix:
        raise click.UsageError("--max-size applies to --quant mix only")
    if part_size is not None and no_split:
        raise click.UsageError("--part-size and --no-split contradict each other; pass one")

    opts = PackOptions(
        target=target, quant=quant.upper() if quant and not (auto or mix) else None, format=fmt, output=output, force=force,
        revision=revision, allow_pickle=allow_pickle, allow_requantize=allow_requantize,
        skip_tokenizer_check=skip_tokenizer_check, n_ctx=n_ctx, ram_bytes=ram, vram_bytes=vram,
        n_threads=n_threads, imatrix=imatrix, imatrix_text=imatrix_text, quiet=quiet,
        onnx_block_size=int(onnx_block_size), onnx_asymmetric=onnx_asymmetric, onnx_accuracy_level=onnx_accuracy_level,
        onnx_algorithm=onnx_algorithm, part_size=part_size, no_split=no_split, draft=draft,
    )
    if auto:
        result = pack_auto(source, opts, max_kld=DEFAULT_MAX_KLD if max_kld is None else max_kld)
    elif mix:
        result = pack_mix(source, opts, max_size=max_size, max_kld=max_kld)
    else:
        result = pack_model(source, opts)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({"path": str(result.path), **result.manifest}, indent=2))
    elif not quiet:
        m = result.manifest
        size = sum(f["bytes"] for f in m["files"])
        quant = f"mix, nearest uniform {m['quant']}" if "mix" in (m.get("quality") or {}) else m["quant"]
        click.echo(f"wrote {result.path} ({quant}, {size / 1e6:.1f} MB, "
                   f"predicted {m['predicted']['memory_bytes'] / 1e9:.2f} GB in memory)", err=True)
