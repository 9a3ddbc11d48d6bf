"""The observed service: a real ``streamlearn serve`` on the embedded broker, scraped by a real
Prometheus that evaluates the shipped alert rules (durations scaled 1/60) and notifies a real
Alertmanager, whose webhook is the shipped alert sink running in-process.

``drift_run`` then feeds it one stream with an abrupt concept change at a known time and stops it,
so that the alert, metric and status-page tests all look at the same, real run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
import yaml

from service.broker import free_port
from service.streams import iter_stream, make_producer, produce
from tests.conftest import ServeProcess
from tests.deploy.promql import DEPLOY, scaled_rules
from tests.deploy.stack import Alertmanager, Prometheus

# 1 minute of the shipped rules lasts 1 second here; the scrape and evaluation interval is 1 s.
TIME_SCALE = 1 / 60
INTERVAL = "1s"

# The stream: a hidden linear concept over 10 numeric + 3 categorical features, re-drawn abruptly
# after CHANGE_AT events (about half the labels flip), paced at RATE events/s, labels
# LABEL_DELAY events late (so predictions wait for labels, are estimated, then realized).
STREAM = "mixed"
CHANGE_AT = 5000
EVENTS = 8000
RATE = 1000.0
LABEL_DELAY = 100


def load_webhook_sink():
    spec = importlib.util.spec_from_file_location("webhook_sink", DEPLOY / "alertmanager" / "webhook_sink.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Observed:
    serve: ServeProcess
    prometheus: Prometheus
    alertmanager: Alertmanager | None
    sink: object | None
    topics: dict[str, str]


@dataclass
class DriftRun:
    started: float           # wall time of the first event
    change: float            # wall time the first event of the new concept was sent
    stopped: float           # wall time the last event was sent
    drift_status: dict = field(default_factory=dict)  # concept-drift status once all is learned


@pytest.fixture(scope="session")
def observed(broker: str, tmp_path_factory) -> Observed:
    root = tmp_path_factory.mktemp("observed")
    tag = uuid.uuid4().hex[:8]
    topics = {kind: f"obs-{tag}.{kind}" for kind in ("events", "labels", "predictions", "dead_letter")}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"models": {"default": {"topics": topics}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
    env.update({
        "STREAMLEARN_CONFIG": str(config),
        "STREAMLEARN_KAFKA_BOOTSTRAP": broker,
        "STREAMLEARN_HTTP_HOST": "127.0.0.1",
        "STREAMLEARN_HTTP_PORT": str(free_port()),
        "STREAMLEARN_STATE_DIR": str(root / "state"),
        "STREAMLEARN_CHECKPOINT_INTERVAL_SECONDS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    with contextlib.ExitStack() as stack:
        sink = alertmanager = None
        if shutil.which(Alertmanager.binary):
            sink = load_webhook_sink().WebhookSink(("127.0.0.1", 0))
            threading.Thread(target=sink.serve_forever, daemon=True).start()
            stack.callback(sink.server_close)
            stack.callback(sink.shutdown)
            alertmanager = Alertmanager(root / "alertmanager", f"http://127.0.0.1:{sink.server_address[1]}")
            stack.callback(alertmanager.stop)
            alertmanager.start()
        serve = ServeProcess(env, root / "state", root / "serve.log")
        stack.callback(serve.stop)
        serve.start()
        prometheus = Prometheus(root / "prometheus", f"127.0.0.1:{serve.port}", scaled_rules(TIME_SCALE),
                                interval=INTERVAL, alertmanager=alertmanager and alertmanager.address)
        stack.callback(prometheus.stop)
        prometheus.start().wait_scraped()
        yield Observed(serve, prometheus, alertmanager, sink, topics)


@pytest.fixture(scope="session")
def drift_run(observed: Observed, broker: str) -> DriftRun:
    """Produce the stream (abrupt concept change at CHANGE_AT), wait until every event is learned."""
    producer = make_producer(broker)
    try:
        # one malformed message: the dead-letter path is part of what is observed
        producer.send(observed.topics["events"], b"{not json")
        started = time.time()
        report = produce(producer, STREAM, EVENTS, events_topic=observed.topics["events"],
                         labels_topic=observed.topics["labels"], label_delay=LABEL_DELAY, drift_every=CHANGE_AT,
                         rate=RATE, id_prefix="e2e-")
        stopped = time.time()
    finally:
        producer.close()
    assert report.events == EVENTS
    # every event predicted and every label handled (joined, or counted if it overtook its event)
    status = observed.serve.wait_for(lambda s: s["events"]["predicted"] >= EVENTS
                                     and sum(s["labels"].values()) >= EVENTS, timeout=180)
    # HTTP predictions feed streamlearn_predict_seconds
    for i, (x, _) in enumerate(itertools.islice(iter_stream(STREAM, seed=7), 5)):
        response = observed.serve.post("/v1/models/default/predict", {"instances": [{"id": f"http-{i}", "features": x}]})
        assert response.status_code == 200, response.text
    # produce() paces event i to start + i / RATE
    return DriftRun(started=started, change=started + CHANGE_AT / RATE, stopped=stopped,
                    drift_status=status["drift"]["concept"])
