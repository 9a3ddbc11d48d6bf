"""Confidence-based performance estimation (CBPE, as in NannyML).

Calibrate the model's scores on labelled reference data, then treat the calibrated probabilities
of an unlabelled chunk as soft labels: the expected confusion matrix gives accuracy, precision,
recall, F1 and specificity, and the soft-labelled ROC curve over the raw scores gives ROC AUC.

>>> import numpy as np, pandas as pd
>>> rng = np.random.default_rng(1)
>>> def sample(n):
...     x = rng.normal(size=n)
...     p = 1 / (1 + np.exp(-2 * x))
...     return pd.DataFrame({"x": x}), p, (rng.random(n) < p).astype(int)
>>> ref_x, ref_p, ref_y = sample(5000)
>>> est = CBPE(problem="binary", metrics=("accuracy", "roc_auc")).fit(ref_x, ref_p, ref_y)
>>> x, p, y = sample(5000)
>>> e = est.estimate(x, p)
>>> sorted(e)
['accuracy', 'roc_auc']
>>> bool(abs(e["accuracy"] - np.mean((p >= 0.5) == y)) < 0.02)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from drift.calibration import Calibrator
from drift.metrics import check_metrics, metrics_from_soft_labels, sampling_std


class CBPE:
    """Label-free performance estimator.

    Parameters
    ----------
    problem
        ``"binary"`` (``proba`` is P(positive), labels 0/1) or ``"multiclass"`` (``proba`` is
        ``(n, K)`` with columns in ``classes`` order, labels and ``pred`` are class labels).
    metrics
        Names from ``drift.metrics.SUPPORTED_METRICS``; ``estimate`` returns exactly these keys.
    calibration
        ``"auto"`` keeps isotonic calibration only where it lowers the cross-fitted expected calibration error (ECE).
    draws
        Label draws for the sampling-error bands of ratio metrics (accuracy is closed form).
    """

    def __init__(
        self,
        problem: str = "binary",
        metrics: Sequence[str] = ("accuracy", "f1", "roc_auc"),
        calibration: str = "auto",
        draws: int = 64,
        seed: int = 0,
    ):
        if problem not in ("binary", "multiclass"):
            raise ValueError(f"problem: must be 'binary' or 'multiclass', got {problem!r}")
        self.problem = problem
        self.metrics = check_metrics(metrics)
        self.calibration = calibration
        self.draws = draws
        self.seed = seed
        Calibrator(calibration)  # validate the mode now, not at fit time

    # -- input checking: one place that turns the contract's arrays into scores + class indices --
    def _scores(self, proba: Any, n: int | None, field: str) -> np.ndarray:
        p = np.asarray(proba, dtype=float)
        if self.problem == "binary":
            if p.ndim != 1:
                raise ValueError(f"{field}: binary problems take P(positive) as a 1-d array, got shape {p.shape}")
            p = np.c_[1.0 - p, p]
        elif p.ndim != 2 or (hasattr(self, "classes_") and p.shape[1] != len(self.classes_)):
            want = len(self.classes_) if hasattr(self, "classes_") else "K"
            raise ValueError(f"{field}: multiclass problems take an (n, {want}) array, got shape {p.shape}")
        if n is not None and p.shape[0] != n:
            raise ValueError(f"{field}: {p.shape[0]} rows but the features have {n}")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"{field}: contains NaN or infinite values")
        return p

    def _indices(self, labels: Any, n: int, field: str) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"{field}: expected {n} values, got shape {labels.shape}")
        lookup = {c: i for i, c in enumerate(self.classes_)}
        try:
            return np.fromiter((lookup[v] for v in labels.tolist()), dtype=np.intp, count=n)
        except KeyError as e:
            raise ValueError(f"{field}: label {e.args[0]!r} is not one of the classes {self.classes_}") from None

    def _pred(self, pred: Any, scores: np.ndarray, field: str) -> np.ndarray:
        if pred is None:
            if self.problem == "binary":
                return (scores[:, 1] >= 0.5).astype(np.intp)
            return np.argmax(scores, axis=1)
        return self._indices(pred, scores.shape[0], field)

    @staticmethod
    def _n_rows(features: Any) -> int | None:
        return None if features is None else len(features)

    def fit(
        self,
        reference_features: pd.DataFrame | None,
        reference_proba: np.ndarray,
        reference_labels: np.ndarray,
        reference_pred: np.ndarray | None = None,
        classes: Sequence[Any] | None = None,
    ) -> CBPE:
        """Calibrate on labelled reference data (features are ignored by CBPE)."""
        self._set_classes(reference_labels, classes)
        scores = self._scores(reference_proba, self._n_rows(reference_features), "reference_proba")
        y = self._indices(reference_labels, scores.shape[0], "reference_labels")
        self._pred(reference_pred, scores, "reference_pred")  # validated for symmetry with estimate
        self._fit_arrays(reference_features, scores, y)
        return self

    def _set_classes(self, labels: Any, classes: Sequence[Any] | None) -> None:
        if self.problem == "binary":
            self.classes_ = [0, 1]
            return
        if classes is None:
            classes = sorted(set(np.asarray(labels).tolist()))
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"classes: need at least two distinct classes, got {list(classes)}")
        self.classes_ = list(classes)

    def _fit_arrays(self, features, scores: np.ndarray, y: np.ndarray) -> None:
        if scores.shape[0] < 2:
            raise ValueError("reference_proba: need at least two reference rows")
        self.calibrator_ = Calibrator(self.calibration, seed=self.seed).fit(scores, y)

    def _calibrated(self, features, scores: np.ndarray) -> np.ndarray:
        return self.calibrator_.transform(scores)

    def estimate(self, features: pd.DataFrame | None, proba: np.ndarray, pred: np.ndarray | None = None) -> dict[str, float]:
        """Estimated metrics of one unlabelled chunk, keyed by the requested metric names."""
        return {m: v["value"] for m, v in self.estimate_with_bands(features, proba, pred).items()}

    def estimate_with_bands(
        self, features: pd.DataFrame | None, proba: np.ndarray, pred: np.ndarray | None = None, z: float = 1.96
    ) -> dict[str, dict[str, float]]:
        """``{metric: {"value", "std", "lower", "upper"}}``; ``std`` is the chunk's sampling error
        (how far the realized metric scatters around a perfect estimate), bands are ``value ± z·std``.
        """
        if not hasattr(self, "calibrator_"):
            raise RuntimeError("call fit() before estimate()")
        scores = self._scores(proba, self._n_rows(features), "proba")
        if scores.shape[0] == 0:
            raise ValueError("proba: the chunk is empty")
        pred_idx = self._pred(pred, scores, "pred")
        cal = self._calibrated(features, scores)
        values = metrics_from_soft_labels(cal, pred_idx, scores, self.metrics)
        std = sampling_std(cal, pred_idx, scores, self.metrics, self.draws, self.seed)
        return {
            m: {"value": values[m], "std": std[m], "lower": values[m] - z * std[m], "upper": values[m] + z * std[m]}
            for m in self.metrics
        }
