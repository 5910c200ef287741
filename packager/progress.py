"""Progress bars on stderr (tqdm), silenced by --quiet or EDGEPACK_NO_PROGRESS=1."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm

QUIET_ENV = "EDGEPACK_NO_PROGRESS"


def _disabled(quiet: bool) -> bool:
    return quiet or os.environ.get(QUIET_ENV, "") not in ("", "0")


@contextmanager
def progress_bar(*, total: int, desc: str, unit: str = "it", quiet: bool = False) -> Iterator[tqdm]:
    """A tqdm bar on stderr; bytes are shown in KB/MB/GB."""
    bar = tqdm(
        total=total or None, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
        disable=_disabled(quiet) or total == 0, file=sys.stderr, leave=False, dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def hub_progress(quiet: bool = False) -> Iterator[None]:
    """huggingface_hub's download bars follow ours: off with --quiet or EDGEPACK_NO_PROGRESS=1
    (its own HF_HUB_DISABLE_PROGRESS_BARS still applies), restored afterwards."""
    if not _disabled(quiet):
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


def say(message: str, *, quiet: bool = False) -> None:
    """A line for people, on stderr."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def quiet_llama_log() -> Iterator[None]:
    """Keep llama.cpp's log (a screenful per load, warnings per prompt) off stderr.

    llama-cpp-python prints llama.cpp's log through the "llama-cpp-python" logger's
    level; its level table predates ggml's current numbering (warnings arrive as
    ERROR), so only CRITICAL silences them. Our own errors say what went wrong.
    """
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
