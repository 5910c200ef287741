"""`pack matrix report`: a markdown table and PNG plots from every matrix result file.

Reads *.jsonl files (or directories of them, e.g. the merged artifacts of the CI
device-matrix jobs, one file per runner) and keeps, per (runner, model, target,
test), the records of the latest run. Lines that are not pack bench records
(other benchmarks share benchmarks/results/) are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from packager.errors import UsageError, missing_backend
from packager.measure.bench import SCHEMA


def result_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.rglob("*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"{p} does not exist; pass result files or directories such as benchmarks/results")
    return files


def load_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Every pack bench / matrix record in these files, oldest first."""
    out: list[dict[str, Any]] = []
    for f in result_files(paths):
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
                rec.setdefault("runner", f"{rec.get('host', {}).get('os', '?')}-{rec.get('host', {}).get('arch', '?')}")
                rec.setdefault("matrix_model", rec.get("model_name"))
                out.append(rec)
    out.sort(key=lambda r: r.get("test_time", ""))
    return out


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (runner, model, target): the records of its most recent run only."""
    last_run: dict[tuple, str] = {}
    for r in records:
        last_run[(r["runner"], r["matrix_model"], r["target"])] = r.get("run_id") or r.get("test_time", "")
    return [r for r in records
            if (r.get("run_id") or r.get("test_time", "")) == last_run[(r["runner"], r["matrix_model"], r["target"])]]


def _gb(n: int | None) -> str:
    return "-" if not n else f"{n / 1e9:.2f}"


def markdown(records: list[dict[str, Any]]) -> str:
    """One row per measured test, then the failed and skipped cells with their reasons."""
    ok = [r for r in records if r.get("status") == "ok"]
    bad = [r for r in records if r.get("status") != "ok"]
    lines = ["# edgepack device matrix", "",
             f"{len(ok)} measurements, {len(bad)} failed or skipped cells, from "
             f"{len({r['runner'] for r in records})} runner(s).", "",
             "| runner | model | target | quant | test | t/s | predicted t/s | measured / predicted | peak RSS GB "
             "| predicted GB | fits target | load s | ttft ms | threads | fallback |",
             "|---|---|---|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|---|"]
    for r in sorted(ok, key=lambda r: (r["target"], r["matrix_model"], r["runner"], r.get("test", ""))):
        pred = r.get("predicted_ts")
        # A run that fell back to the CPU is not the configuration the planner predicted (GPU offload).
        ratio = f"{r['avg_ts'] / pred:.2f}" if pred and not r.get("fallback") else "-"
        fits = {True: "yes", False: "**no**", None: "?"}[r.get("emulated", {}).get("within_budget")]
        lines.append(f"| {r['runner']} | {r['matrix_model']} | {r['target']} | {r.get('quant', '-')} | {r.get('test')} "
                     f"| {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} | {pred if pred is not None else '-'} | {ratio} "
                     f"| {_gb(r.get('peak_rss_bytes'))} | {_gb(r.get('predicted_rss_bytes'))} | {fits} "
                     f"| {r.get('load_s', 0):.2f} | {r.get('ttft_s', 0) * 1e3:.0f} | {r.get('n_threads')} "
                     f"| {'yes' if r.get('fallback') else ''} |")
    if bad:
        lines += ["", "## Failed and skipped cells", "", "| runner | model | target | status | stage | reason |",
                  "|---|---|---|---|---|---|"]
        for r in bad:
            reason = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['runner']} | {r['matrix_model']} | {r['target']} | {r['status']} | {r.get('stage')} | {reason} |")
    return "\n".join(lines) + "\n"


def plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """tokens_per_s.png, peak_memory.png and predicted_vs_measured.png (matplotlib, headless)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_backend("matplotlib", "bench") from None
    ok = [r for r in records if r.get("status") == "ok"]
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({r["target"] for r in ok})
    series = sorted({(r["runner"], r["matrix_model"]) for r in ok})
    written = []

    def grouped(ax, value, kinds: list[str] | None, title: str, ylabel: str) -> None:
        width = 0.8 / max(1, len(series))
        for i, (runner, model) in enumerate(series):
            ys = []
            for t in targets:
                rs = [r for r in ok if r["target"] == t and (r["runner"], r["matrix_model"]) == (runner, model)
                      and (kinds is None or r.get("test", "").startswith(tuple(kinds)))]
                ys.append(value(rs) if rs else 0)
            ax.bar([x + i * width for x in range(len(targets))], ys, width, label=f"{model} @ {runner}")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(targets))], targets, rotation=20)
        ax.set_title(title)
        ax.set_ylabel(ylabel)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, name in ((axes[0], "pp", "prefill"), (axes[1], "tg", "decode")):
        grouped(ax, lambda rs: rs[-1]["avg_ts"], [kind], f"{name} tokens/s per device class", "tokens/s")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "tokens_per_s.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    grouped(ax, lambda rs: rs[-1]["peak_rss_bytes"] / 2**20, None, "peak RSS per device class", "MiB")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "peak_memory.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    planned = [r for r in ok if not r.get("fallback")]  # a CPU fallback ran another configuration than the plan's
    for kind, marker in (("pp", "o"), ("tg", "s")):
        pts = [(r["predicted_ts"], r["avg_ts"]) for r in planned
               if r.get("predicted_ts") and r.get("test", "").startswith(kind)]
        if pts:
            axes[0].scatter(*zip(*pts), marker=marker, label=kind)
    mem = [(r["predicted_rss_bytes"] / 2**20, r["peak_rss_bytes"] / 2**20) for r in planned
           if r.get("predicted_rss_bytes") and r.get("peak_rss_bytes")]
    if mem:
        axes[1].scatter(*zip(*mem), marker="^", color="tab:red")
    for ax, title, unit in ((axes[0], "tokens/s", "tokens/s"), (axes[1], "memory", "MiB")):
        lims = [v for coll in ax.collections for xy in coll.get_offsets() for v in xy]
        if lims:
            lo, hi = min(lims) * 0.8, max(lims) * 1.25
            ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8, label="measured = predicted")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(f"predicted vs measured {title}")
        ax.set_xlabel(f"predicted {unit}")
        ax.set_ylabel(f"measured {unit}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "predicted_vs_measured.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def report(paths: list[Path], out: Path, *, with_plots: bool = True) -> tuple[Path, list[Path]]:
    """Write report.md (+ PNGs) into ``out`` from the latest run of every cell in ``paths``."""
    records = latest(load_results(paths))
    if not records:
        raise UsageError(f"no pack bench records in {', '.join(map(os.fspath, paths))}; run `pack matrix run` first")
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(records, out) if with_plots else []
    text = markdown(records)
    if pngs:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    md = out / "report.md"
    md.write_text(text, encoding="utf-8")
    return md, pngs
