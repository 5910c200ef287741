"""The Model interface every backend implements."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

from packager.errors import UsageError

Message = dict[str, str]


@dataclass(frozen=True)
class GenOptions:
    """Generation options; the bundle's defaults fill what the caller leaves out."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = field(default=())
    seed: int | None = None

    @classmethod
    def build(cls, defaults: dict[str, Any], opts: dict[str, Any]) -> "GenOptions":
        names = {f.name for f in fields(cls)}
        unknown = set(opts) - names
        if unknown:
            raise UsageError(f"unknown generation option(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(names))}")
        merged = {k: v for k, v in defaults.items() if k in names} | {k: v for k, v in opts.items() if v is not None}
        if isinstance(merged.get("stop"), str):
            merged["stop"] = (merged["stop"],)
        elif merged.get("stop") is not None:
            merged["stop"] = tuple(merged["stop"])
        o = cls(**merged)
        if o.max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {o.max_tokens}")
        if o.temperature < 0 or not 0 < o.top_p <= 1 or o.top_k < 0:
            raise UsageError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
        return o


class Model(ABC):
    """A loaded bundle. Thread-safe: calls are serialized by an internal lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._closed = False

    @abstractmethod
    def stream(self, prompt: str, **opts: Any) -> Iterator[str]:
        """Yield text pieces as they decode. Closing the iterator stops decoding at once."""

    @abstractmethod
    def chat_stream(self, messages: list[Message], **opts: Any) -> Iterator[str]:
        """Like :meth:`stream`, for a conversation rendered with the bundle's chat template."""

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _free(self) -> None: ...

    def generate(self, prompt: str, **opts: Any) -> str:
        """The whole completion of ``prompt`` as one string."""
        return "".join(self.stream(prompt, **opts))

    def chat(self, messages: list[Message], *, stream: bool = False, **opts: Any) -> str | Iterator[str]:
        """The assistant's reply to ``messages`` ([{"role": ..., "content": ...}, ...])."""
        pieces = self.chat_stream(messages, **opts)
        return pieces if stream else "".join(pieces)

    def close(self) -> None:
        """Free the model. Waits for a stream in progress in another thread to finish."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._free()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
