"""Label-free performance estimation in the running service: a real ``streamlearn serve``, the real
broker, the real ``/metrics``.

The truth is a known function of two features: ``y = [x0 > 0]``, except where ``x1 > 1``, where the
label is a fair coin. A logistic regression learns the clean rule; in training ``x1 ~ N(0, 1)``, so
about one event in six falls in the noisy region and the model is right on roughly 90%. The
covariate shift moves ``x1`` to ``N(1.8, 0.5)``: almost every event is now in the noisy region,
``P(y | x)`` is unchanged, the model's scores look just as confident as before — and its accuracy
drops to about one half. With the labels withheld, M-CBPE (calibration re-weighted toward the
chunk) must see the drop; plain CBPE (calibration as on the reference) cannot.

The estimate is read before the labels are released; the realized accuracy is computed by the
service against the predictions it stored for the same events (and checked here against the
predictions topic), so learning from the released labels cannot flatter the comparison.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.broker

CHUNK = 1000  # each unlabelled phase is exactly one analysis chunk, so estimate and truth pair up
MONITOR = {"chunk_size": CHUNK, "reference_size": 3000, "min_estimate_interval_seconds": 0,
           "realized_fraction": 1.0}
# Batches of at most 200 records: each is predicted before it is learned, so smaller batches let
# the reference hold predictions of a model that has already learned something.
CONFIG = {"publish_interval_seconds": 0.05,
          "models": {"default": {"learner": {"learner": "river", "estimator": "linear_model.LogisticRegression"},
                                 "monitor": MONITOR}}}


def draw(rng: np.random.Generator, n: int, shifted: bool) -> tuple[list[dict], list[int]]:
    """``n`` events of the known truth; ``shifted`` moves ``x1`` into the noisy region."""
    x0 = rng.normal(0.0, 1.0, n)
    x1 = rng.normal(1.8, 0.5, n) if shifted else rng.normal(0.0, 1.0, n)
    y = np.where(x1 > 1.0, rng.random(n) < 0.5, x0 > 0.0).astype(int)
    return [{"x0": float(a), "x1": float(b)} for a, b in zip(x0, x1, strict=True)], y.tolist()


def send(bootstrap: str, topic: str, messages: list[dict]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for msg in messages:
        producer.send(topic, orjson.dumps(msg))
    producer.flush()
    producer.close()


def estimation_metrics(proc) -> dict[tuple[str, str, str | None], float]:
    """``{(family, metric, method): value}`` of the estimated and realized metrics, from ``/metrics``."""
    out = {}
    for fam in text_string_to_metric_families(proc.get("/metrics")):
        for s in fam.samples:
            if s.name in ("streamlearn_estimated_metric", "streamlearn_realized_metric") \
                    and s.labels["model"] == "default":
                out[(s.name, s.labels["metric"], s.labels.get("method"))] = s.value
    return out


def accuracy(proc, method: str) -> float:
    return estimation_metrics(proc)[("streamlearn_estimated_metric", "accuracy", method)]


def realized_accuracy(proc) -> float:
    return estimation_metrics(proc)[("streamlearn_realized_metric", "accuracy", None)]


def stored_predictions(bootstrap: str, topic: str, ids: set[str], timeout: float = 30.0) -> dict[str, object]:
    """The predictions the service published for ``ids``: ``{id: prediction}``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, 0)])
    found: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(ids) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            for rec in records:
                msg = orjson.loads(rec.value)
                if msg["id"] in ids:
                    found[msg["id"]] = msg["prediction"]
    consumer.close()
    assert len(found) == len(ids), f"{len(found)} of {len(ids)} predictions on {topic}"
    return found


@pytest.mark.timeout(120)
def test_covariate_shift_with_labels_withheld_moves_the_estimate_to_the_realized_accuracy(serve, broker, topics):
    rng = np.random.default_rng(20261127)
    cfg = {**CONFIG, "kafka": {"group_id": f"g-{uuid.uuid4().hex[:8]}", "max_poll_records": 200},
           # no checkpoint (which waits for pending estimates) may be what publishes an estimate
           "checkpoint": {"interval_seconds": 3600}}
    cfg["models"] = {"default": {**CONFIG["models"]["default"], "topics": topics}}
    proc = serve(cfg)

    # Phase 1: labels inline. The model learns; the monitor fills its calibration reference.
    xs, ys = draw(rng, 4000, shifted=False)
    send(broker, topics["events"], [{"id": f"t{i}", "features": x, "label": y}
                                    for i, (x, y) in enumerate(zip(xs, ys, strict=True))])
    proc.wait_for(lambda s: s["events"]["learned"] == 4000)

    def unlabelled_chunk(prefix: str, shifted: bool, number: int) -> tuple[dict[str, float], list[dict]]:
        """One chunk of unlabelled events; returns its estimates (read from /metrics) and its labels."""
        xs, ys = draw(rng, CHUNK, shifted)
        ids = [f"{prefix}{i}" for i in range(CHUNK)]
        send(broker, topics["events"], [{"id": i, "features": x} for i, x in zip(ids, xs, strict=True)])
        status = proc.wait_for(lambda s: s["estimated"]["chunk"] == number, timeout=60)
        assert status["events"]["pending_labels"] == CHUNK, status["events"]
        estimates = {m: accuracy(proc, m) for m in ("cbpe", "mcbpe")}
        assert estimates == pytest.approx({m: status["estimated"][m]["accuracy"] for m in estimates})
        return estimates, [{"id": i, "label": y} for i, y in zip(ids, ys, strict=True)]

    def release(labels: list[dict], number: int) -> float:
        """Sends the withheld labels; returns the realized accuracy of their chunk from /metrics."""
        send(broker, topics["labels"], labels)
        proc.wait_for(lambda s: s["realized"]["chunk"] == number and s["events"]["pending_labels"] == 0, timeout=60)
        return realized_accuracy(proc)

    # Phase 2: a chunk without shift, labels withheld: the estimate sits near the truth.
    before, labels = unlabelled_chunk("a", shifted=False, number=1)
    realized_before = release(labels, 1)
    assert abs(before["mcbpe"] - realized_before) < 0.06, (before, realized_before)

    # Phase 3: covariate shift, labels withheld. The estimate is read before any label is released.
    after, labels = unlabelled_chunk("s", shifted=True, number=2)
    assert before["mcbpe"] - after["mcbpe"] > 0.2, (before, after)  # it moved, and down
    realized_after = release(labels, 2)

    # The realized value is the accuracy of the predictions published before the labels came.
    preds = stored_predictions(broker, topics["predictions"], {lab["id"] for lab in labels})
    own = np.mean([preds[lab["id"]] == lab["label"] for lab in labels])
    assert realized_after == pytest.approx(own, abs=1e-12)
    assert proc.get("/v1/models/default")["realized"]["labelled"] == 1.0  # every label of the chunk came
    # the labelled share is status, not a metric of the model's quality
    assert {metric for family, metric, _ in estimation_metrics(proc) if family == "streamlearn_realized_metric"} \
        == {"accuracy", "f1", "roc_auc"}
    assert realized_before - realized_after > 0.1  # the shift really cost accuracy

    # M-CBPE's label-free estimate landed on the realized accuracy, far closer than where it was ...
    assert abs(after["mcbpe"] - realized_after) < 0.1, (after, realized_after)
    assert abs(after["mcbpe"] - realized_after) < abs(before["mcbpe"] - realized_after) / 3
    # ... which the calibration of plain CBPE, fitted on the unshifted reference, cannot see.
    assert after["cbpe"] - realized_after > 0.2, (after, realized_after)
