"""ModelMonitor end to end on lists of dicts, as the service drives it."""

import json
import pickle
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from bench.estimation import CLASSES, binary, multiclass
from drift import DriftEvent, ModelMonitor
from learners.protocol import ProbaRows

BASE = {"reference_size": 5000, "min_reference": 500, "background": False, "min_estimate_interval_seconds": 0.0}


class Stream:
    """Rows of the benchmark's synthetic data as the service sees them: ids, dicts, proba dicts."""

    def __init__(self, seed, labels=(0, 1)):
        self.rng = np.random.default_rng(seed)
        self.labels = labels
        self.n = 0

    def batch(self, n, shift=0.0, problem="binary"):
        if problem == "binary":
            x, p, y = binary(self.rng, n, shift)
            neg, pos = self.labels
            probas = [{neg: 1 - q, pos: q} for q in p]
            ys = [pos if v else neg for v in y]
        else:
            x, proba, y = multiclass(self.rng, n, shift)
            probas = [dict(zip(CLASSES, row, strict=True)) for row in proba]
            ys = list(y)
        preds = [max(d, key=d.get) for d in probas]
        ids = [f"e{self.n + i}" for i in range(n)]
        self.n += n
        return ids, x.to_dict("records"), probas, preds, ys


def warm(mon, stream, n=5000, **kw):
    """Labelled traffic: predicted with the label at once, then scored."""
    for _ in range(n // 500):
        ids, xs, probas, preds, ys = stream.batch(500, **kw)
        mon.observe_predictions(ids, xs, probas, preds, [True] * 500)
        mon.observe_outcomes(ids, xs, probas, preds, ys, [0.5] * 500)


def test_status_has_the_documented_shape_and_is_json():
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 200})
    s = mon.status()
    assert set(s) == {"drift", "estimated", "realized"}
    assert set(s["drift"]) == {"concept", "data", "prediction"}
    for kind in s["drift"].values():
        assert set(kind) == {"active", "detected_total", "detector", "last"}
        assert kind["active"] is False and kind["detected_total"] == 0 and kind["last"] is None
    assert s["estimated"] == {"cbpe": {}, "mcbpe": {}, "chunk": 0, "ts": None}
    assert s["realized"] == {"chunk": 0}
    stream = Stream(0)
    warm(mon, stream, 2000)
    ids, xs, probas, preds, ys = stream.batch(400)
    mon.observe_predictions(ids, xs, probas, preds, [False] * 400)
    mon.observe_outcomes(ids, xs, probas, preds, ys, [0.5] * 400)
    s = json.loads(json.dumps(mon.status()))
    assert s["estimated"]["chunk"] == 2 and s["realized"]["chunk"] == 2
    assert set(s["estimated"]["cbpe"]) == set(s["estimated"]["mcbpe"]) == {"accuracy", "f1", "roc_auc"}
    assert set(s["realized"]) == {"accuracy", "f1", "roc_auc", "chunk", "labelled"} and s["realized"]["labelled"] == 1.0


def test_injected_shift_with_labels_withheld_estimate_moves_toward_the_realized_value():
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 1000})
    stream = Stream(1)
    warm(mon, stream)
    before = mon.history  # no chunk yet: every event so far was labelled
    assert not before
    # the world moves; labels are withheld
    withheld = []
    for _ in range(4):
        batch = stream.batch(1000, shift=1.5)
        mon.observe_predictions(*batch[:4], [False] * 1000)
        withheld.append(batch)
    est = {n: (r["cbpe"]["accuracy"], r["mcbpe"]["accuracy"]) for n, r in mon.history.items()}
    assert len(est) == 4 and mon.status()["realized"] == {"chunk": 0}
    # the labels arrive
    for ids, xs, probas, preds, ys in withheld:
        mon.observe_outcomes(ids, xs, probas, preds, ys, [0.5] * 1000)
    realized = {n: r["realized"]["accuracy"] for n, r in mon.history.items()}
    assert mon.status()["realized"]["chunk"] == 4
    # 1000-row chunks: the realized accuracy itself scatters by ~0.014, so compare averages
    pre_shift = 0.78  # the reference accuracy of this model (bench/results/estimation.md)
    truth = np.mean(list(realized.values()))
    cbpe_err = np.mean([abs(c - realized[n]) for n, (c, _) in est.items()])
    mcbpe_err = np.mean([abs(m - realized[n]) for n, (_, m) in est.items()])
    assert truth < pre_shift - 0.03  # the shift really cost accuracy
    assert abs(np.mean([m for _, m in est.values()]) - truth) < 0.5 * (pre_shift - truth)  # moved toward it
    assert mcbpe_err < 0.5 * cbpe_err
    assert mcbpe_err < 0.025


