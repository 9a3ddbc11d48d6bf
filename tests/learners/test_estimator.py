"""The recommended learner as a River estimator and as the service's StreamModel."""

from __future__ import annotations

import copy
import itertools
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from river import checks, datasets, evaluate, metrics
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from learners import (
    KalmanClassifier,
    KalmanRegressor,
    ModelUnavailable,
    RowsRejected,
    StreamModel,
    as_stream_model,
    build_model,
)
from learners.estimator import LearnerDiverged
from learners.kalman import log_probit_softmax_logits
from learners.protocol import ModelDiverged, argmax_label, score

SMALL = {"hidden": 8, "max_numeric": 16, "n_buckets": 32}


def _river_checks():
    for cls in (KalmanClassifier, KalmanRegressor):
        model = cls(**SMALL)
        for check in checks.yield_checks(model):
            if check.__name__ in model._unit_test_skips():
                continue
            dataset = getattr(check, "keywords", {}).get("dataset")
            label = f"{cls.__name__}-{check.__name__}-{type(dataset).__name__ if dataset is not None else ''}"
            yield pytest.param(cls, check, id=label)


@pytest.mark.parametrize(("cls", "check"), list(_river_checks()))
def test_river_estimator_checks(cls, check):
    params = dict(SMALL)
    if check.__name__ == "check_bounded_memory_growth":
        # 2,000 learn_one calls per dataset: the linear Kalman configuration has every structure
        # that can grow with the stream (encoder, classes, head) at a third of the time; the
        # backbone's parameters have a fixed size.
        params["depth"] = 0
    check(cls(**params))


def test_skipped_river_check_is_only_the_per_row_equivalence():
    assert KalmanClassifier()._unit_test_skips() == {"check_learn_many_matches_learn_one"}


def test_progressive_val_score_beats_the_majority_class():
    model = build_model({"task": "classification", **SMALL})
    acc = evaluate.progressive_val_score(datasets.Phishing(), model, metrics.Accuracy())
    assert acc.get() > 0.85  # majority class is 56%


def test_regression_progressive_val_score_beats_predicting_the_last_value_mean():
    model = build_model({"task": "regression", **SMALL})
    mae = evaluate.progressive_val_score(datasets.TrumpApproval(), model, metrics.MAE())
    assert mae.get() < 2.0  # the target's mean absolute deviation is ~4


def test_clone_and_pickle_keep_predictions():
    model = KalmanClassifier(**SMALL)
    stream = list(itertools.islice(datasets.Phishing(), 200))
    for x, y in stream[:150]:
        model.learn_one(x, y)
    restored = pickle.loads(pickle.dumps(model))
    for x, _ in stream[150:]:
        assert restored.predict_proba_one(x) == pytest.approx(model.predict_proba_one(x))
    fresh = model.clone()
    assert fresh.predict_proba_one(stream[0][0]) == {}
    assert fresh._get_params() == model._get_params()


def test_learning_in_inference_mode_leaves_normal_trainable_state():
    # the Kalman path learns in inference mode (no autograd there); what persists must not be
    # inference tensors, so a restored model keeps learning the same way and autograd still works
    stream = list(itertools.islice(datasets.Phishing(), 300))
    model = KalmanClassifier(**SMALL)
    for i in range(0, 200, 50):
        model.learn_many(pd.DataFrame([x for x, _ in stream[i : i + 50]]), pd.Series([y for _, y in stream[i : i + 50]]))
    net, optim = model._net, model._optim
    assert not any(p.is_inference() or p.grad.is_inference() for p in net.parameters())
    assert not any(v.is_inference() for st in optim.state.values() for v in st.values() if torch.is_tensor(v))
    restored = pickle.loads(pickle.dumps(model))
    for x, y in stream[200:260]:
        model.learn_one(x, y)
        restored.learn_one(x, y)
    for x, _ in stream[260:]:
        assert restored.predict_proba_one(x) == pytest.approx(model.predict_proba_one(x))
    net["backbone"](torch.randn(3, model._encoder.width)).sum().backward()


