"""`pack serve`: try a web bundle's page locally, cross-origin isolated so WASM runs several threads."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from packager.bundle.serve import bundle_server
from packager.progress import say


@click.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on (only).")
@click.option("--for", "seconds", type=click.FloatRange(min=0, min_open=True),
              help="Stop after this many seconds. Default: until Ctrl-C.")
def serve_cmd(bundle: Path, port: int, host: str, seconds: float | None) -> None:
    """Serve BUNDLE (a --target web bundle) on this machine with the COOP/COEP headers its page needs for
    WASM threads; prints the page's URL on stdout. Loopback only: to host a bundle, see its SHIPPING.md.

    \b
    Examples:
      pack serve dist/SmolLM2-135M-Instruct-web              # then open the URL it prints
      pack serve dist/SmolLM2-135M-Instruct-web --port 0 --for 600
    """
    server = bundle_server(bundle, host=host, port=port)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    click.echo(f"http://{shown}:{bound_port}/web/index.html")
    say("serving the bundle cross-origin isolated (WASM threads on); Ctrl-C stops", quiet=False)
    timer = threading.Timer(seconds, server.shutdown) if seconds else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if timer:
            timer.cancel()
        server.server_close()
