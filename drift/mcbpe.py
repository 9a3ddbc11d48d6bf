"""M-CBPE (PAPE, arXiv 2401.08348): CBPE with a calibrator re-weighted toward each chunk.

Under covariate shift P(y | x) stays but P(x) moves, so a calibrator fitted on reference data is
right for the reference mix of regions and wrong for the chunk's. Per chunk we

1. train a domain classifier (reference = 0, chunk = 1) on the features, cross-fitted so no row
   is scored by a model that saw it, giving ``p(chunk | x)`` for every reference row;
2. turn it into density-ratio weights ``w = p / (1 - p) · n_ref / n_chunk``, clip and normalise;
3. shrink the weights toward 1 by the classifier's evidence: its cross-fitted AUC is turned into a
   z-score against the no-shift null, and weighting is phased in between ``z_low`` and
   ``z_high`` — an indistinguishable chunk gets plain CBPE and none of the variance of weighting;
4. fit the *weighted* isotonic calibrator on reference and apply the CBPE formulas to the chunk.

>>> import numpy as np, pandas as pd
>>> rng = np.random.default_rng(0)
>>> def sample(n, shift):
...     x1, x2 = rng.normal(0, 1, n), rng.normal(shift, 1, n)
...     p_true = 1 / (1 + np.exp(-(2 * x1 + 1.5 * np.tanh(2 * x2))))  # the truth depends on x2 ...
...     score = 1 / (1 + np.exp(-(2 * x1 - 0.3 + 0.2 * x2)))          # ... the model hardly does
...     y = (rng.random(n) < p_true).astype(int)
...     return pd.DataFrame({"x1": x1, "x2": x2, "c": np.where(x2 > 0, "hi", "lo")}), score, y
>>> ref = sample(10000, 0.0)
>>> cbpe, mcbpe = CBPE(metrics=("accuracy",)).fit(*ref), MCBPE(metrics=("accuracy",)).fit(*ref)
>>> x, p, y = sample(5000, 1.0)
>>> realized = np.mean((p >= 0.5) == y)
>>> err = [abs(e.estimate(x, p)["accuracy"] - realized) for e in (cbpe, mcbpe)]
>>> bool(err[1] < 0.01 < err[0])
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from drift.calibration import Calibrator
from drift.cbpe import CBPE
from drift.metrics import roc_auc


def encode_features(frames: Sequence[pd.DataFrame], max_categories: int = 63) -> tuple[np.ndarray, np.ndarray]:
    """Stack frames into one float matrix for a domain classifier.

    Numeric (and bool) columns stay as floats with NaN for missing values; any other column is
    treated as categorical and ordinal-coded over the stacked values (the ``max_categories - 1``
    most frequent keep their own code, the rest share one); identifier-like ones (mostly unique
    values) are dropped. Columns missing from a frame are NaN.
    Returns the matrix and the boolean mask of categorical columns.
    """
    columns = list(dict.fromkeys(c for f in frames for c in f.columns))
    out, categorical = [], []
    for name in columns:
        parts = [f[name] if name in f.columns else pd.Series(np.nan, index=range(len(f))) for f in frames]
        col = pd.concat(parts, ignore_index=True)
        numeric = pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col)
        if not numeric and pd.api.types.infer_dtype(col, skipna=True) in (
            "integer", "floating", "mixed-integer-float", "boolean"
        ):  # an object column holding only numbers or bools, and missing values
            numeric, col = True, col.astype(object).where(col.notna(), np.nan).astype(float)
        if numeric:
            out.append(col.to_numpy(dtype=float, na_value=np.nan))
            categorical.append(False)
            continue
        text = col.astype(str).where(col.notna())
        text = text.where(text != "")  # "" is how ModelMonitor's windows spell a missing string
        codes, uniques = pd.factorize(text, use_na_sentinel=True)
        if len(uniques) > max(100, len(col) // 2):
            continue  # identifier-like: its codes would only tell reference rows from chunk rows
        counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
        remap = np.full(len(uniques) + 1, float(min(len(uniques), max_categories - 1)))
        top = np.argsort(-counts, kind="stable")[: max_categories - 1]
        remap[top] = np.arange(len(top))
        remap[-1] = np.nan  # the sentinel -1 indexes the last slot
        out.append(remap[codes])
        categorical.append(True)
    matrix = np.column_stack(out) if out else np.zeros((sum(len(f) for f in frames), 0))
    return matrix, np.asarray(categorical, dtype=bool)


def _domain_model(kind: str, categorical: np.ndarray, seed: int):
    if kind == "hgb":
        return HistGradientBoostingClassifier(
            max_iter=40, learning_rate=0.15, max_leaf_nodes=15, min_samples_leaf=40, l2_regularization=1.0,
            early_stopping=False, categorical_features=categorical if categorical.any() else None,
            random_state=seed,
        )
    return LogisticRegression(C=1.0, max_iter=200)


def _logistic_design(x: np.ndarray, categorical: np.ndarray) -> np.ndarray:
    """Standardised numerics with missing indicators, one-hot categoricals (for the linear model)."""
    cols = []
    for j in range(x.shape[1]):
        v = x[:, j]
        miss = np.isnan(v)
        if categorical[j]:
            codes = np.where(miss, -1, v).astype(int)
            cols.extend((codes == c).astype(float) for c in np.unique(codes))
            continue
        mean = np.nanmean(v) if (~miss).any() else 0.0
        std = np.nanstd(v) if (~miss).any() else 1.0
        cols.append(np.where(miss, 0.0, (v - mean) / (std or 1.0)))
        if miss.any():
            cols.append(miss.astype(float))
    return np.column_stack(cols) if cols else np.zeros((x.shape[0], 1))


class MCBPE(CBPE):
    """CBPE whose calibrator is re-fitted per chunk with density-ratio weights (PAPE).

    Parameters (beyond :class:`CBPE`)
    ----------
    domain_classifier
        ``"hgb"`` (gradient-boosted trees, native categorical support; default) or ``"logistic"``.
    folds
        Cross-fitting folds for the domain classifier's probabilities on reference rows.
    max_weight
        Weights are normalised to mean 1 and clipped at this value (then renormalised).
    z_low, z_high
        Evidence thresholds on the domain AUC's z-score: below ``z_low`` the estimate is CBPE's,
        above ``z_high`` the full weights are used, linear in between.
    max_reference
        Reference rows used to train the domain classifier (a seeded subsample above this; all
        reference rows still receive weights). Bounds the cost per chunk.
    n_threads
        Threads for the domain classifier (1 keeps a monitor from competing with ingestion).

    After each ``estimate`` the attribute ``last_`` holds ``{"domain_auc", "z", "shrinkage",
    "effective_sample_size", "calibrated"}`` for logs and status pages.
    """

    def __init__(
        self,
        problem: str = "binary",
        metrics: Sequence[str] = ("accuracy", "f1", "roc_auc"),
        calibration: str = "auto",
        draws: int = 64,
        seed: int = 0,
        domain_classifier: str = "hgb",
        folds: int = 2,
        max_weight: float = 100.0,
        z_low: float = 2.0,
        z_high: float = 4.0,
        max_reference: int = 5000,
        n_threads: int = 1,
    ):
        super().__init__(problem, metrics, calibration, draws, seed)
        if domain_classifier not in ("hgb", "logistic"):
            raise ValueError(f"domain_classifier: use 'hgb' or 'logistic', got {domain_classifier!r}")
        if not 0 <= z_low < z_high:
            raise ValueError("z_low, z_high: need 0 <= z_low < z_high")
        self.domain_classifier = domain_classifier
        self.folds = folds
        self.max_weight = max_weight
        self.z_low = z_low
        self.z_high = z_high
        self.max_reference = max_reference
        self.n_threads = n_threads

    def _fit_arrays(self, features, scores: np.ndarray, y: np.ndarray) -> None:
        if not isinstance(features, pd.DataFrame):
            raise ValueError("reference_features: M-CBPE needs the reference features as a pandas DataFrame")
        super()._fit_arrays(features, scores, y)  # the unweighted (CBPE) calibrator, used when shrunk away
        self.reference_ = (features.reset_index(drop=True), scores, y)

    def as_cbpe(self) -> CBPE:
        """Plain CBPE on the same reference, sharing the unweighted calibrator (fitted once)."""
        cbpe = CBPE(self.problem, self.metrics, self.calibration, self.draws, self.seed)
        cbpe.classes_, cbpe.calibrator_ = self.classes_, self.calibrator_
        return cbpe

    def _calibrated(self, features: Any, scores: np.ndarray) -> np.ndarray:
        if not isinstance(features, pd.DataFrame):
            raise ValueError("features: M-CBPE needs the chunk's features as a pandas DataFrame")
        ref_x, ref_s, ref_y = self.reference_
        weights, info = self.density_ratio(ref_x, features)
        if info["shrinkage"] > 0:
            cal = Calibrator(self.calibration, seed=self.seed).fit(ref_s, ref_y, weights)
        else:
            cal = self.calibrator_
        info["calibrated"] = bool(cal.calibrated_)
        self.last_ = info
        return cal.transform(scores)

    def density_ratio(self, reference: pd.DataFrame, chunk: pd.DataFrame) -> tuple[np.ndarray, dict[str, float]]:
        """Shrunk, clipped, mean-1 weights ``p_chunk(x) / p_ref(x)`` for the reference rows."""
        n_ref, n_cur = len(reference), len(chunk)
        x, categorical = encode_features([reference, chunk])
        if x.shape[1] == 0:
            return np.ones(n_ref), {"domain_auc": 0.5, "z": 0.0, "shrinkage": 0.0, "effective_sample_size": n_ref}
        if self.domain_classifier == "logistic":
            x = _logistic_design(x, categorical)
        domain = np.r_[np.zeros(n_ref), np.ones(n_cur)]
        rng = np.random.default_rng(self.seed)
        fold = rng.permutation(n_ref + n_cur) % self.folds
        # Train on at most max_reference reference rows per fit; every row is still scored out of fold.
        train_ok = np.ones(n_ref + n_cur, dtype=bool)
        if n_ref > self.max_reference:
            train_ok[:n_ref] = False
            train_ok[rng.choice(n_ref, self.max_reference, replace=False)] = True
        oof = np.empty(n_ref + n_cur)
        with threadpool_limits(limits=self.n_threads):
            for f in range(self.folds):
                test = fold == f
                train = ~test & train_ok
                model = _domain_model(self.domain_classifier, categorical, self.seed)
                model.fit(x[train], domain[train])
                oof[test] = model.predict_proba(x[test])[:, 1]
        auc = float(roc_auc(np.eye(2)[domain.astype(int)], np.c_[1 - oof, oof], [1])[0])
        se = np.sqrt((n_ref + n_cur + 1) / (12.0 * n_ref * n_cur))
        z = (auc - 0.5) / se
        shrinkage = float(np.clip((z - self.z_low) / (self.z_high - self.z_low), 0.0, 1.0))
        # The prior odds n_ref / n_cur (and any subsampling) only scale w: normalising removes them.
        p = np.clip(oof[:n_ref], 1e-4, 1 - 1e-4)
        w = p / (1 - p)
        w /= w.mean()
        w = np.minimum(w, self.max_weight)
        w /= w.mean()
        w = 1.0 + shrinkage * (w - 1.0)
        ess = float(w.sum() ** 2 / np.sum(w**2))
        return w, {"domain_auc": auc, "z": float(z), "shrinkage": shrinkage, "effective_sample_size": ess}
