"""Routing between several models on the real broker: the optional "model" field, shared topics,
per-task label checks. The service runs in this process (no HTTP needed)."""

from __future__ import annotations

import time

import orjson
import pytest
from kafka import KafkaProducer

from service.runtime import Service
from tests.conftest import in_process_settings, wait_until

pytestmark = pytest.mark.broker

RIVER_CLF = {"learner": "river", "estimator": "linear_model.LogisticRegression"}
RIVER_REG = {"learner": "river", "estimator": "linear_model.LinearRegression"}


def test_events_route_by_model_field_else_to_every_model_of_the_topic(broker, topics, tmp_path):
    shared = {**topics, "predictions": None}
    settings = in_process_settings(broker, tmp_path, {
        "clf": {"topics": shared, "learner": RIVER_CLF},
        "reg": {"task": "regression", "topics": shared, "learner": RIVER_REG},
    })
    svc = Service(settings).start()
    try:
        send = KafkaProducer(bootstrap_servers=broker)
        for raw in [
            {"id": "both", "features": {"x": 1.0}, "label": 1},                     # to both models
            {"id": "only-reg", "features": {"x": 2.0}, "label": 2.5, "model": "reg"},
            {"id": "only-clf", "features": {"x": 3.0}, "label": 0, "model": "clf"},
            {"id": "bad-reg", "features": {"x": 4.0}, "label": "dog", "model": "reg"},  # not a number
            {"id": "nobody", "features": {"x": 5.0}, "model": "zzz"},               # unknown model
            {"id": "pend", "features": {"x": 6.0}},                                 # both, unlabelled
        ]:
            send.send(shared["events"], orjson.dumps(raw))
        send.send(shared["labels"], orjson.dumps({"id": "pend", "label": 0.5, "model": "reg"}))
        send.flush()
        clf, reg = svc.models["clf"], svc.models["reg"]
        wait_until(lambda: clf.predicted == 3 and reg.predicted == 3 and reg.learned == 3)
        time.sleep(0.3)  # anything misrouted would show up now
        assert (clf.predicted, clf.learned, len(clf.pending)) == (3, 2, 1)  # both, only-clf, pend (pending)
        assert (reg.predicted, reg.learned, len(reg.pending)) == (3, 3, 0)  # both, only-reg, pend (joined)
        assert dict(reg.dead_letters) == {"bad_label": 1, "unknown_model": 1}
        assert dict(clf.dead_letters) == {"unknown_model": 1}
        assert reg.status()["prequential"]["mae"] is not None and clf.status()["prequential"]["accuracy"] is not None
    finally:
        svc.stop()
