"""Target profiles: one TOML file per device class, loaded into a validated, frozen Target.

Profiles ship as resources of ``packager.targets``; a user's own profile is given
by path. A malformed profile is an error naming the file, the key and the type
that was expected.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from packager.errors import ProfileError, UnknownTargetError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(value: str | int | float, *, where: str = "size") -> int:
    """'8GiB', '6GB', '512M', 1024 -> bytes. GB means 10^9, GiB 2^30."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a size like '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{where}: a size cannot be negative ({value})")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{where}: expected a size like '8GiB' or '6GB', got {value!r}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(number * ((1024 if binary else 1000) ** power))


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
    path: str = ""

    def __post_init__(self) -> None:
        where = self.path or self.name
        if not 0 < self.usable_ram_fraction <= 1:
            raise ProfileError(f"{where}: usable_ram_fraction must be in (0, 1], got {self.usable_ram_fraction}")
        for key in ("ram_bytes", "cpu_threads", "max_context", "memory_bandwidth_gbps", "compute_gflops"):
            if getattr(self, key) <= 0:
                raise ProfileError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if not self.quant_ladder:
            raise ProfileError(f"{where}: quant_ladder is empty; list at least one quant type")
        from packager.quants import get_quant

        for q in self.quant_ladder:
            get_quant(q)  # an unknown quant in a profile is the profile's error
        if self.kv_cache_type not in ("f16", "q8_0", "q4_0", "f32", "bf16"):
            raise ProfileError(f"{where}: kv_cache_type must be one of f16, q8_0, q4_0, f32, bf16")

    @property
    def usable_ram_bytes(self) -> int:
        return int(self.ram_bytes * self.usable_ram_fraction)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}


_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "description": (str,), "os": (str,), "arch": (str,),
    "usable_ram_fraction": (float, int), "memory_bandwidth_gbps": (float, int), "cpu_threads": (int,),
    "compute_gflops": (float, int), "backends": (list,), "formats": (list,), "quant_ladder": (list,),
    "max_context": (int,), "kv_cache_type": (str,), "aliases": (list,),
}
_SIZES = ("ram_bytes", "vram_bytes")
_TYPE_NAMES = {str: "a string", float: "a number", int: "an integer", list: "a list of strings"}


def target_from_toml(data: dict[str, Any], where: str) -> Target:
    """Validate a parsed profile; every problem names the file, key and expected type."""
    values: dict[str, Any] = {}
    for key in list(_TYPES) + list(_SIZES):
        if key not in data:
            if key in ("aliases",):
                continue
            raise ProfileError(f"{where}: missing key {key!r}")
        value = data[key]
        if key in _SIZES:
            try:
                values[key] = parse_size(value, where=f"{where}: {key}")
            except ValueError as exc:
                raise ProfileError(str(exc)) from None
            continue
        expected = _TYPES[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ProfileError(f"{where}: {key} must be {_TYPE_NAMES[expected[0]]}, got {type(value).__name__}")
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ProfileError(f"{where}: {key} must be a list of strings")
            value = tuple(value)
        values[key] = value
    unknown = set(data) - set(_TYPES) - set(_SIZES)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; check the spelling")
    return Target(**values, path=where)


def _builtin() -> dict[str, Path]:
    root = resources.files("packager.targets")
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def _read(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read ({exc})") from None
    return target_from_toml(data, str(path))


def list_targets() -> list[Target]:
    """Every built-in profile, by name."""
    return [_read(p) for _, p in sorted(_builtin().items())]


def load_target(name_or_path: str | os.PathLike[str]) -> Target:
    """A built-in profile by name or alias, or a user's profile by path."""
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
    known = sorted(set(builtin) | {a for t in list_targets() for a in t.aliases})
    raise UnknownTargetError(f"unknown target {text!r}; known targets: {', '.join(known)} (or a path to a .toml profile)")
