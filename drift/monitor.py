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
>>> mon.flush()  # estimation runs on a background thread
>>> s = mon.status()
>>> s["estimated"]["chunk"], sorted(s["estimated"]["mcbpe"])
(1, ['accuracy', 'f1', 'roc_auc'])
>>> _ = mon.observe_outcomes(ids, xs, probas, preds, ys, [0.5] * 200)
>>> mon.status()["realized"]["chunk"]
1
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import repeat
from operator import itemgetter, ne
from typing import Any

import numpy as np
import pandas as pd

from drift.data_drift import DataDriftMonitor, Window, columns_from_dicts, ring_slices
from drift.detectors import DETECTORS, ConceptDriftDetector, DriftEvent
from drift.mcbpe import MCBPE
from drift.metrics import check_metrics, metrics_from_soft_labels
from learners.protocol import ProbaRows

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "metrics": ("accuracy", "f1", "roc_auc"),
    # analysis chunks of unlabelled predictions
    "chunk_size": 1000,
    "chunk_max_seconds": 60.0,  # a chunk also closes after this long, if it has min_chunk rows
    "min_chunk": 100,
    # calibration reference: the last labelled, prequentially scored predictions
    "reference_size": 5000,
    "min_reference": 500,
    # realized metrics of a chunk once this share of its labels arrived; a chunk leaving the open
    # set (max_open_chunks, label_expiry_seconds) is realized on the labels it has if they are at
    # least realized_min_fraction of it (a stream where some labels never come still gets them)
    "realized_fraction": 0.9,
    "realized_min_fraction": 0.5,
    # ... or once this many predictions passed with no label for it (its labels have stopped:
    # a stream where 20% are never labelled would otherwise wait for the eviction)
    "realized_quiet_rows": 2000,
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
    "draws": 32,  # label draws for the sampling-error bands
    # estimation runs on one background thread so ingestion never waits for it; a chunk that
    # closes while max_pending_estimates are queued, or within the interval below, gets no
    # estimate (counted), except the newest such chunk: it is estimated as soon as the queue and
    # the interval allow, so a burst's last estimate is never left for good on an older chunk
    "background": True,
    "max_pending_estimates": 2,
    # ... and at most one estimate per this many seconds (its CPU competes with ingestion for the GIL)
    "min_estimate_interval_seconds": 1.0,
    "seed": 0,
}


def _sort_key(label: Hashable) -> tuple[str, Any]:
    return (type(label).__name__, label) if isinstance(label, (int, float, str, bool)) else ("~", str(label))


def _finite(d: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if v is not None and math.isfinite(v)}


class _Chunk:
    """One closed analysis chunk waiting for its labels."""

    last_label = 0  # (a class default: chunks checkpointed before it existed read it too)

    def __init__(self, number: int, ids: list, proba: np.ndarray, pred: np.ndarray, closed: float):
        self.number = number
        self.ids = ids
        self.proba = proba  # (n, registry columns at close time)
        self.pred = pred  # registry column of the predicted class, -1 = none
        self.y = np.full(len(pred), -1, dtype=np.intp)  # registry column of the label, -1 = unknown
        self.labelled = 0
        self.closed = closed
        self.last_label = 0  # the monitor's prediction count when it was closed or last got a label


@dataclasses.dataclass
class EstimationJob:
    """Everything one chunk's estimation needs, detached from the live windows."""

    chunk: int
    ts: float
    classes: list
    metrics: tuple[str, ...]
    reference: tuple  # (features DataFrame, scores (n, K), label indices, prediction indices)
    analysis: tuple  # (features DataFrame, scores (m, K), prediction indices)
    seed: int
    draws: int
    mcbpe: dict

    def run(self) -> dict[str, Any]:
        ref_x, ref_s, ref_y, ref_pred = self.reference
        x, scores, pred = self.analysis
        binary = len(self.classes) == 2
        problem = "binary" if binary else "multiclass"
        record: dict[str, Any] = {"chunk": self.chunk, "ts": self.ts, "rows": len(pred), "classes": self.classes}
        mcbpe = MCBPE(problem, self.metrics, draws=self.draws, seed=self.seed, **self.mcbpe)
        if binary:
            mcbpe.fit(ref_x, ref_s[:, 1], ref_y, ref_pred)
            scores = scores[:, 1]
        else:
            mcbpe.fit(ref_x, ref_s, ref_y, ref_pred, classes=list(range(len(self.classes))))
        for name, est in (("cbpe", mcbpe.as_cbpe()), ("mcbpe", mcbpe)):
            bands = est.estimate_with_bands(x, scores, pred)
            record[name] = {m: b["value"] for m, b in bands.items()}
            record[f"{name}_bands"] = {m: [b["lower"], b["upper"]] for m, b in bands.items()}
        record["mcbpe_evidence"] = mcbpe.last_
        return record


