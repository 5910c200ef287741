"""Ctrl-C that always stops `pack`, also while llama.cpp is calling back into Python.

Python raises KeyboardInterrupt in whatever Python code runs when SIGINT arrives.
While llama.cpp loads a model it calls llama-cpp-python's log callback (through
ctypes) for every log line; an exception raised inside a ctypes callback cannot
propagate into C, so ctypes prints a traceback and drops it, and the run goes on
as if Ctrl-C had never been pressed (found by tests/test_interrupted.py). Here a
SIGINT that lands inside such a callback is sent again 50 ms later, when the
callback has returned, so it reaches our code, which cleans up and exits 130.

SIGTERM (what `docker stop`, systemd and CI runners send) is handled the same way: it raises
:class:`Terminated`, a KeyboardInterrupt, so every cleanup that Ctrl-C runs (the bundle's
``.partial-`` directory, temporary conversions) runs for it too, and the CLI exits 143
(128 + SIGTERM), as a process killed by it would.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

# Python files whose functions C code calls back (ctypes callbacks).
FOREIGN_CALLBACKS = (os.path.join("llama_cpp", "_logger.py"),)
RETRY_S = 0.05


def _in_foreign_callback(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.endswith(FOREIGN_CALLBACKS):
            return True
        frame = frame.f_back
    return False


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop like Ctrl-C (clean up), then exit 143."""

    exit_code = 128 + int(getattr(signal, "SIGTERM", 15))


_pending: dict[int, threading.Timer] = {}  # signals to re-send because they landed in a C callback


def raise_pending() -> None:
    """Raise a signal still waiting for its retry: a step that must not start after it (publishing a
    bundle) asks first, since the process may finish before the retry fires."""
    if _pending:
        signum, timer = _pending.popitem()
        timer.cancel()  # raised here, once: a second copy must not interrupt the cleanup it starts
        _raise(signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _in_foreign_callback(frame):
        timer = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        _pending[signum] = timer
        timer.start()
        return
    _pending.pop(signum, None)
    _raise(signum)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


def install() -> None:
    """Use the handler above for SIGINT and SIGTERM (the CLI calls this; a library leaves its host's
    handlers alone). Only a signal still at its default is taken over."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal)
    # Windows has SIGTERM in the signal module but never delivers it to a handler: harmless there.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_signal)
