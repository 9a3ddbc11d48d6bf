"""``streamlearn``: ``serve``, ``broker``, ``produce``, ``demo``.

``serve`` runs the ingest loop (:class:`service.runtime.Service`) and the HTTP app under uvicorn.
SIGTERM or Ctrl-C stops HTTP first, then the loop finishes its batch, writes a checkpoint, commits
the offsets it covers and the process exits 0. If the loop dies the process exits 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

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
    # uvicorn re-raises the signal that stopped it once it has shut down; these handlers make that
    # re-raise harmless so that the checkpoint below still runs. A signal during start-up stops too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    service = Service(settings)
    try:
        try:
            service.start()
        except Exception as exc:  # noqa: BLE001 - unreachable Kafka, busy port, missing topic: say which
            log.error("cannot start: %s", exc)
            return 1
        server = uvicorn.Server(uvicorn.Config(create_app(service), host=settings.http.host,
                                               port=settings.http.port, log_level="warning",
                                               access_log=False, lifespan="on"))
        service.on_fatal = lambda: setattr(server, "should_exit", True)
        log.info("HTTP on http://%s:%d (docs at /docs)", settings.http.host, settings.http.port)
        if not stopping.is_set():
            server.run()
    finally:
        service.stop()
    if service.error is not None:
        log.error("stopped with an error: %s", service.error)
        return 1
    log.info("stopped cleanly at checkpoint %s", service.checkpoint_seq)
    return 0


def run_broker(args: argparse.Namespace) -> int:
    from service.broker import EmbeddedBroker

    _setup_logging()
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with EmbeddedBroker(args.port, host=args.host) as broker:
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


def build_parser() -> argparse.ArgumentParser:
    from service.demo import add_demo_arguments
    from service.streams import add_produce_arguments

    parser = argparse.ArgumentParser(prog="streamlearn", description="Online learning from Kafka event streams.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="the service: Kafka in, prequential learning, HTTP out")
    serve.add_argument("--config", default=None, help="YAML file (default: $STREAMLEARN_CONFIG)")
    serve.set_defaults(func=run_serve)

    broker = sub.add_parser("broker", help="the embedded Kafka-protocol broker on its own")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--host", default="127.0.0.1")
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
