"""Target profiles: one TOML file per device class, loaded into a validated, frozen Target.

Profiles ship as resources of ``packager.targets``; a user's own profile is given
by path. A malformed profile is an error naming the file, the key and the type
that was expected. Besides the roofline inputs (RAM, bandwidth, cores), a profile
carries the limits that decide whether an app survives on the device
(``[limits]``: per-app memory caps, low-memory-killer headroom, GPU buffer
limits) and how a model reaches it (``[distribution]``: download caps and the
largest file or asset pack a store accepts).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (declared for < 3.11)
    import tomli as tomllib

import psutil

from packager.errors import ProfileError, UnknownQuantError, UnknownTargetError
from packager.formats import FORMATS
from packager.host import default_threads
from packager.plan import host_probe
from packager.quants import get_quant

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
KV_TYPES = ("f16", "q8_0", "q4_0", "f32", "bf16")
BACKENDS = ("cpu", "metal", "cuda", "vulkan", "webgpu", "opencl")


def parse_size(value: str | int | float, *, where: str = "size") -> int:
    """'8GiB', '6GB', '512M', 1024 -> bytes. GB means 10^9, GiB 2^30."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a size like '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):  # TOML has inf and nan
            raise ValueError(f"{where}: a size must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"{where}: a size cannot be negative ({value})")
        return _plausible(int(value), where)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{where}: expected a size like '8GiB' or '6GB', got {value!r}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    return _plausible(int(number * ((1024 if binary else 1000) ** power)), where)


MAX_SIZE = 1 << 50  # 1 PiB: no device class has more; bigger is a typo that would overflow the planner's floats


def _plausible(size: int, where: str) -> int:
    if size > MAX_SIZE:
        raise ValueError(f"{where}: {size} bytes is not a plausible device size (at most 1 PiB)")
    return size


@dataclass(frozen=True)
class Limits:
    """What the OS or the browser enforces on one app; 0 means 'no such limit'."""

    app_memory_bytes: int = 0  # hard per-app cap without special permission (iOS jetsam)
    app_memory_entitled_bytes: int = 0  # the cap with memory_entitlement
    memory_entitlement: str = ""  # e.g. com.apple.developer.kernel.increased-memory-limit
    lmk_headroom_bytes: int = 0  # RAM the system keeps for itself before the low-memory killer acts
    gpu_working_set_bytes: int = 0  # Metal's recommendedMaxWorkingSetSize (unified memory)
    gpu_max_buffer_bytes: int = 0  # WebGPU maxBufferSize
    gpu_max_binding_bytes: int = 0  # WebGPU maxStorageBufferBindingSize


@dataclass(frozen=True)
class Distribution:
    """How a model file reaches the device; 0 means 'no cap'."""

    channel: str = "direct"  # direct, play, app-store, web
    download_cap_bytes: int = 0  # largest download without Wi-Fi / user consent (cellular cap)
    part_bytes: int = 0  # largest single file or asset pack the channel accepts
    total_cap_bytes: int = 0  # largest app (all its packs together) the channel accepts
    delivery: str = ""  # how the parts ship (asset packs, on-demand resources, HTTP range fetches)
    setting: str = ""  # the manifest / build setting the app needs for that delivery


@dataclass(frozen=True)
class Target:
    """A device class: what an app may use there and how fast memory is."""

    name: str
    description: str
    os: str
    arch: str
    ram_bytes: int
    usable_ram_fraction: float
    vram_bytes: int
    memory_bandwidth_gbps: float
    cpu_threads: int
    compute_gflops: float
    backends: tuple[str, ...]
    formats: tuple[str, ...]
    quant_ladder: tuple[str, ...]
    max_context: int
    kv_cache_type: str
    aliases: tuple[str, ...] = ()
    unified_memory: bool = False  # GPU and CPU share RAM (Apple silicon, phones): no VRAM split
    vram_usable_fraction: float = 0.9  # the driver, the display and the CUDA context keep the rest
    vram_bandwidth_gbps: float = 0.0
    gpu_compute_gflops: float = 0.0
    # Fixed decode cost per layer and token (thread barriers, graph launch), measured where known (host); 0: none.
    decode_layer_overhead_us: float = 0.0
    limits: Limits = field(default_factory=Limits)
    distribution: Distribution = field(default_factory=Distribution)
    path: str = ""

    def __post_init__(self) -> None:
        where = self.path or self.name
        for key in ("usable_ram_fraction", "vram_usable_fraction"):
            if not 0 < getattr(self, key) <= 1:
                raise ProfileError(f"{where}: {key} must be in (0, 1], got {getattr(self, key)}")
        for key in ("ram_bytes", "cpu_threads", "max_context", "memory_bandwidth_gbps", "compute_gflops"):
            if getattr(self, key) <= 0:
                raise ProfileError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if self.vram_bytes and self.vram_bandwidth_gbps <= 0:
            raise ProfileError(f"{where}: vram_bandwidth_gbps must be positive when vram_bytes is set")
        if not self.quant_ladder:
            raise ProfileError(f"{where}: quant_ladder is empty; list at least one quant type")

        for q in self.quant_ladder:
            try:
                get_quant(q)
            except UnknownQuantError as exc:  # an unknown quant in a profile is the profile's error
                raise ProfileError(f"{where}: quant_ladder: {exc}") from None
        if self.kv_cache_type not in KV_TYPES:
            raise ProfileError(f"{where}: kv_cache_type must be one of {', '.join(KV_TYPES)}, got {self.kv_cache_type!r}")
        for key, known in (("backends", BACKENDS), ("formats", FORMATS)):
            bad = [v for v in getattr(self, key) if v not in known]
            if bad or not getattr(self, key):
                raise ProfileError(f"{where}: {key} must be a non-empty list from {', '.join(known)}, got {bad or '[]'}")

    @property
    def usable_ram_bytes(self) -> int:
        return int(self.ram_bytes * self.usable_ram_fraction)

    @property
    def has_gpu(self) -> bool:
        return any(b != "cpu" for b in self.backends)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "path":
                continue
            value = getattr(self, f.name)
            out[f.name] = {g.name: getattr(value, g.name) for g in fields(value)} if f.name in ("limits", "distribution") else value
        return out


# key -> kind; kinds: str, int, float, bool, list, size. Keys absent from _REQUIRED take the dataclass default.
_TOP: dict[str, str] = {
    "name": "str", "description": "str", "os": "str", "arch": "str", "ram_bytes": "size",
    "usable_ram_fraction": "float", "vram_bytes": "size", "memory_bandwidth_gbps": "float", "cpu_threads": "int",
    "compute_gflops": "float", "backends": "list", "formats": "list", "quant_ladder": "list", "max_context": "int",
    "kv_cache_type": "str", "aliases": "list", "unified_memory": "bool", "vram_usable_fraction": "float",
    "vram_bandwidth_gbps": "float", "gpu_compute_gflops": "float", "decode_layer_overhead_us": "float",
}
_REQUIRED = ("name", "description", "os", "arch", "ram_bytes", "usable_ram_fraction", "vram_bytes",
             "memory_bandwidth_gbps", "cpu_threads", "compute_gflops", "backends", "formats", "quant_ladder",
             "max_context", "kv_cache_type")
# TOML key -> (dataclass field, kind)
_LIMITS: dict[str, tuple[str, str]] = {
    "app_memory": ("app_memory_bytes", "size"), "app_memory_entitled": ("app_memory_entitled_bytes", "size"),
    "memory_entitlement": ("memory_entitlement", "str"), "lmk_headroom": ("lmk_headroom_bytes", "size"),
    "gpu_working_set": ("gpu_working_set_bytes", "size"), "gpu_max_buffer": ("gpu_max_buffer_bytes", "size"),
    "gpu_max_storage_binding": ("gpu_max_binding_bytes", "size"),
}
_DISTRIBUTION: dict[str, tuple[str, str]] = {
    "channel": ("channel", "str"), "download_cap": ("download_cap_bytes", "size"), "part_size": ("part_bytes", "size"),
    "total_cap": ("total_cap_bytes", "size"),
    "delivery": ("delivery", "str"), "setting": ("setting", "str"),
}
_KIND_NAMES = {"str": "a string", "float": "a number", "int": "an integer", "list": "a list of strings",
               "bool": "true or false", "size": "a size like '8GiB' or '6GB'"}


def _value(value: Any, kind: str, where: str, key: str) -> Any:
    """One checked value; the error names the file, the key and the expected type."""
    def bad() -> ProfileError:
        return ProfileError(f"{where}: {key} must be {_KIND_NAMES[kind]}, got {type(value).__name__}")

    if kind == "size":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad()
        try:
            return parse_size(value, where=f"{where}: {key}")
        except ValueError as exc:
            raise ProfileError(str(exc)) from None
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if isinstance(value, bool):
        raise bad()
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "int" and isinstance(value, int) and not abs(value) < 1 << 40:
        raise ProfileError(f"{where}: {key} = {value} is not plausible; check the profile")
    if kind == "int" and isinstance(value, int):
        return value
    if kind == "float" and isinstance(value, (int, float)):
        if not 0 <= abs(value) < 1e12:  # also refuses TOML's inf and nan, which would poison every prediction
            raise ProfileError(f"{where}: {key} must be a finite number below 1e12, got {value!r}")
        return float(value)
    if kind == "list" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise bad()


def _table(data: Any, spec: dict[str, tuple[str, str]], where: str, prefix: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: [{prefix}] must be a table, got {type(data).__name__}")
    unknown = set(data) - set(spec)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(f'{prefix}.{k}' for k in sorted(unknown))}; "
                           f"known: {', '.join(spec)}")
    return {spec[k][0]: _value(v, spec[k][1], where, f"{prefix}.{k}") for k, v in data.items()}


