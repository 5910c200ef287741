"""Stop strings over a stream of text pieces, backend-neutral.

A piece may end with the first characters of a stop string ("<|", then "end|>"), so
text that could still become a stop string is held back until the next piece settles it.
"""

from __future__ import annotations


class StopFilter:
    """Feed decoded pieces; get back the text safe to show and whether a stop string was hit."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to emit now, stopped). After a stop, the text before it is all that is emitted."""
        if not self.stops:
            return piece, False
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Text held back at the end of the stream: it never became a stop string."""
        text, self._held = self._held, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
