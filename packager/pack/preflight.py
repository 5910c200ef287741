"""Fail before a long job, not half-way: free disk and memory against what the job needs."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil

from packager.errors import PreflightError

DISK_MARGIN = 1.05  # model card, manifest, filesystem slack


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_disk(directory: Path, need_bytes: int) -> None:
    """Enough free space where the bundle will be written?"""
    probe = Path(directory).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(need_bytes * DISK_MARGIN)
    if free < need:
        raise PreflightError(
            f"not enough disk in {probe}: the bundle needs about {_gb(need)}, {_gb(free)} is free; "
            "free some space or choose another -o"
        )


def check_memory(need_bytes: int, what: str) -> None:
    """Enough available RAM for ``what``?"""
    available = psutil.virtual_memory().available
    if available < need_bytes:
        raise PreflightError(
            f"not enough memory for {what}: needs about {_gb(need_bytes)}, {_gb(available)} is available; "
            "close other programs or use a machine with more RAM"
        )
