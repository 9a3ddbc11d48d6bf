"""Kafka I/O of the service (kafka-python): the consumer, the producer, the prediction publisher.

- :func:`make_consumer`: every partition of the given topics assigned manually (the service is the
  single writer of its models; see :class:`service.config.KafkaConfig`), positioned at the
  checkpoint's offsets where it has them (a checkpoint offset past the partition's end, as after
  a restart of the in-memory embedded broker, is reset per ``auto_offset_reset`` with a warning),
  else at the group's committed offsets, else per ``auto_offset_reset``. It runs in the
  :mod:`service.fetcher` child process, which commits the offsets the runtime sends it after
  each durable checkpoint.
- :class:`TimeAligner`: Kafka orders nothing across partitions, and a broker may fill a whole fetch
  with one partition (tansu fills ``fetch_max_bytes`` with the first partition it reads), so a
  consumer with a backlog would read tens of thousands of events before their labels — filling
  the pending store for nothing — or a backlog of labels before their events, which are then
  unknown. The aligner releases records across partitions in timestamp order, so a label is
  processed after the event it follows, whatever the backlog.
- :class:`PredictionPublisher`: one prediction message per event must cost the learner's thread
  next to nothing. The loop hands a whole batch of predictions to a child process as one
  :func:`encode_predictions` payload (one ``orjson.dumps`` call); the child writes the messages
  and produces them as whole record batches (:class:`BatchProducer`, ~3 µs a message where
  ``KafkaProducer.send`` costs ~20 µs). ``flush()`` returns once the broker acknowledged
  everything sent before it, so a checkpoint never covers events whose predictions could still
  be lost.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import gc
import heapq
import itertools
import logging
import math
import multiprocessing
import queue
import signal
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from service.config import KafkaConfig
from service.records import record_batches

log = logging.getLogger(__name__)

FETCH_MAX_BYTES = 4 << 20
PARTITION_FETCH_BYTES = 1 << 20
# A poll takes up to this many of the service's batches (``max_poll_records`` each; the loop cuts
# them): kafka-python fetches a partition again only once its last fetch is drained, so a poll
# that leaves records of a fetch behind waits a round trip for the next one. Measured here: 1 MiB
# fetches (~4,000 events) polled 5,000 at a time cost 7-15 µs an event, 2 MiB ones 25 µs;
# polled 20,000 at a time, 7 µs either way.
POLL_BATCHES = 4


def make_producer(bootstrap: str, kafka: KafkaConfig):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, linger_ms=kafka.producer_linger_ms, batch_size=1 << 20,
                         max_request_size=16 << 20, request_timeout_ms=kafka.request_timeout_ms)


def make_consumer(bootstrap: str, kafka: KafkaConfig, topics: Iterable[str], offsets: dict[tuple[str, int], int],
                  timeout: float = 30.0):
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=kafka.group_id, enable_auto_commit=False,
        auto_offset_reset=kafka.auto_offset_reset, max_poll_records=POLL_BATCHES * kafka.max_poll_records,
        fetch_max_bytes=FETCH_MAX_BYTES, max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
        request_timeout_ms=kafka.request_timeout_ms, bootstrap_timeout_ms=int(timeout * 1000),
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
    ends = consumer.end_offsets(partitions) if offsets else {}
    beyond = [tp for tp in partitions if offsets.get((tp.topic, tp.partition), -1) > ends.get(tp, math.inf)]
    if beyond:
        # tansu answers ListOffsets with the base offset of the partition's last record batch, short
        # of its end: a checkpoint taken after the whole stream was read lies "past" it. Taken at its
        # word, the topic would count as recreated and be learned again from the start.
        ends.update(fetched_ends(bootstrap, beyond, ends, timeout=min(timeout, 5.0)))
    for tp in partitions:
        offset = offsets.get((tp.topic, tp.partition))
        if offset is not None and offset <= ends.get(tp, offset):
            consumer.seek(tp, offset)
        elif offset is not None:
            # Kafka would reset an out-of-range offset on the first fetch; some brokers (tansu) just
            # return nothing, and every event up to the old offset would be skipped in silence
            log.warning("%s:%d: the checkpoint's offset %d is past the end of the partition (%d): the topic was "
                        "recreated (the embedded broker keeps topics in memory only); reading it from the %s",
                        tp.topic, tp.partition, offset, ends[tp], "start" if kafka.auto_offset_reset == "earliest" else "end")
            (consumer.seek_to_beginning if kafka.auto_offset_reset == "earliest" else consumer.seek_to_end)(tp)
            consumer.position(tp)
        else:
            # Resolve committed / reset positions now: kafka-python would otherwise resolve them lazily,
            # and fetch a busy events partition for seconds before the first labels fetch.
            consumer.position(tp)
    return consumer


def fetched_ends(bootstrap: str, partitions: list, listed: dict, timeout: float = 5.0) -> dict:
    """The partitions' end offsets as a fetch reports them (its high-water mark). The probe reads
    from the ``listed`` ends on, which no broker puts beyond the true ones; a partition with no
    answer within ``timeout`` seconds keeps its listed end."""
    from kafka import KafkaConsumer

    probe = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        probe.assign(partitions)
        for tp in partitions:
            probe.seek(tp, listed[tp])
        deadline = time.monotonic() + timeout
        while any(probe.highwater(tp) is None for tp in partitions) and time.monotonic() < deadline:
            probe.poll(timeout_ms=100, max_records=1)
        return {tp: max(listed[tp], probe.highwater(tp) or 0) for tp in partitions}
    finally:
        probe.close()


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

    def put_back(self, released: dict) -> None:
        """Released records not handed on after all go back to the front of their buffers, to be
        released again (in the same order) with what comes next."""
        for tp, records in released.items():
            self.buffers[tp].extendleft(reversed(records))

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
    """``batch`` (``{tp: [records]}``) cut into chunks of at most ``size`` records in timestamp order.

    The runtime handles a chunk's events before its labels; cutting a long multi-partition release
    by time keeps a label within one chunk of the event it follows (the pending store need not
    hold a whole release). A single partition's records are cut in offset order.

    >>> from collections import namedtuple
    >>> R = namedtuple("R", "timestamp offset")
    >>> [{tp: [r.offset for r in recs] for tp, recs in c.items()}
    ...  for c in time_ordered_chunks({"a": [R(1, 0), R(4, 1)], "b": [R(2, 0), R(3, 1)]}, 3)]
    [{'a': [0], 'b': [0, 1]}, {'a': [1]}]
    >>> [len(c["a"]) for c in time_ordered_chunks({"a": [R(t, t) for t in range(7)]}, 3)]
    [3, 3, 1]
    """
    if sum(len(r) for r in batch.values()) <= size:
        if batch:
            yield batch
        return
    if len(batch) == 1:
        ((tp, records),) = batch.items()
        for i in range(0, len(records), size):
            yield {tp: records[i : i + size]}
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


PRODUCE_BATCH_BYTES = 1 << 20
_STOP = object()
_RETRIABLE = {5, 6, 7, 13, 19, 20}  # leader not available / not leader, timeout, network, not enough replicas


class BatchProducer:
    """Produces whole record batches with Produce v3 requests (acks=all), for the publisher child.

    ``KafkaProducer.send`` costs ~20 µs of Python per message (accumulator, futures, per-record
    sizing); a prediction per event at 20,000 events/s would keep a core busy on it. Here a list of
    messages becomes record batches of up to ``PRODUCE_BATCH_BYTES`` (:func:`service.records.record_batches`,
    ~0.5 µs a message), each batch one request on a plain socket to its
    partition's leader (from ``KafkaAdminClient``, version-negotiated), up to ``max_in_flight``
    pipelined. Partitions are taken round-robin, one per batch (as a keyless producer's sticky
    partitioner does). Retriable errors refresh the leaders and resend, up to ``retries`` times; a
    batch still refused is kept, and every :meth:`flush` sends the kept ones again before it waits
    for every response and returns how many messages are still not acknowledged (Kafka away: the
    checkpoint that waits on it fails until they are written, and nothing is lost in between).
    Plaintext only, like the rest of the service's Kafka configuration.
    """

    def __init__(self, bootstrap: str, request_timeout_ms: int = 30_000, retries: int = 5,
                 max_in_flight: int = 5, client_id: str = "streamlearn-publisher"):
        self.bootstrap = bootstrap
        self.timeout_s = request_timeout_ms / 1000
        self.retries = retries
        self.max_in_flight = max_in_flight
        self._client_id = client_id.encode()
        self._leaders: dict[str, list[tuple[str, int]]] = {}
        self._socks: dict[tuple[str, int], Any] = {}
        self._in_flight: collections.deque = collections.deque()  # (addr, corr, topic, part, batch, n, tries)
        self._corr = 0
        self._rr = 0
        self._undelivered: list[tuple[str, int, bytes, int]] = []  # (topic, partition, batch, messages)

    # -- metadata and connections ---------------------------------------------------------
    def _refresh(self, topic: str) -> list[tuple[str, int]]:
        from kafka import KafkaAdminClient

        ms = int(self.timeout_s * 1000)
        opts = {"bootstrap_timeout_ms": ms} if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG else {}
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=ms,
                                 client_id="streamlearn-publisher-metadata", **opts)
        try:
            brokers = {b.get("broker_id", b.get("node_id")): (b["host"], b["port"])
                       for b in admin.describe_cluster()["brokers"]}
            (meta,) = admin.describe_topics([topic])
        finally:
            admin.close()
        parts = sorted(meta["partitions"], key=lambda p: p.get("partition_index", p.get("partition")))
        leaders = [brokers.get(p.get("leader_id", p.get("leader"))) for p in parts]
        if not leaders or None in leaders:
            raise RuntimeError(f"topic {topic}: no leader known for every partition ({meta})")
        self._leaders[topic] = leaders
        return leaders

    def _sock(self, addr: tuple[str, int]):
        import socket

        sock = self._socks.get(addr)
        if sock is None:
            sock = socket.create_connection(addr, timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks[addr] = sock
        return sock

    def _drop(self, addr: tuple[str, int]) -> None:
        sock = self._socks.pop(addr, None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # -- requests -------------------------------------------------------------------------
    def _request(self, corr: int, topic: str, partition: int, batch: bytes) -> bytes:
        t = topic.encode()
        body = b"".join((
            struct.pack(">hhih", 0, 3, corr, len(self._client_id)), self._client_id,  # Produce v3 header
            struct.pack(">hhiih", -1, -1, int(self.timeout_s * 1000), 1, len(t)), t,  # no txn id, acks=all
            struct.pack(">iii", 1, partition, len(batch)), batch,
        ))
        return struct.pack(">i", len(body)) + body

    def _send(self, topic: str, partition: int, batch: bytes, n: int, tries: int) -> None:
        while len(self._in_flight) >= self.max_in_flight:
            self._receive()
        try:
            leaders = self._leaders.get(topic) or self._refresh(topic)
            addr = leaders[partition % len(leaders)]
            self._corr = (self._corr + 1) & 0x7FFFFFFF
            self._sock(addr).sendall(self._request(self._corr, topic, partition, batch))
        except Exception as exc:  # noqa: BLE001 - socket or metadata (kafka-python's errors) failure: retry, count
            self._failed(topic, partition, batch, n, tries, f"send: {exc}")
            return
        self._in_flight.append((addr, self._corr, topic, partition, batch, n, tries))

    def _read(self, sock, size: int) -> bytes:
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            k = sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("connection closed by the broker")
            got += k
        return bytes(buf)

    def _receive(self) -> None:
        addr, corr, topic, partition, batch, n, tries = self._in_flight.popleft()
        try:
            sock = self._sock(addr)
            (size,) = struct.unpack(">i", self._read(sock, 4))
            resp = self._read(sock, size)
            # v3 response: corr, [topic, [partition, error, base_offset, log_append_time]], throttle
            got_corr, n_topics = struct.unpack_from(">ii", resp, 0)
            (tlen,) = struct.unpack_from(">h", resp, 8)
            _, _, error = struct.unpack_from(">iih", resp, 10 + tlen)
            if got_corr != corr or n_topics != 1:
                raise ConnectionError(f"unexpected response (correlation {got_corr}, expected {corr})")
        except (OSError, struct.error) as exc:
            # The connection is unusable: everything in flight on it is resent (or counted) — taken
            # out first, as the resends go on a new connection to the same address.
            self._drop(addr)
            lost = [i for i in self._in_flight if i[0] == addr]
            for item in lost:
                self._in_flight.remove(item)
            for item in [(addr, corr, topic, partition, batch, n, tries), *lost]:
                self._failed(*item[2:], f"receive: {exc}")
            return
        if error:
            self._failed(topic, partition, batch, n, tries if error in _RETRIABLE else self.retries, f"error {error}")

    def _failed(self, topic: str, partition: int, batch: bytes, n: int, tries: int, why: str) -> None:
        if tries < self.retries:
            log.warning("produce to %s[%d] failed (%s); retrying", topic, partition, why)
            time.sleep(0.1 * (tries + 1))
            self._leaders.pop(topic, None)
            self._send(topic, partition, batch, n, tries + 1)
        else:
            self._undelivered.append((topic, partition, batch, n))
            held = len(self._undelivered)
            if held & (held - 1) == 0:  # at the 1st, 2nd, 4th … batch held: no flood while Kafka is away
                log.error("produce of %d messages to %s[%d] failed: %s; kept to be sent again (%d batches held)",
                          n, topic, partition, why, held)

    # -- the API --------------------------------------------------------------------------
    def send(self, topic: str, values: list[bytes]) -> None:
        """Queue ``values`` (serialised messages, no key) as record batches; returns once sent."""
        for batch, n in record_batches(values, int(time.time() * 1000), PRODUCE_BATCH_BYTES):
            self._rr += 1
            self._send(topic, self._rr % self._partitions(topic), batch, n, 0)

    def _partitions(self, topic: str) -> int:
        try:
            return len(self._leaders.get(topic) or self._refresh(topic))
        except Exception as exc:  # noqa: BLE001 - the send below retries the metadata, then counts
            log.warning("no metadata for %s yet: %s", topic, exc)
            return 1

    def flush(self) -> int:
        """Sends the kept batches again (one try each), waits for every response; returns the number
        of messages still not acknowledged (they stay kept)."""
        kept, self._undelivered = self._undelivered, []
        for topic, partition, batch, n in kept:
            self._send(topic, partition, batch, n, self.retries)
        while self._in_flight:
            self._receive()
        return sum(n for *_, n in self._undelivered)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
        for addr in list(self._socks):
            self._drop(addr)


def encode_predictions(model: str, version: int, ts: float, ids: list, preds: list, probas: Any,
                       classes: list | None = None) -> bytes:
    """One payload for a batch of predictions (one ``orjson.dumps`` call in the learner's loop);
    the publisher child turns it into the prediction messages of the contract. ``probas``: a
    dict per row, None (a regressor), or with ``classes`` the matrix of the rows' probabilities of
    each class (a learner's :class:`learners.protocol.ProbaRows`): the child makes the dicts then,
    off the loop's core."""
    if classes is not None:
        probas = {"classes": classes, "matrix": probas}
    return orjson.dumps((model, version, ts, ids, preds, probas), option=orjson.OPT_NON_STR_KEYS
                        | orjson.OPT_SERIALIZE_NUMPY)


def prediction_messages(payload: bytes) -> list[bytes]:
    """The messages ``{"id", "model", "prediction", "proba", "model_version", "ts"}`` of a payload.

    >>> [m.decode() for m in prediction_messages(encode_predictions("m", 3, 1.5, ["a"], [1], [{0: .25, 1: .75}]))]
    ['{"id":"a","model":"m","prediction":1,"proba":{"0":0.25,"1":0.75},"model_version":3,"ts":1.5}']
    """
    model, version, ts, ids, preds, probas = orjson.loads(payload)
    dumps = orjson.dumps
    proba_json = dumps
    if probas is None:
        probas = itertools.repeat(None, len(ids))
    elif isinstance(probas, dict):  # a matrix and its classes
        classes, rows = probas["classes"], probas["matrix"]
        # the classes as the JSON keys orjson writes for them (1 → "1", True → "true"), once: a
        # dict with string keys dumps in a third of the time; classes that would share a key (1
        # and True are one dict key, 1 and "1" one JSON key) take the exact way
        keys = list(orjson.loads(dumps(dict.fromkeys(classes, 0), option=orjson.OPT_NON_STR_KEYS)))
        if len(keys) == len(classes):
            probas = map(dict, map(zip, itertools.repeat(keys), rows))
        else:
            probas = map(dict, map(zip, itertools.repeat(classes), rows))
            proba_json = functools.partial(dumps, option=orjson.OPT_NON_STR_KEYS)
    # orjson.dumps of each message's dict, written as the fixed parts around three values: a
    # fifth of the time (0.5 µs a message against 2.9), the same bytes. (Each part is dumped
    # where it is joined: 5,000 outputs of orjson held at once cost ~3 µs each to make, not 0.25.)
    head, model_part = b'{"id":', b',"model":' + dumps(model) + b',"prediction":'
    tail = b',"model_version":' + dumps(version) + b',"ts":' + dumps(ts) + b"}"
    join = b"".join
    return [join((head, dumps(i), model_part, dumps(p), b',"proba":', proba_json(q), tail))
            for i, p, q in zip(ids, preds, probas, strict=True)]


GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> tuple[int, int, int]:
    """Keep the cyclic GC off a hot loop's back; returns the thresholds to restore.

    The service's loop, and its fetcher process, allocate several containers per event (decoded
    dicts, records, lists), and a batch lives long enough to be promoted to the older generations,
    whose collections then scan every object the process holds — in the loop torch, River, pandas
    and the models: ~10⁶ of them, which cost ~30% of the loop's time with a light learner; in the
    fetcher, kafka-python's records (``bench.throughput``, 200,000 events: its polls took 1.8–1.9 s
    in all, four of them ~0.13 s instead of ~0.03, against 1.2–1.3 s tuned; its CPU time 3.0–3.3 s
    against 2.6–2.7, time the loop's process needs on a 2-core host). What exists at start is
    collected once and then frozen (left out of every later collection), and the young generation
    is collected every ``GC_GEN0_THRESHOLD`` allocations instead of 700, so that a batch mostly
    dies young.
    """
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(before[0], GC_GEN0_THRESHOLD), *before[1:])
    return before


def widen_pipe(conn) -> None:
    """Widen a one-way pipe (either end of ``Pipe(duplex=False)``) to 1 MB, so that a writer's
    message (a fetched chunk, ~1.3 MB for 5,000 events) goes in with one or two waits for the
    reader instead of one per 64 kB: waking a sleeping process costs this host up to a
    millisecond. (Best effort: where the system caps pipes lower, writes wait for the reads.)"""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


_PIPE_BYTES = 1 << 20  # Linux's default ceiling for unprivileged processes (/proc/sys/fs/pipe-max-size)


def setup_child_process(role: str) -> None:
    """Signals and logging of the service's Kafka child processes (``role`` prefixes their log)."""
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd, GNU timeout), reach the
    # children too: the parent says when they stop, after its last checkpoint and commit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level="WARNING", format=f"%(asctime)s %(levelname)s {role}: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # its event-loop timing warnings are noise here


