"""Resolve a model source: a local HF directory, a hub id, or a .gguf file.

Only safetensors, config, tokenizer and license files are fetched from the hub;
pickle weights are refused unless the caller allows them, and remote code is
never run (nothing here imports model code). The resolved revision and the
sha256 of every file go into the bundle manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from packager.errors import GatedSourceError, PickleRefusedError, SourceError, SourceNotFoundError
from packager.progress import hub_progress, progress_bar

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a conversion needs from a hub repository, and nothing else (no consolidated
# *.pth copies, no ONNX or GGUF siblings).
ALLOW_PATTERNS = [
    "*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt",
    "*.jinja", "LICENSE*", "LICENCE*", "license*", "NOTICE*", "USE_POLICY*", "README.md",
]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
IGNORE_PATTERNS = ["original/*", "onnx/*", "*.onnx*", "*.gguf", "runs/*", "optimizer*", "training_args*"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SourceFile:
    """One file of the source, as recorded in the manifest."""

    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Source:
    """A resolved, local, readable model source."""

    kind: Literal["hf", "gguf"]
    path: Path  # the checkpoint directory, or the .gguf file
    name: str  # "Qwen2.5-3B-Instruct": the hub convention for output names
    repo: str | None = None  # hub id, when it came from the hub
    revision: str | None = None  # commit hash that was resolved
    files: tuple[SourceFile, ...] = field(default=())

    @property
    def weight_files(self) -> list[Path]:
        if self.kind == "gguf":
            return [self.path]
        return sorted(self.path.glob("*.safetensors"))

    def with_hashes(self, sha256s: dict[str, str]) -> "Source":
        """This source with the sha256 of the named files (relative paths) filled in."""
        files = tuple(SourceFile(f.path, f.bytes, sha256s.get(f.path) or f.sha256) for f in self.files)
        return replace(self, files=files)

    def manifest(self) -> dict:
        return {
            "kind": self.kind,
            "repo": self.repo,
            "revision": self.revision,
            "name": self.name,
            "files": [f.__dict__ for f in self.files],
        }


def resolve(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    hash_files: bool = True,
    hash_weights: bool = True,
    quiet: bool = False,
) -> Source:
    """Turn what the user typed into a local :class:`Source`.

    A path that exists is used as it is (a directory with config.json, or a .gguf
    file). Otherwise a ``owner/name`` string is a hub id resolved through
    huggingface_hub, which honours HF_TOKEN, HF_HOME and HF_HUB_OFFLINE.
    ``hash_weights=False`` leaves the safetensors' sha256 empty for the converter to
    fill in while it reads them (:meth:`Source.with_hashes`): one read instead of two.
    """
    hashing = "all" if hash_files and hash_weights else "small" if hash_files else "none"
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise SourceError(
                    f"{path} is a file but not a .gguf; pass a checkpoint directory (with config.json) or a .gguf file"
                )
            return Source("gguf", path.resolve(), _gguf_name(path), files=_describe([path], path.parent, hashing, quiet))
        return _local_dir(path.resolve(), allow_pickle, hashing, quiet)
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise SourceNotFoundError(
            f"{text}: no such file or directory; pass a local checkpoint directory, a .gguf file, or a hub id like Qwen/Qwen2.5-0.5B-Instruct"
        )
    snapshot = _download(text, revision, allow_pickle, token, cache_dir, quiet)
    local = _local_dir(snapshot, allow_pickle, hashing, quiet)
    return Source("hf", snapshot, text.split("/")[-1], repo=text, revision=snapshot.name, files=local.files)


def _gguf_name(path: Path) -> str:
    # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"
    stem = path.stem
    return re.sub(r"[.-](F16|BF16|F32|Q\d\w*|IQ\d\w*)$", "", stem, flags=re.IGNORECASE)


def _local_dir(path: Path, allow_pickle: bool, hashing: str, quiet: bool) -> Source:
    config = path / "config.json"
    if not config.is_file():
        raise SourceError(f"{path} has no config.json; pass the directory of a Hugging Face checkpoint")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SourceError(f"{config} is not valid JSON ({exc}); re-download the checkpoint") from None
    safetensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not safetensors:
        if pickles and not allow_pickle:
            raise PickleRefusedError(
                f"{path} has only pickle weights ({pickles[0].name}); pickle can run code when loaded: "
                "convert to safetensors, or pass --allow-pickle if you trust the source"
            )
        if not pickles:
            raise SourceError(f"{path} has no *.safetensors weights; download the model's weights too")
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if safetensors:  # pickle copies beside safetensors are ignored, so neither hashed nor recorded
        files = [p for p in files if p.suffix not in PICKLE_SUFFIXES]
    return Source("hf", path, path.name, files=_describe(files, path, hashing, quiet))


def _describe(files: list[Path], root: Path, hashing: str, quiet: bool) -> tuple[SourceFile, ...]:
    """Sizes and sha256s; ``hashing`` is "all", "small" (not *.safetensors) or "none"."""

    def wanted(p: Path) -> bool:
        return hashing == "all" or (hashing == "small" and p.suffix != ".safetensors")

    total = sum(p.stat().st_size for p in files if wanted(p))
    out = []
    with progress_bar(total=total, desc="hashing source", unit="B", quiet=quiet) as bar:
        for p in files:
            size = p.stat().st_size
            digest = _cached_sha256(p) or (sha256_file(p, bar.update) if wanted(p) else "")
            out.append(SourceFile(str(p.relative_to(root)), size, digest))
    return tuple(out)


def _cached_sha256(path: Path) -> str | None:
    # In the HF cache a weights file is a link to blobs/<sha256>: the hash is free.
    if path.is_symlink():
        target = Path(os.readlink(path)).name
        if _SHA256.match(target):
            return target
    return None


def sha256_file(path: Path, update=None, chunk: int = 8 << 20) -> str:
    """sha256 of a file, read in chunks; ``update(n)`` is called per chunk for progress."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if update:
                update(len(block))
    return h.hexdigest()


def _download(repo: str, revision: str | None, allow_pickle: bool, token: str | None,
              cache_dir, quiet: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        with hub_progress(quiet):
            path = snapshot_download(
                repo, revision=revision, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS,
                token=token, cache_dir=cache_dir,
            )
    except GatedRepoError:  # subclass of RepositoryNotFoundError: check it first
        raise GatedSourceError(
            f"{repo} is gated: accept its terms on the hub, then log in (hf auth login) or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise SourceNotFoundError(f"{repo} has no revision {revision!r}; check the branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise SourceNotFoundError(
            f"{repo} was not found on the hub (or is private); check the id, or log in / set HF_TOKEN"
        ) from None
    except LocalEntryNotFoundError:
        raise SourceNotFoundError(
            f"{repo} is not in the local HF cache and the hub cannot be reached; "
            "download it once online, or pass a local directory"
        ) from None
    return Path(path)