def test_string_labels_map_positive_to_the_second_sorted_class_and_chunks_of_200_work():
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 200})
    stream = Stream(2, labels=("no", "yes"))
    warm(mon, stream, 2000)
    ids, xs, probas, preds, ys = stream.batch(200)
    mon.observe_predictions(ids, xs, probas, preds, [False] * 200)
    # labels trickle in: realized metrics wait for 90 % of them
    mon.observe_outcomes(ids[:150], xs[:150], probas[:150], preds[:150], ys[:150], [0.5] * 150)
    assert mon.status()["realized"]["chunk"] == 0
    mon.observe_outcomes(ids[150:], xs[150:], probas[150:], preds[150:], ys[150:], [0.5] * 50)
    r = mon.status()["realized"]
    assert r["chunk"] == 1
    assert r["f1"] == pytest.approx(skm.f1_score(ys, preds, pos_label="yes"))
    assert r["roc_auc"] == pytest.approx(skm.roc_auc_score([y == "yes" for y in ys], [p["yes"] for p in probas]))


def test_multiclass_classes_are_learned_from_outcomes():
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 200, "metrics": ("accuracy", "f1")})
    stream = Stream(3)
    warm(mon, stream, 2000, problem="multiclass")
    ids, xs, probas, preds, ys = stream.batch(400, problem="multiclass")
    mon.observe_predictions(ids, xs, probas, preds, [False] * 400)
    assert mon.history[2]["classes"] == sorted(CLASSES)
    mon.observe_outcomes(ids, xs, probas, preds, ys, [0.5] * 400)
    r = mon.status()["realized"]
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(ys[200:], preds[200:]))
    assert r["f1"] == pytest.approx(skm.f1_score(ys[200:], preds[200:], average="macro"))
    est = mon.status()["estimated"]["mcbpe"]["accuracy"]
    assert abs(est - r["accuracy"]) < 0.1


def test_labels_that_never_come_are_evicted_and_counted():
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 200, "max_open_chunks": 2})
    stream = Stream(4)
    warm(mon, stream, 1000)
    for _ in range(5):
        mon.observe_predictions(*stream.batch(200)[:4], [False] * 200)
    assert mon.counters["chunks_evicted"] == 3 and mon.counters["ids_evicted"] == 600
    assert len(mon._where) == 400  # bounded: only the open chunks' ids are kept


def test_a_chunk_whose_last_labels_never_come_is_realized_on_the_ones_that_did_when_it_leaves():
    # 20% of labels never come: 90% is never reached, but a chunk leaving the open set with at least
    # realized_min_fraction of its labels is realized on them (the demo's stream is like this)
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 200, "max_open_chunks": 1})
    stream = Stream(7)
    warm(mon, stream, 1000)
    ids, xs, probas, preds, ys = stream.batch(200)
    mon.observe_predictions(ids, xs, probas, preds, [False] * 200)
    mon.observe_outcomes(ids[:160], xs[:160], probas[:160], preds[:160], ys[:160], [0.5] * 160)
    assert mon.status()["realized"]["chunk"] == 0  # 80% < realized_fraction: the chunk waits
    few = stream.batch(200)
    mon.observe_predictions(*few[:4], [False] * 200)  # pushes the first chunk out (max_open_chunks 1)
    r = mon.status()["realized"]
    assert r["chunk"] == 1 and r["accuracy"] == pytest.approx(skm.accuracy_score(ys[:160], preds[:160]))
    assert r["labelled"] == 0.8  # on what share of the chunk it stands
    assert mon.counters["ids_evicted"] == 40 and mon.counters["chunks_evicted"] == 0
    mon.observe_outcomes(few[0][:40], few[1][:40], few[2][:40], few[3][:40], few[4][:40], [0.5] * 40)  # 20%
    mon.observe_predictions(*stream.batch(200)[:4], [False] * 200)
    assert mon.status()["realized"]["chunk"] == 1  # too few labels: dropped, not realized
    assert mon.counters["chunks_evicted"] == 1 and mon.counters["ids_evicted"] == 40 + 160


