"""A bundle served on this machine the way its web page wants (issue 29): `pack serve BUNDLE`.

onnxruntime-web runs on more than one WASM thread only where the page is cross-origin isolated
(SharedArrayBuffer), which takes two response headers on the page and everything it loads:

    Cross-Origin-Opener-Policy: same-origin
    Cross-Origin-Embedder-Policy: require-corp

The server is the standard library's, on the loopback interface only (it is for trying a bundle, not
for hosting one: SHIPPING.md gives the headers for real hosts), serving GET and HEAD of the bundle's own
files (no listings, no symlink leaving the bundle), with .mjs and .wasm under the MIME types browsers
insist on, and a bounded number of requests in flight.
"""

from __future__ import annotations

import http.server
import ipaddress
import os
import socket
import threading
from pathlib import Path
from typing import Any

from packager.errors import UsageError

ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
MIME = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
        ".html": "text/html", ".css": "text/css", ".onnx": "application/octet-stream",
        ".data": "application/octet-stream"}
MAX_IN_FLIGHT = 16  # a page fetches a handful of files at once; more is not a browser on this machine


class IsolatedHandler(http.server.SimpleHTTPRequestHandler):
    """Files under ``directory`` with the isolation headers; nothing else."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME}

    def end_headers(self) -> None:
        for key, value in ISOLATION_HEADERS.items():
            self.send_header(key, value)
        self.send_header("Cache-Control", "no-cache")  # a re-packed bundle is not served stale
        super().end_headers()

    def list_directory(self, path: str | os.PathLike[str]) -> None:  # type: ignore[override]
        self.send_error(404, "no directory listings")
        return None

    def send_head(self) -> Any:
        target = Path(self.translate_path(self.path))
        root = Path(self.directory).resolve()
        if target.exists() and not target.resolve().is_relative_to(root):
            self.send_error(404, "outside the bundle")
            return None
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the command prints its URL; a browser's requests are not news


class BundleServer(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer that refuses requests past MAX_IN_FLIGHT instead of spawning without bound."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # the browser retries; this machine is not a host
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class BundleServer6(BundleServer):
    address_family = socket.AF_INET6


def loopback(host: str) -> str:
    """``host`` if it names this machine's loopback interface, else UsageError."""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"--host {host}: pack serve listens on the loopback interface only (127.0.0.1, ::1 or "
                         "localhost); to host a bundle for others, upload it with the headers SHIPPING.md gives")
    return host


def bundle_server(bundle: Path, host: str = "127.0.0.1", port: int = 8000) -> BundleServer:
    """A server (not yet serving) for ``bundle``'s folder, cross-origin isolated; port 0 picks a free one."""
    bundle = Path(bundle)
    if not (bundle / "web" / "index.html").is_file():
        raise UsageError(f"{bundle}: no web/index.html, so there is no page to serve; pack the model with "
                         "--target web")
    handler = lambda *a, **kw: IsolatedHandler(*a, directory=str(bundle), **kw)  # noqa: E731
    server = BundleServer6 if ":" in loopback(host) else BundleServer
    try:
        return server((host, port), handler)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another with --port") from exc