def _publisher_main(conn, bootstrap: str, kafka: KafkaConfig) -> None:
    """Child process: produce what the parent sends; an int = flush and acknowledge that flush."""
    setup_child_process("publisher")
    producer = BatchProducer(bootstrap, kafka.request_timeout_ms)
    conn.send("ready")
    try:
        while True:
            item = conn.recv()
            if type(item) is int:  # a flush, numbered
                conn.send((item, producer.flush()))
            elif item == "close":
                return
            else:
                topic, payload = item
                producer.send(topic, prediction_messages(payload))
    except (EOFError, KeyboardInterrupt):  # the parent went away
        pass
    finally:
        producer.close()


class PublisherBlocked(RuntimeError):
    pass


class PredictionPublisher:
    """Produces the prediction messages of batches of predictions from a child process.

    Payloads reach the child through a pipe from a writer thread: writing a batch's payload (a few
    hundred KB) waits for the child to read it piece by piece (a pipe buffers 64–200 KB), and the
    learner's loop must not wait with it. At most ``max_queued`` payloads wait for the writer; beyond
    that :meth:`publish` blocks (backpressure when Kafka is slower than the loop), until ``stopping``
    is set. Failures — messages Kafka has not acknowledged yet (the child keeps and resends them),
    or the child gone — are raised by :meth:`flush` (so the checkpoint that would cover them fails),
    never by :meth:`publish` (the batch's learning goes on).
    """

    def __init__(self, bootstrap: str, kafka: KafkaConfig, max_queued: int = 8):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_publisher_main, args=(child, bootstrap, kafka),
                                    name="streamlearn-publisher", daemon=True)
        self._process.start()
        child.close()
        # The child imports kafka-python first (~0.5 s): wait, so that the loop starts with a publisher.
        try:
            ready = self._conn.poll(60) and self._conn.recv() == "ready"
        except (EOFError, OSError):  # it died on the way
            ready = False
        if not ready:
            self._process.kill()  # (it ignores SIGTERM: setup_child_process)
            self._process.join(5)
            raise RuntimeError(f"the prediction publisher process did not start (exit code {self._process.exitcode})")
        self._flushes = 0
        self._queue: queue.Queue = queue.Queue(max_queued)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write, name="streamlearn-publisher-writer", daemon=True)
        self._writer.start()

    def _write(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:
                try:
                    self._conn.send(item)
                except OSError as exc:  # the child is gone: flush() says so
                    self._error = exc

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def publish(self, topic: str, payload: bytes, stopping: threading.Event | None = None) -> None:
        """``payload``: an :func:`encode_predictions` batch. Waits while the queue is full (Kafka
        slower than the loop, or away); raises :class:`PublisherBlocked` if ``stopping`` is set
        meanwhile, so that a stop does not wait for Kafka to come back."""
        while True:
            try:
                self._queue.put((topic, payload), timeout=0.5)
                return
            except queue.Full:
                if stopping is not None and stopping.is_set():
                    raise PublisherBlocked("stopped while the prediction publisher could take no more (Kafka "
                                           "unreachable?): the events since the last checkpoint are replayed "
                                           "at the next start") from None

    def flush(self, timeout: float = 60.0) -> None:
        """Waits until everything published so far is acknowledged; raises if it was not."""
        self._flushes += 1
        deadline, number, pending = time.monotonic() + timeout, None, 0
        try:  # (a full queue: the child cannot write, Kafka away)
            self._queue.put(self._flushes, timeout=timeout)
        except queue.Full:
            raise TimeoutError(f"prediction publisher did not flush within {timeout:.0f} s") from None
        try:  # the answer to an earlier flush that timed out may come first
            while number != self._flushes and self._conn.poll(max(0.0, deadline - time.monotonic())):
                number, pending = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"the prediction publisher process is gone ({self._error or exc!r})") from exc
        if number != self._flushes:
            raise TimeoutError(f"prediction publisher did not flush within {timeout:.0f} s")
        if pending:
            raise RuntimeError(f"{pending} prediction messages are not acknowledged by Kafka yet (kept, and "
                               "sent again at the next checkpoint)")

    def close(self) -> None:
        # Bounded waits throughout: a hung child must not hang the service's shutdown.
        with contextlib.suppress(queue.Full):
            self._queue.put("close", timeout=10)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()  # (it ignores SIGTERM: setup_child_process)
            self._process.join(5)
        with contextlib.suppress(queue.Full):  # the child is gone: the writer drains the queue fast
            self._queue.put(_STOP, timeout=10)
        self._writer.join(10)
        self._conn.close()
