"""Numeric kernels the converters call: ggml quantization through ctypes, safetensors reads.

Installed, this folder is ``packager.kernels``. From a checkout, a Python started in the repository root
(``python -m pytest``, ``python -c``, PYTHONPATH=.) also finds it as a top-level ``kernels``: a name that
belongs to the PyPI package transformers 5 imports with its modeling code. Imported under that name, this
module hands the import to the next ``kernels`` on sys.path or, with none, becomes what a stray folder of that
name would be: an empty namespace package, which transformers takes for "not installed".
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
    if _spec is None or _spec.loader is None:
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    # The import system returns what sys.modules holds under the name once this body has run.
    sys.modules["kernels"] = _module
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
