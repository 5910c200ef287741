"""examples/desktop_chat.py, headless: a real Qt window on Qt's offscreen platform (no display,
no X server: PySide6-Essentials from PyPI is all it needs), a real SmolLM2 bundle; the test types
a question, clicks, and reads the streamed reply back from the widget."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
from PySide6.QtWidgets import QApplication  # the `test` extra installs it: this test never skips

import packager

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "desktop_chat.py"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def qapp() -> QApplication:
    old = os.environ.get("QT_QPA_PLATFORM")
    os.environ["QT_QPA_PLATFORM"] = "offscreen"  # read when Qt starts: windows render to memory
    try:
        app = QApplication.instance() or QApplication([])
    finally:
        if old is None:
            del os.environ["QT_QPA_PLATFORM"]
        else:
            os.environ["QT_QPA_PLATFORM"] = old
    assert app.platformName() == "offscreen"
    return app


@pytest.fixture(scope="module")
def app_module():
    spec = importlib.util.spec_from_file_location("desktop_chat", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pump(qapp, until, timeout: float = 300) -> None:
    """Run the Qt event loop until ``until()`` holds."""
    end = time.monotonic() + timeout
    while not until() and time.monotonic() < end:
        qapp.processEvents()
        time.sleep(0.005)  # an event loop's idle wait, not a timing assumption
    qapp.processEvents()
    assert until(), "timed out waiting for the window"


def test_reply_streams_into_the_window(qapp, app_module, smollm2_bundle):
    model = packager.load(smollm2_bundle, n_threads=1, n_ctx=512)
    expected = model.chat([{"role": "user", "content": QUESTION}], max_tokens=24)
    win = app_module.ChatWindow(model, gen={"max_tokens": 24})
    win.show()
    win.entry.setText(QUESTION)
    win.send_button.click()  # as a user's click would
    assert win.stop_button.isEnabled() and not win.send_button.isEnabled()
    lengths = []
    end = time.monotonic() + 300
    while win.busy and time.monotonic() < end:
        qapp.processEvents()
        lengths.append(len(win.text()))
        time.sleep(0.005)  # an event loop's idle wait, not a timing assumption
    assert not win.busy, "the reply did not finish"
    assert len(set(lengths)) >= 3  # the text arrived in pieces while the window kept running
    assert win.text() == f"You: {QUESTION}\nAssistant: {expected}\n\n"
    assert win.history[-1] == {"role": "assistant", "content": expected}
    assert win.send_button.isEnabled() and not win.stop_button.isEnabled()
    assert win.close()  # the window manager's close: frees the model
    assert model.closed


def test_stop_button_and_closing_mid_reply(qapp, app_module, smollm2_bundle):
    model = packager.load(smollm2_bundle, n_threads=1, n_ctx=512)
    win = app_module.ChatWindow(model, gen={"max_tokens": 400})
    win.show()
    win.entry.setText("Write a long story about a dragon who learns to cook.")
    win.entry.returnPressed.emit()  # Enter in the entry
    _pump(qapp, lambda: len(win.text().split("Assistant: ", 1)[1]) >= 10)
    win.stop_button.click()
    _pump(qapp, lambda: not win.busy)
    assert win.text().endswith(" [stopped]\n\n") and win.stream.finish_reason == "cancelled"
    assert win.stream.n_generated < 100  # 400 were allowed
    # the model is still usable: ask again, then close the window while that reply streams
    win.entry.setText("Write another long story.")
    win.send_button.click()
    _pump(qapp, lambda: win.stream.n_generated >= 3)
    stream = win.stream
    assert win.close()
    win.worker.join(60)
    assert not win.worker.is_alive() and stream.finish_reason == "cancelled" and model.closed
    assert stream.n_generated < 100
