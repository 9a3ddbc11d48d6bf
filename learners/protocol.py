"""The array-level interface the service drives every model through.

River's API (``learn_one``/``predict_proba_one``/``*_many``) is the public contract; the service's
hot path works on lists of feature dicts instead, so a model that can do better than a loop over
``*_one`` (or than building a DataFrame per batch) implements :class:`StreamModel` natively.
Any other River estimator is wrapped by :func:`as_stream_model`.
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

Features = dict[str, Any]
Proba = dict[Hashable, float]


class FeatureRows(list):
    """The feature dicts of one batch, which keep the table :func:`transpose` made of them: the
    learner's encoder and the service's monitor both read a batch column by column, and the service
    hands both the same rows (transposing 5,000 rows of 13 keys costs ~0.45 µs an event). Like
    any batch, it is not changed once made."""

    _table: tuple[frozenset, dict[Hashable, tuple]] | None = None
    _floats: dict[Hashable, np.ndarray] | None = None  # the table's columns as numbers (float_column)


class ProbaRows(Sequence[Proba]):
    """The class probabilities of a batch, a ``{class: probability}`` dict per row, kept as the
    matrix they come from (``matrix[i, j]``: row i's probability of ``classes[j]``; read-only).
    A row's dict is made when the row is read: the service's loop reads the matrix (the monitor,
    the prequential scores, the predictions topic) and dicts only for the events left waiting for
    their labels (5,000 dicts cost ~2 ms a batch). Compares equal to the list of its dicts.

    >>> rows = ProbaRows(np.array([[0.25, 0.75], [0.5, 0.5]]), ["a", "b"])
    >>> rows[0], len(rows), rows == [{"a": 0.25, "b": 0.75}, {"a": 0.5, "b": 0.5}]
    ({'a': 0.25, 'b': 0.75}, 2, True)
    >>> rows.of(["b", "a"]).tolist(), rows.of(["c", "a"]).tolist()  # a class not among them: 0
    ([0.75, 0.5], [0.0, 0.5])
    >>> ProbaRows(np.zeros((2, 0)), []).of(["a", "b"]).tolist()  # no class yet
    [0.0, 0.0]
    """

    __slots__ = ("matrix", "classes", "_rows")

    def __init__(self, matrix: np.ndarray, classes: Sequence[Hashable]):
        self.matrix = matrix
        self.classes = list(classes)
        self._rows: list[Proba] | None = None

    def __len__(self) -> int:
        return len(self.matrix)

    def __getitem__(self, i):  # (int → dict, slice → ProbaRows)
        if isinstance(i, slice):
            return ProbaRows(self.matrix[i], self.classes)
        if self._rows is not None:
            return self._rows[i]
        return dict(zip(self.classes, self.matrix[i].tolist(), strict=True))

    def __iter__(self) -> Iterator[Proba]:
        return iter(self.rows())

    def rows(self) -> list[Proba]:
        """Every row's dict (made once)."""
        if self._rows is None:
            # map/zip builds the dicts without a Python frame per row
            self._rows = list(map(dict, map(zip, itertools.repeat(self.classes), self.matrix.tolist())))
        return self._rows

    def of(self, labels: Sequence[Hashable]) -> np.ndarray:
        """Each row's probability of its label (0 for a class the rows do not name), as
        ``row.get(label, 0.0)`` would read it."""
        if not self.classes:  # (a learner that has seen no class yet)
            return np.zeros(len(labels))
        index = {c: j for j, c in enumerate(self.classes)}
        cols = np.fromiter(map(index.get, labels, itertools.repeat(-1)), dtype=np.intp, count=len(labels))
        out = self.matrix[np.arange(len(cols)), cols]
        out[cols < 0] = 0.0
        return out

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ProbaRows | list | tuple):
            return self.rows() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (mutable-looking, like the list it stands for)

    def __repr__(self) -> str:
        return repr(self.rows())


def probabilities_of(probas: Sequence[Proba], labels: Sequence[Hashable]) -> Sequence[float]:
    """Each row's probability of its label (0 for a class the row does not name)."""
    if isinstance(probas, ProbaRows):
        return probas.of(labels)
    return [p.get(y, 0.0) for p, y in zip(probas, labels, strict=True)]


