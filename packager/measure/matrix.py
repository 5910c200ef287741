"""The device matrix file (benchmarks/matrix.toml): which models to pack and bench on which targets.

    [bench]                       # pack bench's options for every cell
    n_prompt = 512
    n_gen = 128
    repetitions = 5

    targets = ["laptop", "android-midrange"]

    [[model]]
    name = "smollm2-135m"         # no source: the embedded SmolLM2-135M-Instruct (no network)

    [[model]]
    name = "qwen2.5-0.5b"
    source = "Qwen/Qwen2.5-0.5B-Instruct"
    quant = "Q4_K_M"              # optional; default: the target's ladder
    format = "gguf"               # optional: gguf or onnx; default: the target's first format
    draft = "lookup"              # optional: pack model --draft (lookup, self:QUANT, a .gguf); adds the sg test
    targets = ["laptop"]          # optional; default: the top-level list

A model may instead name a prebuilt ``bundle = "path"`` (benched as it is).
Each cell's records are appended to the results file as soon as the cell is
done. A cell that cannot be measured (unknown target, a bundle that fails
verification, a model that does not fit, a crash, out of memory under the
emulated ceiling) is recorded as failed with its reason, and the matrix goes on;
a cell this host cannot hold at all (the plan needs more RAM than the host has)
is recorded as skipped.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (declared for < 3.11)
    import tomli as tomllib

from packager.errors import MatrixError
from packager.formats import FORMATS

BENCH_KEYS = {"n_prompt": int, "n_gen": int, "repetitions": int, "n_threads": int}


@dataclass(frozen=True)
class MatrixModel:
    name: str
    source: str | None = None  # hub id, local dir or .gguf; None: the embedded SmolLM2
    bundle: str | None = None  # a prebuilt bundle, benched as it is
    quant: str | None = None
    targets: tuple[str, ...] | None = None
    format: str | None = None  # gguf or onnx; None: each target's first
    draft: str | None = None  # pack model --draft


@dataclass(frozen=True)
class Matrix:
    models: tuple[MatrixModel, ...]
    targets: tuple[str, ...]
    bench: dict[str, int] = field(default_factory=dict)
    path: str = ""

    def cells(self, models: tuple[str, ...] = (), targets: tuple[str, ...] = ()) -> list[tuple[MatrixModel, str]]:
        """Every (model, target) pair, filtered by name when filters are given."""
        out = []
        for m in self.models:
            if models and m.name not in models:
                continue
            for t in m.targets or self.targets:
                if not targets or t in targets:
                    out.append((m, t))
        return out


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise MatrixError(f"{where} must be a list of names, e.g. [\"laptop\", \"android-midrange\"]")
    return tuple(value)


def load_matrix(path: str | os.PathLike[str]) -> Matrix:
    """Parse and check a matrix file; every problem names the file and the key."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MatrixError(f"{p} does not exist; pass a matrix file such as benchmarks/matrix.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MatrixError(f"{p}: not valid TOML ({exc})") from None
    unknown = set(data) - {"bench", "targets", "model"}
    if unknown:
        raise MatrixError(f"{p}: unknown key(s) {', '.join(sorted(unknown))}; use bench, targets, [[model]]")
    targets = _strs(data.get("targets", []), f"{p}: targets")
    bench = data.get("bench", {})
    if not isinstance(bench, dict):
        raise MatrixError(f"{p}: [bench] must be a table")
    for k, v in bench.items():
        if k not in BENCH_KEYS or isinstance(v, bool) or not isinstance(v, int):
            raise MatrixError(f"{p}: bench.{k} is not one of {', '.join(BENCH_KEYS)} with an integer value")
    raw = data.get("model", [])
    if not isinstance(raw, list) or not raw:
        raise MatrixError(f"{p}: no [[model]] entries; add at least one")
    models, names = [], set()
    for i, m in enumerate(raw):
        where = f"{p}: model[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise MatrixError(f"{where} needs a name")
        extra = set(m) - {"name", "source", "bundle", "quant", "format", "draft", "targets"}
        if extra:
            raise MatrixError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; "
                              "use name, source, bundle, quant, format, draft, targets")
        for k in ("source", "bundle", "quant", "format", "draft"):
            if k in m and not isinstance(m[k], str):
                raise MatrixError(f"{where}: {k} must be a string")
        if m.get("format") not in (None, *FORMATS):
            raise MatrixError(f"{where}: format must be one of {', '.join(map(repr, FORMATS))}, not {m['format']!r}")
        if m["name"] in names:
            raise MatrixError(f"{where}: the name {m['name']!r} is used twice")
        names.add(m["name"])
        mt = _strs(m["targets"], f"{where}.targets") if "targets" in m else None
        if not (mt or targets):
            raise MatrixError(f"{where} has no targets and the file has no top-level targets list")
        models.append(MatrixModel(m["name"], m.get("source"), m.get("bundle"), m.get("quant"), mt, m.get("format"),
                                  m.get("draft")))
    return Matrix(tuple(models), targets, dict(bench), str(p))


def default_results(label: str | None = None) -> Path:
    """benchmarks/results/matrix-<label or os-arch>.jsonl: one file per host kind, so hosts never collide."""
    slug = (label or f"{platform.system()}-{platform.machine()}").lower().replace(" ", "-").replace("/", "-")
    return Path("benchmarks") / "results" / f"matrix-{slug}.jsonl"
