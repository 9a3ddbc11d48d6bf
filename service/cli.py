"""``streamlearn``: ``serve``, ``broker``, ``produce``, ``demo``.

``serve`` runs the HTTP app under uvicorn, then starts the ingest loop
(:class:`service.runtime.Service`): ``/healthz`` answers during the start, ``/readyz`` once it is
done. SIGTERM or Ctrl-C stops HTTP first, then the loop finishes its batch, writes a checkpoint,
commits the offsets it covers and the process exits 0. If the start fails or the loop dies the
process exits 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

log = logging.getLogger("streamlearn")


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)


def run_serve(args: argparse.Namespace) -> int:
    from service.config import ConfigError, load_settings

    try:  # before the heavy imports: a bad configuration fails at once
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"streamlearn serve: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from service.http import create_app
    from service.runtime import Service

    _setup_logging(settings.log_level)
    stopping = threading.Event()
    # uvicorn runs in a thread of its own, where it installs no signal handlers: these stop the
    # service, during the start too (which then ends before the loop runs)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        service = Service(settings)  # builds the models: their settings are checked here
    except ConfigError as exc:
        print(f"streamlearn serve: {exc}", file=sys.stderr)
        return 2
    # HTTP first: /healthz answers and /readyz says 503 (streamlearn_ready 0) while the checkpoint
    # is restored and Kafka connected, so a slow or stuck start shows as not ready, not as down
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=settings.http.host, port=settings.http.port,
                                           log_level="warning", access_log=False, lifespan="on"))
    http = threading.Thread(target=server.run, name="http")
    http.start()
    try:
        while not server.started and http.is_alive():
            time.sleep(0.01)
        if not server.started:  # uvicorn logged why (a busy port)
            log.error("cannot start: HTTP cannot listen on %s:%d", settings.http.host, settings.http.port)
            return 1
        log.info("HTTP on http://%s:%d (docs at /docs); not ready until the service has started",
                 settings.http.host, settings.http.port)
        try:
            service.start(cancelled=stopping)
        except Exception as exc:  # noqa: BLE001 - unreachable Kafka, missing topic: say which
            if stopping.is_set():
                log.info("stopped while starting (%s)", exc)
                return 0
            log.error("cannot start: %s", exc)
            return 1
        service.on_fatal = stopping.set
        while not stopping.wait(0.5):
            if not http.is_alive():
                log.error("the HTTP server stopped")
                return 1
    finally:
        server.should_exit = True
        http.join()
        service.stop()
    if service.error is not None:
        log.error("stopped with an error: %s", service.error)
        return 1
    log.info("stopped cleanly at checkpoint %s", service.checkpoint_seq)
    return 0


def run_broker(args: argparse.Namespace) -> int:
    from service.broker import BrokerError, EmbeddedBroker

    _setup_logging()
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    broker = EmbeddedBroker(args.port, host=args.host)
    try:
        broker.start()
    except BrokerError as exc:
        print(f"streamlearn broker: {exc}", file=sys.stderr)
        return 1
    with broker:
        print(f"Kafka-protocol broker (tansu, memory storage) on {broker.bootstrap}; Ctrl-C stops it", flush=True)
        while not stopping.wait(0.5):
            if broker.process.poll() is not None:
                log.error("the broker exited with code %s", broker.process.returncode)
                return 1
    return 0


def run_produce(args: argparse.Namespace) -> int:
    from service.streams import run_produce as produce

    return produce(args)


def run_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo as demo

    return demo(args)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535, got {text!r}")
    return port


def build_parser() -> argparse.ArgumentParser:
    from service.demo import add_demo_arguments
    from service.streams import add_produce_arguments

    parser = argparse.ArgumentParser(prog="streamlearn", description="Online learning from Kafka event streams.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="the service: Kafka in, prequential learning, HTTP out")
    serve.add_argument("--config", default=None, help="YAML file (default: $STREAMLEARN_CONFIG)")
    serve.set_defaults(func=run_serve)

    broker = sub.add_parser("broker", help="the embedded Kafka-protocol broker on its own")
    broker.add_argument("--port", type=_port, default=9092, help="TCP port, 0 for a free one (default: 9092)")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    broker.set_defaults(func=run_broker)

    produce = sub.add_parser("produce", help="write a built-in drifting demo stream to Kafka")
    produce.add_argument("--config", default=None, help="YAML file (default: $STREAMLEARN_CONFIG)")
    add_produce_arguments(produce)
    produce.set_defaults(func=run_produce)

    demo = sub.add_parser("demo", help="broker + service + producer with a live terminal view")
    demo.add_argument("--config", default=None, help="YAML file (default: $STREAMLEARN_CONFIG)")
    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
