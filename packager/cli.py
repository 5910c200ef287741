"""`pack`: the command line. Thin: parsing, one exit path, data on stdout, people on stderr."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from packager import __version__
from packager.cli_options import quiet_option, size_callback as _size
from packager.errors import EdgepackError
from packager.quants import QUANTS

DEBUG_ENV = "EDGEPACK_DEBUG"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgepack")
def cli() -> None:
    """edgepack: pack small language models into verified bundles that fit a device.

    \b
    Examples:
      pack model                                    # the embedded SmolLM2-135M, for a laptop
      pack model Qwen/Qwen2.5-0.5B-Instruct --target android
      pack model ./my-checkpoint --quant Q5_K_M -o out/
      pack verify dist/SmolLM2-135M-Instruct-laptop
      pack run dist/SmolLM2-135M-Instruct-laptop "Give me three tips for staying healthy."
      pack chat dist/SmolLM2-135M-Instruct-laptop

    Set EDGEPACK_DEBUG=1 for tracebacks, EDGEPACK_NO_PROGRESS=1 to hide progress bars.
    """


@cli.command("model")
@click.argument("source", required=False)
@click.option("-t", "--target", default="laptop", show_default=True,
              help="Device class: a name from `pack targets`, an alias (android), or a path to a .toml profile.")
@click.option("--quant", type=click.Choice(sorted(QUANTS) + ["auto"], case_sensitive=False),
              help="Quant type. Default: the best one on the target's ladder that fits. auto: the smallest "
                   "one on the ladder that fits and whose measured mean KL divergence is under --max-kld.")
@click.option("--max-kld", type=float,
              help="With --quant auto: the quality bar, mean KL divergence from F16 in nats (default 0.05).")
@click.option("--format", "fmt", type=click.Choice(["gguf", "onnx"]),
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
@click.option("--json", "as_json", is_flag=True, help="Print the bundle's manifest as JSON on stdout.")
@quiet_option
def model_cmd(source: str | None, target: str, quant: str | None, fmt: str | None, output: Path, force: bool,
              revision: str | None, n_ctx: int | None, ram: int | None, vram: int | None, n_threads: int | None,
              allow_pickle: bool, allow_requantize: bool, skip_tokenizer_check: bool, imatrix: Path | None,
              imatrix_text: Path | None, as_json: bool, quiet: bool, max_kld: float | None = None,
              onnx_block_size: str = "32", onnx_asymmetric: bool = False, onnx_accuracy_level: int = 4,
              onnx_algorithm: str = "rtn") -> None:
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
      pack model ./Qwen2.5-3B-Instruct --format onnx --block-size 32     # int4 for onnxruntime-genai
      pack model ./Qwen2.5-3B-Instruct --format onnx --algorithm hqq     # int4, lower error, no calibration
    """
    from packager.pack import PackOptions, pack_model

    auto = quant is not None and quant.lower() == "auto"
    if max_kld is not None and not auto:
        raise click.UsageError("--max-kld applies to --quant auto only")

    opts = PackOptions(
        target=target, quant=quant.upper() if quant and not auto else None, format=fmt, output=output, force=force,
        revision=revision, allow_pickle=allow_pickle, allow_requantize=allow_requantize,
        skip_tokenizer_check=skip_tokenizer_check, n_ctx=n_ctx, ram_bytes=ram, vram_bytes=vram,
        n_threads=n_threads, imatrix=imatrix, imatrix_text=imatrix_text, quiet=quiet,
        onnx_block_size=int(onnx_block_size), onnx_asymmetric=onnx_asymmetric, onnx_accuracy_level=onnx_accuracy_level,
        onnx_algorithm=onnx_algorithm,
    )
    if auto:
        from packager.autoquant import DEFAULT_MAX_KLD, pack_auto

        result = pack_auto(source, opts, max_kld=DEFAULT_MAX_KLD if max_kld is None else max_kld)
    else:
        result = pack_model(source, opts)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({"path": str(result.path), **result.manifest}, indent=2))
    elif not quiet:
        m = result.manifest
        size = sum(f["bytes"] for f in m["files"])
        click.echo(f"wrote {result.path} ({m['quant']}, {size / 1e6:.1f} MB, "
                   f"predicted {m['predicted']['memory_bytes'] / 1e9:.2f} GB in memory)", err=True)


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--fast", is_flag=True, help="Hash only small files; check the weights' sizes only.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def verify_cmd(bundle: Path, fast: bool, as_json: bool) -> None:
    """Re-hash every file of BUNDLE and say what differs from its manifest.

    Exit code 0 when verified, 1 when anything was changed, added or removed.

    \b
    Example:
      pack verify dist/SmolLM2-135M-Instruct-laptop
    """
    from packager.bundle import verify

    problems = verify(bundle, weights=not fast, quiet=False)
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "ok": not problems, "problems": problems}, indent=2))
    for p in problems:
        click.echo(f"{bundle}: {p}", err=True)
    if problems:
        sys.exit(1)
    if not as_json:
        click.echo(f"{bundle}: verified", err=True)


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON on stdout.")
def targets_cmd(as_json: bool) -> None:
    """List the device classes edgepack can pack for."""
    from packager.profiles import list_targets

    targets = list_targets()
    if as_json:
        click.echo(json.dumps([t.as_dict() for t in targets], indent=2))
        return
    rows = [(t.name, ",".join(t.aliases) or "-", f"{t.ram_bytes / 2**30:.0f} GiB", f"{t.usable_ram_fraction:.0%}",
             ",".join(t.formats), t.quant_ladder[0], t.description) for t in targets]
    header = ("name", "aliases", "ram", "usable", "formats", "first quant", "description")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