def test_a_chunk_whose_labels_stopped_coming_is_realized_without_waiting_for_its_eviction():
    # the demo's stream: labels 100 events late, 20% never; 90% is never reached, and waiting for
    # the eviction (max_open_chunks 20) left the realized metrics 20 chunks behind
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 200, "realized_quiet_rows": 400})
    stream = Stream(8)
    warm(mon, stream, 1000)
    late = []
    for _ in range(6):
        ids, xs, probas, preds, ys = stream.batch(200)
        mon.observe_predictions(ids, xs, probas, preds, [False] * 200)
        if late:  # the labels of the batch before, but the last fifth of them
            mon.observe_outcomes(*[part[:160] for part in late], [0.5] * 160)
        late = (ids, xs, probas, preds, ys)
    r = mon.status()["realized"]
    assert r["chunk"] >= 2 and r["labelled"] == 0.8  # realized, 400 predictions after its last label
    assert mon.counters["chunks_realized"] >= 2 and mon.counters["chunks_evicted"] == 0


def test_the_newest_chunk_a_burst_left_without_an_estimate_gets_one_when_the_interval_allows():
    # a burst closed chunks faster than one estimate a second: the last estimate stayed on an
    # older chunk for good once the stream went quiet (an accuracy alert could fire on it)
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 200, "min_estimate_interval_seconds": 0.3})
    stream = Stream(9)
    warm(mon, stream, 1000)
    for _ in range(4):
        mon.observe_predictions(*stream.batch(200)[:4], [False] * 200)
    assert mon.status()["estimated"]["chunk"] == 1 and mon.counters["estimation_skipped"] == 3
    time.sleep(0.35)
    assert mon.status()["estimated"]["chunk"] == 4  # the newest, not the skipped ones in between
    assert mon.status()["estimated"]["chunk"] == 4 and 3 not in mon.history and 2 not in mon.history


def test_a_chunk_also_closes_on_its_time_limit():
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 10_000, "chunk_max_seconds": 0.0, "min_chunk": 50})
    stream = Stream(5)
    warm(mon, stream, 1000)
    mon.observe_predictions(*stream.batch(30)[:4], [False] * 30)
    assert mon.status()["estimated"]["chunk"] == 0  # fewer than min_chunk rows: keep waiting
    mon.observe_predictions(*stream.batch(30)[:4], [False] * 30)
    assert mon.status()["estimated"]["chunk"] == 1 and mon.history[1]["rows"] == 60


def test_concept_and_data_drift_are_events_and_status():
    mon = ModelMonitor("classification", {**BASE, "data_drift": {"reference_size": 2000, "window_size": 1000,
                                                                  "check_every": 1000}})
    stream = Stream(6)
    warm(mon, stream, 4000)
    events = []
    for _ in range(8):  # a shift of x2 (data drift) that also raises the error (concept-like)
        ids, xs, probas, preds, ys = stream.batch(500, shift=2.5)
        flipped = [p if i % 3 else y for i, (p, y) in enumerate(zip(preds, ys, strict=True))]
        events += mon.observe_predictions(ids, xs, probas, preds, [True] * 500)
        events += mon.observe_outcomes(ids, xs, probas, preds, [
            ("wrong" if i % 2 else y) for i, y in enumerate(flipped)], [1.0] * 500)
    kinds = {e.kind for e in events}
    assert {"concept", "data"} <= kinds
    assert all(isinstance(e, DriftEvent) and e.magnitude >= 0 for e in events)
    json.dumps([e.to_dict() for e in events])
    s = mon.status()["drift"]
    assert s["concept"]["active"] and s["concept"]["detected_total"] >= 1 and s["concept"]["detector"] == "adwin"
    assert s["data"]["active"] and "x2" in s["data"]["last"]["evidence"]["columns"]


