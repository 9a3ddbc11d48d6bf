"""The prequential loop of one model, driven directly (no Kafka): what is scored against what."""

import logging
import math
import time

import pytest

from service.codec import Event, Label
from service.config import ConfigError, ModelConfig
from service.runtime import ModelRuntime, Prequential

RIVER = {"learner": "river", "estimator": "linear_model.LogisticRegression"}


def runtime(**kw) -> ModelRuntime:
    return ModelRuntime("m", ModelConfig(learner=RIVER, prequential_window=1, **kw))


def teach(rt: ModelRuntime, n: int, start: int = 0) -> None:
    """Labelled events whose label is the sign of x: the model's confidence moves with every batch."""
    rt.process_events([Event(f"t{i}", {"x": 1.0 if i % 2 else -1.0}, i % 2 == 1) for i in range(start, start + n)])


def test_a_late_label_is_scored_against_the_prediction_stored_before_the_model_changed():
    rt = runtime()
    teach(rt, 20)
    rt.process_events([Event("late", {"x": 1.0})])  # no label yet: prediction stored
    stored = rt.pending._entries["late"]
    p_then = stored.proba[True]
    teach(rt, 500, start=20)  # the model grows much more confident meanwhile
    p_now = rt.model.predict_proba_batch([{"x": 1.0}])[0][True]
    assert p_now > p_then + 0.05
    learned = rt.learned
    rt.process_labels([Label("late", True)])
    pq = rt.prequential.values()
    assert pq["log_loss"] == pytest.approx(-math.log(p_then), rel=1e-12)
    assert pq["log_loss"] != pytest.approx(-math.log(p_now), rel=1e-3)
    assert pq["accuracy"] == float(stored.prediction is True)
    assert rt.learned == learned + 1 and len(rt.pending) == 0 and rt.labels["joined"] == 1


def test_inline_labels_are_predicted_before_they_are_learned():
    rt = runtime()
    rt.process_events([Event("first", {"x": 1.0}, True)])
    # Scored with the untrained model's 50/50 guess, although after learning it says more than 1/2.
    assert rt.prequential.values()["log_loss"] == pytest.approx(math.log(2), rel=1e-12)
    assert rt.model.predict_proba_batch([{"x": 1.0}])[0][True] > 0.5
    assert (rt.predicted, rt.learned) == (1, 1)


def test_labels_for_unknown_and_evicted_ids_are_counted_not_learned():
    rt = ModelRuntime("m", ModelConfig(learner=RIVER, pending={"max_entries": 3, "ttl_seconds": 100}))
    rt.process_events([Event(str(i), {"x": float(i)}) for i in range(5)])  # 0 and 1 evicted
    rt.process_labels([Label("0", True), Label("4", False), Label("nope", True), Label("4", False)])
    assert dict(rt.labels) == {"evicted": 1, "joined": 1, "unknown": 2}
    assert rt.learned == 1 and rt.pending.evicted_capacity == 2
    s = rt.status()
    assert s["events"] == {"predicted": 5, "learned": 1, "pending_labels": 2, "dead_letters": 0}
    assert s["pending"]["early_labels"] == 2  # "nope" and the second "4" wait for an event ...
    rt.tick(now=time.time() + 101, publish_interval=0.2)  # ... until the TTL, which drops them and says so
    s = rt.status()
    assert s["pending"]["early_labels"] == 0 and s["pending"]["early_labels_dropped"] == 2 and rt.learned == 1
    rt.process_labels([Label(f"never-{i}", True) for i in range(5)])  # capacity 3: the two oldest go
    assert rt.status()["pending"]["early_labels"] == 3 and rt.status()["pending"]["early_labels_dropped"] == 4


def test_a_label_that_comes_before_its_event_is_joined_when_the_event_arrives():
    rt = runtime()
    teach(rt, 20)
    rt.process_labels([Label("early", True)])
    p_before = rt.model.predict_proba_batch([{"x": 1.0}])[0][True]
    learned = rt.learned
    rt.process_events([Event("early", {"x": 1.0})])
    # Predicted first, by the model that had not seen this label, then learned.
    assert rt.prequential.values()["log_loss"] == pytest.approx(-math.log(p_before), rel=1e-12)
    assert rt.learned == learned + 1 and len(rt.pending) == 0
    assert rt.labels["unknown"] == 1 and rt.labels["joined"] == 1  # unknown on arrival, joined later


def test_a_new_snapshot_is_published_only_after_learning():
    rt = runtime()
    version, before = rt.snapshot()
    rt.tick(now=0.0, publish_interval=0.2)
    assert rt.snapshot()[0] == version  # nothing learned: nothing new to publish
    teach(rt, 10)
    rt.tick(now=1.0, publish_interval=0.2)
    version2, after = rt.snapshot()
    assert version2 == version + 1 and after is not before
    # The published snapshot is frozen: more learning does not change it.
    p = after.predict_proba_batch([{"x": 1.0}])
    teach(rt, 50, start=10)
    assert after.predict_proba_batch([{"x": 1.0}]) == p


def test_regression_window_metrics_are_mae_and_rmse():
    p = Prequential("regression", window=3)
    p.add_regression([1.0, 2.0, 3.0, 10.0], [1.0, 4.0, 0.0, 10.0])
    v = p.values()
    assert v["mae"] == pytest.approx((2 + 3 + 0) / 3) and v["rmse"] == pytest.approx(math.sqrt((4 + 9) / 3))


