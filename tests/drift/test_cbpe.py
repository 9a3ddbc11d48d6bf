"""CBPE and M-CBPE: the contract's API on mixed DataFrames, and estimates against known truth.

The synthetic data (bench/estimation.py) has a model that ignores ``x2`` while the truth is less
positive where ``x2 > 1``; covariate shift of ``x2`` makes that region dominant, which breaks the
reference calibration — the case M-CBPE exists for.
"""

import numpy as np
import pandas as pd
import pytest

from bench.estimation import CLASSES, binary, multiclass, realized
from drift import CBPE, MCBPE
from drift.mcbpe import encode_features
from drift.metrics import metrics_from_soft_labels

METRICS = ("accuracy", "precision", "recall", "f1", "specificity", "roc_auc")


@pytest.fixture(scope="module")
def reference():
    return binary(np.random.default_rng(0), 10000)


@pytest.fixture(scope="module")
def reference_multiclass():
    return multiclass(np.random.default_rng(1), 10000)


@pytest.mark.parametrize("cls", [CBPE, MCBPE])
def test_binary_api_returns_exactly_the_requested_metrics(cls, reference):
    x, p, y = reference
    assert not pd.api.types.is_numeric_dtype(x["c"])  # a string column rides along
    est = cls(problem="binary", metrics=("accuracy", "f1", "roc_auc"))
    assert est.fit(x, p, y) is est
    out = est.estimate(x.iloc[:1000], p[:1000])
    assert list(out) == ["accuracy", "f1", "roc_auc"]
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in out.values())
    # an explicit prediction overrides the 0.5 threshold
    flipped = est.estimate(x.iloc[:1000], p[:1000], pred=1 - (p[:1000] >= 0.5).astype(int))
    assert flipped["accuracy"] == pytest.approx(1 - out["accuracy"], abs=1e-9)


@pytest.mark.parametrize("cls", [CBPE, MCBPE])
def test_multiclass_api_with_string_classes_and_sorted_default(cls, reference_multiclass):
    x, proba, y = reference_multiclass
    est = cls(problem="multiclass", metrics=METRICS).fit(x, proba, y)  # classes: sorted labels
    assert est.classes_ == sorted(CLASSES)
    out = est.estimate(x.iloc[:2000], proba[:2000], pred=np.asarray(CLASSES, dtype=object)[proba[:2000].argmax(1)])
    assert list(out) == list(METRICS)
    # columns follow `classes` when given: permuting both leaves the estimate unchanged
    perm = [2, 0, 1]
    est2 = cls(problem="multiclass", metrics=METRICS).fit(x, proba[:, perm], y, classes=[CLASSES[i] for i in perm])
    out2 = est2.estimate(x.iloc[:2000], proba[:2000, perm])
    for m in METRICS:
        assert out2[m] == pytest.approx(out[m], abs=1e-9)


def test_mcbpe_handles_missing_values_and_unseen_categories(reference):
    x, p, y = reference
    est = MCBPE(metrics=("accuracy",)).fit(x, p, y)
    chunk = x.iloc[:1500].copy()
    chunk.loc[chunk.index[:100], "x1"] = np.nan
    chunk.loc[chunk.index[100:200], "c"] = None
    chunk.loc[chunk.index[200:300], "c"] = "never-seen"
    chunk["extra"] = "only in the chunk"
    assert 0 < est.estimate(chunk, p[:1500])["accuracy"] < 1


def test_mcbpe_drops_identifier_columns_from_the_domain_classifier(reference):
    x, _, _ = reference
    ref = x.assign(request_id=[f"r{i}" for i in range(len(x))])
    chunk = x.iloc[:2000].assign(request_id=[f"q{i}" for i in range(2000)])
    matrix, categorical = encode_features([ref, chunk])
    assert matrix.shape == (len(x) + 2000, 4)  # x1, x2, x3, c — no request_id
    assert categorical.tolist() == [False, False, False, True]


def test_missing_strings_are_missing_however_they_are_spelled():
    a = pd.DataFrame({"c": ["x", "", "y"]})
    b = pd.DataFrame({"c": ["x", None, np.nan]})
    matrix, _ = encode_features([a, b])
    assert np.isnan(matrix[[1, 4, 5], 0]).all() and matrix[0, 0] == matrix[3, 0]


