"""The package's layout by stage, held from the imports themselves (read with ast, nothing imported).

Data flows source -> spec -> plan -> convert -> bundle -> runtime -> measure; pack and cli compose
the stages. A module imports only its own stage, earlier stages and the shared leaves; our own
modules are imported at the top of a file (only heavy third-party engines stay lazy); there is no
import cycle; kernels import nothing else of ours. Each failure names the file, the line and the
import that breaks the rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where each package folder lives (pyproject's package-dir).
FOLDERS = {"packager": ROOT / "packager", "packager.kernels": ROOT / "kernels"}

# Stage order; a module may import modules of its own rank or lower.
LEAVES = ("packager", "packager.errors", "packager.progress", "packager.host", "packager.interrupt",
          "packager.quants", "packager.archs")  # a leaf package (archs) counts with its modules
STAGES = ("source", "spec", "formats", "plan", "convert", "bundle", "runtime", "measure", "pack", "cli")
# On top of the order: what a stage must not know although it comes later.
FORBIDDEN = {
    "packager.bundle": ("packager.convert", "packager.spec", "packager.plan"),  # files and hashes, not how they were made
    "packager.runtime": ("packager.convert", "packager.plan"),  # a bundle runs without converter or planner code
}
# Engines that are imported where they are used (optional extras, or seconds to import).
HEAVY = ("llama_cpp", "onnxruntime", "onnxruntime_genai", "onnx", "torch", "transformers", "optimum")


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    path: Path
    line: int
    nested: bool  # inside a function or class body

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} imports {self.target}"


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            parts = [p for p in rel if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "packager" and parts and parts[0] == "kernels":
                continue
            mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, nested: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, nested, True)
                continue
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "packager" and not type_only:
                        found.append(Import(name, a.name, path, child.lineno, nested))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                if module.split(".")[0] == "packager" and not type_only:
                    for a in child.names:
                        sub = f"{module}.{a.name}"
                        found.append(Import(name, sub if sub in MODULES else module, path, child.lineno, nested))
            visit(child, inner, type_only)

    visit(tree, False, False)
    return found


IMPORTS = [imp for name, path in MODULES.items() for imp in _imports(name, path)]


def _rank(module: str) -> int:
    if module.startswith("packager.kernels"):
        return -1
    if module in LEAVES or module.rsplit(".", 1)[0] in LEAVES[1:]:
        return 0
    stage = module.split(".")[1]
    assert stage in STAGES, f"{module} belongs to no stage: add it to a stage folder or to LEAVES in {__file__}"
    return 1 + STAGES.index(stage)


def test_every_module_has_a_place() -> None:
    for name in MODULES:
        _rank(name)


def test_our_imports_sit_at_the_top_of_each_file() -> None:
    # packager/__init__.py is the exception: every submodule import runs it first, so its
    # `load` facade must import the runtime only when called.
    bad = [imp.where() + " inside a function" for imp in IMPORTS if imp.nested and imp.importer != "packager"]
    assert not bad, "import these at the top of the file:\n  " + "\n  ".join(bad)


def test_stages_import_only_earlier_stages() -> None:
    bad = []
    for imp in IMPORTS:
        if imp.importer == "packager":
            continue
        if _rank(imp.target) > _rank(imp.importer):
            bad.append(f"{imp.where()}: {imp.importer.split('.')[1]} comes before {imp.target.split('.')[1]} "
                       "in the data flow")
        for stage, never in FORBIDDEN.items():
            if imp.importer.startswith(stage + ".") or imp.importer == stage:
                if imp.target.startswith(never):
                    bad.append(f"{imp.where()}: {stage} must not depend on it")
    assert not bad, "\n  ".join(["imports against the data flow:", *bad])


def test_kernels_import_nothing_else_of_ours() -> None:
    bad = [imp.where() for imp in IMPORTS
           if imp.importer.startswith("packager.kernels") and not imp.target.startswith("packager.kernels")]
    assert not bad, "kernels must stand alone:\n  " + "\n  ".join(bad)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    lines: dict[tuple[str, str], Import] = {}
    for imp in IMPORTS:
        if imp.importer == "packager" or imp.target == imp.importer or imp.target not in graph:
            continue
        graph[imp.importer].add(imp.target)
        lines.setdefault((imp.importer, imp.target), imp)
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            steps = [lines[(a, b)].where() for a, b in zip(cycle, cycle[1:])]
            pytest.fail("import cycle:\n  " + "\n  ".join(steps))


def test_every_module_imports_without_the_heavy_engines() -> None:
    # What `pack --help`, `pack plan` and a GGUF-only install need: none of the engines at import time.
    code = f"""
import importlib, importlib.abc, sys
HEAVY = {HEAVY!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{{name}} imported at module level")
sys.meta_path.insert(0, Refuse())
for name in {sorted(n for n in MODULES if not n.endswith('__main__'))!r}:
    importlib.import_module(name)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