def test_labels_of_any_hashable_type_and_new_classes_mid_stream():
    model = KalmanClassifier(**SMALL)
    rng = np.random.default_rng(0)
    labels = [False, 3, "cat", ("tuple", 1)]
    for i in range(400):
        k = min(i // 100, 3)  # a new class every 100 events
        y = labels[int(rng.integers(0, k + 1))]
        model.learn_one({"x": float(labels.index(y)) + 0.1 * rng.normal(), "c": str(y)}, y)
    proba = model.predict_proba_one({"x": 2.0, "c": "cat"})
    assert set(proba) == set(labels)
    assert math.isclose(sum(proba.values()), 1.0, rel_tol=1e-9)
    assert model.predict_one({"x": 2.0, "c": "cat"}) == "cat"
    assert model.predict_one({"x": 3.0, "c": str(("tuple", 1))}) == ("tuple", 1)


def test_labels_with_probabilities_are_the_most_probable_class_of_each_row():
    model = KalmanClassifier(**SMALL)
    assert score(model, [{"x": 1.0}, {}]) == ([None, None], [{}, {}])  # no class seen yet
    rng = np.random.default_rng(1)
    xs = [{"x": float(v), "c": "abc"[int(v) % 3]} for v in rng.normal(0, 2, 300)]
    model.learn_batch(xs, ["neg" if x["x"] < 0 else "pos" if x["x"] < 2 else "big" for x in xs])
    probas = model.predict_proba_batch(xs)
    looped = [argmax_label(p) for p in probas]
    assert len(set(looped)) == 3
    for predictor in (model, model.snapshot()):
        assert predictor.predict_with_proba_batch(xs) == (looped, probas)
        assert score(predictor, xs) == (looped, probas) and predictor.predict_batch(xs) == looped


def test_mini_batch_api_returns_pandas_aligned_with_the_input_index():
    model = KalmanClassifier(**SMALL)
    X = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0] * 10, "b": ["u", "v", "u", "v"] * 10}, index=range(100, 140))
    y = pd.Series([0, 1, 0, 1] * 10, index=X.index)
    model.learn_many(X, y)
    proba = model.predict_proba_many(X)
    assert list(proba.index) == list(X.index) and list(proba.columns) == [0, 1]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    pred = model.predict_many(X)
    assert list(pred.index) == list(X.index)
    assert pred.tolist() == [max(model.predict_proba_one(r), key=model.predict_proba_one(r).get)
                             for r in X.to_dict("records")]
    reg = KalmanRegressor(**SMALL)
    reg.learn_many(X[["a"]], X["a"] * 2.0)
    assert list(reg.predict_many(X[["a"]]).index) == list(X.index)


def test_stream_model_protocol_snapshot_is_frozen_and_diagnostics():
    model = build_model({"task": "classification", **SMALL})
    assert as_stream_model(model) is model and isinstance(model, StreamModel)
    stream = list(itertools.islice(datasets.Phishing(), 300))
    xs, ys = [x for x, _ in stream], [y for _, y in stream]
    model.learn_batch(xs[:100], ys[:100])
    snap = model.snapshot()
    before = snap.predict_proba_batch(xs[200:])
    assert before == model.predict_proba_batch(xs[200:])
    model.learn_batch(xs[100:200], ys[100:200])
    assert snap.predict_proba_batch(xs[200:]) == before  # later learning does not reach the snapshot
    assert model.predict_proba_batch(xs[200:]) != before
    assert pickle.loads(pickle.dumps(snap)).predict_batch(xs[200:]) == snap.predict_batch(xs[200:])
    diag = model.diagnostics()
    assert set(diag) >= {"learning_rate", "kalman_gamma", "diverged"}
    assert diag["learning_rate"] > 0.0 and 0.9 <= diag["kalman_gamma"] <= 1.0 and diag["diverged"] is False
    model.notify_drift("concept", 0.5)  # reaches the schedule without error
    model._net["backbone"].mlp[0].weight.data[0, 0] = float("nan")
    assert model.diagnostics()["diverged"] is True


