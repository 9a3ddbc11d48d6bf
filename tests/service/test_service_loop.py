"""The service loop in this process on the real broker: a batch with bad messages among good ones
(the batch decoder's slow path), and the process's GC settings while serving and after."""

from __future__ import annotations

import gc
import time

import orjson
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from service.checkpoint import CheckpointStore
from service.ingest import GC_GEN0_THRESHOLD
from service.runtime import CHECKPOINT_FORMAT, Service
from tests.conftest import in_process_settings, wait_until

pytestmark = pytest.mark.broker

PRIOR = {"learner": "river", "estimator": "dummy.PriorClassifier", "preprocess": False}
LINEAR = {"learner": "river", "estimator": "linear_model.LogisticRegression", "preprocess": False}
SOFTMAX = {"head": "softmax", "max_classes": 2, "optimizer": "adam", "lr_schedule": "constant"}
BAD = {
    7: (b"{not json", "not_json", "not JSON"),
    30: (b'{"id": "b1", "features": {"x": [1, 2]}, "label": 1}', "bad_type", "features.x"),
    31: (b'{"id": "b2", "features": {"x": NaN}, "label": 1}', "non_finite", "features.x"),
    150: (b'{"features": {"x": 1.0}, "label": 0}', "missing_field", "id"),
    299: (b'{"id": "b4", "features": {"x": 1.0}, "label": {"k": 1}}', "bad_type", "label"),
}