def transpose(xs: Sequence[Features], keys: Sequence[Hashable]) -> dict[Hashable, tuple] | None:
    """``{key: the rows' values, in row order}`` when every row is a plain dict holding exactly
    ``keys`` (a fixed schema), else None: one C-level ``itemgetter`` call per row. Plain dicts,
    because ``itemgetter`` on a ``defaultdict`` or ``Counter`` would invent a missing key's value
    (and a ``defaultdict`` would keep it). :class:`FeatureRows` remember the last table.

    >>> transpose([{"a": 1, "b": "x"}, {"b": "y", "a": 2}], ["a", "b"])
    {'a': (1, 2), 'b': ('x', 'y')}
    >>> transpose([{"a": 1, "b": "x"}, {"a": 2}], ["a", "b"]) is None
    True
    """
    cached = getattr(xs, "_table", None)
    wanted = frozenset(keys)
    if cached is not None and cached[0] == wanted:
        return cached[1]
    if not xs or not keys or set(map(len, xs)) != {len(keys)} or set(map(type, xs)) != {dict}:
        return None
    try:
        if len(keys) == 1:  # (itemgetter of one key returns the value, not a tuple)
            table = {keys[0]: tuple(map(operator.itemgetter(keys[0]), xs))}
        else:
            table = dict(zip(keys, zip(*map(operator.itemgetter(*keys), xs), strict=True), strict=True))
    except KeyError:  # as many keys, other ones
        return None
    if isinstance(xs, FeatureRows):
        xs._table, xs._floats = (wanted, table), {}
    return table


def float_column(xs: Sequence[Features], table: dict[Hashable, tuple], key: Hashable) -> np.ndarray:
    """``np.asarray(table[key], dtype=float)`` for ``table = transpose(xs, ...)``: None → NaN,
    bools → 0/1, numeric strings parsed, and the same errors for anything else (``np.fromiter``
    converts each value as ``asarray`` does). Read-only, and kept on a :class:`FeatureRows`
    batch: the learner's encoder and the service's monitor read the same numeric columns (each
    conversion of a 5,000-row batch's ten was ~1 ms).

    >>> rows = FeatureRows([{"x": 1, "c": "a"}, {"x": None, "c": "b"}])
    >>> float_column(rows, transpose(rows, ["x", "c"]), "x")
    array([ 1., nan])
    """
    floats = xs._floats if isinstance(xs, FeatureRows) and xs._table is not None and xs._table[1] is table else None
    column = floats.get(key) if floats is not None else None
    if column is None:
        values = table[key]
        column = np.fromiter(values, dtype=np.float64, count=len(values))
        column.flags.writeable = False
        if floats is not None:
            floats[key] = column
    return column


@runtime_checkable
class Predictor(Protocol):
    """A read-only model: safe to call from another thread than the learner's. A model that
    cannot predict at all (its weights diverged) raises :class:`ModelUnavailable`, never
    non-finite probabilities."""

    task: str  # "classification" or "regression"

    def predict_batch(self, xs: Sequence[Features]) -> list[Any]:
        """Labels (classification, ``None`` before any class was seen) or floats (regression)."""

    def predict_proba_batch(self, xs: Sequence[Features]) -> list[Proba]:
        """Class probabilities per row (classification only; ``{}`` before any class was seen)."""


@runtime_checkable
class StreamModel(Predictor, Protocol):
    """A learner the service owns as the single writer."""

    def learn_batch(self, xs: Sequence[Features], ys: Sequence[Any]) -> None:
        """Learn a micro-batch, in order. A row the model cannot take fails the call in one of two
        ways: :class:`RowsRejected` after every other row was learned, or any other exception with
        nothing learned (the service then halves the batch to find the rows at fault, unless it is
        :class:`ModelUnavailable`: then no row is at fault and the model takes none)."""

    def snapshot(self) -> Predictor:
        """A frozen copy that later ``learn_batch`` calls do not change (published to HTTP readers)."""

    def notify_drift(self, kind: str, magnitude: float) -> None:
        """A monitor saw drift (``kind`` in concept/data/prediction; ``magnitude`` >= 0 is the excess
        loss or test statistic). Learners with a shift-aware schedule react; others ignore it."""

    def diagnostics(self) -> dict[str, Any]:
        """``{"learning_rate": float | None, "kalman_gamma": float | None, "diverged": bool}``."""


def argmax_label(proba: Proba) -> Hashable | None:
    return max(proba, key=proba.__getitem__) if proba else None


