"""Kafka input read in a child process, so that fetching overlaps learning.

kafka-python parses fetch responses in Python: 6–9 µs an event on a 2-core host, a sixth to a fifth
of the service loop's time, and the GIL would serialise it with the loop if it ran in a thread.
The child also decodes and validates the messages (``service.codec``) and sends them packed beside
the raw values (kept for dead letters). The child owns the consumer (:func:`service.ingest.make_consumer`) and the
:class:`service.ingest.TimeAligner`, and sends the released chunks down a pipe as plain lists
(reading them back costs the loop ~1 µs an event). While the loop learns one chunk the child
fetches the next; a full pipe blocks the child, so it runs at most about one poll ahead
(backpressure, bounded memory). The parent sets the chunk size (small while its models are new);
chunks the child cut before it heard of a larger size are joined on the parent's side.

The parent decides what is durable: it sends the offsets to commit after each checkpoint; the child
commits them between polls and reports the outcome in-band. On :meth:`RecordFetcher.close` the child
commits what it was sent before it exits, so offsets committed at shutdown match the last
checkpoint. If the parent dies (``kill -9``), the child's next write to the pipe fails and it exits.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from service.codec import decode_events, decode_labels, pack, unpack
from service.config import KafkaConfig
from service.ingest import (
    POLL_BATCHES,
    TimeAligner,
    make_consumer,
    setup_child_process,
    time_ordered_chunks,
    tune_gc,
    widen_pipe,
)

log = logging.getLogger(__name__)

_COMMIT_TIMEOUT_MS = 10_000


def _reason(exc: BaseException) -> str:
    """``"ClassName: text"``; kafka-python's exceptions already start their text with their class."""
    text, name = str(exc), type(exc).__name__
    return text if text == name or text.startswith(f"{name}: ") else f"{name}: {text}"


class Record(NamedTuple):
    """A consumed message, as the loop needs it."""

    partition: int
    offset: int
    value: bytes


class PartitionRecords(Sequence[Record]):
    """One partition's records of a chunk, as the wire carried them: offsets and values side by
    side. The loop decodes :attr:`values` whole; a :class:`Record` is made only for what is looked
    at one by one (the last offset, dead letters): 5,000 of them took ~1.2 ms a chunk."""

    __slots__ = ("partition", "offsets", "values", "decoded")

    def __init__(self, partition: int, offsets: list[int], values: list[bytes], decoded: list | None = None):
        self.partition, self.offsets, self.values = partition, offsets, values
        self.decoded = decoded  # the values decoded by the fetcher process (None: not decoded)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int | slice) -> Record | list[Record]:
        if isinstance(i, slice):
            return list(map(Record, itertools.repeat(self.partition), self.offsets[i], self.values[i]))
        return Record(self.partition, self.offsets[i], self.values[i])

    def __iter__(self) -> Iterator[Record]:
        return map(Record, itertools.repeat(self.partition), self.offsets, self.values)


# one released chunk on the wire: [(topic, partition, offsets, values, packed decoded values or None), ...]
_WireChunk = list[tuple[str, int, list[int], list[bytes], bytes | None]]


def _wire(chunk: dict, decoders: dict[str, Callable[[list[bytes]], list]]) -> _WireChunk:
    out = []
    for tp, records in chunk.items():
        values = [r.value for r in records]
        decode = decoders.get(tp.topic)
        out.append((tp.topic, tp.partition, [r.offset for r in records], values,
                     pack(decode(values)) if decode is not None else None))
    return out


def _length(chunk: _WireChunk) -> int:
    return sum(len(offsets) for _, _, offsets, _, _ in chunk)


def _joined(chunks: list[_WireChunk]) -> dict[tuple[str, int], PartitionRecords]:
    """Consecutive chunks as one: each partition's records, in order, their decoded values
    unpacked (the lists are the unpickled ones, extended in place)."""
    joined: dict[tuple[str, int], PartitionRecords] = {}
    for chunk in chunks:
        for topic, partition, offsets, values, packed in chunk:
            decoded = unpack(packed) if packed is not None else None
            held = joined.get((topic, partition))
            if held is None:
                joined[(topic, partition)] = PartitionRecords(partition, offsets, values, decoded)
            else:
                held.offsets.extend(offsets)
                held.values.extend(values)
                if held.decoded is not None:
                    held.decoded = held.decoded + decoded if decoded is not None else None
    return joined


