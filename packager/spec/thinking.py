"""Thinking models: whether a chat template reasons in ``<think>`` blocks, how to switch it, and a
streaming splitter that keeps the reasoning apart from the answer.

Two kinds are in use among the small models people ship:

- a template switch: Qwen3 and SmolLM3 read ``enable_thinking`` (Granite 3.3: ``thinking``); off,
  the generation prompt closes an empty ``<think></think>`` block itself, so the model answers at once;
- always on: the DeepSeek-R1 distills' generation prompt ends with ``<think>\\n``, so the model's
  first token is already reasoning and its text never shows the opening tag.

Both are found by rendering the template (packager.spec.chat_template's sandbox) with the switch on,
off and absent, never by matching its source: whatever the template does is what the runtime gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from packager.errors import ThinkingSwitchError
from packager.spec.chat_template import render

OPEN, CLOSE = "<think>", "</think>"
# Template variables that switch thinking, as templates name them (tried in this order).
SWITCHES = ("enable_thinking", "thinking")
_PROBE = [{"role": "user", "content": "What is 2 + 2?"}]


@dataclass(frozen=True)
class Thinking:
    """How a chat template thinks; ``thinks`` False for a model that never does."""

    thinks: bool
    switch: str | None = None  # the template variable that turns it on and off; None: no switch
    default: bool | None = False  # whether it thinks when the switch is not given (None: a third way)
    open_tag: str = OPEN
    close_tag: str = CLOSE

    def context(self, think: bool | None) -> dict[str, Any]:
        """What to pass the template for ``think`` (None: its default); a one-line ThinkingSwitchError
        where the template has no switch and ``think`` asks for what it does not do by default."""
        if think is None or (self.switch is None and think == (self.thinks and self.default)):
            return {}
        if self.switch is None:
            what = ("does not think" if not self.thinks else
                    "always thinks (its generation prompt opens the <think> block)")
            raise ThinkingSwitchError(f"the model's chat template {what} and has no switch "
                                      f"({' or '.join(SWITCHES)}); drop think={think}")
        return {self.switch: bool(think)}

    def as_manifest(self) -> dict[str, Any]:
        """The manifest's runtime.thinking: whether the model thinks, how to switch it, its tags."""
        return {"thinks": self.thinks, "switch": self.switch, "default": self.default,
                "tags": [self.open_tag, self.close_tag]}

    @classmethod
    def from_manifest(cls, data: dict[str, Any] | None) -> "Thinking":
        if not data:
            return NOT_THINKING
        tags = data.get("tags") or [OPEN, CLOSE]
        default = data.get("default")
        return cls(bool(data.get("thinks")), data.get("switch"), None if default is None else bool(default),
                   tags[0], tags[1])


NOT_THINKING = Thinking(False)


def thinking_of(template: str | None, **context: Any) -> Thinking:
    """How ``template`` thinks (``context``: bos_token, eos_token, as the runtime renders it).

    A template that writes no ``</think>`` for a turn (the model's reasoning is taken out of past
    turns, or an empty block closes it) does not think. Its switch is the first of SWITCHES that
    changes the generation prompt; its default, which of on and off the prompt without it equals
    (None: neither).
    """
    if not template or CLOSE not in template:
        return NOT_THINKING
    plain = render(template, _PROBE, **context)
    for name in SWITCHES:
        on = render(template, _PROBE, **{**context, name: True})
        off = render(template, _PROBE, **{**context, name: False})
        if on != off:  # not given, a third prompt (RWKV, MiniCPM): the template's own choice, unknown here
            return Thinking(True, name, True if plain == on else False if plain == off else None)
    return Thinking(True, None, True)


def starts_in_reasoning(prompt: str, thinking: Thinking) -> bool:
    """Whether a reply to ``prompt`` begins inside a ``<think>`` block: the prompt opened one and did not
    close it (the R1 distills' generation prompt), so the model's text starts with reasoning."""
    if not thinking.thinks:
        return False
    opened = prompt.rfind(thinking.open_tag)
    return opened >= 0 and prompt.find(thinking.close_tag, opened) < 0


Kind = Literal["reasoning", "answer"]


@dataclass(frozen=True)
class Part:
    """A run of a reply's text: reasoning (inside ``<think>``...``</think>``, tags left out) or answer."""

    kind: Kind
    text: str


@dataclass
class ThinkSplitter:
    """Separates a streamed reply into reasoning and answer, piece by piece.

    ``feed`` takes each text piece as it comes (a tag may arrive split across pieces: what could be
    the start of a tag is held back until the next piece says) and returns the parts it completes;
    ``finish`` returns what was held back. The tags never appear in a part; whitespace right after a
    tag and right before one is dropped (Qwen3 writes ``</think>\\n\\n`` before its answer).
    """

    in_reasoning: bool = False  # starts_in_reasoning(prompt, thinking)
    open_tag: str = OPEN
    close_tag: str = CLOSE
    _held: str = field(default="", repr=False)
    _after_tag: bool = field(default=True, repr=False)  # leading whitespace is dropped

    def feed(self, piece: str) -> list[Part]:
        parts: list[Part] = []
        text = self._held + piece
        self._held = ""
        while text:
            tag = self.close_tag if self.in_reasoning else self.open_tag
            at = text.find(tag)
            if at >= 0:
                self._emit(parts, text[:at].rstrip())
                text = text[at + len(tag):]
                self.in_reasoning = not self.in_reasoning
                self._after_tag = True
                continue
            keep = _partial_tag(text, tag)  # a tag's beginning at the end: wait for the next piece
            body = text[:len(text) - keep]
            stripped = body.rstrip()  # whitespace before a tag that may follow is held too
            self._held = body[len(stripped):] + text[len(text) - keep:]
            self._emit(parts, stripped)
            break
        return parts

    def finish(self) -> list[Part]:
        """The held-back text, once the reply has ended (a lone ``<thi`` at the end is text after all)."""
        parts: list[Part] = []
        self._emit(parts, self._held.rstrip() if self.in_reasoning else self._held)
        self._held = ""
        return parts

    def _emit(self, parts: list[Part], text: str) -> None:
        if self._after_tag:
            text = text.lstrip()
        if not text:
            return
        self._after_tag = False
        kind: Kind = "reasoning" if self.in_reasoning else "answer"
        if parts and parts[-1].kind == kind:
            parts[-1] = Part(kind, parts[-1].text + text)
        else:
            parts.append(Part(kind, text))


def split_reply(text: str, *, in_reasoning: bool = False) -> tuple[str, str]:
    """A whole reply's (reasoning, answer), as ThinkSplitter streams them."""
    s = ThinkSplitter(in_reasoning=in_reasoning)
    parts = s.feed(text) + s.finish()
    return ("".join(p.text for p in parts if p.kind == "reasoning"),
            "".join(p.text for p in parts if p.kind == "answer"))


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (0: none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
