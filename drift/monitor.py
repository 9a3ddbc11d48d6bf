"""ModelMonitor: everything the service asks of drift/ for one model, on lists of dicts.

The service calls ``observe_predictions`` for every predicted event and ``observe_outcomes`` for
every scored prediction (label at once, or joined later), and reads ``status()``. Per batch the
feature dicts are turned into columns once; windows are ring buffers; statistical tests run every
``check_every`` rows and estimation once per closed chunk, so the per-event cost is a few dict
look-ups and array writes.

Classes are learned from the outcomes. With two classes the problem is binary and the positive
class is the *second* of the sorted labels (``1`` for 0/1, ``True`` for booleans, ``"yes"`` for
"no"/"yes"); with more it is multiclass (macro one-vs-rest metrics). A prediction of a class never
seen in the labels is mapped to the most probable labelled class for estimation.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> mon = ModelMonitor("classification", {"chunk_size": 200, "reference_size": 1000, "min_reference": 200})
>>> def batch(n):
...     x = rng.normal(size=n)
...     p = 1 / (1 + np.exp(-2 * x))
...     ids = [str(i) for i in rng.integers(0, 2**62, n)]
...     xs = [{"x": float(v), "c": "a" if v > 0 else "b"} for v in x]
...     probas = [{0: 1 - q, 1: q} for q in p]
...     preds = [int(q >= 0.5) for q in p]
...     ys = [int(u < q) for u, q in zip(rng.random(n), p)]
...     return ids, xs, probas, preds, ys
>>> ids, xs, probas, preds, ys = batch(1000)
>>> _ = mon.observe_predictions(ids, xs, probas, preds, [True] * 1000)
>>> _ = mon.observe_outcomes(ids, xs, probas, preds, ys, [0.5] * 1000)
>>> ids, xs, probas, preds, ys = batch(200)
>>> _ = mon.observe_predictions(ids, xs, probas, preds, [False] * 200)
>>> s = mon.status()
>>> s["estimated"]["chunk"], sorted(s["estimated"]["mcbpe"])
(1, ['accuracy', 'f1', 'roc_auc'])
>>> _ = mon.observe_outcomes(ids, xs, probas, preds, ys, [0.5] * 200)
>>> mon.status()["realized"]["chunk"]
1
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from drift.cbpe import CBPE
from drift.data_drift import DataDriftMonitor, Window, columns_from_dicts
from drift.detectors import DETECTORS, ConceptDriftDetector, DriftEvent
from drift.mcbpe import MCBPE
from drift.metrics import check_metrics, metrics_from_soft_labels

DEFAULTS: dict[str, Any] = {
    "metrics": ("accuracy", "f1", "roc_auc"),
    # analysis chunks of unlabelled predictions
    "chunk_size": 1000,
    "chunk_max_seconds": 60.0,  # a chunk also closes after this long, if it has min_chunk rows
    "min_chunk": 100,
    # calibration reference: the last labelled, prequentially scored predictions
    "reference_size": 5000,
    "min_reference": 500,
    # realized metrics of a chunk once this share of its labels arrived
    "realized_fraction": 0.9,
    "max_open_chunks": 20,  # chunks still waiting for labels (oldest evicted beyond)
    "label_expiry_seconds": 3600.0,
    # concept drift
    "detector": "adwin",
    "detector_params": None,
    "concept_history": 5000,
    "active_hold_seconds": 300.0,
    # data / prediction drift (keyword arguments of DataDriftMonitor)
    "data_drift": {},
    "prediction_drift": {"multivariate": False},
    # M-CBPE keyword arguments
    "mcbpe": {},
    "seed": 0,
}


def _sort_key(label: Hashable) -> tuple[str, Any]:
    return (type(label).__name__, label) if isinstance(label, (int, float, str, bool)) else ("~", str(label))


def _finite(d: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if v is not None and math.isfinite(v)}


class _Chunk:
    """One closed analysis chunk waiting for its labels."""

    def __init__(self, number: int, ids: list, proba: np.ndarray, pred: np.ndarray, closed: float):
        self.number = number
        self.ids = ids
        self.proba = proba  # (n, registry columns at close time)
        self.pred = pred  # registry column of the predicted class, -1 = none
        self.y = np.full(len(pred), -1, dtype=np.intp)  # registry column of the label, -1 = unknown
        self.labelled = 0
        self.closed = closed


class ModelMonitor:
    """Concept drift, data drift, prediction drift and CBPE/M-CBPE estimation for one model.

    Picklable (it is checkpointed with the model). ``config`` keys and defaults: ``DEFAULTS``.
    """

    def __init__(self, task: str = "classification", config: Mapping[str, Any] | None = None):
        if task not in ("classification", "regression"):
            raise ValueError(f"task: must be 'classification' or 'regression', got {task!r}")
        unknown = set(config or {}) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        cfg = {**DEFAULTS, **(config or {})}
        self.task = task
        self.config = cfg
        self.metrics = check_metrics(cfg["metrics"])
        if task == "regression" and DETECTORS.get(cfg["detector"], (None, False))[1]:
            raise ValueError(f"config.detector: {cfg['detector']!r} needs 0/1 errors; regressors have losses")
        self.concept = ConceptDriftDetector(cfg["detector"], cfg["detector_params"], cfg["concept_history"])
        self.data = DataDriftMonitor("data", **cfg["data_drift"])
        self.prediction = DataDriftMonitor("prediction", **cfg["prediction_drift"])
        self._last: dict[str, DriftEvent | None] = {"concept": None, "data": None, "prediction": None}
        # class registry: every label seen in probas, predictions or outcomes -> proba column
        self._col: dict[Hashable, int] = {}
        self._labels_seen: set[Hashable] = set()
        # calibration reference (labelled rows)
        size = cfg["reference_size"]
        self._ref_x = Window(size)
        self._ref_p = np.zeros((size, 0))
        self._ref_y = np.zeros(size, dtype=np.intp)
        self._ref_pred = np.zeros(size, dtype=np.intp)
        # the open analysis chunk (unlabelled rows)
        self._open: dict[str, list] = {"ids": [], "x": [], "p": [], "pred": []}
        self._open_rows = 0
        self._open_since: float | None = None
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        self._where: dict[Hashable, tuple[int, int]] = {}  # id -> (chunk, row)
        self._chunk_no = 0
        self.estimated: dict[str, Any] = {"cbpe": {}, "mcbpe": {}, "chunk": 0, "ts": None}
        self.realized: dict[str, Any] = {"chunk": 0}
        self.history: list[dict[str, Any]] = []  # per chunk: estimates, bands, evidence, realized
        self.counters = {"chunks": 0, "chunks_realized": 0, "chunks_evicted": 0, "ids_evicted": 0,
                         "estimation_skipped": 0}

    # -- classes ------------------------------------------------------------------------------
    def _register(self, label: Hashable) -> int:
        col = self._col.get(label)
        if col is None:
            col = self._col[label] = len(self._col)
            self._ref_p = np.pad(self._ref_p, ((0, 0), (0, 1)))
        return col

    def _proba_matrix(self, probas: Sequence[Mapping[Hashable, float] | None]) -> np.ndarray:
        col = self._col
        for p in probas:
            if p:
                for k in p:
                    if k not in col:
                        self._register(k)
        m = np.zeros((len(probas), len(col)))
        for i, p in enumerate(probas):
            if p:
                for k, v in p.items():
                    m[i, col[k]] = v
        return m

    def _pred_cols(self, preds: Sequence[Hashable]) -> np.ndarray:
        return np.fromiter((-1 if y is None else self._register(y) for y in preds), dtype=np.intp, count=len(preds))

    # -- the service-facing calls -------------------------------------------------------------
    def observe_predictions(
        self,
        ids: Sequence[Hashable],
        xs: Sequence[Mapping[str, Any]],
        probas: Sequence[Mapping[Hashable, float]] | None,
        preds: Sequence[Hashable],
        labelled: Sequence[bool],
    ) -> list[DriftEvent]:
        """Every predicted event: data and prediction drift; unlabelled rows join the open chunk."""
        n = len(ids)
        if not (len(xs) == len(preds) == len(labelled) == n) or (probas is not None and len(probas) != n):
            raise ValueError("observe_predictions: ids, xs, probas, preds and labelled must have equal lengths")
        if n == 0:
            return []
        now = time.time()
        cols = columns_from_dicts(xs)
        events = self.data.update(cols, now)
        classifier = self.task == "classification" and probas is not None
        if classifier:
            pm = self._proba_matrix(probas)
            pred_cols = self._pred_cols(preds)
            pcols = {f"proba[{lab}]": pm[:, c] for lab, c in self._col.items()}
            pcols["pred"] = np.asarray([str(p) for p in preds], dtype=object)
        else:
            pcols = {"pred": np.asarray(preds, dtype=float)}
        events += self.prediction.update(pcols, now)
        if classifier:
            unl = ~np.asarray(labelled, dtype=bool)
            if unl.any():
                idx = np.flatnonzero(unl)
                o = self._open
                o["ids"].extend(ids[i] for i in idx)
                o["x"].append({k: v[idx] for k, v in cols.items()})
                o["p"].append(pm[idx])
                o["pred"].append(pred_cols[idx])
                if self._open_since is None:
                    self._open_since = now
                self._open_rows += len(idx)
                while self._open_rows >= self.config["chunk_size"]:
                    self._close_chunk(now, self.config["chunk_size"])
            if (
                self._open_since is not None
                and now - self._open_since >= self.config["chunk_max_seconds"]
                and self._open_rows >= self.config["min_chunk"]
            ):
                self._close_chunk(now, self._open_rows)
        self._record(events)
        return events

    def observe_outcomes(
        self,
        ids: Sequence[Hashable],
        xs: Sequence[Mapping[str, Any]],
        probas: Sequence[Mapping[Hashable, float]] | None,
        preds: Sequence[Hashable],
        ys: Sequence[Hashable],
        losses: Sequence[float],
    ) -> list[DriftEvent]:
        """Every scored prediction: concept drift on the error/loss, the calibration reference,
        and realized metrics of past chunks."""
        n = len(ids)
        if not (len(xs) == len(preds) == len(ys) == len(losses) == n) or (probas is not None and len(probas) != n):
            raise ValueError("observe_outcomes: ids, xs, probas, preds, ys and losses must have equal lengths")
        if n == 0:
            return []
        now = time.time()
        losses = np.asarray(losses, dtype=float)
        if self.task == "classification":
            signal = np.fromiter((p != y for p, y in zip(preds, ys, strict=True)), dtype=float, count=n)
        else:
            signal = losses
        events = self.concept.update_many(signal, losses, now)
        if self.task == "classification" and probas is not None:
            self._labels_seen.update(ys)
            pm = self._proba_matrix(probas)
            ycols = self._pred_cols(ys)
            self._add_reference(columns_from_dicts(xs), pm, ycols, self._pred_cols(preds))
            self._join_labels(ids, ycols)
            self._expire(now)
        self._record(events)
        return events

    # -- reference window -----------------------------------------------------------------------
    def _add_reference(self, cols, pm, ycols, pred_cols) -> None:
        size = self.config["reference_size"]
        n = len(ycols)
        take = min(n, size)
        idx = (self._ref_x.n + (n - take) + np.arange(take)) % size
        self._ref_p[idx, : pm.shape[1]] = pm[n - take :]
        self._ref_p[idx, pm.shape[1] :] = 0.0
        self._ref_y[idx] = ycols[n - take :]
        self._ref_pred[idx] = pred_cols[n - take :]
        self._ref_x.append(cols, n)

    # -- chunks -------------------------------------------------------------------------------
    def _close_chunk(self, now: float, rows: int) -> None:
        o = self._open
        x = {k: np.concatenate([b.get(k, np.full(len(p), np.nan)) for b, p in zip(o["x"], o["p"], strict=True)])
             for k in dict.fromkeys(k for b in o["x"] for k in b)}
        k = len(self._col)
        p = np.concatenate([np.pad(b, ((0, 0), (0, k - b.shape[1]))) for b in o["p"]])
        pred = np.concatenate(o["pred"])
        ids = o["ids"]
        # rows beyond this chunk stay open
        rest = len(ids) - rows
        self._open = {"ids": ids[rows:], "x": [{c: v[rows:] for c, v in x.items()}] if rest else [],
                      "p": [p[rows:]] if rest else [], "pred": [pred[rows:]] if rest else []}
        self._open_rows = rest
        self._open_since = now if rest else None
        x = {c: v[:rows] for c, v in x.items()}
        self._chunk_no += 1
        chunk = _Chunk(self._chunk_no, ids[:rows], p[:rows], pred[:rows], now)
        self._chunks[chunk.number] = chunk
        for r, i in enumerate(ids[:rows]):
            self._where[i] = (chunk.number, r)
        self.counters["chunks"] += 1
        self._estimate(chunk, x, now)
        while len(self._chunks) > self.config["max_open_chunks"]:
            self._evict(next(iter(self._chunks)))

    def _labelled_classes(self) -> list[Hashable]:
        return sorted(self._labels_seen, key=_sort_key)

    def _problem(self, classes: list[Hashable], proba: np.ndarray, pred: np.ndarray):
        """The contract's arrays (scores over ``classes``, predictions as labels) from registry columns."""
        cols = [self._col[c] for c in classes]
        scores = proba[:, cols]
        inside = np.isin(pred, cols)
        fallback = np.asarray(cols)[np.argmax(scores, axis=1)]
        pred = np.where(inside, pred, fallback)
        pos = {c: i for i, c in enumerate(cols)}
        pred_idx = np.fromiter((pos[c] for c in pred.tolist()), dtype=np.intp, count=len(pred))
        return scores, pred_idx

    def _estimate(self, chunk: _Chunk, x: dict[str, np.ndarray], now: float) -> None:
        classes = self._labelled_classes()
        n_ref = len(self._ref_x)
        if len(classes) < 2 or n_ref < self.config["min_reference"]:
            self.counters["estimation_skipped"] += 1
            return
        ref_y_cols = self._ref_y[:n_ref]
        keep = np.isin(ref_y_cols, [self._col[c] for c in classes])
        ref_p, ref_pred = self._problem(classes, self._ref_p[:n_ref][keep], self._ref_pred[:n_ref][keep])
        pos = {self._col[c]: i for i, c in enumerate(classes)}
        ref_y = np.fromiter((pos[c] for c in ref_y_cols[keep].tolist()), dtype=np.intp, count=int(keep.sum()))
        if len(np.unique(ref_y)) < 2:
            self.counters["estimation_skipped"] += 1
            return
        k = self._ref_p.shape[1]
        chunk_p = np.pad(chunk.proba, ((0, 0), (0, k - chunk.proba.shape[1])))
        scores, pred_idx = self._problem(classes, chunk_p, chunk.pred)
        binary = len(classes) == 2
        problem = "binary" if binary else "multiclass"
        ref_frame = pd.DataFrame({c: v[keep] for c, v in self._ref_x.columns().items()})
        frame = pd.DataFrame(x)
        idx = list(range(len(classes)))
        args_ref = (ref_p[:, 1], ref_y, ref_pred) if binary else (ref_p, ref_y, ref_pred)
        args_cur = (scores[:, 1], pred_idx) if binary else (scores, pred_idx)
        record: dict[str, Any] = {"chunk": chunk.number, "ts": now, "rows": len(chunk.pred), "classes": classes}
        seed = self.config["seed"]
        for name, est in (("cbpe", CBPE(problem, self.metrics, seed=seed)),
                          ("mcbpe", MCBPE(problem, self.metrics, seed=seed, **self.config["mcbpe"]))):
            est.fit(ref_frame, *args_ref, classes=None if binary else idx)
            bands = est.estimate_with_bands(frame, *args_cur)
            record[name] = {m: b["value"] for m, b in bands.items()}
            record[f"{name}_bands"] = {m: (b["lower"], b["upper"]) for m, b in bands.items()}
            if name == "mcbpe":
                record["mcbpe_evidence"] = est.last_
        self.estimated = {"cbpe": _finite(record["cbpe"]), "mcbpe": _finite(record["mcbpe"]),
                          "chunk": chunk.number, "ts": now}
        self._remember(record)

    def _remember(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        del self.history[: -2 * self.config["max_open_chunks"]]

    def _join_labels(self, ids: Sequence[Hashable], ycols: np.ndarray) -> None:
        if not self._where:
            return
        touched = set()
        for i, y in zip(ids, ycols.tolist(), strict=True):
            loc = self._where.pop(i, None)
            if loc is None:
                continue
            chunk = self._chunks[loc[0]]
            if chunk.y[loc[1]] < 0:
                chunk.labelled += 1
            chunk.y[loc[1]] = y
            touched.add(loc[0])
        for number in touched:
            chunk = self._chunks[number]
            if chunk.labelled >= self.config["realized_fraction"] * len(chunk.y):
                self._realize(chunk)

    def _realize(self, chunk: _Chunk) -> None:
        classes = self._labelled_classes()
        k = len(self._col)
        have = chunk.y >= 0
        proba = np.pad(chunk.proba, ((0, 0), (0, k - chunk.proba.shape[1])))[have]
        scores, pred_idx = self._problem(classes, proba, chunk.pred[have])
        pos = {self._col[c]: i for i, c in enumerate(classes)}
        y = np.fromiter((pos[c] for c in chunk.y[have].tolist()), dtype=np.intp, count=int(have.sum()))
        values = metrics_from_soft_labels(np.eye(len(classes))[y], pred_idx, scores, self.metrics)
        self.realized = {**_finite(values), "chunk": chunk.number}
        for record in self.history:
            if record["chunk"] == chunk.number:
                record["realized"] = values
                record["labelled"] = int(have.sum())
        self.counters["chunks_realized"] += 1
        self._drop(chunk.number)

    def _drop(self, number: int) -> int:
        gone = 0
        for i in self._chunks.pop(number).ids:
            if self._where.get(i, (None,))[0] == number:
                del self._where[i]
                gone += 1
        return gone

    def _evict(self, number: int) -> None:
        self.counters["chunks_evicted"] += 1
        self.counters["ids_evicted"] += self._drop(number)

    def _expire(self, now: float) -> None:
        limit = self.config["label_expiry_seconds"]
        for number, chunk in list(self._chunks.items()):
            if now - chunk.closed > limit:
                self._evict(number)

    # -- drift state and status ---------------------------------------------------------------
    def _record(self, events: list[DriftEvent]) -> None:
        for e in events:
            self._last[e.kind] = e

    def _kind_status(self, kind: str, detected: int, detector: str) -> dict[str, Any]:
        last = self._last[kind]
        active = last is not None and time.time() - last.ts < self.config["active_hold_seconds"]
        return {"active": bool(active), "detected_total": int(detected), "detector": detector,
                "last": last.to_dict() if last is not None else None}

    def status(self) -> dict[str, Any]:
        """``{"drift": {kind: {...}}, "estimated": {...}, "realized": {...}}`` (see architecture.md)."""
        uni = f"ks+chi2({self.data.correction})"
        return {
            "drift": {
                "concept": self._kind_status("concept", self.concept.detected, self.concept.name),
                "data": self._kind_status("data", self.data.detected, uni + ("+pca" if self.data.multivariate else "")),
                "prediction": self._kind_status("prediction", self.prediction.detected, uni),
            },
            "estimated": {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.estimated.items()},
            "realized": dict(self.realized),
        }
