"""Data drift and prediction drift: a frozen reference window against a sliding current window.

Per column, numeric values get a two-sample Kolmogorov–Smirnov test and categorical values a
chi-squared test on their frequency table (identifier-like string columns, mostly unique values,
are skipped: any two windows of ids differ); p-values are corrected across columns
(Benjamini–Hochberg by default, or Bonferroni) and a column only counts when its effect size
(KS statistic, or total-variation distance of the frequencies) also reaches ``min_effect`` — with
thousands of rows a test is significant for shifts nobody cares about. One multivariate signal
rides along: the mean PCA reconstruction error of the current window against its distribution on
the reference. Tests run every ``check_every`` rows, never per event; windows are ring buffers.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> mon = DataDriftMonitor("data", reference_size=2000, window_size=1000, check_every=500)
>>> def batch(n, mu):
...     return columns_from_dicts([{"a": float(v), "b": "x" if v > 0 else "y"} for v in rng.normal(mu, 1, n)])
>>> [mon.update(batch(500, 0.0), ts=0.0) for _ in range(8)] == [[]] * 8
True
>>> events = [e for _ in range(4) for e in mon.update(batch(500, 1.0), ts=1.0)]
>>> [e.kind for e in events], sorted(events[0].evidence["columns"])
(['data'], ['a', 'b'])
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import special

from drift.detectors import DriftEvent
from learners.protocol import float_column, transpose


def _column(values: Sequence) -> np.ndarray:
    try:
        return np.asarray(values, dtype=float)  # None -> nan, bools -> 0/1
    except (TypeError, ValueError):
        pass
    if set(map(type, values)) == {str}:
        return np.array(values, dtype=object)  # the usual categorical column: nothing to convert
    return np.asarray(["" if v is None else str(v) for v in values], dtype=object)


def columns_from_dicts(xs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Columnar view of a batch of feature dicts: float arrays (NaN = missing) or object arrays of
    strings (any column holding a non-number; ``""`` = missing).

    A batch whose dicts all have the keys of the first (the usual fixed schema) is transposed in C
    (:func:`learners.protocol.transpose`; the service's batches come transposed already by the
    learner's encoder, and their numeric columns converted: :func:`learners.protocol.float_column`);
    any other batch goes key by key with ``dict.get``. The arrays may be read-only."""
    if not xs:
        return {}
    keys = list(xs[0])
    table = transpose(xs, keys)
    if table is not None:
        return {k: _table_column(xs, table, k) for k in keys}
    keys = list(dict.fromkeys(k for x in xs for k in x))
    return {k: _column([x.get(k) for x in xs]) for k in keys}


def _table_column(xs: Sequence[Mapping[str, Any]], table: Mapping[str, tuple], key: str) -> np.ndarray:
    """``_column`` of one key of a transposed batch."""
    try:
        return float_column(xs, table, key)
    except (TypeError, ValueError):  # a non-number: _column decides (categorical, usually)
        return _column(list(table[key]))


def ring_slices(end: int, take: int, capacity: int) -> list[tuple[slice, slice]]:
    """Where the last ``take`` rows go in a ring of ``capacity`` once ``end`` rows were ever
    appended: ``(ring slice, slice of those take rows)`` pairs, two when they wrap around (slices
    copy faster than an index array). ``take <= capacity``.

    >>> ring_slices(end=7, take=3, capacity=5)
    [(slice(4, 5, None), slice(0, 1, None)), (slice(0, 2, None), slice(1, 3, None))]
    """
    start = (end - take) % capacity
    first = min(take, capacity - start)
    pairs = [(slice(start, start + first), slice(0, first))]
    if first < take:
        pairs.append((slice(0, take - first), slice(first, take)))
    return pairs