def score(predictor: Predictor, xs: Sequence[Features]) -> tuple[list[Any], list[Proba] | None]:
    """Labels (floats for a regressor) and class probabilities (None for a regressor) of ``xs``,
    with one pass over the model. A classifier with ``predict_with_proba_batch`` gives both at
    once (the most probable class of each row, ties to the first, as :func:`argmax_label`): the
    learner picks its labels from the probability matrix instead of a ``max`` over each row's
    dict (0.4 µs an event).

    >>> class Coin:
    ...     task = "classification"
    ...     def predict_proba_batch(self, xs):
    ...         return [{"heads": x["p"], "tails": 1 - x["p"]} for x in xs]
    >>> score(Coin(), [{"p": 0.75}, {"p": 0.5}])
    (['heads', 'heads'], [{'heads': 0.75, 'tails': 0.25}, {'heads': 0.5, 'tails': 0.5}])
    """
    if predictor.task != "classification":
        return [float(y) for y in predictor.predict_batch(xs)], None
    both = getattr(predictor, "predict_with_proba_batch", None)
    if both is not None:
        return both(xs)
    probas = predictor.predict_proba_batch(xs)
    return [argmax_label(p) for p in probas], probas


def is_classifier(estimator: Any) -> bool:
    from river import base

    return isinstance(estimator, base.Classifier) or (
        hasattr(estimator, "predict_proba_one") and not isinstance(estimator, base.Regressor)
    )


class RowsRejected(ValueError):
    """Rows of a batch that a model could not take: ``rows`` maps their positions to the reason.
    ``learn_batch`` raises it after learning every other row; the HTTP predictor raises it for a
    request with instances the model cannot score."""

    def __init__(self, rows: dict[int, str]):
        super().__init__(f"{len(rows)} row(s) rejected: " + "; ".join(f"{i}: {r}" for i, r in list(rows.items())[:3]))
        self.rows = rows


class ModelUnavailable(RuntimeError):
    """The model as a whole cannot serve a call (a learner whose weights diverged): no row is at
    fault and none was handled. The service dead-letters the whole batch, which stays replayable
    once a good model is restored, and answers HTTP predictions with 503."""


class ModelDiverged(ModelUnavailable, FloatingPointError):
    """The model's state is not finite: it can neither predict nor learn until an earlier
    checkpoint is restored (``streamlearn_learner_diverged`` pages)."""


def failure(exc: BaseException) -> str:
    """An exception as one line for a dead letter or a log."""
    return f"{type(exc).__name__}: {exc}"


def rows_at_fault(run: Callable[[int, int], dict[int, str] | None], start: int, stop: int,
                  failed: Exception | None = None) -> dict[int, str]:
    """The rows in ``[start, stop)`` that fail on their own, with the reason.

    ``run(i, j)`` handles rows ``i`` to ``j - 1`` and either returns the rows it rejected itself
    (or None), or raises having handled none of them; then each half is run in turn, down to single
    rows. A batch with one bad row costs about 2·log₂(n) calls instead of n. :class:`ModelUnavailable`
    puts every row at fault at once: halving would only repeat the same refusal 2n − 1 times.
    ``failed`` is what ``run(start, stop)`` already raised, for a caller that tried the whole
    batch itself: it is not run again.

    >>> def run(i, j):  # fails on any run of rows that holds row 3 or row 6
    ...     if i <= 3 < j or i <= 6 < j:
    ...         raise ValueError("bad row")
    >>> rows_at_fault(run, 0, 8)
    {3: 'ValueError: bad row', 6: 'ValueError: bad row'}
    >>> calls = []
    >>> def diverged(i, j):
    ...     calls.append((i, j))
    ...     raise ModelUnavailable("diverged")
    >>> rows_at_fault(diverged, 0, 3), calls
    ({0: 'ModelUnavailable: diverged', 1: 'ModelUnavailable: diverged', 2: 'ModelUnavailable: diverged'}, [(0, 3)])
    """
    if failed is None:
        try:
            return run(start, stop) or {}
        except Exception as exc:  # noqa: BLE001 - narrowed down below, reported row by row
            failed = exc
    if isinstance(failed, ModelUnavailable) or stop - start == 1:
        return dict.fromkeys(range(start, stop), failure(failed))
    mid = (start + stop) // 2
    return {**rows_at_fault(run, start, mid), **rows_at_fault(run, mid, stop)}


