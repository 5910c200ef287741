"""A desktop chat window over an edgepack bundle (Qt for Python, from PyPI).

    pip install PySide6-Essentials        # or: pip install 'edgepack[desktop]'
    python examples/desktop_chat.py dist/SmolLM2-135M-Instruct-laptop

The reply is generated on a worker thread and streamed into the window piece by
piece; the window stays responsive. Stop cancels the reply at its next token;
closing the window cancels it and frees the model. Widgets are only touched on the
UI thread: the worker emits Qt signals, which Qt queues onto the UI thread.

Without a display (a server, CI), run it with QT_QPA_PLATFORM=offscreen.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import QApplication, QHBoxLayout, QLineEdit, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

import packager
from packager.runtime import Model
from packager.runtime.model import Stream


class _Relay(QObject):
    """Signals the worker thread emits; connected with Qt.QueuedConnection, so the slots run on the UI thread."""

    piece = Signal(str)
    done = Signal(str, str)  # the whole reply, the stream's finish_reason
    failed = Signal(str)


class ChatWindow(QWidget):
    """The window, its conversation, and the worker thread that streams a reply into it."""

    def __init__(self, model: Model, *, gen: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.gen = dict(gen or {})
        self.history: list[dict[str, str]] = []
        self.stream: Stream | None = None  # the reply in progress (read by the worker, cancelled by the UI)
        self.worker: threading.Thread | None = None
        self.busy = False  # from Send until the reply's last signal has been handled

        name = model.bundle.path.name if hasattr(model, "bundle") else "a bundle"
        self.setWindowTitle(f"edgepack chat: {name}")
        self.transcript = QPlainTextEdit(readOnly=True)
        self.entry = QLineEdit(placeholderText="Ask something, then Enter")
        self.send_button = QPushButton("Send")
        self.stop_button = QPushButton("Stop", enabled=False)
        bar = QHBoxLayout()
        bar.addWidget(self.entry, 1)
        bar.addWidget(self.send_button)
        bar.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.transcript, 1)
        layout.addLayout(bar)
        self.resize(640, 480)

        self.entry.returnPressed.connect(self.send)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.relay = _Relay()
        self.relay.piece.connect(self._append, Qt.ConnectionType.QueuedConnection)
        self.relay.done.connect(self._done, Qt.ConnectionType.QueuedConnection)
        self.relay.failed.connect(self._failed, Qt.ConnectionType.QueuedConnection)

    # -- UI thread ---------------------------------------------------------------------
    def send(self) -> None:
        text = self.entry.text().strip()
        if not text or self.busy:
            return
        self.entry.clear()
        self.history.append({"role": "user", "content": text})
        self._append(f"You: {text}\nAssistant: ")
        self._set_busy(True)
        try:
            self.stream = self.model.chat(list(self.history), stream=True, **self.gen)
        except Exception as exc:  # e.g. the conversation no longer fits the context
            self._failed(str(exc))
            return
        self.worker = threading.Thread(target=self._work, args=(self.stream,), daemon=True)
        self.worker.start()

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.cancel()  # safe from any thread: decoding ends before the next token

    def closeEvent(self, event: QCloseEvent) -> None:
        self.model.close()  # cancels a reply in progress and waits for its current token
        event.accept()

    def text(self) -> str:
        """The transcript as shown."""
        return self.transcript.toPlainText()

    def _append(self, text: str) -> None:
        self.transcript.moveCursor(self.transcript.textCursor().MoveOperation.End)
        self.transcript.insertPlainText(text)
        self.transcript.ensureCursorVisible()

    def _done(self, reply: str, reason: str) -> None:
        self.history.append({"role": "assistant", "content": reply})
        self._append(" [stopped]\n\n" if reason == "cancelled" else "\n\n")
        self._set_busy(False)

    def _failed(self, message: str) -> None:
        self.history.pop()  # the question was not answered
        self._append(f"\n[error: {message}]\n\n")
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)

    # -- worker thread ------------------------------------------------------------------
    def _work(self, stream: Stream) -> None:
        parts = []
        try:
            for piece in stream:
                parts.append(piece)
                self.relay.piece.emit(piece)
        except Exception as exc:  # shown in the window; the app keeps running
            self.relay.failed.emit(str(exc))
            return
        self.relay.done.emit("".join(parts), stream.finish_reason or "stop")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Chat with an edgepack bundle in a window.")
    ap.add_argument("bundle", help="a bundle directory written by `pack model`")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    app = QApplication(sys.argv[:1])
    model = packager.load(args.bundle, n_threads=args.threads)
    window = ChatWindow(model, gen={"max_tokens": args.max_tokens, "temperature": args.temperature})
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