def test_a_hundred_categories_are_told_apart_by_the_vocabulary_not_by_hashing():
    # the label is a coin flip per category: only a bucket per category can learn it exactly; with
    # 100 categories hashed into 128 buckets over half share theirs with another
    rng = np.random.default_rng(0)
    label = rng.random(100) < 0.5
    cats, noise = rng.integers(0, 100, size=12_000), rng.normal(size=12_000)
    xs, ys = [{"product": f"p{c}", "noise": float(z)} for c, z in zip(cats, noise, strict=True)], label[cats].tolist()
    accuracy = {}
    for categories in ("vocabulary", "hash"):
        model = KalmanClassifier(categories=categories, device="cpu")
        hits = []
        for i in range(0, len(xs), 64):
            hits += [p == y for p, y in zip(model.predict_batch(xs[i : i + 64]), ys[i : i + 64], strict=True)]
            model.learn_batch(xs[i : i + 64], ys[i : i + 64])
        accuracy[categories] = sum(hits[-4000:]) / 4000
    assert accuracy["vocabulary"] >= 0.99
    assert accuracy["hash"] < 0.97  # what the vocabulary is for
    old = KalmanClassifier(**SMALL)
    del old.categories  # pickled before the parameter existed: its encoder hashes
    assert old.categories == "hash" and old.clone()._encoder.categories == "hash"


@pytest.mark.timeout(30)
def test_a_diverged_learner_refuses_to_learn_and_to_predict_and_says_so():
    model = KalmanClassifier(**SMALL)
    xs, ys = [{"a": float(i % 5), "c": "xy"[i % 2]} for i in range(64)], [i % 2 for i in range(64)]
    model.learn_batch(xs, ys)
    snap = model.snapshot()
    model._net["backbone"].mlp[0].weight.data[0, 0] = float("nan")
    for predict in (model.predict_proba_batch, model.predict_batch, model.snapshot().predict_proba_batch):
        with pytest.raises(LearnerDiverged, match="diverged"):
            predict(xs)  # not NaN probabilities and an arbitrary label
    assert set(snap.predict_batch(xs)) <= {0, 1}  # a snapshot taken before is a copy: untouched
    with pytest.raises(FloatingPointError, match="diverged"):
        model.learn_batch(xs, ys)  # found by the Kalman head, which met non-finite features
    state = pickle.dumps(model)
    with pytest.raises(LearnerDiverged, match="diverged"):
        model.learn_batch(xs, ys)  # refused at once now: nothing changes
    assert pickle.dumps(model) == state
    assert model.diagnostics()["diverged"] is True
    assert issubclass(LearnerDiverged, ModelUnavailable)  # the service takes it as "no row is at fault"


def test_outputs_that_are_not_finite_for_some_rows_only_are_an_error_not_nan():
    model = KalmanRegressor(**SMALL)
    xs = [{"a": float(i % 5)} for i in range(32)]
    model.learn_batch(xs, [float(i % 5) for i in range(32)])
    model._kalman.M = torch.full_like(model._kalman.M, 1e308)  # finite weights whose predictions overflow
    with pytest.raises(FloatingPointError, match="not finite for these features") as raised:
        model.predict_batch(xs)
    assert not isinstance(raised.value, ModelUnavailable)  # the service looks for the rows at fault


def test_predict_does_not_change_the_model():
    model = KalmanClassifier(**SMALL)
    for x, y in itertools.islice(datasets.Phishing(), 50):
        model.learn_one(x, y)
    state = pickle.dumps(model)
    model.predict_proba_batch([{"brand_new_key": 1.0, "other": "text"}])
    assert pickle.dumps(model) == state


