"""How many threads a loaded model decodes with by default.

Decoding is memory-bound: a second hyperthread on a core, or a thread on a CPU the
process may not run on (a container's cpuset, `taskset`), only adds contention; so does
a thread beyond a container's CPU quota (`docker --cpus 2`): it gets throttled, and
llama.cpp's threads wait for the slowest. The default is the number of *physical* cores
among the CPUs this process may use, capped by the cgroup's CPU quota.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def allowed_cpus() -> set[int]:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], sys_cpu: Path = SYS_CPU) -> int:
    """Distinct physical cores behind ``cpus`` (Linux sysfs topology), or 0 when unknown."""
    cores = set()
    for cpu in cpus:
        topo = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            core = (topo / "core_id").read_text().strip()
            package = (topo / "physical_package_id").read_text().strip()
        except OSError:
            return 0
        cores.add((package, core))
    return len(cores)


def cpu_quota(root: Path = CGROUP, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time this process's cgroup may use (cgroup v2 cpu.max, v1 CFS quota), the
    tightest limit from its cgroup up to the root; None when unlimited or unknown (not Linux)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path", cpu.max holds "QUOTA PERIOD" or "max PERIOD"
            base, read = root, _v2_quota
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            base, read = root / controllers, _v1_quota
            if not base.is_dir():
                base = root / "cpu"
        else:
            continue
        d = base / path.lstrip("/")
        while True:  # a limit set on a parent (the container's) binds its children too
            q = read(d)
            if q is not None:
                limits.append(q)
            if d == base or base not in d.parents:
                break
            d = d.parent
    return min(limits) if limits else None


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return int(quota) / int(period) if quota != "max" and int(period) > 0 else None


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def default_threads() -> int:
    """Physical cores this process may use: never more threads than that, at least 1."""
    cpus = allowed_cpus()
    n = physical_cores(cpus)
    if n == 0:  # no sysfs topology (macOS, Windows, some sandboxes): psutil's machine-wide count
        import psutil

        n = min(len(cpus), psutil.cpu_count(logical=False) or len(cpus))
    quota = cpu_quota()
    if quota is not None:  # whole CPUs only: a thread throttled part of each period stalls the others
        n = min(n, math.floor(quota))
    return max(1, n)
