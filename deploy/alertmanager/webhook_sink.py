"""A minimal Alertmanager webhook receiver: logs every notification, one line per alert.

The compose stack runs it as ``alert-sink`` so that a fresh ``docker compose up`` shows where the
alerts go; replace the receiver URLs in alertmanager.yml with a pager or chat bridge in
production. The end-to-end alert test runs the same server in-process and reads ``received``.

Standard library only, so it runs in a bare ``python`` image::

    python webhook_sink.py --port 9095
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookSink(ThreadingHTTPServer):
    """HTTP server that keeps every Alertmanager notification it receives (path, payload)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], echo: bool = False) -> None:
        super().__init__(address, _Handler)
        self.echo = echo
        self.received: list[tuple[str, dict]] = []
        self.arrived = threading.Condition()

    def record(self, path: str, payload: dict) -> None:
        with self.arrived:
            self.received.append((path, payload))
            self.arrived.notify_all()
        if self.echo:
            for alert in payload.get("alerts", []):
                labels = alert.get("labels", {})
                print(f"{path} {alert.get('status')} {labels.get('alertname')} "
                      f"severity={labels.get('severity')} model={labels.get('model', '-')} "
                      f"{alert.get('annotations', {}).get('summary', '')}", flush=True)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(received)`` is true or ``timeout`` seconds pass."""
        with self.arrived:
            return self.arrived.wait_for(lambda: predicate(self.received), timeout)


class _Handler(BaseHTTPRequestHandler):
    server: WebhookSink

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            payload = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as exc:
            self.send_error(400, f"body is not JSON: {exc}")
            return
        self.server.record(self.path, payload)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        # One line per alert is printed by record(); the access log would only repeat it.
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9095)
    args = parser.parse_args()
    server = WebhookSink((args.host, args.port), echo=True)
    print(f"alert sink listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
