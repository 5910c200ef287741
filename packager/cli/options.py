"""Option pieces shared by the `pack` commands (the modules of packager/cli/)."""

from __future__ import annotations

import click

from packager.plan.targets import parse_size


def size_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A click callback: '6GB', '512MiB', ... as bytes, or a one-line usage error naming the option."""
    if value is None:
        return None

    try:
        return parse_size(value, where=param.opts[0] if param.opts else f"--{param.name}")
    except ValueError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages on stderr.")
