"""What the host is: CPU, cores, RAM, clock and temperature readings, GPU memory, and the threads to use.

Readings come from what the OS exposes and are None where it exposes nothing
(a container without /sys/devices/system/cpu/*/cpufreq, a Mac without sensors
access): a benchmark record says "unknown" rather than inventing a number.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil

_CPUFREQ = Path("/sys/devices/system/cpu")
SYS_CPU = _CPUFREQ
CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_THERMAL = Path("/sys/class/thermal")


def cpu_info() -> str:
    """The CPU's model name, as llama-bench's cpu_info shows it."""
    if platform.system() == "Linux":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def usable_cpus() -> list[int]:
    """CPU ids this process may run on (its affinity mask), or all of them where there is no mask."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _sysfs_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split(",")[0].split("-")[0].strip())
    except (OSError, ValueError):
        return None


def performance_cpus(cpus: list[int] | None = None, sysfs: Path = _CPUFREQ) -> list[int]:
    """Usable CPUs ordered as a device class's performance cores are chosen: fastest first, then one
    thread per physical core before any SMT sibling.

    Pinning a 4-thread phone class to the first 4 ids would land on a hybrid CPU's efficiency
    cores or on two hyper-threads of one core on some hosts; llama.cpp runs on big cores, one
    thread per core. Speed is the kernel's cpu_capacity (ARM big.LITTLE) or the cpufreq
    maximum (Intel P/E cores); where sysfs says nothing (macOS, Windows), by id.
    """
    def key(cpu: int) -> tuple[int, int, int]:
        d = sysfs / f"cpu{cpu}"
        speed = _sysfs_int(d / "cpu_capacity") or _sysfs_int(d / "cpufreq" / "cpuinfo_max_freq") or 0
        first_sibling = _sysfs_int(d / "topology" / "thread_siblings_list")
        is_sibling = int(first_sibling is not None and first_sibling != cpu)
        return (-speed, is_sibling, cpu)

    return sorted(usable_cpus() if cpus is None else cpus, key=key)


def host() -> dict[str, Any]:
    """The host, as recorded in every benchmark record."""
    return {
        "node": platform.node(),
        "os": platform.system(),
        "os_release": platform.release(),
        "arch": platform.machine(),
        "cpu_info": cpu_info(),
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "usable_cpus": len(usable_cpus()),
        "ram_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
    }


def cpu_freq_mhz() -> dict[str, float] | None:
    """Current clock per CPU in MHz (sysfs cpufreq), else psutil's average; None where unknown."""
    out: dict[str, float] = {}
    for f in sorted(_CPUFREQ.glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        try:
            out[f.parent.parent.name] = int(f.read_text().strip()) / 1000
        except (OSError, ValueError):
            continue
    if out:
        return out
    try:
        f = psutil.cpu_freq()
    except (OSError, NotImplementedError, AttributeError):
        return None
    return {"avg": float(f.current)} if f and f.current else None


def thermal_c() -> dict[str, float] | None:
    """Temperature per thermal zone / sensor in degrees C; None where the OS exposes none."""
    out: dict[str, float] = {}
    for zone in sorted(_THERMAL.glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip()
            out[f"{zone.name}:{kind}"] = int((zone / "temp").read_text().strip()) / 1000
        except (OSError, ValueError):
            continue
    if out:
        return out
    try:
        sensors = psutil.sensors_temperatures()  # Linux/FreeBSD only
    except (AttributeError, OSError):
        return None
    for name, entries in (sensors or {}).items():
        for i, e in enumerate(entries):
            out[f"{name}:{e.label or i}"] = float(e.current)
    return out or None


def readings() -> dict[str, Any]:
    """Clock and temperature right now: taken before and after each repetition."""
    return {"cpu_freq_mhz": cpu_freq_mhz(), "thermal_c": thermal_c()}


def gpu_info() -> str | None:
    """Names of NVIDIA GPUs (nvidia-smi), or None when there is none to ask."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return ", ".join(names) or None


def gpu_memory_used(pid: int) -> int | None:
    """Bytes of GPU memory process ``pid`` holds (NVIDIA only), or None when unknown."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = 0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            used += int(parts[1]) << 20  # MiB
    return used


# Threads: how many a job uses by default.
#
# Decoding is memory-bound: a second hyperthread on a core, or a thread on a CPU the
# process may not run on (a container's cpuset, `taskset`), only adds contention; so does
# a thread beyond a container's CPU quota (`docker --cpus 2`): it gets throttled, and
# llama.cpp's threads wait for the slowest. The default is the number of *physical* cores
# among the CPUs this process may use, capped by the cgroup's CPU quota. Converting and quantizing
# use the same count: they are compute-bound, and a hyperthread adds little there either.


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
        n = min(len(cpus), psutil.cpu_count(logical=False) or len(cpus))
    quota = cpu_quota()
    if quota is not None:  # whole CPUs only: a thread throttled part of each period stalls the others
        n = min(n, math.floor(quota))
    return max(1, n)