@pytest.mark.parametrize("cls", [KalmanClassifier, KalmanRegressor])
def test_learning_the_rows_just_predicted_reuses_their_features_and_learns_the_same(cls, monkeypatch):
    # prequential: predict a batch, then learn it. The first chunk's features (and the backward
    # pass's tape) come from the prediction instead of a second forward; the learner must end
    # where one that learns copies of the rows (nothing to reuse) ends, up to float rounding
    rng = np.random.default_rng(0)
    batches = [[{"a": float(v), "b": float(w), "c": f"k{int(v > 0)}"} for v, w in rng.normal(size=(100, 2))]
               for _ in range(8)]
    targets = [[(x["a"] > x["b"]) if cls is KalmanClassifier else x["a"] - 2 * x["b"] for x in xs] for xs in batches]
    reusing, plain = cls(**SMALL, grad_batch=32), cls(**SMALL, grad_batch=32)
    forwards = {"reusing": 0, "plain": 0}
    for name, model in (("reusing", reusing), ("plain", plain)):
        backbone = model._net["backbone"]
        original = backbone.forward_for_backward

        def counted(x, _name=name, _original=original):
            forwards[_name] += 1
            return _original(x)

        monkeypatch.setattr(backbone, "forward_for_backward", counted)
    for xs, ys in zip(batches, targets, strict=True):
        reusing.predict_batch(xs)
        reusing.learn_batch(xs, ys)
        plain.predict_batch(xs)
        plain.learn_batch(copy.deepcopy(xs), ys)  # other dict objects: read and computed afresh
    # 100 rows in chunks of 32: 4 forwards to learn, 1 to predict; the first chunk's is reused,
    # but for the first batch (its keys were unknown when it was predicted)
    assert forwards == {"reusing": 5 + 7 * 4, "plain": 8 * 5}
    for p, q in zip(reusing._net.parameters(), plain._net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reusing._kalman.M, plain._kalman.M, rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    reusing.predict_batch(batches[0])
    assert "_predicted_features" in reusing.__dict__
    assert "_predicted_features" not in pickle.loads(pickle.dumps(reusing)).__dict__  # a cache, not state


def test_optimizer_step_hooks_still_run_when_the_learner_skips_torchs_step_wrapper():
    # the learner calls the optimizer's step without torch's wrapper while no hook is registered
    # (it costs a quarter of a UPGD step); hooks registered later, global or the optimizer's own,
    # must run all the same, and both paths must learn the same
    rng = np.random.default_rng(1)
    xs = [{"a": float(v), "b": float(w)} for v, w in rng.normal(size=(64, 2))]
    ys = [x["a"] > x["b"] for x in xs]
    hooked, plain = KalmanClassifier(**SMALL, grad_batch=16), KalmanClassifier(**SMALL, grad_batch=16)
    calls = {"global_pre": 0, "global_post": 0, "own_pre": 0, "own_post": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1
        return hook

    plain.learn_batch(xs, ys)
    hooked.learn_batch(xs, ys)  # builds the optimizer; no hook yet
    assert calls == dict.fromkeys(calls, 0)
    handles = [register_optimizer_step_pre_hook(count("global_pre")),
               register_optimizer_step_post_hook(count("global_post"))]
    try:
        hooked.learn_batch(xs, ys)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"global_pre": 4, "global_post": 4, "own_pre": 0, "own_post": 0}
    handles = [hooked._optim.register_step_pre_hook(count("own_pre")),
               hooked._optim.register_step_post_hook(count("own_post"))]
    hooked.learn_batch(xs, ys)
    assert calls == {"global_pre": 4, "global_post": 4, "own_pre": 4, "own_post": 4}
    for handle in handles:
        handle.remove()
    hooked.learn_batch(xs, ys)
    assert calls["own_pre"] == 4
    for _ in range(3):
        plain.learn_batch(xs, ys)
    for p, q in zip(hooked._net.parameters(), plain._net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_learn_batch_validates_lengths_and_targets():
    with pytest.raises(ValueError, match="ys"):
        KalmanClassifier(**SMALL).learn_batch([{"a": 1.0}], [1, 2])
    with pytest.raises(ValueError, match="y: regression targets"):
        KalmanRegressor(**SMALL).learn_batch([{"a": 1.0}], [float("nan")])
    model = KalmanClassifier(**SMALL)
    state = pickle.dumps(model)
    for bad, message in [(None, "missing"), (float("nan"), "missing"), (["a"], "hashable")]:
        with pytest.raises(ValueError, match=f"y: .*{message}"):
            model.learn_batch([{"a": 1.0}, {"a": 2.0}], ["fine", bad])
    assert pickle.dumps(model) == state  # a rejected batch changes nothing
    capped = KalmanClassifier(**SMALL, head="softmax", max_classes=2)
    capped.learn_batch([{"a": 1.0}], ["x"])
    state = pickle.dumps(capped)
    with pytest.raises(ValueError, match="max_classes=2"):
        capped.learn_batch([{"a": 1.0}, {"a": 2.0}], ["y", "z"])  # the second new class is one too many
    assert pickle.dumps(capped) == state  # not even the first of them was added
    # the Kalman head too: a stream whose labels are ids would grow it (and the monitor) without end
    kalman = KalmanClassifier(**SMALL, max_classes=3)
    kalman.learn_batch([{"a": 1.0}] * 3, ["x", "y", "z"])
    state = pickle.dumps(kalman)
    with pytest.raises(ValueError, match="more than max_classes=3 classes"):
        kalman.learn_batch([{"a": 1.0}], ["w"])
    assert pickle.dumps(kalman) == state


def test_the_river_adapter_learns_around_a_row_it_cannot_take_and_names_it():
    from river import linear_model

    model = as_stream_model(linear_model.LogisticRegression())
    xs = [{"x": 1.0}, {"x": "one"}, {"x": -1.0}, {"x": "minus one"}]
    with pytest.raises(RowsRejected) as caught:
        model.learn_batch(xs, [True, True, False, False])
    assert sorted(caught.value.rows) == [1, 3]
    assert caught.value.rows[1].startswith("TypeError: ")
    reference = linear_model.LogisticRegression()
    for x, y in [({"x": 1.0}, True), ({"x": -1.0}, False)]:
        reference.learn_one(x, y)
    assert model.estimator.weights == reference.weights  # the other rows were learned, once each


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_river_adapter_raises_rather_than_answer_nan(task):
    from river import linear_model

    estimator = linear_model.LogisticRegression() if task == "classification" else linear_model.LinearRegression()
    model = as_stream_model(estimator)
    model.learn_batch([{"x": 1.0}, {"x": -1.0}], [True, False] if task == "classification" else [1.0, -1.0])
    assert len(model.predict_batch([{"x": 2.0}])) == 1
    estimator._weights["x"] = float("nan")  # (the public `weights` is a copy) a model that blew up
    with pytest.raises(FloatingPointError, match="not finite"):
        model.predict_batch([{"x": 2.0}])
    with pytest.raises(FloatingPointError, match="not finite"):
        model.snapshot().predict_batch([{"x": 2.0}])


def test_a_river_binary_classifier_answers_with_the_labels_it_learned():
    # River's binary models answer True/False: for labels 1/0 that printed "true"/"false" in JSON
    model = as_stream_model(build_model({"task": "classification", "learner": "river"}))
    model.learn_batch([{"x": 1.0}, {"x": -1.0}] * 10, [1, 0] * 10)
    for predictor in (model, model.snapshot(), pickle.loads(pickle.dumps(model))):
        (proba,) = predictor.predict_proba_batch([{"x": 1.0}])
        assert [type(k) for k in proba] == [int, int] and set(proba) == {0, 1}
        assert predictor.predict_batch([{"x": 1.0}]) == [1] and type(predictor.predict_batch([{"x": 1.0}])[0]) is int
    assert model.predict_proba_batch([]) == []
    booleans = as_stream_model(build_model({"task": "classification", "learner": "river"}))
    booleans.learn_batch([{"x": 1.0}, {"x": -1.0}], [True, False])
    assert all(type(k) is bool for k in booleans.predict_proba_batch([{"x": 1.0}])[0])


def test_a_river_model_whose_state_is_not_finite_says_it_diverged():
    from river import linear_model

    estimator = linear_model.LogisticRegression()
    model = as_stream_model(estimator)
    model.learn_batch([{"x": 1.0}, {"x": -1.0}], [True, False])
    estimator.intercept = float("nan")  # even a row with no features is NaN: the model is gone
    with pytest.raises(ModelDiverged, match="River model diverged"):
        model.predict_batch([{"x": 2.0}])
    assert model.diagnostics()["diverged"] is True  # streamlearn_learner_diverged pages
    with pytest.raises(ModelDiverged):
        model.learn_batch([{"x": 2.0}], [True])  # refused whole, as the Kalman learner does
    with pytest.raises(ModelDiverged):
        model.snapshot().predict_proba_batch([{"x": 2.0}])


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_one_extreme_value_does_not_poison_a_river_model(task):
    # River's scaler squares its input: 1e300 turned its variance, then every weight, into NaN,
    # and the model predicted nothing ever after (with nothing saying it diverged)
    model = as_stream_model(build_model({"task": task, "learner": "river"}))
    xs = [{"x": float(i % 7), "c": "ab"[i % 2]} for i in range(20)]
    ys = [i % 2 == 0 for i in range(20)] if task == "classification" else [float(i % 7) for i in range(20)]
    model.learn_batch(xs, ys)
    with pytest.raises(RowsRejected) as caught:
        model.learn_batch([{"x": 1.0, "c": "a"}, {"x": 1e300, "c": "a"}], ys[:2])
    assert list(caught.value.rows) == [1] and "features.x: 1e+300 is too large" in caught.value.rows[1]
    assert all(math.isfinite(v) for v in model.predict_batch(xs) if not isinstance(v, bool))
    assert model.diagnostics()["diverged"] is False


def test_a_regression_target_too_large_to_scale_is_refused_and_the_model_goes_on():
    model = KalmanRegressor(**SMALL)
    model.learn_batch([{"a": 1.0}], [1e300])  # beyond float32: still predicted (in float64)
    assert model.predict_batch([{"a": 1.0}]) == [pytest.approx(1e300)]
    state = pickle.dumps(model)
    with pytest.raises(ValueError, match="y: targets this large cannot be learned"):
        model.learn_batch([{"a": 1.0}], [-1e300])  # the scaler's variance would be inf: every prediction NaN
    assert pickle.dumps(model) == state
    assert math.isfinite(model.predict_batch([{"a": 1.0}])[0])


@pytest.mark.parametrize(
    "ablation",
    [{"optimizer": "sgd"}, {"optimizer": "upgd_global", "lr": 0.1}, {"optimizer": "upgd_local", "lr": 0.1},
     {"optimizer": "upgd_nonprotecting", "lr": 0.1}, {"optimizer": "adam"}, {"optimizer": "adamw"}, {"learn_gamma": False, "gamma": 0.99},
     {"head": "softmax", "lr": 0.05}, {"lr_schedule": "constant"}, {"lr_schedule": "wsd"}, {"lr_schedule": "infinite"},
     {"ema": 0.9}, {"depth": 0}, {"bins": 8}],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
@pytest.mark.parametrize("cls", [KalmanClassifier, KalmanRegressor])
def test_every_ablation_learns(cls, ablation):
    model = cls(**SMALL, **ablation)
    stream = list(itertools.islice(datasets.Phishing(), 600))
    xs = [x for x, _ in stream]
    ys = [y if cls is KalmanClassifier else float(y) for _, y in stream]
    for i in range(0, 500, 16):
        model.learn_batch(xs[i : i + 16], ys[i : i + 16])
    preds = model.predict_batch(xs[500:])
    if cls is KalmanClassifier:
        assert np.mean([p == y for p, y in zip(preds, ys[500:], strict=True)]) > 0.75
    else:
        assert np.mean(np.abs(np.asarray(preds) - np.asarray(ys[500:]))) < 0.4
    assert not model.diagnostics()["diverged"]
    copy.deepcopy(model).learn_batch(xs[:4], ys[:4])


def test_unknown_switch_values_name_the_parameter():
    for kwargs, field in [({"optimizer": "rmsprop"}, "optimizer"), ({"head": "tree"}, "head"),
                          ({"lr_schedule": "cosine"}, "lr_schedule")]:
        with pytest.raises(ValueError, match=field):
            KalmanClassifier(**kwargs)


def test_backbone_loss_gradient_is_autograds_on_the_plain_expression():
    # the head's loss writes its gradients out by hand; autograd on the plain expression agrees
    model = KalmanClassifier(**SMALL)
    rows = list(itertools.islice(datasets.ImageSegments(), 300))
    for i in range(0, 240, 16):
        model.learn_batch([x for x, _ in rows[i : i + 16]], [y for _, y in rows[i : i + 16]])
    xs, ys = [x for x, _ in rows[240:]], [y for _, y in rows[240:]]
    target = model._targets(ys)
    M, A = (t.to(torch.float32) for t in model._kalman.prior(len(xs)))
    phi = model._net["backbone"](torch.from_numpy(model._encoder.encode(xs))).detach()
    ours = model._head_loss(phi, F.one_hot(target, len(model._classes)).to(phi.dtype), (M, A))
    plain = phi.clone().requires_grad_()
    log_scale = torch.tensor(model._log_scale, requires_grad=True)
    var = ((plain @ A) * plain).sum(dim=1)
    reference = F.cross_entropy(log_probit_softmax_logits(plain @ M, var, torch.exp(log_scale)), target)
    reference.backward()
    assert ours.loss == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(ours.d_phi, plain.grad)
    assert ours.d_log_scale == pytest.approx(float(log_scale.grad), rel=1e-4, abs=1e-7)
    assert ours.d_phi.abs().max() > 0
