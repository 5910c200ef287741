"""python -m packager.cli: the `pack` command."""

import sys

# `python -m` puts the current directory first on sys.path. Run from an edgepack checkout, its top-level
# kernels/ (installed as packager.kernels) would shadow the PyPI package `kernels` that transformers 5
# requires and imports with its modeling code ("cannot import name 'CUDAProperties' from 'kernels'"): the
# directory goes last instead (packager itself is already imported).
if sys.path:
    sys.path.append(sys.path.pop(0))

from packager.cli.app import main  # noqa: E402

main()
