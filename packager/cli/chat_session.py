"""`pack chat`: an interactive conversation with a loaded model, for people at a terminal.

The reply streams to stdout; the prompt and notices go to stderr. Ctrl-C during a
reply stops it (decoding ends at the next token) and returns to the prompt; Ctrl-C
at the prompt clears the line; Ctrl-D, /exit or /quit ends the session.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable, TextIO

import click

from packager.errors import ContextOverflowError
from packager.runtime.model import Message, Model, Stream

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops a reply"
PROMPT = "you> "


def chat_session(model: Model, *, system: str | None = None, opts: dict[str, Any] | None = None,
                 stdin: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None,
                 think: bool | None = None) -> int:
    """Run the conversation until end of input or /exit; returns the exit code (0).

    ``think``: a thinking model's switch (None: the template's default); True also shows the reasoning, dimmed.
    The history keeps the answers only, as thinking models' templates expect."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    opts = dict(opts or {})
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    with _sigint_cancels() as current:
        err.write(f"{HELP}\n")
        while True:
            line = _read(stdin, err)
            if line is None:
                err.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                history = list(start)
                err.write("(conversation forgotten)\n")
                continue
            if text in ("/help", "/?"):
                err.write(f"{HELP}\n")
                continue
            history.append({"role": "user", "content": text})
            try:
                reply = _reply(model.chat(history, stream=True, think=think, **opts), current, out, err, bool(think))
            except ContextOverflowError as exc:
                history.pop()
                err.write(f"error: {exc}; or /reset to start over\n")
                continue
            history.append({"role": "assistant", "content": reply})


def _read(stdin: TextIO, err: TextIO) -> str | None:
    """One line from the user (None at end of input); Ctrl-C here clears the line."""
    while True:
        err.write(PROMPT)
        err.flush()
        try:
            line = input() if stdin is sys.stdin and stdin.isatty() else stdin.readline()
        except EOFError:
            return None
        except KeyboardInterrupt:
            err.write("\n")
            continue
        if line == "" and not (stdin is sys.stdin and stdin.isatty()):
            return None
        return line


def write_reply(stream: Stream, out: TextIO, *, show_reasoning: bool = False) -> str:
    """Write a reply's answer to ``out`` as it streams (and its reasoning, dimmed where ``out`` is a terminal, when
    ``show_reasoning``); the answer's text."""
    pieces, reasoned = [], False
    for part in stream.parts():
        if part.kind == "reasoning":
            if show_reasoning:
                out.write(click.style(part.text, dim=True) if out.isatty() else part.text)
                out.flush()
                reasoned = True
            continue
        if reasoned:  # the reasoning ends: the answer starts on a line of its own
            out.write("\n\n")
            reasoned = False
        out.write(part.text)
        out.flush()
        pieces.append(part.text)
    return "".join(pieces)


def _reply(stream: Stream, current: dict[str, Stream | None], out: TextIO, err: TextIO,
           show_reasoning: bool = False) -> str:
    current["stream"] = stream
    try:
        answer = write_reply(stream, out, show_reasoning=show_reasoning)
    finally:
        current["stream"] = None
    out.write("\n")
    out.flush()
    if stream.finish_reason == "cancelled":
        err.write(f"[stopped after {stream.n_generated} tokens]\n")
    elif stream.finish_reason == "length":
        err.write("[reply cut at the token limit: raise it with -n]\n")
    return answer


class _sigint_cancels:
    """While a reply streams, SIGINT cancels it (no exception inside the model's bookkeeping);
    otherwise SIGINT raises KeyboardInterrupt as usual."""

    def __enter__(self) -> dict[str, Stream | None]:
        self.current: dict[str, Stream | None] = {"stream": None}
        self.old: Callable[..., Any] | int | None = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self.current

    def _handler(self, signum: int, frame: Any) -> None:
        s = self.current["stream"]
        if s is not None and s.finish_reason is None:
            s.cancel()
        else:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
