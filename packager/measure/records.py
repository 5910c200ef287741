"""Benchmark records as llama-bench prints them: md, csv, json, jsonl (on stdout)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

FORMATS = ("md", "csv", "json", "jsonl")


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.2f} MiB"


def _params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _ts(r: dict[str, Any]) -> str:
    return f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"


def _opt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


# (header, right-aligned, cell) in llama-bench's order, then edgepack's memory and timing columns.
COLUMNS: list[tuple[str, bool, Any]] = [
    ("model", False, lambda r: r.get("model_type") or r.get("model_name") or "-"),
    ("size", True, lambda r: _mib(r.get("model_size"))),
    ("params", True, lambda r: _params(r.get("model_n_params"))),
    ("backend", False, lambda r: r.get("backends") or "-"),
    ("threads", True, lambda r: str(r.get("n_threads", "-"))),
    ("test", True, lambda r: r.get("test", "-")),
    ("t/s", True, lambda r: _ts(r) if r.get("status") == "ok" else f"failed: {r.get('error', '')}"),
    ("predicted t/s", True, lambda r: _opt(r.get("predicted_ts"), ".1f")),
    ("peak RSS", True, lambda r: _mib(r.get("peak_rss_bytes"))),
    ("predicted mem", True, lambda r: _mib(r.get("predicted_rss_bytes"))),
    ("load s", True, lambda r: _opt(r.get("load_s"), ".2f")),
    ("ttft ms", True, lambda r: _opt(None if r.get("ttft_s") is None else r["ttft_s"] * 1e3, ".0f")),
    ("chat ttft ms 1st/later", True, lambda r: "-" if r.get("ttft_chat_first_s") is None else
     f"{r['ttft_chat_first_s'] * 1e3:.0f}/{r['ttft_chat_later_s'] * 1e3:.0f}"),
    ("target", False, lambda r: r.get("target", "-")),
]


# A bundle with a draft adds its sg test (greedy decode with the draft): how it compares with none.
DRAFT_COLUMN = ("vs no draft", True, lambda r: "-" if r.get("speedup") is None else
                f"{r['speedup']:.2f}x, {100 * r['acceptance']:.0f}% kept, {r['tokens_per_step']:.2f}/step")


def markdown(records: list[dict[str, Any]]) -> str:
    """llama-bench's markdown table plus memory, load and first-token columns (and the draft's, if any)."""
    columns = COLUMNS + ([DRAFT_COLUMN] if any(r.get("speedup") is not None for r in records) else [])
    rows = [[cell(r) for _, _, cell in columns] for r in records]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, (h, _, _) in enumerate(columns)]
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if right else c.ljust(w)
                                 for c, w, (_, right, _) in zip(cells, widths, columns)) + " |"
    sep = "| " + " | ".join(("-" * (w - 1) + ":") if right else "-" * w for w, (_, right, _) in zip(widths, columns)) + " |"
    return "\n".join([line([h for h, _, _ in columns]), sep] + [line(row) for row in rows]) + "\n"


def _flat(v: Any) -> Any:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else ("" if v is None else v)


def to_csv(records: list[dict[str, Any]]) -> str:
    """One row per record; nested fields (samples, emulated, host) as compact JSON, as llama-bench quotes its lists."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: _flat(r.get(k)) for k in keys})
    return buf.getvalue()


def render(records: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "md":
        return markdown(records)
    if fmt == "csv":
        return to_csv(records)
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