class RiverStreamModel:
    """Adapts any River estimator (or pipeline) to :class:`StreamModel` by looping ``*_one``."""

    # class defaults: adapters pickled before these existed read them too (never mutated here)
    diverged = False
    labels: dict[Hashable, Hashable] = {}  # noqa: RUF012

    def __init__(self, estimator: Any):
        self.estimator = estimator
        self.task = "classification" if is_classifier(estimator) else "regression"
        # every class learned, as it was given: River's binary classifiers answer True/False for
        # labels 1/0 (equal keys in Python, "true"/"false" in JSON): they are answered as given
        self.labels = {}

    def predict_proba_batch(self, xs: Sequence[Features]) -> list[Proba]:
        self._refuse_if_diverged()
        probas = [dict(self.estimator.predict_proba_one(x)) for x in xs]
        if not all(math.isfinite(p) for proba in probas for p in proba.values()):
            self._not_finite()
        labels = self.labels
        if labels and probas and any(type(k) is bool and type(labels.get(k, k)) is not bool for k in probas[0]):
            probas = [{labels.get(k, k): p for k, p in proba.items()} for proba in probas]
        return probas

    def predict_batch(self, xs: Sequence[Features]) -> list[Any]:
        if self.task == "classification":
            return [argmax_label(p) for p in self.predict_proba_batch(xs)]
        self._refuse_if_diverged()
        values = [float(self.estimator.predict_one(x)) for x in xs]
        if not all(map(math.isfinite, values)):
            self._not_finite()
        return values

    def learn_batch(self, xs: Sequence[Features], ys: Sequence[Any]) -> None:
        self._refuse_if_diverged()
        # row by row, so a row that fails has its predecessors learned already: go on with the
        # rest and say which failed, rather than leave the batch half learned with no way to tell
        rejected = {}
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            try:
                _check_magnitudes(x)
                self.estimator.learn_one(x, y)
            except Exception as exc:  # noqa: BLE001 - reported to the caller row by row
                rejected[i] = failure(exc)
            else:
                if self.task == "classification" and y not in self.labels:
                    self.labels = {**self.labels, y: y}
        if rejected:
            raise RowsRejected(rejected)

    def _not_finite(self) -> None:
        """Some prediction is NaN or infinite: the row's extreme values, or the whole model. River
        has no generic check of an estimator's state, so an empty row tells: a model that cannot
        predict even that one (its intercept, its scaler) has diverged, and says so from now on."""
        try:
            probe = self.estimator.predict_proba_one({}) if self.task == "classification" else \
                {None: self.estimator.predict_one({})}
            finite = all(math.isfinite(float(p)) for p in probe.values())
        except Exception:  # noqa: BLE001 - a model that cannot take an empty row is judged on the rows
            finite = True
        if not finite:
            self.diverged = True
            self._refuse_if_diverged()
        raise FloatingPointError("prediction: not finite for these features (extreme values?)")

    def _refuse_if_diverged(self) -> None:
        if self.diverged:
            raise ModelDiverged(_RIVER_DIVERGED)

    def snapshot(self) -> Predictor:
        snap = RiverStreamModel(copy.deepcopy(self.estimator))
        snap.labels = self.labels  # replaced, never changed in place: shared safely
        return snap

    def notify_drift(self, kind: str, magnitude: float) -> None:
        notify = getattr(self.estimator, "notify_drift", None)
        if notify is not None:
            notify(kind, magnitude)

    def diagnostics(self) -> dict[str, Any]:
        return {"learning_rate": None, "kalman_gamma": None, "diverged": self.diverged}


_RIVER_DIVERGED = ("the River model diverged: it predicts no finite value even for an empty row "
                   "(streamlearn_learner_diverged); restore an earlier checkpoint")
# beyond this a value's square overflows float64: a River scaler fed one turns NaN, and its model with it
_MAX_MAGNITUDE = 1e150


def _check_magnitudes(x: Features) -> None:
    for key, value in x.items():
        if type(value) in (int, float) and abs(value) > _MAX_MAGNITUDE:
            raise ValueError(f"features.{key}: {float(value):.3g} is too large to learn (beyond ±1e150 its square "
                             "overflows, and the model's state would turn NaN)")


def as_stream_model(estimator: Any) -> StreamModel:
    """The estimator itself when it implements the fast path, else a :class:`RiverStreamModel`."""
    if isinstance(estimator, StreamModel):
        return estimator
    return RiverStreamModel(estimator)
