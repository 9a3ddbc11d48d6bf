"""Kafka I/O of the service (kafka-python): the consumer, the producer, the prediction publisher.

- :func:`make_consumer`: every partition of the given topics assigned manually (the service is the
  single writer of its models; see :class:`service.config.KafkaConfig`), positioned at the
  checkpoint's offsets where it has them, else at the group's committed offsets, else per
  ``auto_offset_reset``. Offsets are committed under ``group_id`` by the runtime after each
  durable checkpoint.
- :class:`TimeAligner`: Kafka orders nothing across partitions, and a broker may fill a whole fetch
  with one partition (tansu fills ``fetch_max_bytes`` with the first partition it reads), so a
  consumer with a backlog would read tens of thousands of events before their labels — filling
  the pending store for nothing — or a backlog of labels before their events, which are then
  unknown. The aligner releases records across partitions in timestamp order, so a label is
  processed after the event it follows, whatever the backlog.
- :class:`PredictionPublisher`: kafka-python spends ~20 µs of Python per produced message; one
  prediction message per event would cost the learner's thread as much as the learning itself. The
  messages are serialised in the loop (one ``orjson.dumps`` each) and produced by a child process,
  on another core. ``flush()`` returns once the broker acknowledged everything sent before it, so
  a checkpoint never covers events whose predictions could still be lost.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import math
import multiprocessing
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any

from service.config import KafkaConfig

log = logging.getLogger(__name__)

FETCH_MAX_BYTES = 4 << 20
PARTITION_FETCH_BYTES = 1 << 20


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
        else:
            # Resolve committed / reset positions now: kafka-python would otherwise resolve them lazily,
            # and fetch a busy events partition for seconds before the first labels fetch.
            consumer.position(tp)
    return consumer


class TimeAligner:
    """Releases polled records across partitions in (producer) timestamp order.

    A record is released once every partition that still has unread data has buffered a record at
    least as new; a partition that is caught up (nothing beyond its buffer) constrains nothing.
    If a partition with unread data sends nothing for ``max_wait_s`` the buffered records are
    released anyway, so a stalled partition delays the others at most that long. A partition
    running ahead keeps at most ``max_buffered`` records: the rest is dropped and the consumer
    seeks back to it, to fetch it again later (no ``pause()``: with tansu, kafka-python sometimes
    never fetches a resumed partition again).
    """

    def __init__(self, consumer, max_buffered: int, max_wait_s: float = 5.0):
        self.consumer = consumer
        self.max_buffered = max_buffered
        self.max_wait_s = max_wait_s
        self.buffers: dict[Any, collections.deque] = {tp: collections.deque() for tp in consumer.assignment()}
        self._waiting_since: float | None = None

    def add(self, batch: dict) -> None:
        for tp, records in batch.items():
            buf = self.buffers[tp]
            room = self.max_buffered - len(buf)
            if room >= len(records):
                buf.extend(records)
                continue
            if room > 0:
                buf.extend(records[:room])
            self.consumer.seek(tp, records[max(room, 0)].offset)

    def _bound(self, tp, buf: collections.deque) -> float | None:
        """The newest timestamp this partition vouches for; ``None``: it constrains nothing."""
        hw = self.consumer.highwater(tp)
        next_offset = buf[-1].offset + 1 if buf else self.consumer.position(tp)
        if hw is not None and next_offset >= hw:
            return None  # caught up: nothing beyond the buffer (yet)
        return buf[-1].timestamp if buf else -math.inf

    def release(self, now: float) -> dict:
        """Records that may be processed now, ``{tp: [records]}`` in offset order per partition."""
        bounds = [b for tp, buf in self.buffers.items() if (b := self._bound(tp, buf)) is not None]
        limit = min(bounds, default=math.inf)
        if limit == -math.inf:
            if self._waiting_since is None:
                self._waiting_since = now
            if now - self._waiting_since < self.max_wait_s:
                return {}
            limit = math.inf
        self._waiting_since = None
        out = {}
        for tp, buf in self.buffers.items():
            if not buf:
                continue
            if buf[-1].timestamp <= limit:
                out[tp] = list(buf)
                buf.clear()
            else:
                taken = []
                while buf and buf[0].timestamp <= limit:
                    taken.append(buf.popleft())
                if taken:
                    out[tp] = taken
        return out


def time_ordered_chunks(batch: dict, size: int) -> Iterator[dict]:
    """``batch`` (``{tp: [records]}``) cut into chunks of about ``size`` records in timestamp order.

    The runtime handles a chunk's events before its labels; cutting a long multi-partition release
    by time keeps a label within one chunk of the event it follows (the pending store need not
    hold a whole release). A single partition's records are one chunk: no reordering to do.
    """
    if len(batch) <= 1 or sum(len(r) for r in batch.values()) <= size:
        if batch:
            yield batch
        return
    merged = heapq.merge(*([(rec.timestamp, i, tp, rec) for rec in records]
                           for i, (tp, records) in enumerate(batch.items())), key=lambda t: (t[0], t[1]))
    chunk: dict = {}
    n = 0
    for _, _, tp, rec in merged:
        chunk.setdefault(tp, []).append(rec)
        n += 1
        if n >= size:
            yield chunk
            chunk, n = {}, 0
    if chunk:
        yield chunk


def _publisher_main(conn, bootstrap: str, kafka: KafkaConfig) -> None:
    """Child process: produce what the parent sends; ``None`` = flush and acknowledge."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C hits the whole group; the parent says when to stop
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s publisher: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # its event-loop timing warnings are noise here
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
