"""Reaching Kafka at start: a clear error within the wait it announced, without kafka-python's noise."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from kafka import KafkaProducer, TopicPartition

from service.broker import BrokerError, EmbeddedBroker, PortInUse, ensure_topics, free_port
from service.ingest import fetched_ends


def test_an_unreachable_kafka_is_one_clear_error_within_the_timeout(caplog):
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    with pytest.raises(BrokerError, match=f"cannot reach Kafka at {bootstrap} within 2 s"):
        ensure_topics(bootstrap, ["t"], timeout=2)
    assert time.monotonic() - start < 6  # kafka-python alone would wait 30 s per attempt
    said = [(r.name, r.levelno) for r in caplog.records]
    assert ("service.broker", logging.INFO) in said  # "connecting to Kafka at … (waiting up to 2 s)"
    assert not [name for name, level in said if name.startswith("kafka") and level >= logging.WARNING]
    assert logging.getLogger("kafka").level == logging.NOTSET  # muted only while waiting


@pytest.mark.broker
def test_fetched_ends_are_the_partitions_true_ends(broker):
    # tansu's ListOffsets answers the base offset of a partition's last record batch (91 here, for
    # records 0-99 written in four batches), which a restart must not take for the end
    topic = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, [topic], partitions=2)
    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=5)
    for i in range(100):
        producer.send(topic, b"%d" % i, partition=0)
        if i % 30 == 29:
            producer.flush()
    producer.flush()
    producer.close()
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    assert fetched_ends(broker, tps, dict.fromkeys(tps, 0)) == {tps[0]: 100, tps[1]: 0}


@pytest.mark.broker
def test_the_embedded_broker_refuses_a_port_where_a_kafka_already_listens(broker, tmp_path):
    # the wait for the port used to succeed against the broker already there: the service then
    # used that Kafka (a real one, on the default 9092) believing it its own in-memory broker
    from service.config import load_settings
    from service.runtime import Service

    port = int(broker.rpartition(":")[2])
    with pytest.raises(PortInUse, match=f"127.0.0.1:{port}: Address already in use"):
        EmbeddedBroker(port).start()
    service = Service(load_settings(overrides={"state_dir": str(tmp_path), "kafka": {"embedded_port": port}}))
    try:
        with pytest.raises(PortInUse, match="set STREAMLEARN_KAFKA_BOOTSTRAP to use that Kafka"):
            service.start()
    finally:
        service.stop()
    assert service.bootstrap is None  # it never took the other broker for its own
