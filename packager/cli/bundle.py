"""`pack verify`: re-hash every file of a bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from packager.bundle.verify import verify


@click.command("verify")
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
    problems = verify(bundle, weights=not fast, quiet=False)
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "ok": not problems, "problems": problems}, indent=2))
    for p in problems:
        click.echo(f"{bundle}: {p}", err=True)
    if problems:
        sys.exit(1)
    if not as_json:
        click.echo(f"{bundle}: verified", err=True)
