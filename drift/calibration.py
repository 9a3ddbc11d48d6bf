"""Weighted one-vs-rest isotonic calibration that is skipped when it does not help.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> p_true = rng.random(4000)
>>> y = (rng.random(4000) < p_true).astype(int)
>>> raw = p_true ** 3                     # a badly under-confident score
>>> scores = np.c_[1 - raw, raw]
>>> cal = Calibrator().fit(scores, y)
>>> cal.calibrated_
True
>>> float(np.abs(cal.transform(scores)[:, 1] - p_true).mean()) < 0.05
True
"""

from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression


def brier(proba: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    """Weighted multiclass Brier score of ``proba`` (n, K) against class indices ``y``."""
    err = proba.copy()
    err[np.arange(len(y)), y] -= 1.0
    return float(np.average(np.sum(err**2, axis=1), weights=weights))


def _normalise(p: np.ndarray) -> np.ndarray:
    s = p.sum(axis=1, keepdims=True)
    return np.where(s > 0, p / np.where(s > 0, s, 1.0), 1.0 / p.shape[1])


class Calibrator:
    """Isotonic regression of ``[y == k]`` on the raw score of class ``k`` (the positive class only
    for binary problems, rows renormalised for multiclass), with optional sample weights.

    ``mode="auto"`` (NannyML's rule in spirit) first cross-fits the calibrator and keeps it only if
    it lowers the weighted Brier score of the raw scores; ``"always"`` and ``"never"`` force it.
    """

    def __init__(self, mode: str = "auto", folds: int = 3, seed: int = 0):
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"calibration: unknown mode {mode!r}; use 'auto', 'always' or 'never'")
        self.mode = mode
        self.folds = folds
        self.seed = seed

    def _fit_models(self, scores, y, w) -> list[IsotonicRegression]:
        k = scores.shape[1]
        cols = [1] if k == 2 else range(k)
        models = []
        for c in cols:
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            iso.fit(scores[:, c], (y == c).astype(float), sample_weight=w)
            models.append(iso)
        return models

    @staticmethod
    def _apply(models, scores) -> np.ndarray:
        if scores.shape[1] == 2:
            p = np.clip(models[0].predict(scores[:, 1]), 0.0, 1.0)
            return np.c_[1 - p, p]
        return _normalise(np.column_stack([m.predict(scores[:, c]) for c, m in enumerate(models)]))

    def fit(self, scores: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> Calibrator:
        """``scores`` (n, K) raw class scores, ``y`` (n,) class indices in ``range(K)``."""
        w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
        self.calibrated_ = self.mode == "always" or (self.mode == "auto" and self._helps(scores, y, w))
        self.models_ = self._fit_models(scores, y, w) if self.calibrated_ else None
        return self

    def _helps(self, scores, y, w) -> bool:
        rng = np.random.default_rng(self.seed)
        fold = rng.permutation(len(y)) % self.folds
        cross = np.empty_like(scores, dtype=float)
        for f in range(self.folds):
            test = fold == f
            cross[test] = self._apply(self._fit_models(scores[~test], y[~test], w[~test]), scores[test])
        return brier(cross, y, w) < brier(_normalise(scores), y, w)

    def transform(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (n, K); the raw scores (renormalised) when skipped."""
        return self._apply(self.models_, scores) if self.calibrated_ else _normalise(scores)
