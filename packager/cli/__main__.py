"""python -m packager.cli: the `pack` command."""

from packager.cli.app import main

main()
