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


def measured_on(r: dict[str, Any]) -> str:
    """Where a record was measured: the device itself, or a runner's CPU emulating the device class."""
    emu = r.get("emulated") or {}
    if r.get("target") == "host" or not emu.get("not_emulated"):
        return f"{r['runner']} (the device itself)"
    return f"{r['runner']} emulating {r['target']} ({r.get('n_threads')} threads pinned, memory capped)"


def _emulated(r: dict[str, Any]) -> bool:
    return not measured_on(r).endswith("(the device itself)")


CAPTIONS = {
    "tokens_per_s": ("Measured tokens/s (solid) are each runner's own CPU running the device class's thread count "
                     "with its memory ceiling: the device's memory bandwidth and clock are not emulated, so they "
                     "are the runner's speed, not the device's. The hatched bar beside each is the planner's "
                     "prediction for the device itself."),
    "peak_memory": ("Peak RSS of each run (solid) beside the planner's prediction at the same fill (hatched): the "
                    "prompt and generated tokens of the run, not the planned context full."),
    "predicted_vs_measured": ("Tokens/s: predictions are for the device, measurements on the runner (circles and "
                              "squares: emulated; filled: measured on the device itself), so an emulated point "
                              "off the line says the runner is faster or slower than the device. Memory: both at "
                              "the run's fill."),
}


def markdown(records: list[dict[str, Any]]) -> str:
    """One row per measured test, then the failed and skipped cells with their reasons."""
    ok = [r for r in records if r.get("status") == "ok"]
    bad = [r for r in records if r.get("status") != "ok"]
    emulated = sum(_emulated(r) for r in ok)
    lines = ["# edgepack device matrix", "",
             f"{len(ok)} measurements, {len(bad)} failed or skipped cells, from "
             f"{len({r['runner'] for r in records})} runner(s). {emulated} of the measurements ran on a runner "
             f"emulating a device class (threads pinned, memory capped; the runner's own bandwidth and clock): "
             f"their t/s is the runner's, their predicted t/s the device's.", "",
             "| runner | model | target | quant | test | t/s | predicted t/s | measured / predicted | peak RSS GB "
             "| predicted GB | fits target | load s | ttft ms | threads | fallback | predicted GB at this run's fill "
             "| draft vs none | measured on |",
             "|---|---|---|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|---|--:|---|---|"]
    for r in sorted(ok, key=lambda r: (r["target"], r["matrix_model"], r["runner"], r.get("test", ""))):
        pred = r.get("predicted_ts")
        # A run that fell back to the CPU is not the configuration the planner predicted (GPU offload).
        ratio = f"{r['avg_ts'] / pred:.2f}" if pred and not r.get("fallback") else "-"
        fits = {True: "yes", False: "**no**", None: "?"}[r.get("emulated", {}).get("within_budget")]
        lines.append(f"| {r['runner']} | {r['matrix_model']} | {r['target']} | {r.get('quant', '-')} | {r.get('test')} "
                     f"| {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} | {pred if pred is not None else '-'} | {ratio} "
                     f"| {_gb(r.get('peak_rss_bytes'))} | {_gb(r.get('predicted_rss_bytes'))} | {fits} "
                     f"| {r.get('load_s', 0):.2f} | {r.get('ttft_s', 0) * 1e3:.0f} | {r.get('n_threads')} "
                     f"| {'yes' if r.get('fallback') else ''} | {_gb(r.get('predicted_rss_at_run_bytes'))} "
                     f"| {_draft(r)} | {measured_on(r)} |")
    lines += ["", "predicted GB: the plan's, with the planned context full (what an app must survive); "
              "predicted GB at this run's fill: the same model at the run's prompt and generated tokens, the "
              "figure peak RSS compares with. draft vs none: a bundle with a draft (the sg test, greedy replies "
              "to an input-grounded request): its decode speed over the bundle loaded without it, the share of "
              "drafts kept, and tokens per step of the model."]
    if bad:
        lines += ["", "## Failed and skipped cells", "", "| runner | model | target | status | stage | reason |",
                  "|---|---|---|---|---|---|"]
        for r in bad:
            reason = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['runner']} | {r['matrix_model']} | {r['target']} | {r['status']} | {r.get('stage')} | {reason} |")
    return "\n".join(lines) + "\n"


