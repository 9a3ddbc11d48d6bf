"""The fetcher child process: Kafka records reach the loop in order and complete, commits sent
before ``close()`` are committed, a dead child is an error, and a ``kill -9``
of the service leaves no child process behind."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from service.broker import ensure_topics, free_port
from service.codec import decode_events, decode_labels
from service.config import KafkaConfig
from service.fetcher import PartitionRecords, Record, RecordFetcher
from tests.conftest import wait_until

pytestmark = pytest.mark.broker


def fill(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for value in values:
        producer.send(topic, value, partition=0)
    producer.flush()
    producer.close()


def fetch_all(fetcher: RecordFetcher, n: int, timeout: float = 30.0) -> dict[TopicPartition, list[Record]]:
    got: dict[TopicPartition, list[Record]] = {}
    deadline = time.monotonic() + timeout
    while sum(map(len, got.values())) < n and time.monotonic() < deadline:
        for chunk in fetcher.poll(0.5):
            for tp, records in chunk.items():
                got.setdefault(tp, []).extend(records)
    return got


def small_kafka(**kw) -> KafkaConfig:
    return KafkaConfig(group_id=f"g-{uuid.uuid4().hex[:8]}", max_poll_records=100, **kw)


def test_records_arrive_in_order_from_the_checkpoint_offset_and_commits_before_close_are_committed(broker):
    topic = f"f-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, [topic])
    values = [f"message {i}".encode() for i in range(1000)]
    fill(broker, topic, values)
    kafka = small_kafka()
    fetcher = RecordFetcher(broker, kafka, [topic], offsets={(topic, 0): 250})
    try:
        got = fetch_all(fetcher, 750)
        tp = TopicPartition(topic, 0)
        assert list(got) == [tp]
        assert got[tp] == [Record(0, i, values[i]) for i in range(250, 1000)]
        assert fetcher.highwaters == {(topic, 0): 1000}
        fetcher.commit({(topic, 0): 600})
        fetcher.commit({(topic, 0): 1000})  # the last one sent wins
    finally:
        fetcher.close()
    assert fetcher.commit_error is None
    consumer = KafkaConsumer(bootstrap_servers=broker, group_id=kafka.group_id, enable_auto_commit=False)
    assert consumer.committed(TopicPartition(topic, 0)) == 1000
    consumer.close()


def test_the_child_decodes_the_topics_it_is_given_as_the_loop_would(broker):
    # what the child decodes and packs reaches the loop as decode_events / decode_labels give it,
    # bad messages included (their raw values stay, for the dead-letter topic); other topics come raw
    events, labels, raw = (f"f-{uuid.uuid4().hex[:8]}" for _ in range(3))
    ensure_topics(broker, [events, labels, raw])
    event_values = [b'{"id": "e%d", "features": {"x": %d, "c": "a"}, "label": 1}' % (i, i) for i in range(300)]
    event_values[7], event_values[150] = b"not json", b'{"id": "x", "features": {"x": [1]}}'
    label_values = [b'{"id": "e%d", "label": 0}' % i for i in range(200)] + [b'{"id": "e1", "label": [0]}']
    fill(broker, events, event_values)
    fill(broker, labels, label_values)
    fill(broker, raw, [b"anything"] * 50)
    fetcher = RecordFetcher(broker, small_kafka(), [events, labels, raw], offsets={},
                            decode={events: "events", labels: "labels"})
    try:
        got: dict[str, list] = {}
        deadline = time.monotonic() + 30
        while sum(len(v[0]) for v in got.values()) < 551 and time.monotonic() < deadline:
            for chunk in fetcher.poll(0.5):
                for tp, records in chunk.items():
                    values, decoded = got.setdefault(tp.topic, ([], []))
                    values.extend(records.values)
                    decoded.append(records.decoded)
        assert got[events][0] == event_values and got[labels][0] == label_values
        assert [item for part in got[events][1] for item in part] == decode_events(event_values)
        assert [item for part in got[labels][1] for item in part] == decode_labels(label_values)
        assert set(got[raw][1]) == {None}
    finally:
        fetcher.close()


def test_chunks_cut_before_the_child_heard_of_a_larger_size_are_joined_up_to_it(broker):
    # a new model's chunks grow faster than the child, a pipe ahead, hears of it: what it cut small
    # reaches the loop joined, in order, never above the size asked for
    topic = f"f-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, [topic])
    values = [f"message {i}".encode() for i in range(1000)]
    fill(broker, topic, values)
    fetcher = RecordFetcher(broker, small_kafka(), [topic], offsets={}, chunk_size=10)
    try:
        wait_until(lambda: fetcher._conn.poll(0), timeout=20)  # a poll of the child's, cut in tens
        time.sleep(0.5)  # (and whatever more it sends meanwhile)
        fetcher.set_chunk_size(400)
        sizes, got = [], []
        while len(got) < 1000:
            for chunk in fetcher.poll(5):
                sizes.append(sum(map(len, chunk.values())))
                got.extend(chunk[TopicPartition(topic, 0)])
        assert got == [Record(0, i, values[i]) for i in range(1000)]
        assert sizes[0] >= 40 and max(sizes) <= 400  # the first poll alone brought four tens
    finally:
        fetcher.close()


def test_the_partition_ends_move_while_the_loop_is_behind(broker):
    # the fetched high-water marks come with chunks, which queue while the loop is busy: a backlog
    # of 16,000 events read as a lag of 0. Kafka's listed ends are asked for beside them
    topic = f"f-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, [topic])
    fill(broker, topic, [b"x"] * 100)
    fetcher = RecordFetcher(broker, small_kafka(), [topic], offsets={})
    try:
        fetch_all(fetcher, 100)
        assert fetcher.highwaters == {(topic, 0): 100}
        producer = KafkaProducer(bootstrap_servers=broker, linger_ms=0)
        for _ in range(20):  # while the loop reads nothing
            for _ in range(100):
                producer.send(topic, b"y", partition=0)
            producer.flush()  # record batches of at most 100
        producer.close()
        # tansu lists the base offset of the last record batch: one batch (<= 100) short of 2,100.
        # One unbounded batch of all 2,000 read as 100 now and then (CI failed on it)
        wait_until(lambda: fetcher.highwaters[(topic, 0)] >= 2000, timeout=20)
    finally:
        fetcher.close()


def test_a_dead_fetcher_is_an_error_not_an_endless_wait(broker):
    topic = f"f-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, [topic])
    fetcher = RecordFetcher(broker, small_kafka(), [topic], offsets={})
    os.kill(fetcher._process.pid, signal.SIGKILL)
    fetcher._process.join(10)
    with pytest.raises(RuntimeError, match="fetcher process is gone"):
        for _ in range(50):  # what it sent before it died may still be read first
            fetcher.poll(0.1)
    fetcher.close()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_the_service_leaves_no_child_process(serve, topics):
    proc = serve({"models": {"default": {"topics": topics,
                                         "learner": {"learner": "river", "estimator": "linear_model.LogisticRegression"}}}})
    children = _descendants(proc.process.pid)
    assert len(children) >= 2  # the fetcher and the prediction publisher at least
    proc.signal(signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not any(_alive(pid) for pid in children), timeout=20)


def test_a_fetcher_that_cannot_reach_kafka_says_why_within_its_timeout():
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"the Kafka fetcher process did not start: .*Unable to bootstrap from {bootstrap}") as err:
        RecordFetcher(bootstrap, KafkaConfig(), ["t"], offsets={}, timeout=4)
    assert time.monotonic() - start < 4  # the child's reason, not the parent's bare timeout
    assert "did not start: KafkaTimeoutError: " in str(err.value)
    assert "KafkaTimeoutError: KafkaTimeoutError" not in str(err.value)  # kafka-python names its class itself


def test_partition_records_read_as_a_list_of_records():
    records = PartitionRecords(3, [10, 11, 12], [b"a", b"b", b"c"])
    as_list = [Record(3, 10, b"a"), Record(3, 11, b"b"), Record(3, 12, b"c")]
    assert len(records) == 3 and list(records) == as_list
    assert records[-1] == as_list[-1] and records[1:] == as_list[1:]
    assert records.values == [b"a", b"b", b"c"]


class _CaughtUpConsumer:
    """What TimeAligner asks of a consumer, for one partition that has nothing beyond its buffer."""

    def __init__(self, tp):
        self.tp = tp

    def assignment(self):
        return {self.tp}

    def highwater(self, tp):
        return 0

    def position(self, tp):
        return 0


def test_records_put_back_into_the_aligner_come_out_first_and_in_order():
    from collections import namedtuple

    from service.ingest import TimeAligner, time_ordered_chunks

    R = namedtuple("R", "timestamp offset")
    tp = TopicPartition("t", 0)
    aligner = TimeAligner(_CaughtUpConsumer(tp), max_buffered=100)
    aligner.add({tp: [R(i, i) for i in range(7)]})
    cut = list(time_ordered_chunks(aligner.release(0.0), 3))
    assert [len(c[tp]) for c in cut] == [3, 3, 1]
    aligner.put_back(cut.pop())  # the fetcher keeps a backlog's last, partial chunk for the next poll
    aligner.add({tp: [R(i, i) for i in range(7, 9)]})
    assert [r.offset for r in aligner.release(0.0)[tp]] == [6, 7, 8]
