"""`pack matrix run`: pack and bench every model x target cell of a matrix file (measure/matrix.py).

Each cell's records are appended to the results file as soon as the cell is done; a cell that
cannot be measured is recorded as failed with its reason, and the matrix goes on.
"""

from __future__ import annotations

import platform
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import psutil

from packager.errors import EdgepackError, MatrixError, VerificationError
from packager.measure.bench import BenchOptions, failed_record, run_bench, write_records
from packager.measure.matrix import Matrix, MatrixModel
from packager.pack.options import PackOptions
from packager.pack.pipeline import pack_model
from packager.plan.targets import load_target
from packager.progress import say


def _host_can_hold(predicted_bytes: int | None) -> str | None:
    total = psutil.virtual_memory().total
    if predicted_bytes and predicted_bytes > total:
        return f"the plan needs {predicted_bytes / 1e9:.2f} GB and this host has {total / 1e9:.2f} GB of RAM"
    return None


def run_cell(model: MatrixModel, target: str, opts: BenchOptions, work: Path, *,
             quiet: bool = True) -> list[dict[str, Any]]:
    """Pack (unless prebuilt) and bench one cell; a failure becomes a failed record, never an exception."""
    def failed(stage: str, exc: BaseException | str) -> list[dict[str, Any]]:
        return [failed_record(model=model.name, target=target, stage=stage, error=exc)]

    try:
        load_target(target)
    except EdgepackError as exc:
        return failed("target", exc)
    if model.bundle:
        path = Path(model.bundle)
    else:
        try:
            result = pack_model(model.source, PackOptions(target=target, quant=model.quant, format=model.format,
                                                          draft=model.draft, output=work / model.name, force=True,
                                                          quiet=quiet))
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
