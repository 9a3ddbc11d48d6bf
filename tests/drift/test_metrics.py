"""Metrics from (soft) confusion matrices against scikit-learn and closed forms."""

import numpy as np
import pytest
from sklearn import metrics as skm

from drift.calibration import Calibrator
from drift.metrics import SUPPORTED_METRICS, check_metrics, metrics_from_soft_labels, sampling_std


def _onehot(y, k):
    return np.eye(k)[y]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_labels_match_sklearn_binary(seed):
    rng = np.random.default_rng(seed)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(int)
    pred = (p >= 0.5).astype(int)
    scores = np.c_[1 - p, np.round(p, 2)]  # rounding creates ties for the AUC
    m = metrics_from_soft_labels(_onehot(y, 2), pred, scores, SUPPORTED_METRICS)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, scores[:, 1]))


def test_hard_labels_match_sklearn_multiclass_macro():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(800, 4))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=q) for q in proba])
    pred = proba.argmax(1)
    m = metrics_from_soft_labels(_onehot(y, 4), pred, proba, SUPPORTED_METRICS)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for name in ("precision", "recall", "f1"):
        ref = getattr(skm, f"{name}_score")(y, pred, average="macro")
        assert m[name] == pytest.approx(ref)
    spec = np.mean([skm.recall_score(y != k, pred != k) for k in range(4)])
    assert m["specificity"] == pytest.approx(spec)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))


def test_soft_labels_give_the_expected_confusion_matrix():
    # two rows: P(pos) 0.8 predicted positive, P(pos) 0.3 predicted negative
    soft = np.array([[0.2, 0.8], [0.7, 0.3]])
    pred = np.array([1, 0])
    m = metrics_from_soft_labels(soft, pred, soft, ("accuracy", "precision", "recall"))
    # TP = 0.8, FP = 0.2, FN = 0.3, TN = 0.7
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(0.8 / 1.1)


def test_soft_auc_is_the_expected_auc_over_label_draws():
    rng = np.random.default_rng(4)
    p = rng.random(300)
    scores = np.c_[1 - p, p]
    soft = metrics_from_soft_labels(scores, (p >= 0.5).astype(int), scores, ("roc_auc",))["roc_auc"]
    draws = [skm.roc_auc_score(y, p) for y in (rng.random((400, 300)) < p).astype(int)]
    assert soft == pytest.approx(np.mean(draws), abs=0.01)


def test_undefined_ratio_is_nan():
    m = metrics_from_soft_labels(np.eye(2)[[0, 1]], np.array([0, 0]), np.eye(2)[[0, 1]], ("precision",))
    assert np.isnan(m["precision"])


def test_sampling_std_accuracy_is_closed_form_and_others_match_simulation():
    rng = np.random.default_rng(5)
    p = rng.random(2000)
    pred = (p >= 0.5).astype(int)
    proba = np.c_[1 - p, p]
    std = sampling_std(proba, pred, proba, ("accuracy", "f1"), draws=200, seed=0)
    q = np.where(pred == 1, p, 1 - p)
    assert std["accuracy"] == pytest.approx(np.sqrt(np.sum(q * (1 - q))) / 2000)
    f1 = [skm.f1_score(y, pred) for y in (rng.random((300, 2000)) < p).astype(int)]
    assert std["f1"] == pytest.approx(np.std(f1), rel=0.2)


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="metrics: unsupported \\['auc'\\]"):
        check_metrics(("accuracy", "auc"))


def test_calibrator_fixes_miscalibration_and_is_skipped_when_it_does_not_help():
    rng = np.random.default_rng(6)
    p = rng.random(5000)
    y = (rng.random(5000) < p).astype(int)
    bad = np.c_[1 - p**3, p**3]
    cal = Calibrator().fit(bad, y)
    assert cal.calibrated_
    assert np.abs(cal.transform(bad)[:, 1] - p).mean() < 0.03
    # Exactly calibrated scores (20 % and 80 % positives at scores 0.2 and 0.8): raw ECE is 0,
    # a cross-fitted calibrator can only add error, so it is skipped.
    s = np.repeat([0.2, 0.8], 500)
    y2 = np.r_[np.arange(500) % 5 == 0, np.arange(500) % 5 != 0].astype(int)
    good = Calibrator().fit(np.c_[1 - s, s], y2)
    assert not good.calibrated_
    np.testing.assert_allclose(good.transform(np.c_[1 - s, s])[:, 1], s)


def test_weighted_calibration_follows_the_weights():
    # Same score, two regions with different truth; the weights pick the region.
    rng = np.random.default_rng(7)
    region = rng.random(6000) < 0.5
    s = rng.random(6000)
    truth = np.where(region, s**2, np.sqrt(s))
    y = (rng.random(6000) < truth).astype(int)
    scores = np.c_[1 - s, s]
    cal = Calibrator("always").fit(scores, y, np.where(region, 1.0, 1e-6))
    grid = np.linspace(0.1, 0.9, 9)
    np.testing.assert_allclose(cal.transform(np.c_[1 - grid, grid])[:, 1], grid**2, atol=0.08)
