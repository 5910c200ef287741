"""What tests/test_web_page.py needs around a real browser: onnxruntime-web's npm package (cached once
per machine), a Chromium to drive, a local HTTP server for a bundle and its page, and the reference
greedy run of the same graph in ONNX Runtime (Python).

The page loads onnxruntime-web from a pinned CDN URL; the test machine has no internet, so the npm
package's dist/ files are served by the same local server and the page is pointed at them with
``?ort=/_ort/``.
"""

from __future__ import annotations

import functools
import importlib.resources
import http.server
import json
import os
import posixpath
import shutil
import subprocess
import tarfile
import threading
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from models import CACHE, _atomic_build
from packager.bundle.serve import ISOLATION_HEADERS
from packager.bundle.web import ORT_WEB_VERSION, WEB_DIR
from packager.convert.onnx.wasm_graph import WASM_SESSION_CONFIG
from packager.runtime import onnx as onnx_runtime

ORT_PREFIX = "/_ort/"
# What the page may load from dist/: the ES module bundles and the WASM builds they import (no source maps).
ORT_FILES = ("ort.wasm.min.mjs", "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
             "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
# Chromium, or Chrome, where each OS puts it (GitHub's runners ship Chrome); EDGEPACK_CHROMIUM wins.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome",
            "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
            r"C:\Program Files\Google\Chrome\Application\chrome.exe")
# Headless, no sandbox (root in containers), no GPU, and nothing that reaches the network by itself.
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
# A software WebGPU adapter (SwiftShader, on the CPU): slow, but the page's WebGPU path runs for real.
WEBGPU_ARGS = ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--enable-unsafe-webgpu", "--enable-unsafe-swiftshader",
               "--use-webgpu-adapter=swiftshader"]
MIME = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
        ".html": "text/html", ".css": "text/css", ".onnx": "application/octet-stream", ".data": "application/octet-stream"}


def find_browser() -> str | None:
    env = os.environ.get("EDGEPACK_CHROMIUM")
    if env:
        return env
    for name in BROWSERS:
        found = shutil.which(name) or (name if os.path.isabs(name) and os.path.isfile(name) else None)
        if found:
            return found
    return None


def ort_web_dist() -> Path:
    """onnxruntime-web's dist/ files at the version the page pins, fetched with npm once per machine."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm")

    def build(tmp: Path) -> None:
        subprocess.run([npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--pack-destination", str(tmp),
                        "--silent"], check=True, capture_output=True, timeout=600)
        (tgz,) = tmp.glob("onnxruntime-web-*.tgz")
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")
                       and posixpath.basename(m.name) in ORT_FILES]
            for m in members:
                m.name = posixpath.basename(m.name)
            tar.extractall(tmp, members=members, filter="data")
        tgz.unlink()
        missing = [f for f in ORT_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"onnxruntime-web {ORT_WEB_VERSION} lacks {missing}: the page's file names changed")

    return _atomic_build(CACHE / f"onnxruntime-web-{ORT_WEB_VERSION}", build)


# -- the bundle's page and its chat prompt, as pack would write them ---------------------------------

def chat_renderer(model_dir: Path, manifest: dict[str, Any]):
    """The bundle's chat template bound as packager.load renders a chat (same bos/eos text)."""
    return onnx_runtime.chat_renderer(onnx_runtime.tokenizer_config(model_dir), model_dir,
                                      manifest["runtime"].get("chat_template"))


def page_asset(name: str) -> bytes:
    """One of the page's static files as the package ships it."""
    return (importlib.resources.files("packager") / "data" / "web" / name).read_bytes()


def page_files(bundle: Path) -> dict[str, bytes]:
    """The page's files a web bundle ships (pack/onnx.py writes them for the web target)."""
    shipped = bundle / WEB_DIR
    assert (shipped / "index.html").is_file(), f"{bundle} ships no web page"
    return {f"{WEB_DIR}/{p.name}": p.read_bytes() for p in shipped.iterdir() if p.is_file()}


# -- a local server: the bundle's folder, the page's files over it, onnxruntime-web under /_ort/ ----------

