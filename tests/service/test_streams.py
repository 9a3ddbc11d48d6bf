"""The built-in demo streams: valid event messages, seeded, and drifting the way each one promises."""

from __future__ import annotations

import itertools
import math

import numpy as np
import orjson
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from service.codec import Event, decode_event, decode_label
from service.streams import STREAMS, iter_messages, iter_stream

SEA_THRESHOLDS = (8, 9, 7, 9.5)  # SEA variants 0..3: y = x0 + x1 > threshold


def take(name: str, n: int, **kw):
    return list(itertools.islice(iter_stream(name, **kw), n))


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_event_is_a_valid_contract_message(name):
    messages = list(iter_messages(name, 300, label_delay=0, seed=3, id_prefix="p-"))
    assert [m["id"] for _, m in messages] == [f"p-{i}" for i in range(300)]
    for kind, message in messages:
        assert kind == "event"
        event = decode_event(orjson.dumps(message))
        assert isinstance(event, Event), event
        assert event.label is not None and event.ts is not None


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_streams_are_seeded(name):
    assert take(name, 200, seed=5) == take(name, 200, seed=5)
    assert take(name, 200, seed=5) != take(name, 200, seed=6)


def test_sea_switches_threshold_abruptly_every_drift_every_events():
    events = take("sea", 4 * 500, seed=1, drift_every=500)
    for i, (x, y) in enumerate(events):
        assert y == (x["x0"] + x["x1"] > SEA_THRESHOLDS[i // 500])


def test_stagger_concepts_recur():
    rules = (
        lambda x: x["size"] == "small" and x["color"] == "red",
        lambda x: x["color"] == "blue" or x["shape"] == "square",
        lambda x: x["size"] in ("medium", "large"),
    )
    events = take("stagger", 6 * 200, seed=2, drift_every=200)
    for i, (x, y) in enumerate(events):
        assert y == int(rules[(i // 200) % 3](x)), (i, x, y)


def _one_hot(rows):
    keys = sorted({(k, v) if isinstance(v, str) else (k, None) for x in rows for k, v in x.items()},
                  key=str)
    index = {k: j for j, k in enumerate(keys)}
    out = np.zeros((len(rows), len(keys)))
    for i, x in enumerate(rows):
        for k, v in x.items():
            if isinstance(v, str):
                out[i, index[(k, v)]] = 1.0
            else:
                out[i, index[(k, None)]] = float(v)
    return out


@pytest.mark.parametrize(("name", "model"), [("mixed", LogisticRegression(max_iter=2000)),
                                             ("agrawal", DecisionTreeClassifier(max_depth=8, random_state=0))])
def test_abrupt_drift_breaks_a_model_of_the_old_concept(name, model):
    n = 3000
    events = take(name, 2 * n, seed=4, drift_every=n)
    X = _one_hot([x for x, _ in events])
    y = np.array([int(v) for _, v in events])
    model.fit(X[: n // 2], y[: n // 2])
    same_concept = model.score(X[n // 2: n], y[n // 2: n])
    next_concept = model.score(X[n:], y[n:])
    assert same_concept > 0.85
    assert next_concept < same_concept - 0.15


def test_hyperplane_drifts_incrementally():
    events = take("hyperplane", 40_000, seed=7)
    X = np.array([[x[f"x{i}"] for i in range(10)] for x, _ in events])
    y = np.array([v for _, v in events])
    model = LogisticRegression(max_iter=1000).fit(X[:2000], y[:2000])
    scores = [model.score(X[a: a + 2000], y[a: a + 2000]) for a in (2000, 10_000, 20_000, 38_000)]
    assert scores[0] > 0.8
    assert scores == sorted(scores, reverse=True)  # the old boundary fits worse and worse
    assert scores[-1] < scores[0] - 0.1


def test_mixed_has_ten_numeric_and_three_categorical_features():
    for x, y in take("mixed", 100):
        numeric = [v for v in x.values() if isinstance(v, float)]
        assert len(numeric) == 10 and all(math.isfinite(v) for v in numeric)
        assert sorted(k for k, v in x.items() if isinstance(v, str)) == ["c0", "c1", "c2"]
        assert y in (0, 1)


@pytest.mark.parametrize("delay", [1, 7, 50])
def test_each_label_follows_its_event_by_exactly_the_delay(delay):
    n = 400
    messages = list(iter_messages("sea", n, label_delay=delay, unlabeled_fraction=0.25, seed=11, id_prefix=""))
    events_seen = 0
    labelled = {}
    for kind, message in messages:
        if kind == "event":
            assert "label" not in message
            events_seen += 1
        else:
            decoded = decode_label(orjson.dumps(message))
            event_index = int(decoded.id)
            # Sent once event `index + delay` is out (or at the end of the stream).
            assert events_seen == min(event_index + delay + 1, n)
            assert decoded.id not in labelled
            labelled[decoded.id] = decoded.label
    assert events_seen == n
    stream = take("sea", n, seed=11)
    assert all(labelled[i] == stream[int(i)][1] for i in labelled)
    # A seeded quarter never gets a label.
    assert 0.18 < 1 - len(labelled) / n < 0.32


def test_inline_labels_and_unlabeled_fraction():
    messages = list(iter_messages("mixed", 2000, unlabeled_fraction=0.5, seed=1))
    assert all(kind == "event" for kind, _ in messages)
    with_label = sum("label" in m for _, m in messages)
    assert 900 < with_label < 1100
    assert all("label" in m for _, m in iter_messages("mixed", 50, unlabeled_fraction=0.0))
    assert not any("label" in m for _, m in iter_messages("mixed", 50, unlabeled_fraction=1.0))


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"events": -1}, "--events"),
    ({"label_delay": -2}, "--label-delay"),
    ({"unlabeled_fraction": 1.5}, "--unlabeled-fraction"),
    ({"drift_every": 0}, "--drift-every"),
    ({"name": "nope"}, "--stream"),
])
def test_bad_options_name_the_option(kwargs, option):
    args = {"name": "sea", "events": 10, **kwargs}
    with pytest.raises(ValueError, match=option):
        list(iter_messages(**args))


@pytest.mark.broker
def test_produce_command_writes_events_and_delayed_labels_to_the_broker(broker, topics):
    """``streamlearn produce`` (the CLI contract) against the real broker, read back with a consumer."""
    import subprocess
    import sys
    from pathlib import Path

    from kafka import KafkaConsumer, TopicPartition

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "service", "produce", "--stream", "mixed", "--events", "3000", "--label-delay", "25",
           "--unlabeled-fraction", "0.1", "--bootstrap", broker, "--events-topic", topics["events"],
           "--labels-topic", topics["labels"], "--id-prefix", "cli-", "--seed", "8"]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"produced 3000 events to {topics['events']}" in done.stdout

    def read(topic: str, n: int) -> list:
        consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, consumer_timeout_ms=5000)
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        out = []
        for record in consumer:
            out.append(record)
            if len(out) >= n:
                break
        consumer.close()
        return out

    events = [decode_event(r.value) for r in read(topics["events"], 3000)]
    assert [e.id for e in events] == [f"cli-{i}" for i in range(3000)]
    assert all(isinstance(e, Event) and e.label is None for e in events)
    expected = [(m["id"], m["label"]) for kind, m in iter_messages("mixed", 3000, label_delay=25,
                                                                   unlabeled_fraction=0.1, seed=8, id_prefix="cli-")
                if kind == "label"]
    assert 2500 < len(expected) < 2900
    labels = [decode_label(r.value) for r in read(topics["labels"], len(expected))]
    assert [(lab.id, lab.label) for lab in labels] == expected


def test_produce_command_names_a_bad_option():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "service", "produce", "--stream", "sea", "--events", "10",
                           "--unlabeled-fraction", "2", "--bootstrap", "127.0.0.1:1"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--unlabeled-fraction" in done.stderr and "Traceback" not in done.stderr
