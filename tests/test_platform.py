"""Every platform the package declares: Windows and macOS breakage shows up on Linux too.

- Every module imports, and `pack model` packs the SmolLM2 fixture, with the POSIX-only modules
  (fcntl, resource) refused to our own code, as on Windows.
- Python 3.10 (declared) has no tomllib: the profiles load through tomli.
- Every package folder is in the wheel (pyproject's explicit package list).
- Started with SIGINT ignored (a shell's background job, nohup), the Ctrl-C tests still work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1")

# Refuses `import fcntl` / `import resource` to packager's own modules (third-party libraries pick
# their own Windows paths), then imports every module and packs the embedded default model.
WITHOUT_POSIX = r"""
import builtins, importlib, json, pkgutil, sys
from pathlib import Path

BLOCKED = {"fcntl", "resource"}
real_import = builtins.__import__
refused = []

def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if name.split(".")[0] in BLOCKED and importer.startswith("packager"):
        refused.append(f"{importer} imports {name}")
        raise ImportError(f"No module named {name!r} (as on Windows)")
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = guarded
import packager
names = [m.name for m in pkgutil.walk_packages(packager.__path__, "packager.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
from packager.pack.options import PackOptions
from packager.pack.pipeline import pack_model
from packager.bundle.verify import verify
result = pack_model(None, PackOptions(output=Path(sys.argv[1]), quiet=True))
print(json.dumps({"modules": len(names), "bundle": str(result.path), "problems": verify(result.path),
                  "refused": refused}))
"""


def test_imports_and_packs_without_posix_only_modules(tmp_path):
    r = subprocess.run([sys.executable, "-c", WITHOUT_POSIX, str(tmp_path / "dist")], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["modules"] > 60 and out["problems"] == [], out
    assert Path(out["bundle"], "manifest.json").is_file()


TOML_310 = r"""
import sys, tomllib
sys.modules["tomli"] = tomllib  # tomli is tomllib's package form: same API
del sys.modules["tomllib"]

class NoTomllib:
    def find_spec(self, name, path=None, target=None):
        if name == "tomllib":
            raise ModuleNotFoundError("No module named 'tomllib' (Python 3.10)")
        return None

sys.meta_path.insert(0, NoTomllib())
from packager.plan.targets import list_targets
from packager.measure import matrix
print(len(list_targets()), matrix.tomllib.__name__)
"""


def test_profiles_load_without_tomllib_as_on_python_3_10():
    r = subprocess.run([sys.executable, "-c", TOML_310], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    n, module = r.stdout.split()
    assert int(n) >= 5 and module == "tomllib"  # the tomli stand-in (tomllib's own module object)


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists packages explicitly (kernels/ and targets/ are mapped in): a new stage
    folder missing from it works in an editable install and is absent from the wheel."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(tool["packages"])
    folders = {"packager." + ".".join(p.relative_to(ROOT / "packager").parts) if p != ROOT / "packager" else "packager"
               for p in (ROOT / "packager").rglob("*") if p.is_dir() and p.name != "__pycache__"} | {"packager"}
    assert folders - declared == set(), f"in packager/ but not in pyproject's packages: {sorted(folders - declared)}"
    assert {"packager.kernels", "packager.targets"} <= declared


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal dispositions")
def test_ctrl_c_tests_work_when_started_with_sigint_ignored():
    """A shell's background job (and nohup) starts with SIGINT ignored; children inherit that. The
    suite's conftest restores a handler, so a Ctrl-C test passes there too (7 failed before)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_bundle.py::test_ctrl_c_while_the_old_bundle_is_removed_still_finishes_the_swap"],
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode == 0, r.stdout[-2000:]


def test_the_tests_workflow_runs_every_declared_platform_and_python():
    import yaml

    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    versions = sorted((c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")),
                      key=lambda v: tuple(map(int, v.split("."))))
    assert project["requires-python"] == f">={versions[0]}"
    path = ROOT / ".github" / "workflows" / "tests.yml"
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    job = yaml.safe_load(path.read_text())["jobs"]["test"]
    matrix = job["strategy"]["matrix"]
    assert {"ubuntu-latest", "windows-latest"} <= set(matrix["os"]) and any(o.startswith("macos") for o in matrix["os"])
    assert matrix["python"] == [versions[0], versions[-1]]
    assert any('pytest -q -m "not slow"' in step.get("run", "") for step in job["steps"])


def test_the_wheel_builds_without_setuptools_warnings_and_holds_every_module(tmp_path):
    """A warning on install was the first thing a new user saw (packager/data outside the package list)."""
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), "-v"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line.strip() for line in (r.stdout + r.stderr).splitlines()
                if "Warning" in line or "warning:" in line and "byte-compiling" not in line]
    assert warnings == [], warnings
    (wheel,) = tmp_path.glob("edgepack-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {"packager/" + p.relative_to(ROOT / "packager").as_posix() for p in (ROOT / "packager").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert sources - names == set(), sorted(sources - names)
    assert {"packager/kernels/ggml.py", "packager/targets/laptop.toml"} <= names