def target_from_toml(data: dict[str, Any], where: str) -> Target:
    """Validate a parsed profile; every problem names the file, key and expected type."""
    values: dict[str, Any] = {}
    for key in _REQUIRED:
        if key not in data:
            raise ProfileError(f"{where}: missing key {key!r} ({_KIND_NAMES[_TOP[key]]})")
    for key, value in data.items():
        if key in _TOP:
            values[key] = _value(value, _TOP[key], where, key)
    unknown = set(data) - set(_TOP) - {"limits", "distribution"}
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; check the spelling")
    values["limits"] = Limits(**_table(data.get("limits", {}), _LIMITS, where, "limits"))
    values["distribution"] = Distribution(**_table(data.get("distribution", {}), _DISTRIBUTION, where, "distribution"))
    return Target(**values, path=where)


def _builtin() -> dict[str, Path]:
    root = resources.files("packager.targets")
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def _read(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, RecursionError) as exc:  # RecursionError: x = [[[[...
        raise ProfileError(f"{path}: not valid TOML ({str(exc) or type(exc).__name__})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read ({exc})") from None
    return target_from_toml(data, str(path))


_KEY_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*(?:#\s*(.*))?$")


def profile_sources(target: Target) -> list[tuple[str, str, Any, str]]:
    """Each [limits] / [distribution] value of a profile: (table, key, value, the source its comment gives).

    The profiles cite a source for every figure in a comment on, or just above, its key
    (tests/test_profiles.py holds them to it); this reads those comments back, so that
    `pack targets --explain` shows where each store limit comes from. Empty for a probed host.
    """
    try:
        lines = Path(target.path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    tables = {"limits": (_LIMITS, target.limits), "distribution": (_DISTRIBUTION, target.distribution)}
    out = []
    table, comment = "", []
    for raw in lines:
        line = raw.strip()
        if line.startswith("["):
            table, comment = line.strip("[]").strip(), []
        elif line.startswith("#"):
            comment.append(line.lstrip("#").strip())
        elif not line:
            comment = []
        elif table in tables and (m := _KEY_LINE.match(line)) and m.group(1) in tables[table][0]:
            keys, values = tables[table]
            out.append((table, m.group(1), getattr(values, keys[m.group(1)][0]),
                        " ".join(comment + ([m.group(3)] if m.group(3) else []))))
            comment = []
    return out


def list_targets() -> list[Target]:
    """Every built-in profile, by name."""
    return [_read(p) for _, p in sorted(_builtin().items())]


def load_target(name_or_path: str | os.PathLike[str]) -> Target:
    """A built-in profile by name or alias, a user's profile by path, or ``host`` (this machine, probed)."""
    text = os.fspath(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UnknownTargetError(f"target profile {text} does not exist; pass a .toml path or a name from `pack targets`")
        return _read(path)
    builtin = _builtin()
    if text in builtin:
        return _read(builtin[text])
    for target in list_targets():
        if text in target.aliases:
            return target
    if text == "host":
        return host_target()
    known = sorted(set(builtin) | {a for t in list_targets() for a in t.aliases} | {"host"})
    raise UnknownTargetError(f"unknown target {text!r}; known targets: {', '.join(known)} (or a path to a .toml profile)")


@lru_cache(maxsize=1)
def host_target() -> Target:
    """This machine as a Target, with its bandwidth measured now (cached for the process).

    Its memory_bandwidth_gbps is, like every profile's, what decoding sustains: the probed read
    bandwidth times DECODE_FRACTION.
    """
    threads = default_threads()
    bw = host_probe.read_bandwidth_gbps(threads)
    machine = platform.machine().lower()
    arch = "x86_64" if machine in ("x86_64", "amd64") else "arm64" if machine in ("arm64", "aarch64") else machine
    return Target(
        name="host", description=f"this machine ({platform.processor() or machine}, {threads} threads, probed)",
        os=platform.system().lower(), arch=arch, ram_bytes=psutil.virtual_memory().total,
        # What is free now is what a model may use here.
        usable_ram_fraction=max(min(psutil.virtual_memory().available / psutil.virtual_memory().total, 1.0), 0.05),
        vram_bytes=0, memory_bandwidth_gbps=round(bw * host_probe.DECODE_FRACTION, 2), cpu_threads=threads,
        decode_layer_overhead_us=host_probe.LAYER_OVERHEAD_US,
        # ~16 f32 FMA flop/cycle/core at ~2.5 GHz without knowing the ISA: a floor, not a claim.
        compute_gflops=float(threads * 40), backends=("cpu",), formats=("gguf", "onnx"),
        quant_ladder=("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q3_K_M"), max_context=8192, kv_cache_type="f16",
        path="host (probed)",
    )