class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME}

    def __init__(self, *args, root: Path, overlay: dict[str, bytes], ort: Path, isolated: bool, **kwargs):
        self.root, self.overlay, self.ort, self.isolated = root, overlay, ort, isolated
        super().__init__(*args, directory=str(root), **kwargs)

    def end_headers(self) -> None:
        if self.isolated:  # cross-origin isolated, as `pack serve` serves a bundle: WASM threads work
            for key, value in ISOLATION_HEADERS.items():
                self.send_header(key, value)
        super().end_headers()

    def do_GET(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        if path in self.overlay:
            self._send(self.overlay[path], MIME.get(posixpath.splitext(path)[1], "application/octet-stream"))
            return
        super().do_GET()

    def translate_path(self, path: str) -> str:
        clean = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        if clean.startswith(ORT_PREFIX):
            name = posixpath.basename(clean)
            return str(self.ort / name) if name in ORT_FILES else str(self.ort / "missing")
        return super().translate_path(path)

    def _send(self, data: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # quiet: pytest shows failures, not every GET
        pass


class PageServer:
    """Serves ``root`` (a bundle) with ``overlay`` files on top and onnxruntime-web under /_ort/;
    ``isolated``: with the COOP/COEP headers that make the page cross-origin isolated."""

    def __init__(self, root: Path, overlay: dict[str, bytes], ort: Path, isolated: bool = False) -> None:
        handler = functools.partial(_Handler, root=root, overlay=overlay, ort=ort, isolated=isolated)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="edgepack-web-test", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def __enter__(self) -> "PageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the reference: the same graph, greedy, in ONNX Runtime (Python) ------------------------------

def ort_greedy(model_dir: Path, config: dict[str, Any], prompt_ids: list[int], max_new: int,
               graph_url: str | None = None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens after ``prompt_ids`` and the logits each was taken from, driven by the page's own
    config (names, KV shape, eos), one step at a time as the page runs it; ``graph_url``: the graph the
    page ran (its config's model.graph or model.wasm_graph; default the former)."""
    import onnxruntime as ort

    io, kv = config["io"], config["kv"]
    graph = model_dir / posixpath.basename(graph_url or config["model"]["graph"])
    opts = ort.SessionOptions()
    for key, value in WASM_SESSION_CONFIG.items():  # as the page creates the WASM graph's session
        opts.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    layers = range(kv["n_layers"])
    pasts = [io["past_key"] % i for i in layers] + [io["past_value"] % i for i in layers]
    presents = [io["present_key"] % i for i in layers] + [io["present_value"] % i for i in layers]
    dtype = np.float16 if kv["dtype"] == "float16" else np.float32
    past = {p: np.zeros((1, kv["n_kv_heads"], 0, kv["head_dim"]), dtype) for p in pasts}
    eos = set(config["eos_token_ids"])
    tokens: list[int] = []
    rows: list[np.ndarray] = []
    pos = 0

    def forward(ids: list[int]) -> np.ndarray:
        nonlocal past, pos
        feeds = dict(past)
        feeds[io["input_ids"]] = np.array([ids], np.int64)
        if io.get("attention_mask"):
            feeds[io["attention_mask"]] = np.ones((1, pos + len(ids)), np.int64)
        if io.get("position_ids"):
            feeds[io["position_ids"]] = np.arange(pos, pos + len(ids), dtype=np.int64)[None]
        out = dict(zip([io["logits"], *presents], session.run([io["logits"], *presents], feeds)))
        pos += len(ids)
        past = {p: out[q] for p, q in zip(pasts, presents)}
        return out[io["logits"]][0, -1].astype(np.float32)

    chunk = config.get("prefill_chunk") or len(prompt_ids)
    for i in range(0, len(prompt_ids), chunk):
        row = forward(list(prompt_ids[i:i + chunk]))
    while True:
        rows.append(row)
        nxt = int(row.argmax())
        if nxt in eos:
            break
        tokens.append(nxt)
        if len(tokens) >= max_new:
            break
        row = forward([nxt])
    return tokens, rows


def top2_gap(row: np.ndarray) -> float:
    a, b = np.partition(row, -2)[-2:]
    return float(abs(b - a))


def iter_texts(page, selector: str, until: str, timeout_s: float) -> Iterator[tuple[float, str]]:
    """(seconds, text of ``selector``) as the page changes it, until the JS expression ``until`` is true."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        text, done = page.evaluate(f"[document.querySelector({json.dumps(selector)})?.textContent ?? '', !!({until})]")
        yield time.monotonic() - t0, text
        if done:
            return
        time.sleep(0.03)
    raise TimeoutError(f"the page did not finish within {timeout_s:g} s")
