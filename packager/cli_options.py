"""Option pieces shared by the `pack` commands (cli.py and cli_bench.py)."""

from __future__ import annotations

import click


def size_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A click callback: '6GB', '512MiB', ... as bytes, or a one-line usage error naming the option."""
    if value is None:
        return None
    from packager.profiles import parse_size

    try:
        return parse_size(value, where=f"--{param.name}")
    except ValueError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages on stderr.")