def _draft(r: dict[str, Any]) -> str:
    if r.get("speedup") is None:
        return ""
    same = "" if r.get("identical", True) else ", **output changed**"
    return f"{r['draft']}: {r['speedup']:.2f}x, {100 * r['acceptance']:.0f}% kept, {r['tokens_per_step']:.2f}/step{same}"


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

    def grouped(ax, value, predicted, kinds: list[str] | None, title: str, ylabel: str, what: str) -> None:
        # Per series two bars: the measurement (solid) and the planner's prediction beside it (hatched).
        width = 0.8 / max(1, 2 * len(series))
        for i, (runner, model) in enumerate(series):
            ys, ps = [], []
            for t in targets:
                rs = [r for r in ok if r["target"] == t and (r["runner"], r["matrix_model"]) == (runner, model)
                      and (kinds is None or r.get("test", "").startswith(tuple(kinds)))]
                ys.append(value(rs) if rs else 0)
                ps.append((predicted(rs) or 0) if rs else 0)
            xs = [x + 2 * i * width for x in range(len(targets))]
            bars = ax.bar(xs, ys, width, label=f"{model}: {what} on {runner}")
            ax.bar([x + width for x in xs], ps, width, fill=False, hatch="//", edgecolor=bars.patches[0].get_facecolor(),
                   label=f"{model}: predicted")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(targets))], targets, rotation=20)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, kind, name in ((axes[0], "pp", "prefill"), (axes[1], "tg", "decode")):
        grouped(ax, lambda rs: rs[-1]["avg_ts"], lambda rs: rs[-1].get("predicted_ts"), [kind],
                f"{name} tokens/s: measured on the runner (emulating the class), predicted for the device",
                "tokens/s", "measured")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "tokens_per_s.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    grouped(ax, lambda rs: rs[-1]["peak_rss_bytes"] / 2**20,
            lambda rs: (rs[-1].get("predicted_rss_at_run_bytes") or 0) / 2**20, None,
            "peak RSS of each run, and predicted at the run's fill", "MiB", "peak RSS")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "peak_memory.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    planned = [r for r in ok if not r.get("fallback")]  # a CPU fallback ran another configuration than the plan's
    for kind, marker in (("pp", "o"), ("tg", "s")):
        for emulated in (True, False):
            pts = [(r["predicted_ts"], r["avg_ts"]) for r in planned
                   if r.get("predicted_ts") and r.get("test", "").startswith(kind) and _emulated(r) == emulated]
            if pts:
                axes[0].scatter(*zip(*pts), marker=marker, facecolors="none" if emulated else None,
                                edgecolors="tab:blue" if kind == "pp" else "tab:orange",
                                label=f"{kind}, " + ("emulated on a runner" if emulated else "on the device"))
    mem = [(r["predicted_rss_at_run_bytes"] / 2**20, r["peak_rss_bytes"] / 2**20) for r in planned
           if r.get("predicted_rss_at_run_bytes") and r.get("peak_rss_bytes")]
    if mem:
        axes[1].scatter(*zip(*mem), marker="^", color="tab:red")
    for ax, title, unit in ((axes[0], "tokens/s", "tokens/s"), (axes[1], "memory", "MiB")):
        lims = [v for coll in ax.collections for xy in coll.get_offsets() for v in xy]
        if lims:
            lo, hi = min(lims) * 0.8, max(lims) * 1.25
            ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8, label="measured = predicted")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(f"predicted vs measured {title}" + (" (prediction: the device; measured: where the marker says)"
                                                           if unit == "tokens/s" else " (both at the run's fill)"),
                     fontsize=9)
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
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})\n\n{CAPTIONS[p.stem]}\n" for p in pngs)
    md = out / "report.md"
    md.write_text(text, encoding="utf-8")
    return md, pngs
