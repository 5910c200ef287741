"""`pack serve` (issue 29): a web bundle served on loopback with the COOP/COEP headers that let its page
run onnxruntime-web's WASM on several threads; the page's own use of them is in tests/test_web_page.py."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from packager.bundle.serve import ISOLATION_HEADERS


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    # The files the server hands out, as a web bundle lays them out (what they hold does not matter here).
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "index.html").write_text("<!doctype html><title>page</title>")
    (tmp_path / "web" / "app.js").write_text("export {};")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.onnx.data").write_bytes(b"\0" * 5000)
    (tmp_path.parent / "secret.txt").write_text("not in the bundle")
    (tmp_path / "web" / "escape").symlink_to(tmp_path.parent / "secret.txt")
    return tmp_path


def _get(url: str):
    """(status, headers (case-insensitive), body)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, b""


def _pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *args], capture_output=True, text=True, timeout=60)


def test_pack_serve_serves_the_bundle_cross_origin_isolated(bundle):
    proc = subprocess.Popen([sys.executable, "-m", "packager.cli", "serve", str(bundle), "--port", "0", "--for", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/web/index.html"), url
        status, headers, body = _get(url)
        assert status == 200 and b"<title>page</title>" in body
        for key, value in ISOLATION_HEADERS.items():
            assert headers.get(key) == value, headers
        root = url.removesuffix("web/index.html")
        status, headers, _ = _get(root + "web/app.js")
        assert status == 200 and headers["Content-Type"].startswith("text/javascript"), headers
        status, headers, body = _get(root + "model/model.onnx.data")
        assert status == 200 and len(body) == 5000 and headers.get("Cross-Origin-Embedder-Policy") == "require-corp"
        assert _get(root + "model/")[0] == 404  # no listings
        assert _get(root + "web/escape")[0] == 404  # a symlink out of the bundle
        assert _get(root + "../secret.txt")[0] == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_pack_serve_listens_on_loopback_only(bundle):
    result = _pack("serve", str(bundle), "--host", "0.0.0.0", "--port", "0", "--for", "1")
    assert result.returncode == 2 and not result.stdout, result
    assert "loopback" in result.stderr and "SHIPPING.md" in result.stderr and len(result.stderr.splitlines()) == 1


def test_pack_serve_refuses_a_folder_without_a_page(tmp_path):
    result = _pack("serve", str(tmp_path), "--port", "0", "--for", "1")
    assert result.returncode == 2 and "--target web" in result.stderr, result
