"""Time to first token over a multi-turn chat: what a chat app's user waits for on every turn.

    ttfts = chat_ttfts(model)   # seconds, one per turn: the first reads the system prompt, the later ones
                                # only their new message when the model continues from its cache

The conversation is fixed: a system prompt of about 700 tokens (passages of the shipped evaluation text,
original CC0 prose) and four short user turns, each answered greedily with a short reply that is appended
to the history, as an app does.
"""

from __future__ import annotations

import time
from typing import Any

from packager.errors import UsageError
from packager.measure.quality import default_evaluation_text
from packager.runtime.model import Message, Model

__all__ = ["TURNS", "chat_ttfts", "system_prompt"]

TURNS = (
    "Summarise the first passage in one sentence.",
    "Which detail of the second passage matters most, and why?",
    "Say that again more simply.",
    "Give the whole text a short title.",
)


def system_prompt(words: int = 480) -> str:
    """About 700 tokens of instructions and reference text for most small models' tokenizers."""
    text = " ".join(default_evaluation_text().split()[:words])
    return ("You are a careful assistant inside a reading app. Answer only from the reference text below, "
            "briefly, and say so when the text does not tell.\n\nReference text:\n" + text)


def chat_ttfts(model: Model, *, max_tokens: int = 16, turns: tuple[str, ...] = TURNS, **opts: Any) -> list[float] | None:
    """Seconds to the first streamed piece of each turn's reply (greedy), or None where the model has no chat template."""
    messages: list[Message] = [{"role": "system", "content": system_prompt()}]
    out = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        t0 = time.perf_counter()
        try:
            stream = model.chat(messages, stream=True, max_tokens=max_tokens, temperature=0.0, **opts)
            first = next(stream, "")
        except UsageError:  # no chat template: nothing an app would chat with
            return None
        out.append(time.perf_counter() - t0)
        messages.append({"role": "assistant", "content": first + "".join(stream)})
    return out
