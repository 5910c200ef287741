"""`pack`, the command line: one module per command group (model, plan, bundle, run, quality, bench),
registered on the click group in app.py. Thin: the work lives in the stages."""

from packager.cli.app import cli, main

__all__ = ["cli", "main"]