def test_state_dict_round_trips_through_pickle():
    import pickle

    rt = runtime()
    teach(rt, 30)
    rt.process_events([Event("p", {"x": 1.0})])
    clone = runtime()
    clone.load_state(pickle.loads(pickle.dumps(rt.state_dict())))
    assert clone.status()["events"] == rt.status()["events"]
    assert clone.model.predict_proba_batch([{"x": 0.3}]) == rt.model.predict_proba_batch([{"x": 0.3}])
    assert clone.pending.pop("p") is not None


def test_a_failing_monitor_never_costs_events_it_is_counted_and_the_loop_goes_on():
    rt = runtime()

    def broken(*args):
        raise TypeError("a monitor bug")

    rt.monitor.observe_predictions = broken
    rt.monitor.observe_outcomes = broken
    teach(rt, 10)
    rt.process_events([Event("p", {"x": 1.0})])
    rt.process_labels([Label("p", True)])
    s = rt.status()
    assert s["events"] == {"predicted": 11, "learned": 11, "pending_labels": 0, "dead_letters": 0}
    assert s["monitor_errors"] == 4  # the labelled batch twice (predictions, outcomes), the event once, the label once


def test_a_checkpoint_from_before_the_split_dead_letter_counts_still_loads():
    rt = runtime()
    teach(rt, 10)
    rt.count_dead_letter("not_json", event=True)
    rt.count_dead_letter("bad_type", event=False)
    state = rt.state_dict()
    old = {k: v for k, v in state.items() if k not in ("dead_letter_events", "early_dropped")}
    again = runtime()
    again.load_state(old)
    s = again.status()
    assert s["events"]["learned"] == 10 and s["events"]["dead_letters"] == 2  # what older versions reported
    assert s["pending"]["early_labels_dropped"] == 0
    again.load_state(state)
    assert again.status()["events"]["dead_letters"] == 1 and again.status()["labels"]["dead_letter"] == 1


def test_labels_the_model_cannot_learn_are_returned_by_position_and_the_others_are_joined_and_learned():
    capped = {"head": "softmax", "max_classes": 2, "optimizer": "adam", "lr_schedule": "constant"}
    rt = ModelRuntime("m", ModelConfig(learner=capped, prequential_window=100))
    assert rt.process_events([Event("a", {"x": -1.0}, 0), Event("b", {"x": 1.0}, 1)]) == {}
    rt.process_events([Event(f"p{i}", {"x": float(i)}) for i in range(4)])
    rejected = rt.process_labels([Label("nope", 1), Label("p0", 1), Label("p1", 2), Label("p2", 0), Label("p3", 3)])
    assert sorted(rejected) == [2, 4]  # positions in the labels given, the unknown id counted before them
    assert all("max_classes=2" in reason for reason in rejected.values())
    assert rt.labels["joined"] == 2 and rt.labels["unknown"] == 1
    assert rt.learned == 4 and rt.prequential.values()["n"] == 4  # rejected labels are neither learned nor scored
    assert sorted(rt.pending._entries) == ["p1", "p3"]  # their predictions wait for a corrected label
    assert rt.process_labels([Label("p1", 1)]) == {}
    assert rt.labels["joined"] == 3 and rt.learned == 5 and "p1" not in rt.pending._entries


@pytest.mark.timeout(60)
def test_a_diverged_learner_rejects_whole_batches_at_once_predicts_nothing_and_the_loop_goes_on():
    rt = ModelRuntime("m", ModelConfig(prequential_window=1000))  # the recommended learner
    emitted = []
    rt.emit = lambda topic, payload: emitted.append(payload)
    rt.process_events([Event(f"a{i}", {"x": float(i % 5), "c": "xy"[i % 2]}, i % 2) for i in range(256)])
    rt.process_events([Event(f"p{i}", {"x": float(i % 5)}) for i in range(8)])  # waiting for labels
    assert len(emitted) == 2
    next(rt.model._net.parameters()).data[0, 0] = float("nan")  # what a diverged backbone looks like
    calls = []
    for method in ("predict_with_proba_batch", "learn_batch"):
        def counted(*args, _run=getattr(rt.model, method), _name=method):
            calls.append(_name)
            return _run(*args)
        setattr(rt.model, method, counted)
    rejected = rt.process_events([Event(f"b{i}", {"x": float(i % 5), "c": "xy"[i % 2]}, i % 2) for i in range(256)])
    assert sorted(rejected) == list(range(256)) and all("diverged" in reason for reason in rejected.values())
    assert calls == ["predict_with_proba_batch"]  # no halving: no row is at fault, the model is
    assert rt.predicted == 264 and rt.learned == 256 and len(emitted) == 2  # nothing scored or published
    calls.clear()
    rejected = rt.process_labels([Label(f"p{i}", i % 2) for i in range(8)])
    assert sorted(rejected) == list(range(8)) and calls == ["learn_batch"]
    assert sorted(rt.pending._entries) == [f"p{i}" for i in range(8)]  # still there for a restored model
    assert rt.model.diagnostics()["diverged"] is True  # streamlearn_learner_diverged, which pages


def test_a_checkpoint_of_a_model_built_otherwise_is_kept_with_a_warning_or_refused_for_another_task(caplog):
    # a changed setting was ignored without a word: the restored model silently went on as before
    before = ModelRuntime("m", ModelConfig(learner={"hidden": 16}))
    state = before.state_dict()
    changed = ModelRuntime("m", ModelConfig(learner={"hidden": 8}))
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        changed.load_state(state)
    assert changed.model.hidden == 16  # what it learned goes on
    assert "models.m.learner: the checkpoint's model was built with {'hidden': 16}" in caplog.text
    # a regressor cannot go on as a classifier: the start is refused, naming the key
    with pytest.raises(ConfigError, match="models.m.task: regression, but its checkpoint holds a classification model"):
        ModelRuntime("m", ModelConfig(task="regression")).load_state(state)
