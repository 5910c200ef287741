"""`pack bench` and `pack matrix run|report`: the click commands; the work lives in bench.py / matrix*.py."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from packager.cli.options import size_callback as _size
from packager.measure.bench import BenchOptions, run_bench
from packager.measure.matrix import default_results, load_matrix
from packager.pack.matrix import run_matrix
from packager.measure.matrix_report import report
from packager.measure.records import FORMATS, render


def _names(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n.strip() for v in value for n in v.split(",") if n.strip())


@click.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-t", "--target", help="Device class to emulate (threads, memory ceiling). Default: the bundle's target.")
@click.option("-p", "--n-prompt", type=int, default=512, show_default=True, help="Prompt tokens of the prefill test (0: none).")
@click.option("-n", "--n-gen", type=int, default=128, show_default=True, help="Tokens of the decode test (0: none).")
@click.option("-r", "--repetitions", type=int, default=5, show_default=True,
              help="Repetitions, each in a fresh process (plus one warm-up run, not counted).")
@click.option("--threads", "n_threads", type=int,
              help="Threads. Default: the target's cpu_threads, bounded by this host's usable CPUs.")
@click.option("--ram", callback=_size, help="Override the target's RAM for the memory ceiling, e.g. 4GB.")
@click.option("--ctx", "n_ctx", type=int,
              help="Context size to load with. Default: the bundle's planned context, as the app loads it "
                   "(llama-bench uses -p + -n).")
@click.option("--no-warmup", is_flag=True, help="Skip the uncounted warm-up run.")
@click.option("--no-chat", is_flag=True,
              help="Skip the four-turn chat (a ~700-token system prompt) whose time to first token is recorded for "
                   "turn 1 and the later turns (ttft_chat_first_s, ttft_chat_later_s).")
@click.option("-o", "--output", "fmt", type=click.Choice(FORMATS), default="md", show_default=True,
              help="Record format on stdout, as llama-bench's -o.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def bench_cmd(bundle: Path, target: str | None, n_prompt: int, n_gen: int, repetitions: int, n_threads: int | None,
              ram: int | None, n_ctx: int | None, no_warmup: bool, no_chat: bool, fmt: str, quiet: bool) -> None:
    """Measure BUNDLE: prefill and decode tokens/s, load time, time to first token (a cold request, and each turn
    of a chat), peak memory.

    Like llama-bench (same -p/-n/-r/-o, same record fields), through packager.load, each
    repetition in a fresh process, with the planner's predictions beside the measurements.
    The target's device class is emulated where the OS allows: as many threads as it has
    performance cores, pinned to this host's fastest cores; private memory capped at its
    usable RAM (Linux), peak RSS checked after. Each record says what was emulated and
    what could not be. Records go to stdout, progress to stderr.

    \b
    Examples:
      pack bench dist/SmolLM2-135M-Instruct-laptop
      pack bench dist/SmolLM2-135M-Instruct-laptop --target android -p 256 -n 64 -r 3
      pack bench dist/Qwen2.5-0.5B-Instruct-laptop --threads 4 -o jsonl >> results.jsonl
      pack bench dist/SmolLM2-135M-Instruct-laptop --ctx 640   # llama-bench's context for -p 512 -n 128
    """
    opts = BenchOptions(target=target, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, n_threads=n_threads,
                        ram_bytes=ram, n_ctx=n_ctx, warmup=not no_warmup, chat=not no_chat, quiet=quiet)
    records = run_bench(bundle, opts)
    sys.stdout.write(render(records, fmt))
    for r in records[:1]:
        for note in r["emulated"]["notes"] + ([r["fallback"]] if r.get("fallback") else []):
            if not quiet:
                click.echo(f"note: {note}", err=True)


@click.group("matrix")
def matrix_group() -> None:
    """The device matrix: models x device classes, benched and reported (benchmarks/matrix.toml)."""


@matrix_group.command("run")
@click.argument("matrix_file", type=click.Path(dir_okay=False, path_type=Path), default=Path("benchmarks/matrix.toml"))
@click.option("-m", "--model", "models", multiple=True, callback=_names, help="Only these models (names, comma-separated).")
@click.option("-t", "--target", "targets", multiple=True, callback=_names, help="Only these targets (comma-separated).")
@click.option("-p", "--n-prompt", type=int, help="Override the matrix's prompt tokens.")
@click.option("-n", "--n-gen", type=int, help="Override the matrix's decode tokens.")
@click.option("-r", "--repetitions", type=int, help="Override the matrix's repetitions.")
@click.option("--threads", "n_threads", type=int, help="Threads for every cell. Default: each target's, bounded by the host.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file the records are appended to. Default: benchmarks/results/matrix-<label>.jsonl.")
@click.option("--label", help="Name of this runner in the report (e.g. ubuntu-24.04-arm). Default: <os>-<arch>.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("dist/matrix"), show_default=True,
              help="Where the cells' bundles are packed.")
@click.option("--strict", is_flag=True, help="Exit 1 when any cell failed (CI). Default: failed cells are only recorded.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def matrix_run_cmd(matrix_file: Path, models: tuple[str, ...], targets: tuple[str, ...], n_prompt: int | None,
                   n_gen: int | None, repetitions: int | None, n_threads: int | None, results: Path | None,
                   label: str | None, work: Path, strict: bool, quiet: bool) -> None:
    """Pack and bench every model x target cell this host can serve; append JSONL records.

    A cell that fails (unknown target, bundle fails verification, does not fit, crash,
    out of memory under the emulated ceiling) is recorded as failed with its reason and
    the rest of the matrix goes on (with --strict, the exit code is then 1).

    \b
    Examples:
      pack matrix run
      pack matrix run benchmarks/matrix.toml --model smollm2-135m -p 128 -n 32 -r 2
      pack matrix run --strict --label macos-14 --results benchmarks/results/matrix-macos-14.jsonl
    """
    matrix = load_matrix(matrix_file)
    out = results or default_results(label)
    records = run_matrix(matrix, results=out, work=work, models=models, targets=targets, label=label, quiet=quiet,
                         overrides={"n_prompt": n_prompt, "n_gen": n_gen, "repetitions": repetitions, "n_threads": n_threads})
    failed = [r for r in records if r["status"] == "failed"]
    if not quiet:
        click.echo(f"{len(records) - len(failed)} records, {len(failed)} failed cells -> {out}", err=True)
    if failed and strict:
        sys.exit(1)


@matrix_group.command("report")
@click.argument("results", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/report"),
              show_default=True, help="Directory for report.md and the PNG plots.")
@click.option("--no-plots", is_flag=True, help="Only the markdown table.")
def matrix_report_cmd(results: tuple[Path, ...], output: Path, no_plots: bool) -> None:
    """Render report.md and PNG plots from result files (default: benchmarks/results).

    Takes the latest run of each (runner, model, target) from every file given, including
    files from other hosts (the CI jobs' artifacts). Prints the table on stdout.

    \b
    Examples:
      pack matrix report
      pack matrix report artifacts/ -o report/
    """
    md, _ = report(list(results) or [Path("benchmarks/results")], output, with_plots=not no_plots)
    sys.stdout.write(md.read_text(encoding="utf-8"))
    click.echo(f"wrote {md}", err=True)
