"""Ctrl-C that always stops `pack`, also while llama.cpp is calling back into Python.

Python raises KeyboardInterrupt in whatever Python code runs when SIGINT arrives.
While llama.cpp loads a model it calls llama-cpp-python's log callback (through
ctypes) for every log line; an exception raised inside a ctypes callback cannot
propagate into C, so ctypes prints a traceback and drops it, and the run goes on
as if Ctrl-C had never been pressed (found by tests/test_interrupted.py). Here a
SIGINT that lands inside such a callback is sent again 50 ms later, when the
callback has returned, so it reaches our code, which cleans up and exits 130.
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


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _in_foreign_callback(frame):
        timer = threading.Timer(RETRY_S, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt


def install() -> None:
    """Use the handler above for SIGINT (the CLI calls this; a library leaves its host's handler alone)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