@cli.command("plan")
@click.argument("model")
@click.option("-t", "--target", default="laptop", show_default=True,
              help="Device class: a name from `pack targets`, an alias, a .toml profile, or 'host' (this machine, probed).")
@click.option("--quant", type=click.Choice(sorted(QUANTS), case_sensitive=False),
              help="Plan at this quant only. Default: the best one on the target's ladder that fits.")
@click.option("--format", "fmt", type=click.Choice(["gguf", "onnx"]), help="Bundle format. Default: the target's first.")
@click.option("--ctx", "n_ctx", type=int, help="Context length (not shrunk). Default: the target's maximum that fits.")
@click.option("--ram", callback=_size, help="Override the target's RAM, e.g. 6GB.")
@click.option("--vram", callback=_size, help="Override the target's VRAM, e.g. 4GB.")
@click.option("--threads", "n_threads", type=int, help="Override the target's thread count.")
@click.option("--revision", help="Hub branch, tag or commit (hub ids only).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option("--explain", is_flag=True, help="Also print the arithmetic behind every number.")
def plan_cmd(model: str, target: str, quant: str | None, fmt: str | None, n_ctx: int | None, ram: int | None,
             vram: int | None, n_threads: int | None, revision: str | None, as_json: bool, explain: bool) -> None:
    """Will MODEL fit TARGET? Plan quant, context and GPU layers before converting anything.

    MODEL is a local checkpoint directory, a .gguf file, or a hub id: for a hub id only
    config.json (and model.safetensors.index.json) are fetched, never the weights.
    Exit code 1 with the numbers when nothing fits, 2 for bad input.

    \b
    Examples:
      pack plan Qwen/Qwen2.5-3B-Instruct --target android
      pack plan ./Llama-3.2-1B-Instruct --target gpu-4gb --explain
      pack plan model.gguf --target ios --ctx 8192 --json
      pack plan Qwen/Qwen2.5-1.5B-Instruct --target ./my-phone.toml --ram 6GB
    """
    from packager.plan import Overrides
    from packager.plan_report import as_json as plan_json, plan_model, render

    overrides = Overrides(quant=quant.upper() if quant else None, format=fmt, n_ctx=n_ctx, ram_bytes=ram,
                          vram_bytes=vram, n_threads=n_threads)
    inp, tgt, p = plan_model(model, target, overrides, revision=revision)
    if as_json:
        click.echo(json.dumps(plan_json(inp, tgt, p), indent=2))
    else:
        click.echo(render(inp, tgt, p, explain=explain))


@cli.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap PROMPT in the chat template, or complete it raw.")
@click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", type=float, help="Sampling temperature (0: greedy). Default: the bundle's.")
@click.option("--seed", type=int, help="Sampling seed, for reproducible output.")
@click.option("--threads", "n_threads", type=int, help="Threads. Default: the physical cores this process may use.")
def run_cmd(bundle: Path, prompt: str, chat: bool, max_tokens: int, temperature: float | None, seed: int | None,
            n_threads: int | None) -> None:
    """Answer PROMPT with BUNDLE, streaming the text to stdout.

    \b
    Example:
      pack run dist/SmolLM2-135M-Instruct-laptop "Name three colours."
    """
    from packager.runtime import load

    opts: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    with load(bundle, n_threads=n_threads) as m:
        pieces = m.chat([{"role": "user", "content": prompt}], stream=True, **opts) if chat else m.stream(prompt, **opts)
        for piece in pieces:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    click.echo()


@cli.command("chat")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--system", help="A system message that starts the conversation. Default: the template's own.")
@click.option("-n", "--max-tokens", type=int, default=512, show_default=True, help="Tokens per reply at most.")
@click.option("--temperature", type=float, help="Sampling temperature (0: greedy). Default: the bundle's.")
@click.option("--top-p", type=float, help="Nucleus sampling: keep the most likely tokens up to this probability.")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens only (0: all).")
@click.option("--repeat-penalty", type=float, help="Penalty for repeating recent tokens (1: none).")
@click.option("--seed", type=int, help="Sampling seed, for reproducible replies.")
@click.option("--ctx", "n_ctx", type=int, help="Context length. Default: the bundle's.")
@click.option("--threads", "n_threads", type=int, help="Threads. Default: the physical cores this process may use.")
def chat_cmd(bundle: Path, system: str | None, max_tokens: int, temperature: float | None, top_p: float | None,
             top_k: int | None, repeat_penalty: float | None, seed: int | None, n_ctx: int | None,
             n_threads: int | None) -> None:
    """Talk with BUNDLE: each reply streams to stdout, the conversation is kept.

    Ctrl-C during a reply stops it and returns to the prompt; Ctrl-D, /exit or
    /quit ends the session; /reset forgets the conversation. Reads lines from
    stdin, so it can be scripted too.

    \b
    Examples:
      pack chat dist/SmolLM2-135M-Instruct-laptop
      pack chat dist/Qwen2.5-0.5B-Instruct-laptop --system "Answer in French." --temperature 0.7
      printf 'Hi!\\nName a colour.\\n' | pack chat dist/SmolLM2-135M-Instruct-laptop -n 64
    """
    from packager.chat import chat_session
    from packager.runtime import load

    opts: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                            "repeat_penalty": repeat_penalty, "seed": seed}
    with load(bundle, n_threads=n_threads, n_ctx=n_ctx) as m:
        chat_session(m, system=system, opts=opts)