def build_monitor(task: str = "classification", config: Mapping[str, Any] | None = None) -> ModelMonitor | NullMonitor:
    """The monitor a model's config asks for: ``{"enabled": false}`` turns monitoring off
    (:class:`NullMonitor`); otherwise every other key goes to :class:`ModelMonitor`.

    >>> type(build_monitor("classification", {"enabled": False, "chunk_size": 10})).__name__
    'NullMonitor'
    >>> build_monitor("classification", {"chunk_size": 10}).config["chunk_size"]
    10
    """
    cfg = dict(config or {})
    enabled = cfg.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"config.enabled: must be true or false, got {enabled!r}")
    if not enabled and (unknown := set(cfg) - set(DEFAULTS)):
        raise ValueError(f"unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return ModelMonitor(task, cfg or None) if enabled else NullMonitor(task)


class NullMonitor:
    """Monitoring switched off: observes nothing, never alarms, and reports the status shape of
    :meth:`ModelMonitor.status` with nothing detected or estimated (detector ``"off"``).

    >>> NullMonitor().status()["estimated"]
    {'cbpe': {}, 'mcbpe': {}, 'chunk': 0, 'ts': None}
    """

    def __init__(self, task: str = "classification"):
        self.task = task

    def observe_predictions(self, ids, xs, probas, preds, labelled) -> list[DriftEvent]:
        return []

    def observe_outcomes(self, ids, xs, probas, preds, ys, losses) -> list[DriftEvent]:
        return []

    def flush(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        off = {"active": False, "detected_total": 0, "detector": "off", "last": None}
        return {"drift": {kind: dict(off) for kind in ("concept", "data", "prediction")},
                "estimated": {"cbpe": {}, "mcbpe": {}, "chunk": 0, "ts": None},
                "realized": {"chunk": 0}}


class ModelMonitor:
    """Concept drift, data drift, prediction drift and CBPE/M-CBPE estimation for one model.

    Picklable (it is checkpointed with the model). ``config`` keys and defaults: ``DEFAULTS``.
    """

    def __init__(self, task: str = "classification", config: Mapping[str, Any] | None = None):
        if task not in ("classification", "regression"):
            raise ValueError(f"task: must be 'classification' or 'regression', got {task!r}")
        unknown = set(config or {}) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        cfg = {**DEFAULTS, **(config or {})}
        self.task = task
        self.config = cfg
        self.metrics = check_metrics(cfg["metrics"])
        if task == "regression" and DETECTORS.get(cfg["detector"], (None, False))[1]:
            raise ValueError(f"config.detector: {cfg['detector']!r} needs 0/1 errors; regressors have losses")
        try:
            self.concept = ConceptDriftDetector(cfg["detector"], cfg["detector_params"], cfg["concept_history"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.detector / detector_params: {e}") from None
        for key in ("data_drift", "prediction_drift", "mcbpe"):
            try:
                built = (MCBPE(**cfg[key]) if key == "mcbpe"
                         else DataDriftMonitor(key.split("_")[0], **cfg[key]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"config.{key}: {e}") from None
            if key != "mcbpe":
                setattr(self, key.split("_")[0], built)
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
        self._rows_seen = 0  # predictions observed
        self._deferred: tuple[_Chunk, dict[str, np.ndarray]] | None = None  # the newest chunk not estimated
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        self._where: dict[Hashable, tuple[int, int]] = {}  # id -> (chunk, row)
        self._chunk_no = 0
        self.estimated: dict[str, Any] = {"cbpe": {}, "mcbpe": {}, "chunk": 0, "ts": None}
        self.realized: dict[str, Any] = {"chunk": 0}
        # per chunk (bounded): estimates, bands, M-CBPE evidence, realized metrics — for benchmarks and plots
        self.history: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._open_pos: dict[Hashable, int] = {}  # id -> row of the open chunk
        self._open_y: dict[int, int] = {}  # open row -> label column (labels that beat their chunk)
        self._executor: ThreadPoolExecutor | None = None
        self._last_submit = -math.inf
        self._batch_cache: dict[str, tuple] = {}
        self._futures: list[Future] = []
        self.counters = {"chunks": 0, "chunks_realized": 0, "chunks_evicted": 0, "ids_evicted": 0,
                         "estimation_skipped": 0}

    # -- classes ------------------------------------------------------------------------------
    def _register(self, labels: Iterable[Hashable]) -> None:
        """Columns for the labels not registered yet; the reference grows once for all of them (a
        stream with many classes made one copy of the whole reference per class)."""
        new = [label for label in dict.fromkeys(labels) if label not in self._col]
        for label in new:
            self._col[label] = len(self._col)
        if new:
            self._ref_p = np.pad(self._ref_p, ((0, 0), (0, len(new))))

    def _proba_matrix(self, probas: Sequence[Mapping[Hashable, float] | None]) -> np.ndarray:
        col = self._col
        if isinstance(probas, ProbaRows) and probas.classes == list(col):
            return probas.matrix  # the learner's own matrix, its classes in the order registered here
        k = len(col)
        if k and probas and None not in probas and set(map(len, probas)) == {k}:
            # the usual batch: every row has a probability for every registered class, read a
            # class at a time (half the cost of a row of tuples through np.array)
            m = np.empty((len(probas), k))
            try:
                for label, c in col.items():
                    m[:, c] = np.fromiter(map(itemgetter(label), probas), dtype=float, count=len(probas))
            except KeyError:  # a new class (and one missing): the general path registers it
                pass
            else:
                return m
        return self._proba_matrix_rows(probas)

    def _proba_matrix_rows(self, probas: Sequence[Mapping[Hashable, float] | None]) -> np.ndarray:
        """The general path of :meth:`_proba_matrix`, a row at a time: registers new classes,
        zeros for classes a row does not name, ``None`` rows all zero."""
        col = self._col
        self._register(k for p in probas if p for k in p)
        m = np.zeros((len(probas), len(col)))
        for i, p in enumerate(probas):
            if p:
                for k, v in p.items():
                    m[i, col[k]] = v
        return m

    def _pred_cols(self, preds: Sequence[Hashable]) -> np.ndarray:
        out = np.fromiter(map(self._col.get, preds, repeat(-1)), dtype=np.intp, count=len(preds))
        unknown = np.flatnonzero(out == -1)  # labels seen for the first time, or no prediction (None)
        if len(unknown):
            self._register(preds[i] for i in unknown if preds[i] is not None)
            for i in unknown:
                if preds[i] is not None:
                    out[i] = self._col[preds[i]]
        return out

    def _pred_strings(self, preds: Sequence[Hashable], pred_cols: np.ndarray) -> np.ndarray:
        """``str`` of every prediction, as an object column (prediction drift tests it as a category).

        When every prediction and every registered class have one type among int, bool and str,
        equal labels print alike, so the strings come from one per class: a type check per row
        instead of a ``str`` call."""
        types = set(map(type, preds))
        if len(types) == 1 and (kind := types.pop()) in (int, bool, str) and all(type(c) is kind for c in self._col):
            return np.array([str(c) for c in self._col], dtype=object)[pred_cols]
        return np.asarray([str(p) for p in preds], dtype=object)

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
        self._collect()
        self._rows_seen += n
        cols = self._once("x", xs, columns_from_dicts)
        events = self.data.update(cols, now)
        classifier = self.task == "classification" and probas is not None
        if classifier:
            pm = self._once("p", probas, self._proba_matrix)
            pred_cols = self._once("pred", preds, self._pred_cols)
            pcols = {f"proba[{lab}]": pm[:, c] for lab, c in self._col.items() if c < pm.shape[1]}
            pcols["pred"] = self._pred_strings(preds, pred_cols)
        else:
            pcols = {"pred": np.asarray(preds, dtype=float)}
        events += self.prediction.update(pcols, now)
        if classifier:
            if not all(labelled):  # labels inline (the usual case): nothing joins the open chunk
                idx = np.flatnonzero(~np.asarray(labelled, dtype=bool))
                o = self._open
                for r, i in enumerate(idx.tolist(), start=self._open_rows):
                    self._open_pos[ids[i]] = r
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
        self._collect()
        losses = np.asarray(losses, dtype=float)
        if self.task == "classification" and self.concept.name != "kswin":
            signal = np.fromiter(map(ne, preds, ys), dtype=float, count=n)
        else:
            signal = losses
        events = self.concept.update_many(signal, losses, now)
        if self.task == "classification" and probas is not None:
            self._labels_seen.update(ys)
            pm = self._once("p", probas, self._proba_matrix)
            ycols = self._pred_cols(ys)
            pred_cols = self._once("pred", preds, self._pred_cols)
            self._add_reference(self._once("x", xs, columns_from_dicts), pm, ycols, pred_cols)
            self._join_labels(ids, ycols)
            self._expire(now)
        self._record(events)
        return events

    def _once(self, kind: str, batch: Sequence, convert) -> Any:
        """``convert(batch)``, computed once per batch: the service passes the same lists to
        ``observe_predictions`` and then ``observe_outcomes`` for events labelled at once. The cache
        holds the list itself, so its identity cannot be reused while cached."""
        cached = self._batch_cache.get(kind)
        if cached is not None and cached[0] is batch and cached[1] == len(batch):
            return cached[2]
        out = convert(batch)
        self._batch_cache[kind] = (batch, len(batch), out)
        return out

    # -- reference window -----------------------------------------------------------------------
    def _add_reference(self, cols, pm, ycols, pred_cols) -> None:
        size = self.config["reference_size"]
        n = len(ycols)
        take = min(n, size)
        k = pm.shape[1]
        pm, ycols, pred_cols = pm[n - take :], ycols[n - take :], pred_cols[n - take :]
        for dst, src in ring_slices(self._ref_x.n + n, take, size):
            self._ref_p[dst, :k] = pm[src]
            self._ref_p[dst, k:] = 0.0
            self._ref_y[dst] = ycols[src]
            self._ref_pred[dst] = pred_cols[src]
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
        self._chunk_no += 1
        chunk = _Chunk(self._chunk_no, ids[:rows], p[:rows], pred[:rows], now)
        chunk.last_label = self._rows_seen
        for r, i in enumerate(chunk.ids):
            self._where[i] = (chunk.number, r)
        # labels that arrived while the rows were still open
        for r, y in self._open_y.items():
            if r < rows:
                chunk.y[r] = y
        chunk.labelled = int((chunk.y >= 0).sum())
        # rows beyond this chunk stay open
        rest = len(ids) - rows
        self._open = {"ids": ids[rows:], "x": [{c: v[rows:] for c, v in x.items()}] if rest else [],
                      "p": [p[rows:]] if rest else [], "pred": [pred[rows:]] if rest else []}
        self._open_pos = {i: r - rows for i, r in self._open_pos.items() if r >= rows}
        self._open_y = {r - rows: y for r, y in self._open_y.items() if r >= rows}
        self._open_rows = rest
        self._open_since = now if rest else None
        self._chunks[chunk.number] = chunk
        self.counters["chunks"] += 1
        self._submit(chunk, {c: v[:rows] for c, v in x.items()}, now)
        if chunk.labelled >= self.config["realized_fraction"] * len(chunk.y):
            self._realize(chunk)
        quiet = self._rows_seen - self.config["realized_quiet_rows"]
        for older in [c for c in self._chunks.values() if c.last_label <= quiet]:
            if older.labelled and older.labelled >= self.config["realized_min_fraction"] * len(older.y):
                self._realize(older)
        while len(self._chunks) > self.config["max_open_chunks"]:
            self._evict(next(iter(self._chunks)))

    def _problem(self, classes: list[Hashable], proba: np.ndarray, pred: np.ndarray):
        """Scores over ``classes`` and predictions as indices into ``classes``, from registry columns.

        A predicted class outside ``classes`` (never seen in a label) becomes the most probable
        labelled class: it cannot be right, and estimation needs a labelled class."""
        cols = [self._col[c] for c in classes]
        proba = np.pad(proba, ((0, 0), (0, len(self._col) - proba.shape[1])))
        scores = proba[:, cols]
        lookup = np.full(len(self._col) + 1, -1, dtype=np.intp)
        lookup[cols] = np.arange(len(cols))
        idx = lookup[pred]  # pred == -1 (no prediction) hits the trailing -1
        return scores, np.where(idx >= 0, idx, np.argmax(scores, axis=1))

    def _submit(self, chunk: _Chunk, x: dict[str, np.ndarray], now: float) -> None:
        """Prepare the chunk's estimation job (copies, so the windows can move on) and run it here
        or on the background thread — unless the rate limit or a full queue says skip."""
        self._collect()
        self._deferred = None  # a newer chunk now
        job = self._job(chunk, x, now) if self._may_submit(now) else None
        if job is None:
            self.counters["estimation_skipped"] += 1
            self._deferred = (chunk, x)
            return
        self._run(job, now)

    def _may_submit(self, now: float) -> bool:
        busy = self.config["background"] and len(self._futures) >= self.config["max_pending_estimates"]
        return not busy and now - self._last_submit >= self.config["min_estimate_interval_seconds"]

    def _submit_deferred(self, now: float) -> None:
        """The newest chunk that got no estimate, once the queue and the interval allow."""
        if self._deferred is None or not self._may_submit(now):
            return
        chunk, x = self._deferred
        job = self._job(chunk, x, now)
        if job is not None:
            self._deferred = None
            self._run(job, now)

    def _run(self, job: EstimationJob, now: float) -> None:
        self._last_submit = now
        if not self.config["background"]:
            self._accept(job.run())
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="drift-estimation")
        self._futures.append(self._executor.submit(job.run))

    def _job(self, chunk: _Chunk, x: dict[str, np.ndarray], now: float) -> EstimationJob | None:
        """``None`` while there is no usable reference (fewer than ``min_reference`` rows or one class)."""
        classes = sorted(self._labels_seen, key=_sort_key)
        n_ref = len(self._ref_x)
        if len(classes) < 2 or n_ref < self.config["min_reference"]:
            return None
        cols = [self._col[c] for c in classes]
        keep = np.isin(self._ref_y[:n_ref], cols)
        ref_scores, ref_pred = self._problem(classes, self._ref_p[:n_ref][keep], self._ref_pred[:n_ref][keep])
        lookup = {c: i for i, c in enumerate(cols)}
        ref_y = np.fromiter((lookup[c] for c in self._ref_y[:n_ref][keep].tolist()), dtype=np.intp)
        if len(np.unique(ref_y)) < 2:
            return None
        scores, pred_idx = self._problem(classes, chunk.proba, chunk.pred)
        return EstimationJob(
            chunk=chunk.number, ts=now, classes=classes, metrics=self.metrics,
            reference=(pd.DataFrame({c: v[keep] for c, v in self._ref_x.columns().items()}), ref_scores, ref_y, ref_pred),
            analysis=(pd.DataFrame(x), scores, pred_idx),
            seed=self.config["seed"], draws=self.config["draws"], mcbpe=dict(self.config["mcbpe"]),
        )

    def _collect(self) -> None:
        while self._futures and self._futures[0].done():
            self._accept(self._futures.pop(0).result())

    def flush(self) -> None:
        """Wait for background estimates and publish them (tests and checkpoints call this)."""
        for f in self._futures:
            f.result()
        self._collect()

    def _accept(self, record: dict[str, Any]) -> None:
        rec = self._record_of(record["chunk"])
        rec.update(record)
        if record["chunk"] >= self.estimated["chunk"]:
            self.estimated = {"cbpe": _finite(record["cbpe"]), "mcbpe": _finite(record["mcbpe"]),
                              "chunk": record["chunk"], "ts": record["ts"]}

    def _record_of(self, number: int) -> dict[str, Any]:
        rec = self.history.get(number)
        if rec is None:
            rec = self.history[number] = {"chunk": number}
            while len(self.history) > 2 * self.config["max_open_chunks"]:
                self.history.popitem(last=False)
        return rec

    def _join_labels(self, ids: Sequence[Hashable], ycols: np.ndarray) -> None:
        if not self._open_pos and not self._where:
            return  # no unlabelled prediction waits (labels inline): nothing to look up
        touched = set()
        for i, y in zip(ids, ycols.tolist(), strict=True):
            row = self._open_pos.pop(i, None) if self._open_pos else None
            if row is not None:
                self._open_y[row] = y
                continue
            loc = self._where.pop(i, None) if self._where else None
            if loc is None:
                continue
            chunk = self._chunks[loc[0]]
            if chunk.y[loc[1]] < 0:
                chunk.labelled += 1
            chunk.y[loc[1]] = y
            chunk.last_label = self._rows_seen
            touched.add(loc[0])
        for number in touched:
            chunk = self._chunks[number]
            if chunk.labelled >= self.config["realized_fraction"] * len(chunk.y):
                self._realize(chunk)

    def _realize(self, chunk: _Chunk) -> int:
        """Realized metrics of ``chunk`` on the labels it has; it leaves the open set (returns how
        many of its ids were still waiting for a label)."""
        classes = sorted(self._labels_seen, key=_sort_key)
        have = chunk.y >= 0
        scores, pred_idx = self._problem(classes, chunk.proba[have], chunk.pred[have])
        lookup = {self._col[c]: i for i, c in enumerate(classes)}
        y = np.fromiter((lookup[c] for c in chunk.y[have].tolist()), dtype=np.intp, count=int(have.sum()))
        values = metrics_from_soft_labels(np.eye(len(classes))[y], pred_idx, scores, self.metrics)
        if chunk.number >= self.realized["chunk"]:  # (an older chunk may be realized after a newer one)
            self.realized = {**_finite(values), "chunk": chunk.number, "labelled": round(float(have.mean()), 4)}
        self._record_of(chunk.number).update({"realized": values, "labelled": int(have.sum())})
        self.counters["chunks_realized"] += 1
        return self._drop(chunk.number)

    def _drop(self, number: int) -> int:
        gone = 0
        for i in self._chunks.pop(number).ids:
            if self._where.get(i, (None,))[0] == number:
                del self._where[i]
                gone += 1
        return gone

    def _evict(self, number: int) -> None:
        chunk = self._chunks[number]
        if chunk.labelled and chunk.labelled >= self.config["realized_min_fraction"] * len(chunk.y):
            self.counters["ids_evicted"] += self._realize(chunk)
            return
        self.counters["chunks_evicted"] += 1
        self.counters["ids_evicted"] += self._drop(number)

    def _expire(self, now: float) -> None:
        limit = self.config["label_expiry_seconds"]
        for number, chunk in list(self._chunks.items()):
            if now - chunk.closed > limit:
                self._evict(number)

    # -- checkpointing: the thread pool is not state; pending estimates are finished first --------
    def __getstate__(self) -> dict[str, Any]:
        self.flush()
        state = dict(self.__dict__)
        state["_executor"] = None
        state["_futures"] = []
        state["_batch_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a checkpoint from an earlier version: what was added since takes its default
        state["config"] = {**DEFAULTS, **state["config"]}
        state.setdefault("_rows_seen", 0)
        state.setdefault("_deferred", None)
        self.__dict__.update(state)

    # -- drift state and status ---------------------------------------------------------------
    def _record(self, events: list[DriftEvent]) -> None:
        for e in events:
            self._last[e.kind] = e
            log.info("%s drift, magnitude %.4g, evidence %s", e.kind, e.magnitude, e.evidence)

    def _kind_status(self, kind: str, detected: int, detector: str) -> dict[str, Any]:
        last = self._last[kind]
        active = last is not None and time.time() - last.ts < self.config["active_hold_seconds"]
        return {"active": bool(active), "detected_total": int(detected), "detector": detector,
                "last": last.to_dict() if last is not None else None}

    def status(self) -> dict[str, Any]:
        """``{"drift": {kind: {...}}, "estimated": {...}, "realized": {...}}`` (see architecture.md).

        Publishes the background estimates finished since the last call first, so the last chunk's
        estimate shows even when no more events come (call from the model's writer thread)."""
        self._collect()
        self._submit_deferred(time.time())
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
