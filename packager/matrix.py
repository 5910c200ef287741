"""`pack matrix run`: pack and bench every model x target cell of benchmarks/matrix.toml.

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
import tomllib
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from packager.bench import BenchOptions, failed_record, run_bench, write_records
from packager.errors import EdgepackError, MatrixError, VerificationError

BENCH_KEYS = {"n_prompt": int, "n_gen": int, "repetitions": int, "n_threads": int}


@dataclass(frozen=True)
class MatrixModel:
    name: str
    source: str | None = None  # hub id, local dir or .gguf; None: the embedded SmolLM2
    bundle: str | None = None  # a prebuilt bundle, benched as it is
    quant: str | None = None
    targets: tuple[str, ...] | None = None


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
        extra = set(m) - {"name", "source", "bundle", "quant", "targets"}
        if extra:
            raise MatrixError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; use name, source, bundle, quant, targets")
        for k in ("source", "bundle", "quant"):
            if k in m and not isinstance(m[k], str):
                raise MatrixError(f"{where}: {k} must be a string")
        if m["name"] in names:
            raise MatrixError(f"{where}: the name {m['name']!r} is used twice")
        names.add(m["name"])
        mt = _strs(m["targets"], f"{where}.targets") if "targets" in m else None
        if not (mt or targets):
            raise MatrixError(f"{where} has no targets and the file has no top-level targets list")
        models.append(MatrixModel(m["name"], m.get("source"), m.get("bundle"), m.get("quant"), mt))
    return Matrix(tuple(models), targets, dict(bench), str(p))


def default_results(label: str | None = None) -> Path:
    """benchmarks/results/matrix-<label or os-arch>.jsonl: one file per host kind, so hosts never collide."""
    slug = (label or f"{platform.system()}-{platform.machine()}").lower().replace(" ", "-").replace("/", "-")
    return Path("benchmarks") / "results" / f"matrix-{slug}.jsonl"


def _host_can_hold(predicted_bytes: int | None) -> str | None:
    import psutil

    total = psutil.virtual_memory().total
    if predicted_bytes and predicted_bytes > total:
        return f"the plan needs {predicted_bytes / 1e9:.2f} GB and this host has {total / 1e9:.2f} GB of RAM"
    return None


def run_cell(model: MatrixModel, target: str, opts: BenchOptions, work: Path, *,
             quiet: bool = True) -> list[dict[str, Any]]:
    """Pack (unless prebuilt) and bench one cell; a failure becomes a failed record, never an exception."""
    from packager.profiles import load_target

    def failed(stage: str, exc: BaseException | str) -> list[dict[str, Any]]:
        return [failed_record(model=model.name, target=target, stage=stage, error=exc)]

    try:
        load_target(target)
    except EdgepackError as exc:
        return failed("target", exc)
    if model.bundle:
        path = Path(model.bundle)
    else:
        from packager.pack import PackOptions, pack_model

        try:
            result = pack_model(model.source, PackOptions(target=target, quant=model.quant, output=work / model.name,
                                                          force=True, quiet=quiet))
        except EdgepackError as exc:
            return failed("pack", exc)
        except Exception as exc:  # a bug in packing one cell must not stop the matrix
            return failed("pack", f"internal error: {type(exc).__name__}: {exc}")
        path = result.path
        why = _host_can_hold(result.manifest.get("predicted", {}).get("memory_bytes"))
        if why:
            rec = failed("bench", why)
            rec[0]["status"] = "skipped"
            return rec
    try:
        return run_bench(path, replace(opts, target=target, quiet=quiet))
    except VerificationError as exc:
        return failed("verify", exc)
    except EdgepackError as exc:
        return failed("bench", exc)
    except Exception as exc:
        return failed("bench", f"internal error: {type(exc).__name__}: {exc}")


def run_matrix(matrix: Matrix, *, results: Path, work: Path, overrides: dict[str, int | None] | None = None,
               models: tuple[str, ...] = (), targets: tuple[str, ...] = (), label: str | None = None,
               quiet: bool = False, on_cell: Callable[[MatrixModel, str, list[dict[str, Any]]], None] | None = None,
               ) -> list[dict[str, Any]]:
    """Run every selected cell, appending each cell's records to ``results`` as it finishes."""
    from packager.progress import say

    settings = {**matrix.bench, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    opts = BenchOptions(**settings)
    run_id = uuid.uuid4().hex[:12]
    cells = matrix.cells(models, targets)
    if not cells:
        raise MatrixError(f"{matrix.path}: no cell matches --model {','.join(models) or '*'} / --target {','.join(targets) or '*'}")
    everything: list[dict[str, Any]] = []
    for i, (model, target) in enumerate(cells, 1):
        say(f"[{i}/{len(cells)}] {model.name} x {target}", quiet=quiet)
        records = run_cell(model, target, opts, work, quiet=quiet)
        for r in records:
            r.update(run_id=run_id, matrix_model=model.name, runner=label or f"{platform.system()}-{platform.machine()}")
        write_records(records, results)
        if records and records[0]["status"] != "ok":
            say(f"  {records[0]['status']}: {records[0]['error']}", quiet=quiet)
        if on_cell:
            on_cell(model, target, records)
        everything += records
    return everything
