"""Bundles, read and verified by hash: every file the manifest lists, with its size and sha256.

Verification names every changed, missing or added file; manifest paths that would leave the
bundle (absolute, ``..``, links out) are refused before anything is opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from packager.bundle.manifest import Manifest
from packager.errors import VerificationError
from packager.progress import progress_bar
from packager.source.resolver import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Files at most this big are always re-hashed on load; weights only when asked.
SMALL_FILE = 16 << 20
# A manifest lists a few files; one this large is not ours, and is not read into memory.
MAX_MANIFEST = 16 << 20


def safe_path(rel: str) -> Path:
    """A manifest path as a relative path that stays inside the bundle, or an error."""
    p = PurePosixPath(rel)
    if (not rel or p.is_absolute() or "\\" in rel or "\0" in rel or not p.parts
            or any(part in ("..", "") for part in p.parts) or rel.startswith("/")):
        raise VerificationError(f"unsafe path {rel[:80]!r} in bundle: paths must be relative and stay inside the bundle")
    if len(rel.encode("utf-8", "surrogatepass")) > 1024 or any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in p.parts):
        raise VerificationError(f"path {rel[:80]!r}... in bundle is too long to be a file; pack the bundle again")
    return Path(*p.parts)


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk and its parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> list[dict[str, Any]]:
        return self.manifest["files"]

    def file(self, rel: str) -> Path:
        return self.path / safe_path(rel)

    @property
    def model_file(self) -> Path:
        return self.file(self.manifest["model_file"])

    @property
    def model_bytes(self) -> int:
        """Bytes of the model proper, as the manifest lists them: its file and the files it loads with it
        (a split GGUF's other parts, an ONNX graph's external data: model.onnx.data, model.onnx.data.2, ...)."""
        rel = self.manifest["model_file"]
        folder, _, name = rel.rpartition("/")
        parts = set((self.manifest.get("split") or {}).get("parts") or ())

        def belongs(path: str) -> bool:
            d, _, n = path.rpartition("/")
            return d == folder and (n == name or n in parts or n.startswith(name + "."))

        return sum(int(e.get("bytes") or 0) for e in self.files if belongs(e["path"]))

    @cached_property
    def meta(self) -> Manifest:
        """The manifest's fields, typed and checked (a wrong field is a VerificationError naming it)."""
        return Manifest.from_json(self.manifest, f"{self.path}/{MANIFEST}")


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Parse and sanity-check a bundle's manifest (no hashing)."""
    root = Path(path)
    man = root / MANIFEST
    if not root.is_dir():
        raise VerificationError(f"{root} is not a bundle directory; pass the directory that `pack model` wrote")
    if man.is_symlink():  # its target lies outside what the bundle vouches for: never read it
        raise VerificationError(f"{man} is a link (refused: bundle files must be regular files inside the bundle); pack it again")
    if not man.is_file():
        raise VerificationError(f"{root} has no {MANIFEST}: not a complete bundle; pack it again")
    if man.stat().st_size > MAX_MANIFEST:
        raise VerificationError(f"{man} is {man.stat().st_size} bytes, too large to be a manifest; pack the bundle again")
    try:
        manifest = json.loads(man.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: [[[[...
        raise VerificationError(f"{man} is not valid JSON ({str(exc) or type(exc).__name__}); pack the bundle again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise VerificationError(f"{man} has no file list; pack the bundle again")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise VerificationError(
            f"{man} has schema_version {version!r}; this edgepack reads up to {SCHEMA_VERSION}: upgrade edgepack"
        )
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise VerificationError(f"{man}: malformed file entry {entry!r}; pack the bundle again")
        safe_path(entry["path"])
    if not isinstance(manifest.get("model_file"), str):
        raise VerificationError(f"{man} names no model_file; pack the bundle again")
    safe_path(manifest["model_file"])
    # The model file is what a runtime loads: it must be one of the files the manifest vouches for.
    if manifest["model_file"] not in {e["path"] for e in manifest["files"]}:
        raise VerificationError(f"{man}: model_file {manifest['model_file'][:80]!r} is not in the file list; pack the bundle again")
    return Bundle(root, manifest)


def verify(path: str | os.PathLike[str], *, weights: bool = True, quiet: bool = True) -> list[str]:
    """Every difference between a bundle and its manifest, one line each (empty: verified).

    ``weights=False`` hashes only files up to SMALL_FILE bytes (sizes are always checked).
    """
    bundle = read_bundle(path)
    root = bundle.path.resolve()
    problems = []
    listed = set()
    todo = []
    for entry in bundle.files:
        rel = entry["path"]
        listed.add(rel)
        p = bundle.file(rel)
        try:
            p.lstat()
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # a name the filesystem refuses (too long, bad encoding, ...)
            problems.append(f"{rel[:80]}: unreadable ({exc.strerror if isinstance(exc, OSError) else exc})")
            continue
        if p.is_symlink() or (p.exists() and root not in p.resolve().parents):
            problems.append(f"{rel}: is a link (refused: bundle files must be regular files inside the bundle)")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel}: changed (size {p.stat().st_size}, manifest says {entry.get('bytes')})")
        elif weights or entry.get("bytes", 0) <= SMALL_FILE:
            todo.append((rel, p, entry))
    with progress_bar(total=sum(e.get("bytes", 0) for _, _, e in todo), desc="verifying", unit="B", quiet=quiet) as bar:
        for rel, p, entry in todo:
            if sha256_file(p, bar.update) != entry.get("sha256"):
                problems.append(f"{rel}: changed (sha256 differs from the manifest)")
    for p in sorted(bundle.path.rglob("*")):
        rel = p.relative_to(bundle.path).as_posix()
        # Anything but a real directory counts: a link (to a file or a directory outside), a fifo, ...
        if rel != MANIFEST and rel not in listed and (p.is_symlink() or not p.is_dir()):
            problems.append(f"{rel}: added (not in the manifest{', a link' if p.is_symlink() else ''})")
    return problems


def verified(path: str | os.PathLike[str], *, weights: bool = True) -> Bundle:
    """The bundle, or a VerificationError naming each problem."""
    problems = verify(path, weights=weights)
    if problems:
        raise VerificationError(f"{path} failed verification: " + "; ".join(problems), problems)
    return read_bundle(path)
