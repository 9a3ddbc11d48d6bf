"""The prediction publisher: one message per prediction on the predictions topic, exactly the
contract's JSON, acknowledged before ``flush()`` returns, and failures reported by ``flush()``."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition

from service.broker import EmbeddedBroker, ensure_topics, free_port
from service.config import KafkaConfig
from service.ingest import (
    BatchProducer,
    PredictionPublisher,
    PublisherBlocked,
    encode_predictions,
    prediction_messages,
)

pytestmark = pytest.mark.broker

_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def contract_message(eid, model, pred, proba, version, ts) -> bytes:
    """A prediction message as the contract spells it, serialised on its own."""
    return orjson.dumps({"id": eid, "model": model, "prediction": pred, "proba": proba,
                         "model_version": version, "ts": ts}, option=_OPTS)


def read_topic(bootstrap: str, topic: str, partitions: int, n: int, timeout: float = 30.0) -> dict[int, list[bytes]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    got: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    deadline = time.monotonic() + timeout
    while sum(map(len, got.values())) < n and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500, max_records=100_000).items():
            got[tp.partition].extend(r.value for r in records)
    consumer.close()
    return got


labels = st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=8), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=12), labels,
                          st.dictionaries(labels, st.floats(0, 1), max_size=4) | st.none()), max_size=20),
       st.integers(0, 10**6), st.floats(0, 2e9))
def test_batch_payload_gives_the_per_message_encoding(rows, version, ts):
    ids = [r[0] for r in rows]
    preds = [r[1] for r in rows]
    probas = [r[2] for r in rows]
    if any(p is not None and len({orjson.dumps(k, option=_OPTS) for k in p}) < len(p) for p in probas):
        return  # labels whose JSON keys collide (1 and True) are not a valid distribution
    assert prediction_messages(encode_predictions("m", version, ts, ids, preds, probas)) == [
        contract_message(i, "m", p, q, version, ts) for i, p, q in zip(ids, preds, probas, strict=True)]


@settings(max_examples=200, deadline=None)
@given(st.lists(labels, min_size=1, max_size=5),
       st.integers(0, 20), st.data())
def test_a_learners_probability_matrix_gives_the_messages_of_its_dicts(classes, n, data):
    # ProbaRows travel as (classes, matrix); the publisher makes the dicts, byte for byte the contract's
    matrix = np.array(data.draw(st.lists(st.lists(st.floats(0, 1), min_size=len(classes), max_size=len(classes)),
                                         min_size=n, max_size=n)), dtype=np.float64).reshape(n, len(classes))
    ids, preds = [f"e{i}" for i in range(n)], [classes[0]] * n
    dicts = [dict(zip(classes, row, strict=True)) for row in matrix.tolist()]
    assert prediction_messages(encode_predictions("m", 2, 3.5, ids, preds, matrix, classes=classes)) == [
        contract_message(i, "m", p, q, 2, 3.5) for i, p, q in zip(ids, preds, dicts, strict=True)]


def test_regression_and_numpy_values_encode_as_before():
    ids, preds = ["a", "b"], [np.float32(0.5), np.float64(-2.25)]
    assert prediction_messages(encode_predictions("r", 1, 2.0, ids, preds, None)) == [
        contract_message(i, "r", p, None, 1, 2.0) for i, p in zip(ids, preds, strict=True)]


def test_every_prediction_reaches_the_topic_once(broker):
    topic = f"t-{uuid.uuid4().hex[:10]}.predictions"
    ensure_topics(broker, [topic], partitions=2)
    publisher = PredictionPublisher(broker, KafkaConfig())
    try:
        expected = []
        # several payloads; the last one is larger than one record batch (1 MiB)
        for k, n in enumerate((3, 1000, 2500, 12_000)):
            ids = [f"{k}-{i}" for i in range(n)]
            preds = [i % 3 for i in range(n)]
            probas = [{0: 0.5, 1: 0.25, 2: 0.25 + i / 1e9} for i in range(n)]
            publisher.publish(topic, encode_predictions("default", k, 1.5 + k, ids, preds, probas))
            expected += [contract_message(i, "default", p, q, k, 1.5 + k)
                         for i, p, q in zip(ids, preds, probas, strict=True)]
        publisher.flush()
    finally:
        publisher.close()
    got = read_topic(broker, topic, 2, len(expected))
    assert sorted(got[0] + got[1]) == sorted(expected)
    assert got[0] and got[1]  # batches go round-robin over the partitions
    # within a partition, messages keep the order they were published in
    for part in got.values():
        assert part == sorted(part, key=expected.index)


def test_flush_reports_a_dead_publisher_process_and_publish_never_raises(broker):
    topic = f"t-{uuid.uuid4().hex[:10]}.predictions"
    ensure_topics(broker, [topic])
    publisher = PredictionPublisher(broker, KafkaConfig())
    try:
        publisher._process.kill()  # what an OOM kill would do
        publisher._process.join(10)
        publisher.publish(topic, encode_predictions("default", 0, 0.0, ["a"], [1], [{1: 1.0}]))
        with pytest.raises(RuntimeError, match="publisher process is gone"):
            publisher.flush(timeout=10)
    finally:
        publisher.close()


def test_unacknowledged_messages_are_kept_and_sent_again_once_kafka_is_back():
    # they used to be counted once and dropped: the next checkpoint then committed their offsets
    port = free_port()
    topic = "t-lost.predictions"
    with EmbeddedBroker(port=port) as b:
        ensure_topics(b.bootstrap, [topic])
        producer = BatchProducer(b.bootstrap, request_timeout_ms=500, retries=1)
        producer.send(topic, [b'{"id":"x"}'] * 10)
        assert producer.flush() == 0
    # the broker is gone: nothing sent now is acknowledged, and every flush says how much waits
    producer.send(topic, [b'{"id":"y"}'] * 7)
    assert producer.flush() == 7
    assert producer.flush() == 7
    with EmbeddedBroker(port=port) as b:  # back (empty: the in-memory broker lost its topics)
        ensure_topics(b.bootstrap, [topic])
        assert producer.flush() == 0
        assert read_topic(b.bootstrap, topic, 1, 7) == {0: [b'{"id":"y"}'] * 7}
    producer.close()


def test_a_flush_that_timed_out_is_not_mistaken_for_the_next():
    def payload(n: int) -> bytes:
        return encode_predictions("default", 0, 0.0, [str(i) for i in range(n)], [1] * n, [{1: 1.0}] * n)

    with EmbeddedBroker(port=0) as b:
        topic = "t-flushes.predictions"
        ensure_topics(b.bootstrap, [topic])
        publisher = PredictionPublisher(b.bootstrap, KafkaConfig(request_timeout_ms=500))
        publisher.publish(topic, payload(3))
        publisher.flush()
    try:
        publisher.publish(topic, payload(5))  # the broker is gone: the child retries, then gives up
        with pytest.raises(TimeoutError):
            publisher.flush(timeout=0.2)
        # the late answer to the flush above is skipped; the messages wait, and each flush says so
        for _ in range(2):
            with pytest.raises(RuntimeError, match="^5 prediction messages are not acknowledged by Kafka yet"):
                publisher.flush(timeout=60)
    finally:
        publisher.close()


def test_a_stop_ends_a_publish_that_waits_for_kafka():
    # with Kafka away the child cannot write, its queue fills, and publish waits (backpressure);
    # a SIGTERM then waited for Kafka to come back (689 s in a manual run): a stop ends the wait
    with EmbeddedBroker(port=0) as b:
        topic = "t-away.predictions"
        ensure_topics(b.bootstrap, [topic])
        publisher = PredictionPublisher(b.bootstrap, KafkaConfig(request_timeout_ms=5000), max_queued=2)
    stopping = threading.Event()
    outcome: list = []

    def publish_all() -> None:
        try:
            for _ in range(50):
                publisher.publish(topic, encode_predictions("m", 0, 0.0, ["a"] * 1000, [1] * 1000, None),
                                  stopping=stopping)
            outcome.append("all published")
        except PublisherBlocked as exc:
            outcome.append(exc)

    try:
        loop = threading.Thread(target=publish_all, daemon=True)
        loop.start()
        loop.join(3)
        assert loop.is_alive() and not outcome  # waiting: backpressure, nothing dropped
        stopping.set()
        loop.join(5)
        assert not loop.is_alive() and isinstance(outcome[0], PublisherBlocked)
        assert "replayed at the next start" in str(outcome[0])
    finally:
        publisher.close()


def test_the_producer_reconnects_after_the_broker_comes_back():
    port = free_port()
    topic = "t-back.predictions"
    producer = BatchProducer(f"127.0.0.1:{port}", request_timeout_ms=2000, retries=3)
    with EmbeddedBroker(port=port) as b:
        ensure_topics(b.bootstrap, [topic])
        producer.send(topic, [b'{"id":"1"}'] * 5)
        assert producer.flush() == 0
    with EmbeddedBroker(port=port) as b:  # a new broker on the same address: the old socket is dead
        ensure_topics(b.bootstrap, [topic])
        producer.send(topic, [b'{"id":"2"}'] * 4)
        assert producer.flush() == 0
        assert sum(map(len, read_topic(b.bootstrap, topic, 1, 4).values())) == 4
    producer.close()
