"""``streamlearn serve`` end to end: a real broker, real subprocesses, real HTTP, real signals."""

from __future__ import annotations

import math
import signal
import threading
import time
import uuid

import httpx
import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from service.broker import EmbeddedBroker, free_port
from service.checkpoint import CheckpointStore
from service.ingest import fetched_ends
from service.streams import iter_messages
from tests.conftest import launch, wait_until

pytestmark = pytest.mark.broker

RIVER = {"learner": "river", "estimator": "linear_model.LogisticRegression"}


def config(topics: dict, learner: dict | None = None, **model) -> dict:
    return {"kafka": {"group_id": f"g-{uuid.uuid4().hex[:8]}"},
            "checkpoint": {"interval_seconds": 0.5},
            "publish_interval_seconds": 0.05,
            "models": {"default": {"topics": topics, "learner": learner if learner is not None else RIVER, **model}}}


def produce(bootstrap: str, topics: dict, n: int, *, label_delay: int = 0, unlabeled: float = 0.0,
            rate: float = 0.0, prefix: str = "e", stream: str = "mixed") -> tuple[int, int]:
    """Writes a demo stream; returns (events, labels) written. ``rate`` > 0 paces it (events/s)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    events = labels = 0
    start = time.monotonic()
    for kind, msg in iter_messages(stream, n, label_delay=label_delay, unlabeled_fraction=unlabeled,
                                   seed=7, id_prefix=prefix):
        if kind == "event":
            producer.send(topics["events"], orjson.dumps(msg))
            events += 1
            if rate and events % 100 == 0:
                time.sleep(max(0.0, start + events / rate - time.monotonic()))
        else:
            producer.send(topics["labels"], orjson.dumps(msg))
        labels += kind == "label" or (kind == "event" and "label" in msg)
    producer.flush()
    producer.close()
    return events, labels


def consume_all(bootstrap: str, topic: str, timeout: float = 5.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, 0)])
    out, idle = [], time.monotonic() + timeout
    while time.monotonic() < idle:
        got = consumer.poll(timeout_ms=200)
        for records in got.values():
            out.extend(records)
            idle = time.monotonic() + 1.0
    consumer.close()
    return out


def new_topics() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {kind: f"t-{tag}.{kind}" for kind in ("events", "labels", "predictions", "dead_letter")}


@pytest.fixture(scope="module")
def shared(broker, tmp_path_factory):
    """One service for the tests that need no restart: a model each, on topics of its own.

    ``default`` has the default learner; the others a River logistic regression (fast, and its
    predictions move visibly as it learns); ``late`` scores over a window of one prediction.
    """
    topics = {name: new_topics() for name in ("default", "late", "dlq", "http")}
    models = {name: {"topics": t, "learner": {} if name == "default" else RIVER} for name, t in topics.items()}
    models["late"]["prequential_window"] = 1
    proc = launch(broker, tmp_path_factory.mktemp("shared"),
                  {"kafka": {"group_id": f"g-{uuid.uuid4().hex[:8]}"}, "publish_interval_seconds": 0.05,
                   "models": models})
    proc.topics = topics
    yield proc
    proc.stop()


def metric_values(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_a_produced_stream_is_fully_learned_and_status_and_metrics_agree(shared, broker):
    """The default learner, delayed labels, a tenth of events never labelled, a few bad messages."""
    proc, topics = shared, shared.topics["default"]
    n, n_labels = produce(broker, topics, 3000, label_delay=50, unlabeled=0.1)
    bad = KafkaProducer(bootstrap_servers=broker)
    for raw in (b"{oops", b'{"id": "b1", "features": {"x": [1]}}', b'{"id": "b2"}'):
        bad.send(topics["events"], raw)
    bad.send(topics["labels"], b'{"id": "b3", "label": {"nested": true}}')
    bad.flush()
    status = proc.wait_for(lambda s: s["events"]["predicted"] == n and s["events"]["learned"] == n_labels
                           and s["events"]["dead_letters"] == 3 and s["consumer_lag"] == 0, timeout=120)
    assert status["events"] == {"predicted": n, "learned": n_labels, "pending_labels": n - n_labels,
                                "dead_letters": 3}  # the bad label is a label: ...
    assert status["labels"]["dead_letter"] == 1  # ... counted with the labels
    assert status["labels"]["joined"] == n_labels and status["model_version"] >= 1, status
    assert 0.5 < status["prequential"]["accuracy"] <= 1.0 and status["prequential"]["log_loss"] > 0, status
    for key in ("estimated", "drift", "learning_rate", "kalman_gamma", "checkpoint", "consumer_lag"):
        assert key in status
    m = metric_values(proc.get("/metrics"))
    lbl = (("model", "default"),)
    assert m[("streamlearn_events_total", lbl + (("outcome", "predicted"),))] == n
    assert m[("streamlearn_events_total", lbl + (("outcome", "learned"),))] == n_labels
    assert m[("streamlearn_labels_total", lbl + (("outcome", "joined"),))] == n_labels
    assert m[("streamlearn_events_total", lbl + (("outcome", "dead_letter"),))] == 3
    assert m[("streamlearn_labels_total", lbl + (("outcome", "dead_letter"),))] == 1
    assert m[("streamlearn_pending_labels", lbl)] == n - n_labels
    assert sum(v for (name, _), v in m.items() if name == "streamlearn_dead_letters_total") == 4
    window = str(status["prequential"]["window"])
    assert m[("streamlearn_prequential_metric", (("metric", "accuracy"), ("model", "default"),
                                                 ("window", window)))] == pytest.approx(
        status["prequential"]["accuracy"])
    assert m[("streamlearn_consumer_lag", lbl + (("partition", f"{topics['events']}:0"),))] == 0
    # Every event's prediction was published, with the contract's fields.
    preds = consume_all(broker, topics["predictions"])
    assert len(preds) == n
    first = orjson.loads(preds[0].value)
    assert set(first) == {"id", "model", "prediction", "proba", "model_version", "ts"} and first["model"] == "default"


def test_a_delayed_label_is_scored_against_the_prediction_made_before_it(shared, broker):
    proc, topics = shared, shared.topics["late"]
    x = {f"x{i}": 0.5 for i in range(10)} | {"c0": "a", "c1": "b", "c2": "c"}
    send = KafkaProducer(bootstrap_servers=broker)
    send.send(topics["events"], orjson.dumps({"id": "late", "features": x}))
    send.flush()
    proc.wait_for(lambda s: s["events"]["predicted"] == 1, model="late")
    stored = orjson.loads(consume_all(broker, topics["predictions"], timeout=3)[0].value)
    assert stored["id"] == "late"
    n, _ = produce(broker, topics, 2000)
    proc.wait_for(lambda s: s["events"]["learned"] == n, model="late")
    time.sleep(0.2)  # a snapshot with everything learned is published
    now = proc.post("/v1/models/late/predict", {"instances": [{"features": x}]}).json()["predictions"][0]
    label = 1
    # River's binary logistic regression answers {False: p0, True: p1}: the adapter gives them back
    # as the labels it learned (1/0) once it learned some; before any, they are River's own
    p_then, p_now = stored["proba"]["true"], now["proba"]["1"]
    assert abs(p_now - p_then) > 1e-3  # the model changed in between
    send.send(topics["labels"], orjson.dumps({"id": "late", "label": label}))
    send.flush()
    status = proc.wait_for(lambda s: s["labels"]["joined"] == 1, model="late")
    assert status["prequential"]["log_loss"] == pytest.approx(-math.log(max(p_then, 1e-15)), rel=1e-9)
    assert status["events"]["learned"] == n + 1 and status["events"]["pending_labels"] == 0


BAD_EVENTS = [
    (b"not json at all", "not_json", "not JSON"),
    (b"[1, 2, 3]", "not_object", "expected a JSON object"),
    (b'{"features": {"x": 1}}', "missing_field", "id:"),
    (b'{"id": "a", "features": {"x": NaN}}', "non_finite", "features.x:"),
    (b'{"id": "b", "features": {"x": 1e999}}', "non_finite", "features.x:"),
    (b'{"id": "c", "features": {"x": {"deep": 1}}}', "bad_type", "features.x:"),
    (b'{"id": "d", "features": "x=1"}', "bad_type", "features:"),
    (b'{"id": "e", "features": {"x": 1}, "model": "nope"}', "unknown_model", "model:"),
]


def test_bad_messages_are_dead_lettered_with_the_field_named_and_the_service_lives_on(shared, broker):
    proc, topics = shared, shared.topics["dlq"]
    send = KafkaProducer(bootstrap_servers=broker)
    for raw, _, _ in BAD_EVENTS:
        send.send(topics["events"], raw)
    send.send(topics["labels"], b'{"id": "z", "label": [1]}')
    send.flush()
    n, _ = produce(broker, topics, 500)
    status = proc.wait_for(lambda s: s["events"]["learned"] == n and s["events"]["dead_letters"] == len(BAD_EVENTS)
                           and s["labels"]["dead_letter"] == 1, model="dlq")
    assert status["events"]["predicted"] == n
    dead = consume_all(broker, topics["dead_letter"])
    assert len(dead) == len(BAD_EVENTS) + 1
    by_value = {rec.value: dict(rec.headers) for rec in dead}
    for raw, reason, field in BAD_EVENTS:
        headers = by_value[raw]  # the original bytes, unchanged
        assert headers["reason"].decode() == reason
        assert headers["detail"].decode().startswith(field)
        assert headers["topic"].decode() == topics["events"]
    assert by_value[b'{"id": "z", "label": [1]}']["detail"].decode().startswith("label:")
    assert proc.get("/readyz") == {"ready": True}


def _counts(proc) -> dict:
    return proc.get("/v1/models/default")["events"]


@pytest.mark.parametrize("partitions", [1, 3])
def test_kill_9_mid_stream_then_restart_learns_every_event_exactly_once(serve, broker, topics, tmp_path, partitions):
    cfg = config(topics)
    cfg["kafka"]["partitions"] = partitions  # the producer spreads events and labels over them
    first = serve(cfg, state_dir=tmp_path / "state")
    n = 12_000
    writer = threading.Thread(target=produce, args=(broker, topics, n),
                              kwargs={"label_delay": 25, "rate": 3000.0}, daemon=True)
    writer.start()
    first.wait_for(lambda s: s["events"]["learned"] >= 2000 and (s["checkpoint"]["seq"] or 0) >= 2)
    at_kill = _counts(first)
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert at_kill["learned"] < n  # really mid-stream
    seq, state = CheckpointStore(tmp_path / "state" / "checkpoints").load_latest()
    assert 0 < state["models"]["default"]["learned"] < n
    assert sum(1 for topic, _ in state["offsets"] if topic == topics["events"]) == partitions
    second = serve(cfg, state_dir=tmp_path / "state")
    # Back to exactly the newest checkpoint (the status is already moving on by the time it is
    # readable, so the log says which one); the events after it are replayed, not counted twice.
    assert f"restored checkpoint {seq} " in second.log_path.read_text()
    writer.join(60)
    second.wait_for(lambda s: s["events"]["learned"] >= n and s["consumer_lag"] == 0, timeout=120)
    time.sleep(1.5)  # nothing more trickles in: the count ends exactly at n
    final = _counts(second)
    assert final == {"predicted": n, "learned": n, "pending_labels": 0, "dead_letters": 0}
    events = [TopicPartition(topics["events"], p) for p in range(partitions)]
    ends = fetched_ends(broker, events, dict.fromkeys(events, 0))  # (tansu's ListOffsets falls short)
    assert sum(ends.values()) == n and all(ends.values())  # every partition had events to replay


@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-service", "to-its-process-group"])
def test_sigterm_leaves_a_checkpoint_and_committed_offsets_consistent_with_it(serve, broker, topics, tmp_path,
                                                                              to_group):
    cfg = config(topics)
    cfg["checkpoint"]["interval_seconds"] = 3600  # only the shutdown checkpoint
    proc = serve(cfg, state_dir=tmp_path / "state")
    n = 8000
    writer = threading.Thread(target=produce, args=(broker, topics, n), kwargs={"rate": 3000.0}, daemon=True)
    writer.start()
    proc.wait_for(lambda s: s["events"]["learned"] >= 1000)
    (proc.signal_group if to_group else proc.signal)(signal.SIGTERM)
    assert proc.wait() == 0, proc.log()
    seq, state = CheckpointStore(tmp_path / "state" / "checkpoints").load_latest()
    offset = state["offsets"][(topics["events"], 0)]
    model = state["models"]["default"]
    # Inline labels: the state holds exactly the events before the checkpointed offset.
    assert 1000 <= offset < n and model["predicted"] == model["learned"] == offset
    consumer = KafkaConsumer(bootstrap_servers=broker, group_id=cfg["kafka"]["group_id"], enable_auto_commit=False)
    committed = {tp: consumer.committed(TopicPartition(*tp)) for tp in state["offsets"]}
    consumer.close()
    assert committed == state["offsets"]
    writer.join(60)
    again = serve(cfg, state_dir=tmp_path / "state")
    assert f"restored checkpoint {seq} " in again.log_path.read_text()
    assert again.get("/v1/models/default")["checkpoint"]["seq"] == seq
    again.wait_for(lambda s: s["events"]["learned"] == n and s["consumer_lag"] == 0, timeout=120)


def test_a_restart_after_the_whole_stream_was_learned_learns_nothing_again(serve, broker, topics, tmp_path):
    # The checkpoint's offsets are then the partitions' true ends. tansu's ListOffsets answers the
    # last record batch's base offset instead, below them: taken at its word, the service
    # concluded the topics had been recreated and learned the whole stream a second time.
    cfg = config(topics)
    first = serve(cfg, state_dir=tmp_path / "state")
    n = produce(broker, topics, 3000, label_delay=25)[0]
    first.wait_for(lambda s: s["events"]["learned"] == n and s["consumer_lag"] == 0)
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    second = serve(cfg, state_dir=tmp_path / "state")
    produce(broker, topics, 100, prefix="more")
    second.wait_for(lambda s: s["events"]["learned"] >= n + 100 and s["consumer_lag"] == 0)
    time.sleep(1.5)  # nothing more trickles in
    assert _counts(second)["learned"] == n + 100
    assert "past the end of the partition" not in second.log()


def test_http_answers_while_the_service_starts_and_is_ready_once_kafka_is_there(serve, tmp_path):
    port = free_port()  # no Kafka there yet
    proc = serve(config(new_topics()), env={"STREAMLEARN_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}, start=False)
    proc.start(wait=False)
    wait_until(lambda: _answers(proc.base + "/healthz"), timeout=60)  # alive while the start waits for Kafka
    ready = httpx.get(proc.base + "/readyz")
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    assert metric_values(proc.get("/metrics"))[("streamlearn_ready", (("model", "default"),))] == 0
    assert proc.get("/v1/models/default")["events"]["predicted"] == 0
    instance = {"features": {"x": 1.0}}
    for route, body in (("predict", {"instances": [instance]}), ("labels", {"labels": [{"id": "a", "label": 1}]}),
                        ("learn", {"instances": [{**instance, "label": 1}]})):
        refused = proc.post(f"/v1/models/default/{route}", body)
        assert refused.status_code == 503 and "starting" in refused.json()["detail"], route
        assert refused.headers["retry-after"] == "5"
    with EmbeddedBroker(port=port):
        proc.wait_ready(timeout=60)
        assert metric_values(proc.get("/metrics"))[("streamlearn_ready", (("model", "default"),))] == 1
        assert proc.post("/v1/models/default/predict", {"instances": [instance]}).status_code == 200
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0


def test_sigterm_while_the_start_waits_for_kafka_stops_at_once(serve):
    # the wait for Kafka is 30 s; a SIGTERM used to wait it out, then exit 1 ("cannot start")
    proc = serve(config(new_topics()), env={"STREAMLEARN_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}, start=False)
    proc.start(wait=False)
    wait_until(lambda: _answers(proc.base + "/healthz"), timeout=60)
    time.sleep(1.0)  # well into the wait
    start = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert time.monotonic() - start < 8
    assert "stopped while starting (stopped while waiting for Kafka at" in proc.log()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(("cfg", "named"), [
    ({"kafka": {"max_poll_records": "lots"}}, "kafka.max_poll_records"),
    # the learner's and the monitor's own settings, checked when the models are built
    ({"models": {"a": {"learner": {"hiden": 128}}}}, "models.a.learner: unknown setting(s) ['hiden']"),
    ({"models": {"a": {"learner": {"hidden": "big"}}}}, "models.a.learner.hidden: expected an integer >= 1"),
    ({"models": {"a": {"learner": {"learner": "river", "estimator": "linear_model.LogisticRegresion"}}}},
     "models.a.learner.estimator: no River estimator named 'linear_model.LogisticRegresion'"),
    ({"models": {"a": {"learner": {"learner": "river", "hidden": 8}}}},
     "models.a.learner: unknown setting(s) ['hidden'] for a River learner"),
    ({"models": {"a": {"monitor": {"detectr": "adwin"}}}}, "models.a.monitor: unknown keys ['detectr']"),
], ids=["kafka", "learner-key", "learner-value", "river-estimator", "river-key", "monitor-key"])
def test_serve_with_a_bad_config_exits_naming_the_key(serve, cfg, named):
    proc = serve(cfg, start=False)
    with pytest.raises(RuntimeError) as err:
        proc.start()
    assert named in str(err.value) and proc.process.returncode == 2
    assert "Traceback" not in proc.log()


def test_http_labels_take_the_kafka_path_and_join(shared, broker):
    proc, topics = shared, shared.topics["http"]
    send = KafkaProducer(bootstrap_servers=broker)
    for i in range(5):
        send.send(topics["events"], orjson.dumps({"id": f"h{i}", "features": {"x0": float(i)}}))
    send.flush()
    proc.wait_for(lambda s: s["events"]["pending_labels"] == 5, model="http")
    r = proc.post("/v1/models/http/labels", {"labels": [{"id": f"h{i}", "label": i % 2} for i in range(5)]})
    assert r.status_code in (200, 202), r.text
    status = proc.wait_for(lambda s: s["labels"]["joined"] == 5, model="http")
    assert status["events"]["learned"] == 5 and status["events"]["pending_labels"] == 0
    assert isinstance(httpx.get(proc.base + "/metrics").text, str)


def test_a_checkpoint_from_a_broker_that_lost_its_topics_does_not_skip_the_new_events(serve, topics, tmp_path):
    # The embedded broker keeps topics in memory: after its restart the checkpoint's offsets are
    # past the end of the new partitions, and seeking there would skip every event up to them.
    from service.broker import EmbeddedBroker

    cfg = config(topics)
    with EmbeddedBroker(port=0) as first_broker:
        first = serve(cfg, env={"STREAMLEARN_KAFKA_BOOTSTRAP": first_broker.bootstrap}, state_dir=tmp_path / "state")
        produce(first_broker.bootstrap, topics, 600)
        first.wait_for(lambda s: s["events"]["learned"] == 600)
        first.signal(signal.SIGTERM)
        assert first.wait() == 0
    with EmbeddedBroker(port=0) as second_broker:
        second = serve(cfg, env={"STREAMLEARN_KAFKA_BOOTSTRAP": second_broker.bootstrap}, state_dir=tmp_path / "state")
        produce(second_broker.bootstrap, topics, 200, prefix="again")
        second.wait_for(lambda s: s["events"]["learned"] == 800 and s["consumer_lag"] == 0)
        assert "past the end of the partition" in second.log()
        second.stop()


def test_a_fresh_model_facing_a_backlog_learns_from_the_first_events_instead_of_predicting_them_all_untrained(
        serve, broker, topics):
    # Every event of a chunk is predicted before any is learned: in chunks as large as what a poll
    # returns, a new model would predict a whole fetch of the backlog untrained.
    from service import streams

    producer = streams.make_producer(broker)  # as `streamlearn produce` writes: large record batches
    n = streams.produce(producer, "mixed", 3000, events_topic=topics["events"], labels_topic=topics["labels"]).events
    producer.close()
    proc = serve(config(topics, learner={}, prequential_window=n))  # the default learner, on the backlog
    status = proc.wait_for(lambda s: s["events"]["learned"] == n)
    assert status["prequential"]["n"] == n
    # measured: 0.92 with the warm-up chunks, 0.66 when the first fetch (~1,000 events) is predicted untrained
    assert status["prequential"]["accuracy"] > 0.8, status["prequential"]
