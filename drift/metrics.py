"""Classification metrics from (soft) confusion matrices.

One code path serves realized metrics (hard labels, one-hot "soft labels") and CBPE estimates
(calibrated probabilities as soft labels): the expected confusion matrix is
``C[k, l] = sum_i P[i, k] * [pred_i == l]`` and every metric is a function of ``C``. Binary
problems report the positive class (column 1); multiclass problems report one-vs-rest macro
averages. ROC AUC ranks rows by the raw score of each class and counts soft positives/negatives,
which for soft labels is NannyML's expected ROC curve.

>>> import numpy as np
>>> y = np.array([1, 0, 1, 1])
>>> pred = np.array([1, 0, 0, 1])
>>> scores = np.array([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
>>> m = metrics_from_soft_labels(np.eye(2)[y], pred, scores, ("accuracy", "recall", "roc_auc"))
>>> m["accuracy"], round(m["recall"], 3), m["roc_auc"]
(0.75, 0.667, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SUPPORTED_METRICS = ("accuracy", "precision", "recall", "f1", "specificity", "roc_auc")


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in SUPPORTED_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics: unsupported {unknown or 'empty'}; choose from {SUPPORTED_METRICS}")
    return metrics


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def confusion(soft: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``C[..., k, l]``: expected count of true class ``k`` predicted as ``l``.

    ``soft`` is ``(n, K)`` or a stack ``(M, n, K)`` of label distributions, ``pred`` ``(n,)`` ints.
    """
    k = soft.shape[-1]
    onehot = np.zeros((pred.shape[0], k))
    onehot[np.arange(pred.shape[0]), pred] = 1.0
    return np.swapaxes(soft, -1, -2) @ onehot


def _auc_sorted(soft_sorted: np.ndarray, group_starts: np.ndarray) -> np.ndarray:
    """Tie-aware AUC of soft labels already sorted by descending score; last axis = rows."""
    pos = np.add.reduceat(soft_sorted, group_starts, axis=-1)
    neg = np.add.reduceat(1.0 - soft_sorted, group_starts, axis=-1)
    pos_before = np.cumsum(pos, axis=-1) - pos
    area = np.sum(neg * (pos_before + 0.5 * pos), axis=-1)
    return _div(area, pos.sum(-1) * neg.sum(-1))


def roc_auc(soft: np.ndarray, scores: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """AUC per class in ``classes`` (one-vs-rest); ``soft`` may carry a leading draw axis."""
    out = []
    for k in classes:
        order = np.argsort(-scores[:, k], kind="stable")
        s = scores[order, k]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        out.append(_auc_sorted(soft[..., order, k], starts))
    return np.stack(out, axis=-1)


def _from_confusion(c: np.ndarray, names: Sequence[str], binary: bool) -> dict[str, np.ndarray]:
    n = c.sum(axis=(-1, -2))
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    fp = c.sum(-2) - tp
    fn = c.sum(-1) - tp
    tn = n[..., None] - tp - fp - fn
    per_class = {
        "precision": _div(tp, tp + fp),
        "recall": _div(tp, tp + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "specificity": _div(tn, tn + fp),
    }
    out = {}
    for name in names:
        if name == "accuracy":
            out[name] = _div(tp.sum(-1), n)
        elif name in per_class:
            v = per_class[name]
            out[name] = v[..., 1] if binary else np.mean(v, axis=-1)
    return out


def metrics_from_soft_labels(
    soft: np.ndarray, pred: np.ndarray, scores: np.ndarray, names: Sequence[str]
) -> dict[str, float]:
    """Metrics of predictions ``pred`` (class indices) against label distributions ``soft``.

    ``soft`` and ``scores`` are ``(n, K)``; ``K == 2`` is a binary problem with positive class 1.
    Undefined ratios (e.g. precision with no predicted positive) are ``nan``.
    """
    return {k: float(v) for k, v in _metrics(soft, pred, scores, names).items()}


def _metrics(soft, pred, scores, names) -> dict[str, np.ndarray]:
    binary = soft.shape[-1] == 2
    out = _from_confusion(confusion(soft, pred), names, binary)
    if "roc_auc" in names:
        auc = roc_auc(soft, scores, [1] if binary else range(soft.shape[-1]))
        out["roc_auc"] = auc[..., 0] if binary else np.mean(auc, axis=-1)
    return {name: out[name] for name in names}


def sampling_std(
    proba: np.ndarray, pred: np.ndarray, scores: np.ndarray, names: Sequence[str], draws: int, seed: int
) -> dict[str, float]:
    """Standard deviation of each *realized* metric when labels are drawn from ``proba``.

    This is the sampling error of the chunk: even a perfect estimator of the expected metric
    misses the realized one by about this much. Accuracy has the closed form
    ``sqrt(sum q_i (1 - q_i)) / n`` with ``q_i = proba[i, pred_i]``; the other metrics are
    ratios and AUCs, whose spread is simulated with ``draws`` seeded label draws.
    """
    n = proba.shape[0]
    out: dict[str, float] = {}
    if "accuracy" in names:
        q = proba[np.arange(n), pred]
        out["accuracy"] = float(np.sqrt(np.sum(q * (1 - q))) / n)
    rest = [m for m in names if m != "accuracy"]
    if rest and draws > 1:
        rng = np.random.default_rng(seed)
        cum = np.cumsum(proba, axis=1)
        u = rng.random((draws, n, 1)) * cum[:, -1:]
        labels = np.minimum((u > cum).sum(-1), proba.shape[1] - 1)
        soft = np.eye(proba.shape[1])[labels]
        sims = _metrics(soft, pred, scores, rest)
        for m in rest:
            v = sims[m][np.isfinite(sims[m])]
            out[m] = float(np.std(v)) if v.size > 1 else float("nan")
    return {m: out.get(m, float("nan")) for m in names}