def test_errors_name_the_field(reference):
    x, p, y = reference
    with pytest.raises(ValueError, match="problem"):
        CBPE(problem="regression")
    with pytest.raises(ValueError, match="metrics"):
        CBPE(metrics=("mape",))
    with pytest.raises(ValueError, match="reference_proba: binary problems take P\\(positive\\)"):
        CBPE().fit(x, np.c_[1 - p, p], y)
    with pytest.raises(ValueError, match="reference_labels: label 2"):
        CBPE().fit(x, p, np.where(y == 1, 2, 0))
    with pytest.raises(ValueError, match="reference_features: M-CBPE needs"):
        MCBPE().fit(None, p, y)
    est = CBPE().fit(x, p, y)
    with pytest.raises(ValueError, match="proba: 10 rows but the features have 5"):
        est.estimate(x.iloc[:5], p[:10])
    with pytest.raises(ValueError, match="proba: contains NaN"):
        est.estimate(None, np.r_[p[:5], np.nan])
    with pytest.raises(RuntimeError, match="fit"):
        CBPE().estimate(x, p)


def _errors(problem, shift, balance, chunks, seed, reference):
    gen = binary if problem == "binary" else multiclass
    rng = np.random.default_rng(seed)
    classes = None if problem == "binary" else CLASSES
    cbpe = CBPE(problem, ("accuracy",)).fit(*reference, classes=classes)
    mcbpe = MCBPE(problem, ("accuracy",)).fit(*reference, classes=classes)
    out = {"cbpe": [], "mcbpe": [], "std": []}
    for _ in range(chunks):
        x, p, y = gen(rng, 4000, shift, balance)
        truth = realized(problem, p, y)["accuracy"]
        band = cbpe.estimate_with_bands(x, p)["accuracy"]
        out["cbpe"].append(band["value"] - truth)
        out["std"].append(band["std"])
        out["mcbpe"].append(mcbpe.estimate(x, p)["accuracy"] - truth)
    return {k: np.asarray(v) for k, v in out.items()}


def test_no_shift_both_estimate_accuracy_within_sampling_error(reference):
    e = _errors("binary", 0.0, 0.0, chunks=6, seed=10, reference=reference)
    # reference calibration error (10k rows) adds a little to the chunk's own sampling error
    for method in ("cbpe", "mcbpe"):
        assert np.all(np.abs(e[method]) < 3 * e["std"] + 0.005), method
    np.testing.assert_allclose(e["mcbpe"], e["cbpe"], atol=0.002)  # no evidence of shift: no weighting


@pytest.mark.parametrize(("problem", "shift", "balance"), [("binary", 1.0, 0.0), ("binary", 1.0, 0.7),
                                                           ("multiclass", 1.0, 0.0)])
def test_under_covariate_shift_mcbpe_tracks_realized_accuracy_where_cbpe_does_not(
    problem, shift, balance, reference, reference_multiclass
):
    ref = reference if problem == "binary" else reference_multiclass
    e = _errors(problem, shift, balance, chunks=4, seed=11, reference=ref)
    cbpe_mae, mcbpe_mae = np.abs(e["cbpe"]).mean(), np.abs(e["mcbpe"]).mean()
    assert cbpe_mae > 0.02  # the shift really breaks the reference calibration
    assert mcbpe_mae < 0.5 * cbpe_mae
    assert mcbpe_mae < 0.015


def test_bands_cover_the_realized_metrics(reference):
    x_ref, p_ref, y_ref = reference
    est = CBPE(metrics=METRICS).fit(x_ref, p_ref, y_ref)
    rng = np.random.default_rng(12)
    hits = []
    for _ in range(20):
        x, p, y = binary(rng, 2000)
        truth = metrics_from_soft_labels(np.eye(2)[y], (p >= 0.5).astype(int), np.c_[1 - p, p], METRICS)
        bands = est.estimate_with_bands(x, p)
        hits += [bands[m]["lower"] <= truth[m] <= bands[m]["upper"] for m in METRICS]
    assert np.mean(hits) > 0.85  # nominal 95 %, plus the reference's own error


def test_features_are_ignored_by_cbpe(reference):
    x, p, y = reference
    a = CBPE().fit(x, p, y).estimate(x.iloc[:500], p[:500])
    b = CBPE().fit(None, p, y).estimate(pd.DataFrame(index=range(500)), p[:500])
    assert a == b
