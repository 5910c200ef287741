"""`pack chat`: a conversation driven through stdin, Ctrl-C (SIGINT) mid-reply and at the prompt."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import packager
from packager.cli.chat_session import chat_session

ENV = dict(os.environ, EDGEPACK_NO_PROGRESS="1", PYTHONUNBUFFERED="1")


def test_the_conversation_is_kept_and_reset(smollm2_bundle):
    turns = ["My name is Ada. Say hello.", "What is my name?"]
    with packager.load(smollm2_bundle, n_threads=1, n_ctx=512) as m:
        out, err = io.StringIO(), io.StringIO()
        rc = chat_session(m, opts={"max_tokens": 12}, stdin=io.StringIO("\n".join(turns + ["/reset", turns[1]]) + "\n"),
                          out=out, err=err)
        assert rc == 0
        first = m.chat([{"role": "user", "content": turns[0]}], max_tokens=12)
        second = m.chat([{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first},
                         {"role": "user", "content": turns[1]}], max_tokens=12)
        fresh = m.chat([{"role": "user", "content": turns[1]}], max_tokens=12)
    assert second != fresh  # the test can tell a kept conversation from a forgotten one
    assert out.getvalue() == f"{first}\n{second}\n{fresh}\n"
    assert "(conversation forgotten)" in err.getvalue()


def _chat(bundle, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "packager.cli", "chat", str(bundle), "--threads", "1",
                             "--ctx", "1024", "--temperature", "0", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


class _Reader:
    """Collect a pipe's bytes in a thread, so the test can wait for output without blocking."""

    def __init__(self, pipe) -> None:
        self.data = b""
        self._pipe = pipe
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while chunk := os.read(self._pipe.fileno(), 4096):
            self.data += chunk

    def wait_for(self, pred, timeout: float = 180) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred(self.data):
                return True
            time.sleep(0.02)  # polling the pipe, not a timing assumption
        return False

    def text(self) -> str:
        self._t.join(60)
        return self.data.decode()


def test_stdin_script_and_ctrl_d(smollm2_bundle):
    p = _chat(smollm2_bundle, "-n", "8")
    out, err = p.communicate(b"Name a colour.\n", timeout=300)  # then end of input: Ctrl-D
    assert p.returncode == 0, err.decode()
    assert out.decode().strip() and err.decode().count("you> ") == 2


def test_sigint_mid_reply_stops_it_and_returns_to_the_prompt(smollm2_bundle):
    p = _chat(smollm2_bundle, "-n", "400")
    out, err = _Reader(p.stdout), _Reader(p.stderr)
    p.stdin.write(b"Write a long story about a dragon who learns to cook.\n")
    p.stdin.flush()
    assert out.wait_for(lambda d: len(d) >= 20), err.data
    before = len(out.data)
    p.send_signal(signal.SIGINT)
    assert err.wait_for(lambda d: b"[stopped after" in d), err.data
    stopped = int(re.search(rb"\[stopped after (\d+) tokens\]", err.data).group(1))
    assert stopped < 100  # 400 were allowed: decoding stopped at the Ctrl-C
    assert err.wait_for(lambda d: d.count(b"you> ") == 2)  # back at the prompt
    p.send_signal(signal.SIGINT)  # Ctrl-C at the prompt clears the line, does not quit
    assert err.wait_for(lambda d: d.count(b"you> ") == 3)
    p.stdin.write(b"Name a colour.\n/exit\n")
    p.stdin.flush()
    assert p.wait(300) == 0
    text = out.text()
    assert len(text) > before and text[before:].split("\n", 1)[1].strip()  # the second question was answered
    assert "Traceback" not in err.text()