def test_bad_messages_in_a_batch_are_dead_lettered_naming_the_field_and_the_rest_is_learned(broker, topics, tmp_path):
    topics = {**topics, "predictions": None}
    settings = in_process_settings(broker, tmp_path, {"default": {"topics": topics, "learner": PRIOR}})
    gc_before = gc.get_threshold()
    svc = Service(settings).start()
    try:
        # while serving: the startup heap is frozen and young collections are rarer
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] >= GC_GEN0_THRESHOLD
        send = KafkaProducer(bootstrap_servers=broker, linger_ms=50)  # one batch, good and bad mixed
        for i in range(300):
            raw = BAD[i][0] if i in BAD else orjson.dumps({"id": f"e{i}", "features": {"x": float(i), "c": "a"},
                                                           "label": i % 2})
            send.send(topics["events"], raw)
        send.flush()
        rt = svc.models["default"]
        wait_until(lambda: rt.learned == 300 - len(BAD) and sum(rt.dead_letters.values()) == len(BAD))
        assert rt.predicted == rt.learned == 295
        assert dict(rt.dead_letters) == {"not_json": 1, "bad_type": 2, "non_finite": 1, "missing_field": 1}
    finally:
        svc.stop()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == gc_before

    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    tp = TopicPartition(topics["dead_letter"], 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    letters = []
    deadline = time.monotonic() + 30
    while len(letters) < len(BAD) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            letters += records
    consumer.close()
    assert [r.value for r in letters] == [raw for raw, _, _ in BAD.values()]  # the original bytes, in order
    for rec, (_, reason, field) in zip(letters, BAD.values(), strict=True):
        headers = {k: v.decode() for k, v in rec.headers}
        assert headers["reason"] == reason and headers["detail"].startswith(field)


def _dead_letters(broker: str, topic: str, n: int) -> list:
    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    letters: list = []
    deadline = time.monotonic() + 30
    while len(letters) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            letters += records
    consumer.close()
    return letters


@pytest.mark.parametrize(("learner", "rejected", "predicted"), [
    # River's linear model cannot multiply a text value: it fails to predict those events at all
    (LINEAR, {40: {"id": "s40", "features": {"x": "forty"}, "label": 1},
              41: {"id": "s41", "features": {"x": "forty-one"}, "label": 0},
              250: {"id": "s250", "features": {"x": "n/a"}, "label": 1}}, False),
    # a softmax head capped at two classes predicts every event but cannot learn a third class
    (SOFTMAX, {99: {"id": "k99", "features": {"x": 1.0}, "label": 2},
               200: {"id": "k200", "features": {"x": 2.0}, "label": 3}}, True),
], ids=["predict", "learn"])
def test_events_the_model_rejects_are_dead_lettered_alone_and_the_rest_of_their_batch_is_learned(
        broker, topics, tmp_path, learner, rejected, predicted):
    topics = {**topics, "predictions": None}
    settings = in_process_settings(broker, tmp_path, {"default": {"topics": topics, "learner": learner}})
    svc = Service(settings).start()
    try:
        send = KafkaProducer(bootstrap_servers=broker, linger_ms=50)  # one batch, so a rejection hits its neighbours
        for i in range(300):
            send.send(topics["events"], orjson.dumps(rejected.get(i) or {"id": f"e{i}", "features": {"x": float(i % 7) - 3},
                                                                         "label": int(i % 7 > 3)}))
        send.flush()
        rt = svc.models["default"]
        wait_until(lambda: rt.learned + rt.dead_letter_events == 300)
        assert rt.learned == 300 - len(rejected)
        assert rt.predicted == (300 if predicted else 300 - len(rejected))
        assert dict(rt.dead_letters) == {"model_error": len(rejected)} and rt.dead_letter_events == len(rejected)
        assert rt.prequential.values()["n"] == 300 - len(rejected)  # a rejected label is not scored either
        assert svc.error is None
    finally:
        svc.stop()
    letters = _dead_letters(broker, topics["dead_letter"], len(rejected))
    assert [orjson.loads(r.value) for r in letters] == list(rejected.values())  # the original messages, in order
    for rec in letters:
        headers = {k: v.decode() for k, v in rec.headers}
        assert headers["reason"] == "model_error" and headers["detail"].startswith("ValueError" if predicted else "TypeError")


def _events(n: int, start: int = 0) -> list[bytes]:
    return [orjson.dumps({"id": f"e{i}", "features": {"x": float(i)}, "label": i % 2}) for i in range(start, start + n)]


def test_a_message_too_large_to_dead_letter_whole_is_dead_lettered_truncated_and_the_loop_goes_on(
        broker, topics, tmp_path):
    # 17 MB of garbage: beyond what the service's producer may send (16 MiB), and beyond Kafka's
    # default record limit (~1 MB). It used to stop the loop, and a restart read it again and stopped
    topics = {**topics, "predictions": None}
    settings = in_process_settings(broker, tmp_path, {"default": {"topics": topics, "learner": PRIOR}})
    svc = Service(settings).start()
    try:
        send = KafkaProducer(bootstrap_servers=broker, max_request_size=32 << 20)
        huge = b"X" * 17_000_000
        for raw in [*_events(100), huge, *_events(100, start=100)]:
            send.send(topics["events"], raw)
        send.flush()
        rt = svc.models["default"]
        wait_until(lambda: rt.learned == 200 and rt.dead_letters["not_json"] == 1)
        assert svc.error is None and svc.checkpoint()
    finally:
        svc.stop()
    assert svc.error is None
    (letter,) = _dead_letters(broker, topics["dead_letter"], 1)
    headers = {k: v.decode() for k, v in letter.headers}
    assert letter.value == huge[:1_000_000]
    assert headers["truncated_from"] == "17000000" and headers["reason"] == "not_json" and headers["offset"] == "100"


def test_a_dead_letter_that_cannot_be_written_holds_back_the_checkpoint_not_the_loop(broker, topics, tmp_path,
                                                                                      caplog):
    # a dead letter the producer refuses (here: larger than its 16 MiB requests) is kept and sent
    # again at each checkpoint; until it is written the checkpoint fails (counted, and its offsets
    # are not committed), so a restart would read the message and dead-letter it again
    topics = {**topics, "predictions": None}
    settings = in_process_settings(broker, tmp_path, {"default": {"topics": topics, "learner": PRIOR}})
    settings.kafka.dead_letter_max_bytes = 64 << 20
    svc = Service(settings).start()
    try:
        send = KafkaProducer(bootstrap_servers=broker, max_request_size=32 << 20)
        for raw in [*_events(10), b"Y" * 17_000_000, *_events(10, start=10)]:
            send.send(topics["events"], raw)
        send.flush()
        rt = svc.models["default"]
        wait_until(lambda: rt.learned == 20 and rt.dead_letters["not_json"] == 1)
        failures = svc.checkpoint_failures
        assert not svc.checkpoint() and svc.checkpoint_failures == failures + 1
        assert len(svc._undelivered) == 1  # still held, to be sent again
        send.send(topics["events"], _events(1, start=20)[0])
        send.flush()
        wait_until(lambda: rt.learned == 21)  # the loop goes on
        assert svc.error is None
    finally:
        svc.stop()
    # stopping cannot look clean while a dead letter is missing: the final checkpoint failed too
    assert isinstance(svc.error, RuntimeError) and "shutdown checkpoint failed" in str(svc.error)
    assert "cannot be written (MessageSizeTooLargeError" in caplog.text  # why, and the setting to look at
    assert "kafka.dead_letter_max_bytes=67108864" in caplog.text


def test_a_checkpoint_with_offsets_of_a_topic_no_model_reads_does_not_stall_the_restart(broker, topics, tmp_path):
    # a model removed from the config, with its topic gone from the broker (the embedded one keeps
    # topics in memory): committing its offset was retried for ever, and no poll came after it
    topics = {**topics, "predictions": None}
    settings = in_process_settings(broker, tmp_path, {"default": {"topics": topics, "learner": PRIOR}})
    store = CheckpointStore(settings.state_dir / "checkpoints")
    store.save({"format": CHECKPOINT_FORMAT, "ts": time.time(), "models": {},
                "offsets": {("gone.events", 0): 5, ("gone.labels", 0): 3}})
    svc = Service(settings).start()
    try:
        assert svc.offsets == {}
        send = KafkaProducer(bootstrap_servers=broker)
        rt = svc.models["default"]
        for i, raw in enumerate(_events(200)):
            send.send(topics["events"], raw)
            if i == 99:
                send.flush()
                wait_until(lambda: rt.learned == 100)
                assert svc.checkpoint()
        send.flush()
        wait_until(lambda: rt.learned == 200, timeout=30)
        assert svc.checkpoint()
    finally:
        svc.stop()


def test_labels_of_another_type_than_the_first_are_dead_lettered_and_proba_keys_stay_unique(broker, topics, tmp_path):
    settings = in_process_settings(broker, tmp_path, {"default": {"topics": {**topics, "predictions": None},
                                                                  "learner": {"hidden": 8}}})
    svc = Service(settings).start()
    try:
        send = KafkaProducer(bootstrap_servers=broker)
        labels = [i % 2 for i in range(100)] + ["1", True, 1.0, "cat", False]
        for i, label in enumerate(labels):
            send.send(topics["events"], orjson.dumps({"id": f"e{i}", "features": {"x": float(i % 2)}, "label": label}))
        send.flush()
        rt = svc.models["default"]
        wait_until(lambda: rt.learned == 101 and rt.dead_letters["bad_label"] == 4)
        assert rt.label_kind == "number"
        assert sorted(rt.model.predict_proba_batch([{"x": 1.0}])[0]) == [0, 1]  # 1.0 is the class 1
    finally:
        svc.stop()
    letters = _dead_letters(broker, topics["dead_letter"], 4)
    details = [dict(r.headers)["detail"].decode() for r in letters]
    assert [d.split(" (")[0] for d in details] == [
        "label: expected a number like this model's other labels, got string '1'",
        "label: expected a number like this model's other labels, got boolean True",
        "label: expected a number like this model's other labels, got string 'cat'",
        "label: expected a number like this model's other labels, got boolean False",
    ]



def test_checkpoints_are_held_while_a_model_is_diverged_so_the_last_good_one_stays(broker, topics, tmp_path, caplog):
    # they went on every 30 s with the non-finite weights, and the kept ones rotated out in 90 s:
    # by the time the alert paged, no good checkpoint was left to restore
    settings = in_process_settings(broker, tmp_path, {"default": {"topics": {**topics, "predictions": None},
                                                                  "learner": {"hidden": 8}}})
    settings.checkpoint.interval_seconds = 3600.0  # only the checkpoints this test asks for
    svc = Service(settings).start()
    try:
        send = KafkaProducer(bootstrap_servers=broker)
        for raw in _events(64):
            send.send(topics["events"], raw)
        send.flush()
        rt = svc.models["default"]
        wait_until(lambda: rt.learned == 64)
        assert svc.checkpoint()
        good = svc.checkpoint_seq
        with torch.no_grad():
            rt.model._net["backbone"].mlp[0].weight[0, 0] = float("nan")
        assert not svc.checkpoint() and svc.checkpoint_seq == good
        assert f"model(s) default diverged: checkpoints are held, so that checkpoint {good}" in caplog.text
        assert CheckpointStore(settings.state_dir / "checkpoints").load_latest()[0] == good
    finally:
        svc.stop()  # its shutdown checkpoint is held too
    assert CheckpointStore(settings.state_dir / "checkpoints").load_latest()[0] == good
