"""`pack`: the command line. Thin: parsing, one exit path, data on stdout, people on stderr."""

from __future__ import annotations

import os
import sys
import traceback

import click

from packager import __version__
from packager.cli.bench import bench_cmd, matrix_group
from packager.cli.bundle import verify_cmd
from packager.cli.model import model_cmd
from packager.cli.plan import plan_cmd, targets_cmd
from packager.cli.quality import quality_cmd
from packager.cli.run import chat_cmd, run_cmd
from packager.cli.serve import serve_cmd
from packager.errors import EdgepackError
from packager.interrupt import Terminated, install
from packager.kernels.ggml import LibraryMissing

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
      pack serve dist/SmolLM2-135M-Instruct-web       # the web page, with WASM threads

    Set EDGEPACK_DEBUG=1 for tracebacks, EDGEPACK_NO_PROGRESS=1 to hide progress bars.
    """


cli.add_command(model_cmd)
cli.add_command(targets_cmd)
cli.add_command(plan_cmd)
cli.add_command(verify_cmd)
cli.add_command(run_cmd)
cli.add_command(chat_cmd)
cli.add_command(serve_cmd)
cli.add_command(quality_cmd)
cli.add_command(bench_cmd)
cli.add_command(matrix_group)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one exit path; our errors are one line, bugs get a traceback with EDGEPACK_DEBUG=1."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    # The tokenizer gate uses transformers' tokenizers only; without this, importing
    # transformers imports torch too (~2 s) when it happens to be installed.
    os.environ.setdefault("USE_TORCH", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its warnings are not for our users

    install()  # Ctrl-C must stop the run even while llama.cpp calls back into Python
    try:
        cli.main(args=argv, prog_name="pack", standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns a KeyboardInterrupt it sees into Abort
        if isinstance(exc.__context__, Terminated):
            click.echo("terminated (SIGTERM): nothing was left half-written", err=True)
            sys.exit(Terminated.exit_code)
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # bad input is one line, like our own errors (click's show() prints three)
        where = exc.ctx.command_path if exc.ctx else "pack"
        click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (EdgepackError, LibraryMissing) as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 1))
    except Terminated:
        click.echo("terminated (SIGTERM): nothing was left half-written", err=True)
        sys.exit(Terminated.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was left half-written", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so, and how to report it
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for a traceback)", err=True)
        sys.exit(1)
    sys.exit(0)

