"""`pack quality`: measure a bundle against its reference and record the figures."""

from __future__ import annotations

import json
from pathlib import Path

import click

from packager.cli.options import quiet_option
from packager.measure.bundle_quality import assess_bundle


@click.command("quality")
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
    q = assess_bundle(bundle, reference, text=text, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads, quiet=quiet)
    if as_json:
        click.echo(json.dumps(q, indent=2))
    elif not quiet:
        click.echo(f"{bundle}: ppl {q['ppl']:.4f} (reference {q['ppl_ref']:.4f}), KLD mean {q['kld_mean']:.6f} "
                   f"p99 {q['kld_p99']:.6f}, top-1 {100 * q['top1']:.2f}% over {q['n_tokens']} tokens", err=True)