def _fetcher_main(commands, conn, bootstrap: str, kafka: KafkaConfig, topics: list[str],
                  offsets: dict[tuple[str, int], int], chunk_size: int, connect_timeout: float,
                  decode: dict[str, str]) -> None:
    """Child process: poll, align, decode (``decode``: topic → "events" | "labels"), send chunks of
    at most ``chunk_size`` records; between polls, commit and resize as the parent asks."""
    from kafka.structs import OffsetAndMetadata, TopicPartition

    setup_child_process("fetcher")
    decoders = {topic: decode_events if kind == "events" else decode_labels for topic, kind in decode.items()}
    try:
        consumer = make_consumer(bootstrap, kafka, topics, offsets, timeout=connect_timeout)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", _reason(exc)))
        return
    tune_gc()
    aligner = TimeAligner(consumer, max_buffered=POLL_BATCHES * kafka.max_poll_records,
                          max_wait_s=kafka.align_max_wait_ms / 1000)
    try:
        conn.send(("ready", None))
        while True:
            while commands.poll(0):
                command, arg = commands.recv()
                if command == "close":
                    return
                if command == "chunk_size":
                    chunk_size = arg
                    continue
                seq, to_commit = arg
                # only partitions this consumer reads, and bounded: a commit kafka-python retries
                # (a topic that no longer exists) would otherwise hold up every poll after it
                assigned = consumer.assignment()
                offsets = {tp: OffsetAndMetadata(o, "", -1) for (t, p), o in to_commit.items()
                           if (tp := TopicPartition(t, p)) in assigned}
                try:
                    consumer.commit(offsets, timeout_ms=min(kafka.request_timeout_ms, _COMMIT_TIMEOUT_MS))
                    conn.send(("committed", (seq, None)))
                except Exception as exc:  # noqa: BLE001 - the parent logs it; its checkpoint holds the offsets
                    conn.send(("committed", (seq, _reason(exc))))
            # full polls even while the chunks are small (a new model's): the loop joins what it
            # needs, and its first full chunk is not left waiting for the child to fetch
            aligner.add(consumer.poll(timeout_ms=kafka.poll_timeout_ms))
            cut = list(time_ordered_chunks(aligner.release(time.time()), chunk_size))
            if len(cut) > 1 and sum(map(len, cut[-1].values())) < chunk_size:
                # a backlog (more than a chunk came at once): the next poll brings the rest of the
                # last chunk at once, and a loop handed a few hundred records pays ~40 µs an event
                # for them instead of ~20 (per-batch costs of the learner and the monitor)
                aligner.put_back(cut.pop())
            chunks = [_wire(c, decoders) for c in cut]
            highwaters = {(tp.topic, tp.partition): consumer.highwater(tp) for tp in consumer.assignment()}
            conn.send(("records", (chunks, highwaters)))
    except (EOFError, OSError, KeyboardInterrupt):  # the parent went away
        pass
    finally:
        consumer.close(autocommit=False)


class _ListedEnds(threading.Thread):
    """The partitions' ends as Kafka lists them, every ``interval`` seconds, from a consumer of the
    parent's own. The high-water marks fetched by the child come with its chunks, which wait in
    the pipe while the loop is behind: alone they showed no lag while a backlog grew. (tansu lists
    the base offset of a partition's last record batch: short by at most one batch.)"""

    def __init__(self, bootstrap: str, kafka: KafkaConfig, interval: float = 2.0):
        super().__init__(name="streamlearn-partition-ends", daemon=True)
        self.bootstrap, self.kafka, self.interval = bootstrap, kafka, interval
        self.partitions: list[tuple[str, int]] = []  # which to ask about (set by the fetcher)
        self.ends: dict[tuple[str, int], int] = {}
        self._stopped = threading.Event()

    def run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = None
        try:
            while not self._stopped.wait(self.interval):
                partitions = [TopicPartition(t, p) for t, p in self.partitions]
                if not partitions:
                    continue
                try:
                    if consumer is None:
                        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                                 request_timeout_ms=self.kafka.request_timeout_ms)
                    listed = consumer.end_offsets(partitions)
                    self.ends = {(tp.topic, tp.partition): end for tp, end in listed.items()}
                except Exception:  # noqa: BLE001 - Kafka away: the fetched marks are all there is
                    log.debug("listing the partitions' ends failed", exc_info=True)
        finally:
            if consumer is not None:
                consumer.close()

    def stop(self) -> None:
        self._stopped.set()
        self.join(10)


