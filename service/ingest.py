"""Kafka I/O of the service (kafka-python): the consumer, the producer, the prediction publisher.

- :func:`make_consumer`: every partition of the given topics assigned manually (the service is the
  single writer of its models; see :class:`service.config.KafkaConfig`), positioned at the
  checkpoint's offsets where it has them, else at the group's committed offsets, else per
  ``auto_offset_reset``. Offsets are committed under ``group_id`` by the runtime after each
  durable checkpoint.
- :class:`LabelAlignment`: keeps the labels partitions from falling behind the events partitions
  in time. Kafka orders nothing across partitions and kafka-python drains one partition's fetch
  before the next, so without it a fast consumer reads events far ahead of their labels and the
  pending-label store fills (and evicts) for nothing. While a labels partition has a backlog whose
  last processed record is older than the newest processed event, the events partitions are paused.
- :class:`PredictionPublisher`: kafka-python spends ~20 µs of Python per produced message; one
  prediction message per event would cost the learner's thread as much as the learning itself. The
  messages are serialised in the loop (one ``orjson.dumps`` each) and produced by a child process,
  on another core. ``flush()`` returns once the broker acknowledged everything sent before it, so
  a checkpoint never covers events whose predictions could still be lost.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import time
from collections.abc import Iterable
from typing import Any

from service.config import KafkaConfig

log = logging.getLogger(__name__)

FETCH_MAX_BYTES = 32 << 20
PARTITION_FETCH_BYTES = 2 << 20


def make_producer(bootstrap: str, kafka: KafkaConfig):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, linger_ms=kafka.producer_linger_ms, batch_size=1 << 20,
                         max_request_size=16 << 20, request_timeout_ms=kafka.request_timeout_ms)


def make_consumer(bootstrap: str, kafka: KafkaConfig, topics: Iterable[str], offsets: dict[tuple[str, int], int],
                  timeout: float = 30.0):
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=kafka.group_id, enable_auto_commit=False,
        auto_offset_reset=kafka.auto_offset_reset, max_poll_records=kafka.max_poll_records,
        fetch_max_bytes=FETCH_MAX_BYTES, max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
        request_timeout_ms=kafka.request_timeout_ms,
    )
    partitions = []
    deadline = time.monotonic() + timeout
    for topic in sorted(set(topics)):
        while not (parts := consumer.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                consumer.close()
                raise RuntimeError(f"topic {topic} has no partitions on {bootstrap}")
            time.sleep(0.1)
            consumer.topics()  # refreshes the metadata
        partitions.extend(TopicPartition(topic, p) for p in sorted(parts))
    consumer.assign(partitions)
    for tp in partitions:
        if (tp.topic, tp.partition) in offsets:
            consumer.seek(tp, offsets[(tp.topic, tp.partition)])
    return consumer


class LabelAlignment:
    """Pauses the events partitions while a labels partition lags behind them in time."""

    def __init__(self, consumer, events_topics: set[str], labels_topics: set[str]):
        self.consumer = consumer
        assigned = consumer.assignment()
        self.events = [tp for tp in assigned if tp.topic in events_topics and tp.topic not in labels_topics]
        self.labels = [tp for tp in assigned if tp.topic in labels_topics]
        self.last_ts: dict[Any, int] = {}
        self.paused = False

    def observe(self, batch: dict) -> None:
        for tp, records in batch.items():
            self.last_ts[tp] = records[-1].timestamp

    def update(self, positions: dict[tuple[str, int], int]) -> None:
        newest_event = max((self.last_ts.get(tp, -1) for tp in self.events), default=-1)
        behind = False
        for tp in self.labels:
            hw = self.consumer.highwater(tp)
            pos = positions.get((tp.topic, tp.partition))
            backlog = hw is not None and pos is not None and hw > pos
            if backlog and self.last_ts.get(tp, -1) < newest_event:
                behind = True
                break
        if behind != self.paused and self.events:
            (self.consumer.pause if behind else self.consumer.resume)(*self.events)
            self.paused = behind


def _publisher_main(conn, bootstrap: str, kafka: KafkaConfig) -> None:
    """Child process: produce what the parent sends; ``None`` = flush and acknowledge."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C hits the whole group; the parent says when to stop
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s publisher: %(message)s")
    producer = make_producer(bootstrap, kafka)
    failures = 0

    def failed(_exc) -> None:
        nonlocal failures
        failures += 1

    try:
        while True:
            item = conn.recv()
            if item is None:
                producer.flush()
                conn.send(failures)
                failures = 0
            elif item == "close":
                return
            else:
                topic, messages = item
                send = producer.send
                for m in messages:
                    send(topic, m).add_errback(failed)
    except (EOFError, KeyboardInterrupt):  # the parent went away
        pass
    finally:
        producer.close(timeout=5)


class PredictionPublisher:
    """Produces batches of serialised prediction messages from a child process."""

    def __init__(self, bootstrap: str, kafka: KafkaConfig):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_publisher_main, args=(child, bootstrap, kafka),
                                    name="streamlearn-publisher", daemon=True)
        self._process.start()
        child.close()
        self.failures = 0

    def publish(self, topic: str, messages: list[bytes]) -> None:
        if messages:
            self._conn.send((topic, messages))

    def flush(self, timeout: float = 60.0) -> None:
        """Waits until everything published so far is acknowledged; raises if it was not."""
        self._conn.send(None)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"prediction publisher did not flush within {timeout:.0f} s")
        failed = self._conn.recv()
        if failed:
            self.failures += failed
            raise RuntimeError(f"{failed} prediction messages were not acknowledged by Kafka")

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the child already gone
            self._conn.send("close")
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
        self._conn.close()