class Window:
    """A bounded columnar ring buffer. Columns appearing late are back-filled as missing. A numeric
    column stays numeric: a value in it that is not a number is kept as missing (``coerced`` counts
    them), so that one stray string does not turn a feature into text for the drift tests; only a
    column that has held no number yet becomes a string column. Columns named in ``numeric`` are
    numeric from their first value (a current window takes the reference's numeric columns). At
    most ``max_columns`` columns are tracked (``dropped_columns`` counts the rest)."""

    def __init__(self, capacity: int, max_columns: int = 256, numeric: Collection[str] = ()):
        self.capacity = capacity
        self.max_columns = max_columns
        self.numeric = frozenset(numeric)
        self.cols: dict[str, np.ndarray] = {}
        self.n = 0  # rows ever appended
        self.dropped_columns = 0
        self.coerced = 0

    def __len__(self) -> int:
        return min(self.n, self.capacity)

    def _new(self, numeric: bool) -> np.ndarray:
        return np.full(self.capacity, np.nan) if numeric else np.full(self.capacity, "", dtype=object)

    def append(self, batch: Mapping[str, np.ndarray], n: int) -> None:
        if n == 0:
            return
        take = min(n, self.capacity)
        ring = ring_slices(self.n + n, take, self.capacity)
        for name, values in batch.items():
            numeric = values.dtype != object
            col = self.cols.get(name)
            if col is None:
                if len(self.cols) >= self.max_columns:
                    self.dropped_columns += 1
                    continue
                col = self.cols[name] = self._new(numeric or name in self.numeric)
            elif col.dtype != object and not numeric and name not in self.numeric and np.isnan(col[: len(self)]).all():
                col = self.cols[name] = self._new(False)
            if col.dtype != object and not numeric:
                values = self._as_numbers(values)
            elif col.dtype == object and numeric:
                values = np.array(["" if np.isnan(v) else repr(v) for v in values], dtype=object)
            values = values[n - take :]
            for dst, src in ring:
                col[dst] = values[src]
        for name, col in self.cols.items():
            if name not in batch:
                for dst, _ in ring:
                    col[dst] = np.nan if col.dtype != object else ""
        self.n += n

    def _as_numbers(self, values: np.ndarray) -> np.ndarray:
        """A string column's values for a numeric column: numbers where they parse, else missing."""
        out = np.full(len(values), np.nan)
        for i, v in enumerate(values.tolist()):
            if v != "":
                try:
                    out[i] = float(v)
                except ValueError:
                    self.coerced += 1
        return out

    def columns(self) -> dict[str, np.ndarray]:
        """The filled rows of every column (ring order; the tests here are order-free)."""
        k = len(self)
        return {name: col[:k] for name, col in self.cols.items()}

    def snapshot(self) -> dict[str, np.ndarray]:
        return {name: col.copy() for name, col in self.columns().items()}


def benjamini_hochberg(pvalues: np.ndarray, alpha: float) -> np.ndarray:
    """Boolean mask of hypotheses rejected at false-discovery rate ``alpha``."""
    m = len(pvalues)
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(pvalues)
    passed = pvalues[order] <= alpha * np.arange(1, m + 1) / m
    reject = np.zeros(m, dtype=bool)
    if passed.any():
        reject[order[: np.flatnonzero(passed).max() + 1]] = True
    return reject


