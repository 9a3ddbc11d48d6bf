"""``monitor: {"enabled": false}`` in a model's config: the runtime runs without drift detection or
performance estimation, and its status keeps the documented shape."""

import pickle

import pytest

from drift.monitor import ModelMonitor, NullMonitor, build_monitor
from service.codec import Event, Label
from service.config import ModelConfig
from service.runtime import ModelRuntime

RIVER = {"learner": "river", "estimator": "linear_model.LogisticRegression"}
# small chunks, estimation on the caller's thread: an enabled monitor estimates within this test
SMALL = {"chunk_size": 100, "min_chunk": 10, "reference_size": 400, "min_reference": 100,
         "background": False, "min_estimate_interval_seconds": 0}


def runtime(monitor: dict) -> ModelRuntime:
    return ModelRuntime("m", ModelConfig(learner=RIVER, monitor=monitor))


def feed(rt: ModelRuntime) -> None:
    """400 labelled events, then 200 unlabelled ones whose labels come later: two analysis chunks."""
    rt.process_events([Event(f"l{i}", {"x": (i % 7) - 3.0}, (i % 7) > 3) for i in range(400)])
    rt.process_events([Event(f"u{i}", {"x": (i % 7) - 3.0}) for i in range(200)])
    rt.process_labels([Label(f"u{i}", (i % 7) > 3) for i in range(200)])
    rt.monitor.flush()
    rt.tick(now=1e12, publish_interval=0.0)


def test_a_disabled_monitor_observes_nothing_and_keeps_the_status_shape():
    on, off = runtime(SMALL), runtime({"enabled": False, **SMALL})
    assert isinstance(on.monitor, ModelMonitor) and isinstance(off.monitor, NullMonitor)
    feed(on)
    feed(off)
    s_on, s_off = on.status(), off.status()
    # the same events were learned either way; only the monitoring differs
    assert s_on["events"] == s_off["events"] == {"predicted": 600, "learned": 600, "pending_labels": 0,
                                                 "dead_letters": 0}
    assert s_on["estimated"]["chunk"] == 2 and s_on["estimated"]["mcbpe"]["accuracy"] > 0.5
    assert s_on["realized"]["chunk"] == 2
    assert s_off["estimated"] == {"cbpe": {}, "mcbpe": {}, "chunk": 0, "ts": None}
    assert s_off["realized"] == {"chunk": 0}
    assert set(s_off["drift"]) == set(s_on["drift"]) == {"concept", "data", "prediction"}
    for kind, d in s_off["drift"].items():
        assert set(d) == set(s_on["drift"][kind])
        assert d == {"active": False, "detected_total": 0, "detector": "off", "last": None}
    point = off.history()["points"][-1]
    assert point["estimated_accuracy_mcbpe"] is None and point["realized_accuracy"] is None


def test_the_configuration_wins_over_a_checkpointed_monitor():
    on = runtime(SMALL)
    feed(on)
    state = pickle.loads(pickle.dumps(on.state_dict()))
    off = runtime({"enabled": False})
    off.load_state(state)
    assert isinstance(off.monitor, NullMonitor) and off.learned == 600
    back = runtime(SMALL)
    back.load_state(pickle.loads(pickle.dumps(off.state_dict())))
    assert isinstance(back.monitor, ModelMonitor) and back.status()["estimated"]["chunk"] == 0
    again = runtime(SMALL)
    again.load_state(pickle.loads(pickle.dumps(state)))  # same setting: the monitor is restored
    assert again.status()["estimated"]["chunk"] == 2


@pytest.mark.parametrize(("config", "message"), [
    ({"enabled": "no"}, "config.enabled: must be true or false"),
    ({"enabled": False, "chunk_sise": 10}, "unknown keys ['chunk_sise']"),
    ({"enabled": True, "chunk_sise": 10}, "unknown keys ['chunk_sise']"),
])
def test_bad_monitor_settings_are_named(config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_monitor("classification", config)