@cli.command("quality")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", "reference", required=True,
              help="The F16/BF16 GGUF of the same source, or the source checkpoint (dir or hub id; converted to F16).")
@click.option("--text", type=click.Path(dir_okay=False, path_type=Path),
              help="Evaluation text (UTF-8). Default: the prose edgepack ships (~6k tokens).")
@click.option("--ctx", "n_ctx", type=int, default=512, show_default=True,
              help="Tokens per chunk; each chunk is scored on its second half, as llama-perplexity does.")
@click.option("--chunks", "n_chunks", type=int, help="Evaluate at most this many chunks. Default: all of the text.")
@click.option("--threads", "n_threads", type=int, help="Threads. Default: this machine's physical cores.")
@click.option("--json", "as_json", is_flag=True, help="Print the quality figures as JSON on stdout.")
@quiet_option
def quality_cmd(bundle: Path, reference: str, text: Path | None, n_ctx: int, n_chunks: int | None,
                n_threads: int | None, as_json: bool, quiet: bool) -> None:
    """Measure BUNDLE's quality against its reference and record it in the bundle.

    Reports perplexity of both, the mean and 99th-percentile KL divergence of the
    bundle's next-token distribution from the reference's, and how often both
    pick the same top token. The figures go into manifest.json (`quality`) and
    the model card; the bundle stays verified.

    \b
    Examples:
      pack quality dist/SmolLM2-135M-Instruct-laptop --reference ./SmolLM2-135M-Instruct
      pack quality dist/Qwen2.5-3B-Instruct-android --reference qwen2.5-3b-f16.gguf --chunks 8
      pack quality dist/my-bundle --reference model-bf16.gguf --text my-domain.txt --ctx 1024
    """
    from packager.assess import assess_bundle

    q = assess_bundle(bundle, reference, text=text, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads, quiet=quiet)
    if as_json:
        click.echo(json.dumps(q, indent=2))
    elif not quiet:
        click.echo(f"{bundle}: ppl {q['ppl']:.4f} (reference {q['ppl_ref']:.4f}), KLD mean {q['kld_mean']:.6f} "
                   f"p99 {q['kld_p99']:.6f}, top-1 {100 * q['top1']:.2f}% over {q['n_tokens']} tokens", err=True)


from packager.cli_bench import bench_cmd, matrix_group  # noqa: E402  (pack bench, pack matrix run|report)

cli.add_command(bench_cmd)
cli.add_command(matrix_group)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one exit path; our errors are one line, bugs get a traceback with EDGEPACK_DEBUG=1."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    # The tokenizer gate uses transformers' tokenizers only; without this, importing
    # transformers imports torch too (~2 s) when it happens to be installed.
    os.environ.setdefault("USE_TORCH", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its warnings are not for our users
    from packager.interrupt import install

    install()  # Ctrl-C must stop the run even while llama.cpp calls back into Python
    try:
        cli.main(args=argv, prog_name="pack", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # bad input is one line, like our own errors (click's show() prints three)
        where = exc.ctx.command_path if exc.ctx else "pack"
        click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdgepackError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was left half-written", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so, and how to report it
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for a traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
