"""What the host is: CPU, cores, RAM, clock and temperature readings, GPU memory.

Readings come from what the OS exposes and are None where it exposes nothing
(a container without /sys/devices/system/cpu/*/cpufreq, a Mac without sensors
access): a benchmark record says "unknown" rather than inventing a number.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil

_CPUFREQ = Path("/sys/devices/system/cpu")
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
