"""Saved engine states of fixed prompt prefixes, kept on disk between launches (``load(..., prompt_cache=DIR)``).

A chat app starts every launch with the same system prompt; reading it again costs the user the first
turn's wait on every launch. The engine's state after that prefix (its KV cache) is saved once and
restored on the next load instead.

One entry per prefix, named by the hash of its token ids: ``<key>.state`` (the engine's own file) and
``<key>.json`` (what the state depends on: the model's weights, the engine's build, the cache's layout,
the tokens, and the state file's size and hash). An entry is used only when every one of those matches;
another model with the same tokenizer, another engine build, a truncated or edited file is ignored with
one warning and rebuilt. Entries are written to temporary names and renamed, the header last, so a
crash leaves either the old entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from packager.errors import UsageError

FORMAT = "edgepack-prompt-cache/1"
MIN_TOKENS = 16  # shorter prefixes cost less to read again than to restore


class PromptCacheWarning(UserWarning):
    """A saved prompt state was not used (another model or engine build, a damaged file); it is rebuilt."""


def tokens_key(tokens: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(int(t)) for t in tokens).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PromptCache:
    """A folder of saved prefix states for one loaded model (``identity``: what a state is only valid for)."""

    def __init__(self, directory: str | os.PathLike[str], identity: dict[str, Any]) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise UsageError(f"prompt_cache {self.directory}: not a directory; pass a folder the app may write")
        self.identity = dict(identity)
        self.saved: set[str] = set()  # keys this process has stored or checked: not hashed again
        self.hits = 0  # prefixes restored from disk by this process (for tests and pack bench)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.state", self.directory / f"{key}.json"

    def find(self, tokens: Sequence[int]) -> Path | None:
        """The state file of exactly this prefix, if one was saved for this model and engine; else None."""
        key = tokens_key(tokens)
        state, header = self._paths(key)
        if not header.exists() and not state.exists():
            return None
        why = self._mismatch(header, state, tokens)
        if why is not None:
            warnings.warn(f"prompt cache {state}: {why}; ignored, it is rebuilt", PromptCacheWarning, stacklevel=4)
            return None
        self.saved.add(key)
        return state

    def _mismatch(self, header: Path, state: Path, tokens: Sequence[int]) -> str | None:
        try:
            meta = json.loads(header.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "its header is missing or not JSON"
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return f"not a {FORMAT} entry"
        for field, want in self.identity.items():
            if meta.get(field) != want:
                return f"made with another {field.replace('_', ' ')} ({meta.get(field)!r}, this one is {want!r})"
        if meta.get("n_tokens") != len(tokens) or meta.get("tokens") != tokens_key(tokens):
            return "saved for other tokens"
        try:
            size = state.stat().st_size
        except OSError:
            return "its state file is missing"
        if size != meta.get("state_bytes"):
            return f"its state file has {size} bytes, not the {meta.get('state_bytes')} saved (truncated?)"
        if _file_sha256(state) != meta.get("state_sha256"):
            return "its state file changed since it was saved (sha256 differs)"
        return None

    def is_saved(self, tokens: Sequence[int]) -> bool:
        return tokens_key(tokens) in self.saved

    def store(self, tokens: Sequence[int], write: Callable[[Path], None]) -> None:
        """Save the engine's state of ``tokens``: ``write(path)`` writes the engine's file."""
        key = tokens_key(tokens)
        state, header = self._paths(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp_state, tmp_header = state.with_suffix(f".state.{os.getpid()}.tmp"), header.with_suffix(f".json.{os.getpid()}.tmp")
        try:
            header.unlink(missing_ok=True)  # an entry without its header is never used
            write(tmp_state)
            meta = {"format": FORMAT, **self.identity, "n_tokens": len(tokens), "tokens": key,
                    "state_bytes": tmp_state.stat().st_size, "state_sha256": _file_sha256(tmp_state)}
            tmp_header.write_text(json.dumps(meta, indent=1), encoding="utf-8")
            os.replace(tmp_state, state)
            os.replace(tmp_header, header)
        except OSError as exc:  # a full or read-only disk: the app goes on, the prefix is read next launch
            warnings.warn(f"prompt cache {self.directory}: could not save ({exc}); the prefix is read again next "
                          f"launch", PromptCacheWarning, stacklevel=4)
        finally:
            tmp_state.unlink(missing_ok=True)
            tmp_header.unlink(missing_ok=True)
        self.saved.add(key)
