"""``streamlearn demo``: broker, service and a drifting stream together, watched live on the terminal.

One process runs everything: the service starts the embedded broker (unless ``--bootstrap`` names
a Kafka), serves HTTP on ``--http-port`` (the status page, the API, ``/metrics``), and a producer
thread writes a built-in stream at ``--rate`` events/s with delayed labels and a share of
unlabelled events. The main thread draws the live view: events/s, prequential accuracy, the
accuracy the service estimates for itself (CBPE / M-CBPE), pending labels, drift alarms and the
learning rate. On a terminal that is a rich table redrawn in place; otherwise (a pipe, a log) one
plain progress line per second.

Ctrl-C (SIGINT) or SIGTERM stops the producer, HTTP and the service (which writes its final
checkpoint), then the broker; the exit code is 0. The demo keeps its state in a temporary
directory, removed at exit, so every demo starts fresh.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from service.streams import add_produce_arguments

DRIFT_KINDS = ("concept", "data", "prediction")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """``streamlearn demo``'s options: the stream's, with demo defaults, plus the HTTP port."""
    add_produce_arguments(parser, bootstrap_help="Kafka to use (default: start the embedded broker)")
    parser.set_defaults(stream="sea", events=10_000_000, rate=2000.0, label_delay=200, unlabeled_fraction=0.2,
                        drift_every=20_000)
    parser.add_argument("--http-port", type=int, default=None,
                        help="HTTP port (default: the configured one if free, else any free port)")


def _free_or_any(host: str, port: int) -> int:
    """``port`` when it can be bound, else a free one (0 also means any)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            s.bind((host, 0))
        return s.getsockname()[1]


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


class View:
    """What the demo shows, computed from the model's status JSON."""

    def __init__(self, model: str, headline: str):
        self.model = model
        self.headline = headline
        self.started = time.monotonic()
        self._last: tuple[float, int] | None = None
        self.rate = 0.0

    def update(self, status: dict[str, Any]) -> None:
        now, predicted = time.monotonic(), status["events"]["predicted"]
        if self._last is not None and now > self._last[0]:
            self.rate = (predicted - self._last[1]) / (now - self._last[0])
        self._last = (now, predicted)

    @staticmethod
    def figures(status: dict[str, Any], produced: int) -> dict[str, str]:
        events, preq, est = status["events"], status["prequential"], status.get("estimated") or {}
        drift = status.get("drift") or {}
        alarms = ", ".join(f"{k} {(drift.get(k) or {}).get('detected_total', 0)}"
                           + (" (active)" if (drift.get(k) or {}).get("active") else "") for k in DRIFT_KINDS)
        if "accuracy" in preq:
            quality = {"prequential accuracy": _fmt(preq.get("accuracy")),
                       "estimated accuracy (CBPE / M-CBPE)":
                           f"{_fmt((est.get('cbpe') or {}).get('accuracy'))} / "
                           f"{_fmt((est.get('mcbpe') or {}).get('accuracy'))}"}
        else:
            quality = {"prequential MAE": _fmt(preq.get("mae"))}
        return {
            "events produced / predicted / learned": f"{produced:,} / {events['predicted']:,} / {events['learned']:,}",
            **quality,
            "consumer lag (events not read yet)": f"{status.get('consumer_lag', 0):,}",
            "pending labels": f"{events['pending_labels']:,}",
            "drift alarms": alarms,
            "learning rate": _fmt(status.get("learning_rate"), ".3g"),
            "model version / checkpoint": f"{status['model_version']} / {(status.get('checkpoint') or {}).get('seq')}",
        }

    def table(self, status: dict[str, Any], produced: int) -> Group:
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        table.add_row("events/s", f"{self.rate:,.0f}")
        for name, value in self.figures(status, produced).items():
            table.add_row(name, value)
        elapsed = time.monotonic() - self.started
        return Group(Text(self.headline, style="bold"), table,
                     Text(f"{elapsed:,.0f} s — Ctrl-C to stop", style="dim"))

    def line(self, status: dict[str, Any], produced: int) -> str:
        parts = [f"t={time.monotonic() - self.started:.0f}s", f"events/s={self.rate:,.0f}"]
        parts += [f"{k}={v}" for k, v in self.figures(status, produced).items()]
        return " | ".join(parts)