def ks_test(ref_sorted: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and asymptotic p-value (``ref_sorted`` pre-sorted, NaN-free).

    The p-value is Stephens' approximation of the KS distribution, ``Q((√n + 0.12 + 0.11/√n)·d)``
    with ``n = n₁n₂/(n₁+n₂)``: within 2% of scipy's ``kstwo.sf`` (``ks_2samp(method="asymp")``)
    down to p = 1e-5 and within 6% below, at ~1 µs where ``kstwo.sf`` takes ~1 ms a column.

    The statistic is ``max |F_ref(g) - F_cur(g)|`` over every value ``g`` of either sample, with
    ``F(g)`` the share of a sample ``<= g``. Between two current values ``F_cur`` is flat and
    ``F_ref`` only rises, so the gap peaks at a current value or at the last reference value below
    one: 2m evaluations, not n + m, from one merge of the two sorted samples (~2.5x cheaper than
    the textbook binary search of all n + m values into each sample, and the very same floats)."""
    cur = np.sort(cur[~np.isnan(cur)])
    n, m = len(ref_sorted), len(cur)
    if n == 0 or m == 0:
        return 0.0, 1.0
    merged = np.concatenate((ref_sorted, cur))
    order = np.argsort(merged, kind="stable")  # two sorted runs: a linear merge, equal values ref first
    at = np.flatnonzero(order >= n)  # merged position of each current value
    upto = at - np.arange(m)  # reference values <= each current value
    prev = order[at - 1]
    tied = (merged[prev] == cur) & (prev < n) & (at > 0)  # a reference value equals it (rare)
    below = upto  # reference values < each current value
    if tied.any():
        below = upto.copy()
        below[tied] = np.searchsorted(ref_sorted, cur[tied], "left")
    f_cur = np.arange(m + 1) / m
    repeated = cur[1:] == cur[:-1]
    # at a current value: F_cur counts its last copy; just below it, F_cur stops before its first
    at_value = np.abs(upto / n - f_cur[1:])
    at_value[:-1][repeated] = 0.0
    below_value = np.abs(below / n - f_cur[:-1])
    below_value[1:][repeated] = 0.0
    d = float(max(at_value.max(), below_value.max()))
    en = math.sqrt(n * m / (n + m))
    return d, float(special.kolmogorov((en + 0.12 + 0.11 / en) * d))


def chi2_test(ref_counts: dict[str, int], cur: np.ndarray, max_categories: int = 50) -> tuple[float, float]:
    """Chi-squared test of the two frequency tables (Pearson, no continuity correction, as
    ``scipy.stats.chi2_contingency(table, correction=False)``); effect = total-variation distance."""
    cur_counts = collections.Counter(cur.tolist())
    cats = sorted(set(ref_counts) | set(cur_counts), key=lambda c: -(ref_counts.get(c, 0) + cur_counts.get(c, 0)))
    head, tail = cats[:max_categories], cats[max_categories:]
    table = np.array(
        [[d.get(c, 0) for c in head] + [sum(d.get(c, 0) for c in tail)] for d in (ref_counts, cur_counts)], dtype=float
    )
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2 or (table.sum(1) == 0).any():
        return 0.0, 1.0
    freq = table / table.sum(1, keepdims=True)
    tv = 0.5 * float(np.abs(freq[0] - freq[1]).sum())
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return tv, float(special.chdtrc(table.shape[1] - 1, stat))


_HUGE = 1e150  # finite values beyond this are taken as this (their squares would overflow)


class Reconstruction:
    """PCA reconstruction error of standardised numeric columns (the multivariate signal).

    Fitted on the reference window; a window's mean error is compared with the reference's
    per-row error distribution (z-score of the mean, the rows assumed independent)."""

    cap = math.inf  # (a class default: references pickled before the cap existed read it too)

    def __init__(self, reference: Mapping[str, np.ndarray], variance: float = 0.9):
        names = [k for k, v in reference.items() if v.dtype != object]
        self.names = names
        x = self._matrix(reference, fit=True) if names else None
        if x is None or x.shape[0] < 10 or x.shape[1] < 2:
            self.components = None
            return
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        explained = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.searchsorted(explained, variance) + 1)
        self.components = vt[: min(k, x.shape[1] - 1)]
        err = self._errors(x)
        # a row's error counts up to 3× the reference's 99.9th percentile: a few wild rows (in the
        # reference or in a window) neither inflate the spread that z divides by nor fire alone
        self.cap = 3.0 * float(np.quantile(err, 0.999))
        err = np.minimum(err, self.cap)
        self.ref_mean, self.ref_std = float(err.mean()), float(err.std())

    def _matrix(self, cols: Mapping[str, np.ndarray], fit: bool = False) -> np.ndarray:
        x = np.column_stack([cols[n] if n in cols else np.full(len(next(iter(cols.values()))), np.nan) for n in self.names])
        x = np.clip(x, -_HUGE, _HUGE)
        if fit:
            # the scale of each column from its central 99.8%: one extreme (finite) value, 1e308,
            # made the mean and the variance overflow and every later score NaN (no detection ever)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: handled below
                lo, hi = np.nanquantile(x, [0.001, 0.999], axis=0)
                inner = np.clip(x, lo, hi)
                self.mean = np.nanmean(inner, axis=0)
                std = np.nanstd(inner, axis=0)
            self.mean = np.where(np.isfinite(self.mean), self.mean, 0.0)
            self.std = np.where((std > 0) & np.isfinite(std), std, 1.0)
        # a standardised value beyond ±1000 counts as 1000: an outlier row weighs, never overflows
        x = np.clip((x - self.mean) / self.std, -1e3, 1e3)
        return np.where(np.isnan(x), 0.0, x)

    def _errors(self, x: np.ndarray) -> np.ndarray:
        proj = x @ self.components.T @ self.components
        return np.sqrt(np.sum((x - proj) ** 2, axis=1))

    def score(self, current: Mapping[str, np.ndarray]) -> dict[str, float] | None:
        if self.components is None or not current:
            return None
        err = np.minimum(self._errors(self._matrix(current)), self.cap)
        z = (err.mean() - self.ref_mean) / (self.ref_std / np.sqrt(len(err)) + 1e-12)
        return {"error": float(err.mean()), "reference_error": self.ref_mean, "z": float(z)}


class DataDriftMonitor:
    """Reference window (the first ``reference_size`` rows, and again after each detection) versus
    the last ``window_size`` rows, tested every ``check_every`` rows.

    A detection is an event of ``kind`` whose magnitude is the largest effect among the drifted
    columns (or the relative rise of the reconstruction error when only that fired). The reference
    is then re-filled from the rows that follow, so one shift raises one event, not one per check.
    """

    def __init__(
        self,
        kind: str = "data",
        reference_size: int = 5000,
        window_size: int = 2000,
        check_every: int = 5000,
        alpha: float = 0.001,
        correction: str = "bh",
        min_effect: float = 0.1,
        multivariate: bool = True,
        z_multivariate: float = 6.0,
        max_columns: int = 256,
    ):
        if correction not in ("bh", "bonferroni"):
            raise ValueError(f"correction: use 'bh' or 'bonferroni', got {correction!r}")
        if window_size > reference_size:
            raise ValueError("window_size: must not exceed reference_size")
        self.kind = kind
        self.reference_size = reference_size
        self.window_size = window_size
        self.check_every = check_every
        self.alpha = alpha
        self.correction = correction
        self.min_effect = min_effect
        self.multivariate = multivariate
        self.z_multivariate = z_multivariate
        self.max_columns = max_columns
        self._filling = Window(reference_size, max_columns)
        self.current = Window(window_size, max_columns)
        self.reference: dict[str, Any] | None = None
        self._since_check = 0
        self.checks = 0
        self.detected = 0
        self.last_check: dict[str, Any] | None = None

    def _freeze(self, cols: Mapping[str, np.ndarray]) -> None:
        numeric = {k: np.sort(v[~np.isnan(v)]) for k, v in cols.items() if v.dtype != object}
        categorical, identifiers = {}, []
        for k, v in cols.items():
            if v.dtype == object:
                counts = collections.Counter(v.tolist())
                if len(counts) > max(100, len(v) // 2):
                    # identifier-like (mostly unique values): every window "differs", so never test it
                    identifiers.append(k)
                    continue
                categorical[k] = dict(counts)
        # the current window reads the reference's numeric columns as numbers, whatever comes first
        self.current = Window(self.window_size, self.max_columns, numeric=numeric)
        self.reference = {
            "numeric": numeric,
            "categorical": categorical,
            "identifiers": identifiers,
            "pca": Reconstruction(cols) if self.multivariate else None,
        }

    def update(self, batch: Mapping[str, np.ndarray], ts: float) -> list[DriftEvent]:
        n = len(next(iter(batch.values()))) if batch else 0
        if n == 0:
            return []
        if self.reference is None:
            self._filling.append(batch, n)
            if self._filling.n >= self.reference_size:
                self._freeze(self._filling.snapshot())
                self._filling = Window(1, 1)  # release the fill buffer
            return []
        self.current.append(batch, n)
        self._since_check += n
        if self._since_check < self.check_every or len(self.current) < self.window_size:
            return []
        self._since_check = 0
        return self.check(ts)

    def check(self, ts: float) -> list[DriftEvent]:
        """Run the tests now (normally called by ``update`` every ``check_every`` rows)."""
        self.checks += 1
        cur = self.current.columns()
        ref = self.reference
        names, effects, pvalues = [], [], []
        for name, values in cur.items():
            if values.dtype != object and name in ref["numeric"]:
                d, p = ks_test(ref["numeric"][name], values)
            elif values.dtype == object and name in ref["categorical"]:
                d, p = chi2_test(ref["categorical"][name], values)
            else:
                continue
            names.append(name)
            effects.append(d)
            pvalues.append(p)
        p = np.asarray(pvalues)
        effects = np.asarray(effects)
        reject = benjamini_hochberg(p, self.alpha) if self.correction == "bh" else p <= self.alpha / max(len(p), 1)
        drifted = reject & (effects >= self.min_effect)
        pca = ref["pca"].score(cur) if ref["pca"] is not None else None
        pca_fired = pca is not None and pca["z"] >= self.z_multivariate and pca["error"] >= 1.1 * pca["reference_error"]
        self.last_check = {
            "ts": ts,
            "columns_tested": len(names),
            "identifier_columns_skipped": ref["identifiers"],
            "columns_drifted": int(drifted.sum()),
            "multivariate": pca,
        }
        if not drifted.any() and not pca_fired:
            return []
        self.detected += 1
        columns = {
            names[i]: {"effect": float(effects[i]), "p_value": float(p[i])} for i in np.flatnonzero(drifted)
        }
        magnitude = float(effects[drifted].max()) if drifted.any() else pca["error"] / pca["reference_error"] - 1.0
        evidence = {"columns": columns, "multivariate": pca, "window": self.window_size, "correction": self.correction}
        # Learn the new regime afresh: a reference cut from the current window would straddle the shift.
        self.reference = None
        self._filling = Window(self.reference_size, self.max_columns)
        self.current = Window(self.window_size, self.max_columns)
        return [DriftEvent(self.kind, magnitude, evidence, ts)]
