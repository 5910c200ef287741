"""Run a command and record its wall time and peak memory (RSS and anonymous RSS, children included)."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class RunStats:
    wall_s: float
    peak_rss_bytes: int
    peak_rss_anon_bytes: int
    returncode: int


def _anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(cmd: list[str], *, env: dict | None = None, interval: float = 0.02, log: Path | None = None) -> RunStats:
    """Run ``cmd``; RSS counts mapped file pages too, RssAnon only what the process allocated."""
    out = open(log, "w") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    peak = {"rss": 0, "anon": 0}

    def poll() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [p] + p.children(recursive=True)
                peak["rss"] = max(peak["rss"], sum(q.memory_info().rss for q in procs))
                peak["anon"] = max(peak["anon"], sum(_anon(q.pid) for q in procs))
            except psutil.Error:
                pass
            time.sleep(interval)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    th.join()
    if log:
        out.close()
    return RunStats(wall, peak["rss"], peak["anon"], rc)


def warm_page_cache(model_dir: Path) -> None:
    """Read the checkpoint once so that every side measured reads it from memory, not the disk."""
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def report_checks(checks: dict[str, bool]) -> int:
    """Print PASS/FAIL per check; the benchmark's exit code."""
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1