def run_demo(args: argparse.Namespace) -> int:
    import uvicorn

    from service.config import ConfigError, load_settings
    from service.http import create_app
    from service.runtime import Service
    from service.streams import STREAMS, make_producer, produce

    if args.stream not in STREAMS:
        print(f"streamlearn demo: --stream: unknown stream {args.stream!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = tempfile.mkdtemp(prefix="streamlearn-demo-")
    try:
        settings = load_settings(args.config, overrides={
            "state_dir": state_dir, **({"kafka": {"bootstrap": args.bootstrap}} if args.bootstrap else {})})
    except ConfigError as exc:
        shutil.rmtree(state_dir, ignore_errors=True)
        print(f"streamlearn demo: {exc}", file=sys.stderr)
        return 2
    if args.model not in settings.models:
        shutil.rmtree(state_dir, ignore_errors=True)
        print(f"streamlearn demo: --model: no model named {args.model!r}", file=sys.stderr)
        return 2
    host = settings.http.host
    port = _free_or_any(host, args.http_port if args.http_port is not None else settings.http.port)
    if settings.kafka.bootstrap is None:  # the embedded broker: its usual port may hold a real Kafka
        settings.kafka.embedded_port = _free_or_any("127.0.0.1", settings.kafka.embedded_port)

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())

    console = Console()
    try:
        service = Service(settings)  # builds the models: their settings are checked here
    except ConfigError as exc:
        shutil.rmtree(state_dir, ignore_errors=True)
        print(f"streamlearn demo: {exc}", file=sys.stderr)
        return 2
    server = None
    produced = [0]
    threads: list[threading.Thread] = []
    try:
        console.print(f"starting the service on the {'given' if args.bootstrap else 'embedded'} broker …")
        service.start()
        server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                                               access_log=False, lifespan="on"))
        threads.append(threading.Thread(target=server.run, name="http", daemon=True))
        model = settings.models[args.model]
        producer = make_producer(service.bootstrap)

        def write_stream() -> None:
            try:
                produce(producer, args.stream, args.events, events_topic=model.topics.events,
                        labels_topic=model.topics.labels, label_delay=args.label_delay,
                        unlabeled_fraction=args.unlabeled_fraction, seed=args.seed, drift_every=args.drift_every,
                        rate=args.rate, id_prefix=args.id_prefix,
                        progress=lambda n, _: produced.__setitem__(0, n), stop=stopping.is_set)
            finally:
                producer.close(timeout=5)

        threads.append(threading.Thread(target=write_stream, name="producer", daemon=True))
        for thread in threads:
            thread.start()
        url = f"http://{host}:{port}"
        console.print(f"status page {url}/ · API docs {url}/docs · metrics {url}/metrics · Kafka {service.bootstrap}")
        headline = (f"streamlearn demo — model {args.model!r} learning stream {args.stream!r} at {args.rate:,.0f} events/s, "
                    f"labels {args.label_delay} events late, {args.unlabeled_fraction:.0%} never labelled")
        _watch(console, View(args.model, headline), service, args.model, produced, stopping)
    finally:
        stopping.set()
        if server is not None:
            server.should_exit = True
        for thread in threads:
            thread.join(timeout=15)
        service.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    if service.error is not None:
        console.print(f"the service stopped with an error: {service.error}")
        return 1
    console.print("demo stopped cleanly")
    return 0


def _watch(console: Console, view: View, service, model: str, produced: list[int],
           stopping: threading.Event) -> None:
    """Redraw until ``stopping`` is set or the service fails: in place on a terminal, else a line a second."""
    runtime = service.models[model]

    def tick(seconds: float) -> bool:
        return not stopping.wait(seconds) and service.error is None

    if console.is_terminal:
        status = runtime.status()
        view.update(status)
        with Live(view.table(status, produced[0]), console=console, refresh_per_second=4) as live:
            while tick(0.5):
                status = runtime.status()
                view.update(status)
                live.update(view.table(status, produced[0]))
        return
    while tick(1.0):
        status = runtime.status()
        view.update(status)
        print(view.line(status, produced[0]), flush=True)
