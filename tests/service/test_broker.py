"""Reaching Kafka at start: a clear error within the wait it announced, without kafka-python's noise."""

from __future__ import annotations

import logging
import time

import pytest

from service.broker import BrokerError, ensure_topics, free_port


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