class RecordFetcher:
    """The parent's end: :meth:`poll` returns released chunks ``{TopicPartition: PartitionRecords}``.

    Also keeps the end of every assigned partition (:attr:`highwaters`, for the consumer lag: the
    larger of the child's last fetched high-water mark and Kafka's listed end, see
    :class:`_ListedEnds`) and the outcome of the last commit. Starting waits up to ``timeout`` seconds
    for the child's consumer; a child that cannot reach Kafka gives up after half of it and its
    reason is raised here (``RuntimeError``). The records of the topics in ``decode`` (topic →
    ``"events"`` | ``"labels"``) come decoded as well (:attr:`PartitionRecords.decoded`, what
    :func:`service.codec.decode_events` or ``decode_labels`` gives for their values): the child
    decodes while the loop learns, and unpacking them costs the loop a quarter of decoding.
    """

    def __init__(self, bootstrap: str, kafka: KafkaConfig, topics: Iterable[str],
                 offsets: dict[tuple[str, int], int], chunk_size: int | None = None, timeout: float = 60.0,
                 decode: dict[str, str] | None = None):
        ctx = multiprocessing.get_context("spawn")
        # one pipe each way; the chunks' is widened to 1 MB (ingest.widen_pipe): the child's write
        # of a chunk then waits for the loop's read once or twice instead of about twenty times
        self._conn, child = ctx.Pipe(duplex=False)
        commands, self._commands = ctx.Pipe(duplex=False)
        widen_pipe(self._conn)
        self.chunk_size = chunk_size or kafka.max_poll_records
        # the child gives up connecting first, so that its error, not a bare timeout, reaches us
        self._process = ctx.Process(target=_fetcher_main, args=(commands, child, bootstrap, kafka, sorted(set(topics)), dict(offsets),
                                                                self.chunk_size, timeout / 2, dict(decode or {})),
                                    name="streamlearn-fetcher", daemon=True)
        self._process.start()
        child.close()
        commands.close()
        self._fetched_ends: dict[tuple[str, int], int | None] = {}
        self._received: collections.deque[_WireChunk] = collections.deque()  # chunks not yet handed out
        self._listed_ends = _ListedEnds(bootstrap, kafka)
        self.commit_error: str | None = None
        self._commits = 0
        message: Any = None
        with contextlib.suppress(EOFError, OSError):  # it died on the way: said below
            if self._conn.poll(timeout):
                message = self._conn.recv()
        if message is None or message[0] != "ready":
            self._process.kill()  # (it ignores SIGTERM: setup_child_process)
            self._process.join(5)
            why = message[1] if message is not None else f"exit code {self._process.exitcode}"
            raise RuntimeError(f"the Kafka fetcher process did not start: {why}")
        self._listed_ends.start()

    @property
    def highwaters(self) -> dict[tuple[str, int], int | None]:
        listed, out = self._listed_ends.ends, {}
        for tp, fetched in self._fetched_ends.items():
            known = [end for end in (fetched, listed.get(tp)) if end is not None]
            out[tp] = max(known) if known else None
        return out

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def poll(self, timeout: float) -> list[dict[Any, PartitionRecords]]:
        """The next chunk, as a list of one (empty if nothing came within ``timeout`` seconds).
        Raises ``RuntimeError`` if the child is gone.

        The child cuts chunks at the size it last heard of, and runs a pipe ahead: while the
        loop's size grows (a new model's warm-up) the pipe holds thousands of records cut small
        (72 chunks of 64, a third of a second at 35 µs an event instead of ~13 in full chunks). So
        consecutive chunks are joined here up to :attr:`chunk_size`, as far as they have arrived:
        the same records in the same order, cut as the child would have cut them had it known."""
        from kafka.structs import TopicPartition

        received = self._received
        if not received:
            self._receive(timeout)
            if not received:
                return []
        parts = [received.popleft()]
        n = _length(parts[0])
        while n < self.chunk_size and (received or (self._receive(0) and received)):
            size = _length(received[0])
            if n + size > self.chunk_size:
                break
            parts.append(received.popleft())
            n += size
        return [{TopicPartition(topic, partition): records for (topic, partition), records in _joined(parts).items()}]

    def _receive(self, timeout: float) -> bool:
        """Reads the child's messages until one with records (its chunks are queued), or none came
        within ``timeout`` seconds (False). Every poll of the child sends one, empty or not."""
        try:
            while self._conn.poll(timeout):
                kind, body = self._conn.recv()
                if kind == "records":
                    chunks, self._fetched_ends = body
                    if self._listed_ends.partitions != list(self._fetched_ends):
                        self._listed_ends.partitions = list(self._fetched_ends)
                    self._received.extend(chunks)
                    return True
                self._committed(*body)
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"the Kafka fetcher process is gone (exit code {self._process.exitcode})") from exc
        return False

    def _committed(self, seq: int, error: str | None) -> None:
        if error is not None:
            log.warning("offset commit %d failed: %s", seq, error)
        self.commit_error = error

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Asks the child to commit ``offsets`` (after its current poll); the outcome is logged."""
        self._commits += 1
        self._commands.send(("commit", (self._commits, dict(offsets))))

    def set_chunk_size(self, records: int) -> None:
        """Chunks of at most ``records`` from the child's next poll on."""
        if records != self.chunk_size:
            self.chunk_size = records
            self._commands.send(("chunk_size", records))

    def close(self, timeout: float = 30.0) -> None:
        """Commits what :meth:`commit` sent, stops the child. Bounded: a hung child is terminated."""
        deadline = time.monotonic() + timeout
        if self._listed_ends.is_alive():
            self._listed_ends.stop()
        with contextlib.suppress(EOFError, OSError):  # EOF: the child has exited and all it sent is read
            self._commands.send(("close", None))
            # keep reading: a child blocked writing a chunk reads its commands only after that write
            while time.monotonic() < deadline:
                if self._conn.poll(0.05):
                    kind, body = self._conn.recv()
                    if kind == "committed":
                        self._committed(*body)
        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            self._process.kill()  # (it ignores SIGTERM: setup_child_process)
            self._process.join(5)
        self._conn.close()
        self._commands.close()