def test_estimates_are_rate_limited_and_skips_counted():
    mon = ModelMonitor("classification", {**BASE, "chunk_size": 200, "min_estimate_interval_seconds": 3600.0})
    stream = Stream(9)
    warm(mon, stream, 1000)
    for _ in range(3):
        mon.observe_predictions(*stream.batch(200)[:4], [False] * 200)
    assert mon.counters["chunks"] == 3 and mon.counters["estimation_skipped"] == 2
    assert mon.status()["estimated"]["chunk"] == 1


def test_pickle_round_trip_with_an_estimate_in_flight():
    mon = ModelMonitor("classification", {**BASE, "background": True, "chunk_size": 500})
    stream = Stream(7)
    warm(mon, stream, 2000)
    ids, xs, probas, preds, ys = stream.batch(500)
    mon.observe_predictions(ids, xs, probas, preds, [False] * 500)
    restored = pickle.loads(pickle.dumps(mon))  # finishes the pending estimate first
    assert restored.status()["estimated"]["chunk"] == 1
    restored.observe_outcomes(ids, xs, probas, preds, ys, [0.5] * 500)
    assert restored.status()["realized"]["chunk"] == 1
    batch = stream.batch(500)
    restored.observe_predictions(*batch[:4], [False] * 500)  # a fresh worker thread after restore
    restored.flush()
    assert restored.status()["estimated"]["chunk"] == 2


def test_regression_watches_losses_and_skips_estimation():
    mon = ModelMonitor("regression", {"background": False})
    rng = np.random.default_rng(8)
    events = []
    for k in range(20):
        xs = [{"a": float(v)} for v in rng.normal(size=500)]
        ids = [f"r{k}-{i}" for i in range(500)]
        preds = [0.0] * 500
        losses = np.abs(rng.normal(size=500)) * (1.0 if k < 10 else 3.0)
        mon.observe_predictions(ids, xs, None, preds, [True] * 500)
        events += mon.observe_outcomes(ids, xs, None, preds, [0.0] * 500, losses.tolist())
    assert [e.kind for e in events] == ["concept"]
    assert events[0].magnitude == pytest.approx(2 * np.sqrt(2 / np.pi), rel=0.25)  # E|N| rises 3x
    assert mon.status()["estimated"]["chunk"] == 0


def test_bad_configuration_and_inputs_are_named():
    with pytest.raises(ValueError, match="unknown keys \\['chunk'\\]"):
        ModelMonitor("classification", {"chunk": 5})
    with pytest.raises(ValueError, match="config.detector: 'ddm' needs 0/1 errors"):
        ModelMonitor("regression", {"detector": "ddm"})
    with pytest.raises(ValueError, match="task"):
        ModelMonitor("ranking")
    with pytest.raises(ValueError, match="config.data_drift: .*windw"):
        ModelMonitor("classification", {"data_drift": {"windw": 10}})
    with pytest.raises(ValueError, match="config.mcbpe: domain_classifier"):
        ModelMonitor("classification", {"mcbpe": {"domain_classifier": "svm"}})
    with pytest.raises(ValueError, match="config.detector / detector_params: .*deltaa"):
        ModelMonitor("classification", {"detector_params": {"deltaa": 0.1}})
    mon = ModelMonitor("classification")
    with pytest.raises(ValueError, match="observe_predictions: .* equal lengths"):
        mon.observe_predictions(["a"], [{}], [{0: 1.0}], [0, 1], [True])


def test_proba_matrix_columns_follow_the_class_registry_whatever_the_dict_order():
    mon = ModelMonitor("classification", BASE)
    first = mon._proba_matrix([{"a": 0.5, "b": 0.5}, {"b": 0.1, "a": 0.9}])  # registers a, b
    np.testing.assert_array_equal(first, [[0.5, 0.5], [0.9, 0.1]])
    uniform = [{"b": 0.2, "a": 0.8}, {"a": 0.3, "b": 0.7}]  # every class in every row: the fast path
    np.testing.assert_array_equal(mon._proba_matrix(uniform), [[0.8, 0.2], [0.3, 0.7]])
    # a row with a new class (and one without "b"), rows without probabilities: the general path
    mixed = mon._proba_matrix([{"a": 0.6, "c": 0.4}, None, {"a": 1.0, "b": 0.0}])
    np.testing.assert_array_equal(mixed, [[0.6, 0.0, 0.4], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert mon._col == {"a": 0, "b": 1, "c": 2}
    np.testing.assert_array_equal(mon._proba_matrix([{"c": 1.0, "a": 0.0, "b": 0.0}]), [[0.0, 0.0, 1.0]])


_proba_values = st.one_of(st.floats(0, 1), st.integers(0, 1), st.booleans(),
                         st.floats(0, 1).map(np.float32), st.floats(0, 1).map(np.float64))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_proba_values, min_size=3, max_size=3), min_size=1, max_size=20), st.randoms())
