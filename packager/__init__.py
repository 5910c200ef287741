"""edgepack: pack small open language models into verified, device-fitted bundles.

The public API::

    import packager
    with packager.load("dist/SmolLM2-135M-Instruct-laptop") as m:
        print(m.chat([{"role": "user", "content": "Hi!"}]))
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _version("edgepack")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

if TYPE_CHECKING:
    from packager.runtime import Model


def load(bundle: Any, **overrides: Any) -> "Model":
    """Load a bundle for generation; see :func:`packager.runtime.load`."""
    from packager.runtime import load as _load

    return _load(bundle, **overrides)


__all__ = ["__version__", "load"]