def test_proba_matrix_fast_path_gives_the_floats_of_the_row_by_row_path(rows, rnd):
    # the usual batch is read a class at a time; it must be the general path's matrix, bit for bit
    labels = ["b", 0, True]
    mon = ModelMonitor("classification", BASE)
    mon._proba_matrix([dict(zip(labels, (0.2, 0.3, 0.5), strict=True))])  # registers the classes
    probas = []
    for row in rows:
        items = list(zip(labels, row, strict=True))
        rnd.shuffle(items)  # any key order
        probas.append(dict(items))
    fast, by_rows = mon._proba_matrix(probas), mon._proba_matrix_rows(probas)
    assert fast.dtype == by_rows.dtype and fast.shape == by_rows.shape == (len(rows), 3)
    assert fast.tobytes() == by_rows.tobytes()


_labels = st.one_of(st.integers(-2, 2), st.booleans(), st.sampled_from(["0", "1", "yes"]),
                   st.sampled_from([0.0, -0.0, 1.0]), st.none())


@settings(max_examples=300, deadline=None)
@given(st.lists(_labels, max_size=5), st.lists(_labels, min_size=1, max_size=12))
def test_prediction_strings_are_str_of_each_prediction(earlier, preds):
    # one string per class when types allow; 1 vs True, 0.0 vs -0.0 and None must still print as str() does
    mon = ModelMonitor("classification", BASE)
    mon._pred_cols(earlier)  # classes registered before, maybe under an equal label of another type
    got = mon._pred_strings(preds, mon._pred_cols(preds))
    assert got.dtype == object and got.tolist() == [str(p) for p in preds]


def test_prediction_columns_register_new_classes_and_keep_none_as_no_prediction():
    mon = ModelMonitor("classification", BASE)
    assert mon._pred_cols(["x", None, "y", "x", "y"]).tolist() == [0, -1, 1, 0, 1]
    assert mon._pred_cols([None, "y", "z"]).tolist() == [-1, 1, 2]
    assert None not in mon._col


def test_a_learners_probability_matrix_reads_as_its_dicts():
    """Batches whose probabilities come with the learner's matrix (ProbaRows) give the monitor
    exactly what the dicts alone give, whatever the order of the learner's classes."""
    plain = ModelMonitor("classification", {**BASE, "chunk_size": 200, "metrics": ("accuracy", "f1")})
    shared = ModelMonitor("classification", {**BASE, "chunk_size": 200, "metrics": ("accuracy", "f1")})
    stream = Stream(5)
    for i in range(8):
        ids, xs, probas, preds, ys = stream.batch(500, shift=0.3 * (i >= 4), problem="multiclass")
        # (the first batch's order is the one both register: a monitor's columns follow what it saw first)
        classes = list(probas[0]) if i % 2 == 0 else list(reversed(list(probas[0])))
        rows = ProbaRows(np.array([[p[c] for c in classes] for p in probas]), classes)
        labelled = [j % 3 != 0 for j in range(500)]
        for mon, batch in ((plain, probas), (shared, rows)):
            mon.observe_predictions(ids, xs, batch, preds, labelled)
            mon.observe_outcomes(ids, xs, batch, preds, ys, [0.5] * 500)
        np.testing.assert_array_equal(shared._proba_matrix(rows), plain._proba_matrix(probas))
    assert _untimed(shared.status()) == _untimed(plain.status())


def _untimed(value):
    """A status without its wall-clock times (the two monitors ran a moment apart)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "ts" and not k.endswith("_ts")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value
