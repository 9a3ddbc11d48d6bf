"""Data and prediction drift: tests against scipy, multiple-testing control, windows, monitor."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from drift.data_drift import (
    DataDriftMonitor,
    Window,
    _column,
    benjamini_hochberg,
    chi2_test,
    columns_from_dicts,
    ks_test,
)
from learners.protocol import FeatureRows, transpose


def test_ks_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=3000), rng.normal(0.1, 1.0, size=1000)
    d, p = ks_test(np.sort(a), b)
    ref = stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(ref.statistic)
    assert p == pytest.approx(ref.pvalue, rel=0.05)


def _ks_statistic_by_definition(ref_sorted, cur):
    cur = np.sort(cur[~np.isnan(cur)])
    grid = np.r_[ref_sorted, cur]
    return float(np.max(np.abs(np.searchsorted(ref_sorted, grid, "right") / len(ref_sorted)
                               - np.searchsorted(cur, grid, "right") / len(cur))))


_ks_values = st.one_of(st.integers(-3, 3).map(float), st.floats(-1e3, 1e3), st.sampled_from([np.inf, -np.inf, -0.0]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_ks_values, min_size=1, max_size=60), st.lists(st.one_of(_ks_values, st.just(np.nan)), max_size=60))
def test_ks_statistic_is_exactly_the_largest_cdf_gap_with_ties(ref, cur):
    # the merge gives the very floats of the textbook two-searchsorted formula, ties and infinities included
    ref_sorted, cur = np.sort(np.asarray(ref)), np.asarray(cur, dtype=float)
    d, p = ks_test(ref_sorted, cur)
    if np.isnan(cur).all():
        assert (d, p) == (0.0, 1.0)
    else:
        assert d == _ks_statistic_by_definition(ref_sorted, cur)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=80, unique=True),
       st.lists(st.floats(-10, 10), min_size=1, max_size=80, unique=True))
def test_ks_statistic_without_ties_is_exactly_the_largest_cdf_gap(ref, cur):
    # distinct values: every gap is at a current value or at the reference value just below one
    ref_sorted, cur = np.sort(np.asarray(ref)), np.asarray(cur)
    assert ks_test(ref_sorted, cur)[0] == _ks_statistic_by_definition(ref_sorted, cur)


def test_chi2_matches_scipy_and_reports_total_variation():
    ref_counts = {"a": 500, "b": 300, "c": 200}
    cur = np.array(["a"] * 40 + ["b"] * 30 + ["c"] * 30, dtype=object)
    tv, p = chi2_test(ref_counts, cur)
    table = np.array([[500, 300, 200], [40, 30, 30]])
    assert p == pytest.approx(stats.chi2_contingency(table, correction=False)[1])
    assert tv == pytest.approx(0.5 * (0.1 + 0.0 + 0.1))


def test_benjamini_hochberg_closed_form():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # thresholds 0.05 * k / 10: the largest k with p_(k) <= threshold is k = 2
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True] + [False] * 8


def test_columns_from_dicts_types_and_missing_values():
    cols = columns_from_dicts([{"a": 1, "b": "x", "c": True}, {"a": None, "b": None}, {"a": 2.5, "b": 3, "d": 1}])
    assert cols["a"].dtype == float and np.isnan(cols["a"][1])
    assert cols["b"].tolist() == ["x", "", "3"]  # a column with a string is categorical
    assert cols["c"][0] == 1.0 and np.isnan(cols["c"][1])
    assert np.isnan(cols["d"][0]) and cols["d"][2] == 1.0


def test_window_is_a_bounded_ring_with_late_and_retyped_columns():
    w = Window(capacity=4)
    w.append({"a": np.arange(3.0)}, 3)
    w.append({"a": np.arange(3.0, 6.0), "b": np.array(["x", "y", "z"], dtype=object)}, 3)
    assert len(w) == 4
    assert sorted(w.columns()["a"].tolist()) == [2.0, 3.0, 4.0, 5.0]
    assert sorted(w.columns()["b"].tolist()) == ["", "x", "y", "z"]
    w.append({"a": np.array(["s"], dtype=object)}, 1)  # a stray string in a numeric column: missing
    assert w.columns()["a"].dtype == float and np.isnan(w.columns()["a"]).sum() == 1 and w.coerced == 1
    w.append({"a": np.array(["7.5", ""], dtype=object)}, 2)  # strings that are numbers stay numbers
    assert 7.5 in w.columns()["a"].tolist() and w.coerced == 1
    empty = Window(capacity=4)
    empty.append({"c": np.full(2, np.nan)}, 2)  # nothing but missing values so far
    empty.append({"c": np.array(["x", "y"], dtype=object)}, 2)  # a column that never held a number turns categorical
    assert sorted(empty.columns()["c"].tolist()) == ["", "", "x", "y"]
    named = Window(capacity=4, numeric={"n"})
    named.append({"n": np.array(["1", "oops"], dtype=object)}, 2)  # numeric from its first value
    assert named.columns()["n"].dtype == float and named.coerced == 1
    small = Window(capacity=10, max_columns=1)
    small.append({"a": np.zeros(2), "b": np.zeros(2)}, 2)
    assert list(small.columns()) == ["a"] and small.dropped_columns == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 7), st.lists(st.integers(0, 12), max_size=8))
def test_window_puts_row_r_at_slot_r_mod_capacity(capacity, sizes):
    # the ring's definition: after any appends, slot s holds the last row r ever appended with r % capacity == s
    w, rows = Window(capacity), 0
    for n in sizes:
        new = range(rows, rows + n)
        w.append({"r": np.array(new, dtype=float), "s": np.array([str(r) for r in new], dtype=object)}, n)
        rows += n
    assert len(w) == min(rows, capacity)
    want = [max(r for r in range(rows) if r % capacity == s) for s in range(len(w))]
    cols = w.columns()
    assert cols["r"].tolist() == want and cols["s"].tolist() == [str(r) for r in want] if rows else cols == {}


def _feed(mon, rng, n, mu=0.0, p_cat=(0.5, 0.5), batch=500):
    events = []
    for _ in range(n // batch):
        x = rng.normal(mu, 1.0, batch)
        xs = [{"num": float(v), "noise": float(u), "cat": str(rng.choice(["p", "q"], p=p_cat))}
              for v, u in zip(x, rng.normal(size=batch), strict=True)]
        events += mon.update(columns_from_dicts(xs), ts=1.0)
    return events


@pytest.mark.parametrize("seed", [0, 1])
def test_monitor_is_quiet_on_a_stationary_stream(seed):
    rng = np.random.default_rng(seed)
    mon = DataDriftMonitor(reference_size=2000, window_size=1000, check_every=1000)
    assert _feed(mon, rng, 40000) == []
    assert mon.checks >= 30


def test_monitor_fires_once_per_shift_naming_the_column():
    rng = np.random.default_rng(2)
    mon = DataDriftMonitor(reference_size=2000, window_size=1000, check_every=500)
    assert _feed(mon, rng, 5000) == []
    events = _feed(mon, rng, 10000, mu=0.5)
    assert len(events) == 1
    ev = events[0]
    assert ev.kind == "data" and list(ev.evidence["columns"]) == ["num"]
    assert ev.magnitude == pytest.approx(0.2, abs=0.07)  # KS distance of N(0,1) vs N(0.5,1)
    cat = _feed(mon, rng, 6000, mu=0.5, p_cat=(0.8, 0.2))
    assert len(cat) == 1 and list(cat[0].evidence["columns"]) == ["cat"]


@pytest.mark.parametrize("stray_at", [1000, 2010], ids=["in-the-reference", "first-in-the-current-window"])
def test_a_stray_string_in_a_numeric_column_neither_breaks_the_checks_nor_hides_a_shift(stray_at):
    # the event contract allows a string for any feature; the column must stay numeric for the tests
    rng = np.random.default_rng(4)
    mon = DataDriftMonitor(reference_size=2000, window_size=1000, check_every=500)
    events, rows = [], 0
    for mu in [0.0] * 10 + [1.0] * 6:
        xs = [{"num": float(v), "other": float(u)} for v, u in zip(rng.normal(mu, 1, 500), rng.normal(size=500), strict=True)]
        if rows <= stray_at < rows + 500:
            xs[stray_at - rows]["num"] = "not a number"
        events += mon.update(columns_from_dicts(xs), ts=0.0)
        rows += 500
    assert mon.checks >= 5
    assert [e.kind for e in events] == ["data"] and "num" in events[0].evidence["columns"]


def test_multivariate_signal_sees_a_correlation_change_the_marginals_miss():
    rng = np.random.default_rng(3)

    def feed(n, rho):
        cov = [[1, rho], [rho, 1]]
        out = []
        for _ in range(n // 500):
            x = rng.multivariate_normal([0, 0], cov, 500)
            out += mon.update({"a": x[:, 0], "b": x[:, 1]}, ts=0.0)
        return out

    mon = DataDriftMonitor(reference_size=3000, window_size=1000, check_every=500)
    assert feed(6000, 0.95) == []
    events = feed(3000, -0.95)  # same N(0, 1) marginals, opposite correlation
    assert len(events) == 1
    assert events[0].evidence["columns"] == {}
    assert events[0].evidence["multivariate"]["z"] > 6


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_one_extreme_finite_value_in_the_reference_does_not_blind_the_multivariate_signal():
    # 1.8e308 made the reference's mean and variance overflow: every later z was NaN, nothing fired
    rng = np.random.default_rng(3)
    mon = DataDriftMonitor(reference_size=3000, window_size=1000, check_every=500)
    x = rng.multivariate_normal([0, 0], [[1, 0.95], [0.95, 1]], 3000)
    x[10, 0], x[20, 1] = 1.7976931348623157e308, -1e308
    for part in np.split(x, 6):
        assert mon.update({"a": part[:, 0], "b": part[:, 1]}, ts=0.0) == []
    events = []
    for _ in range(6):
        part = rng.multivariate_normal([0, 0], [[1, -0.95], [-0.95, 1]], 500)
        events += mon.update({"a": part[:, 0], "b": part[:, 1]}, ts=0.0)
    assert len(events) == 1 and events[0].evidence["multivariate"]["z"] > 6


def test_identifier_like_columns_are_not_tested():
    rng = np.random.default_rng(4)
    mon = DataDriftMonitor(reference_size=2000, window_size=1000, check_every=500)
    events, n = [], 0
    for _ in range(12):
        ids = np.array([f"user-{n + i}" for i in range(500)], dtype=object)  # never repeats
        n += 500
        events += mon.update({"id": ids, "x": rng.normal(size=500)}, ts=0.0)
    assert events == []
    assert mon.last_check["identifier_columns_skipped"] == ["id"] and mon.last_check["columns_tested"] == 1


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="correction"):
        DataDriftMonitor(correction="holm")
    with pytest.raises(ValueError, match="window_size"):
        DataDriftMonitor(reference_size=100, window_size=200)


def _columns_key_by_key(xs):
    """The definition: one column per key of any row, ``None`` where a row lacks it."""
    keys = list(dict.fromkeys(k for x in xs for k in x))
    return {k: _column([x.get(k) for x in xs]) for k in keys}


_values = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.floats(-1e6, 1e6),
                    st.sampled_from(["a", "b", "east", "1.5", " 2 ", "nan", "1e400"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["x", "y", "z", "c"]), min_size=1, max_size=4, unique=True),
       st.lists(st.lists(_values, min_size=4, max_size=4), min_size=1, max_size=30),
       st.booleans(), st.integers(0, 3))
def test_columns_from_dicts_fast_transpose_agrees_with_the_definition(keys, rows, shuffle, drop):
    xs = [dict(zip(keys, row, strict=False)) for row in rows]
    if shuffle:  # same keys, another order in some rows
        xs = [dict(reversed(x.items())) if i % 2 else x for i, x in enumerate(xs)]
    if drop and len(xs) > 1 and len(keys) > 1:  # a ragged batch: the general path
        xs[-1] = {k: v for k, v in xs[-1].items() if k != keys[drop % len(keys)]}
    want = _columns_key_by_key(xs)
    rows = FeatureRows(xs)
    transpose(rows, list(reversed(list(xs[0]))))  # what the learner's encoder leaves on the service's batches
    for got in (columns_from_dicts(xs), columns_from_dicts(rows)):
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == want[k].dtype
            if want[k].dtype == object:
                assert got[k].tolist() == want[k].tolist()
            else:
                np.testing.assert_array_equal(got[k], want[k])


def test_same_sized_rows_with_other_keys_keep_every_column():
    cols = columns_from_dicts([{"a": 1.0}, {"b": 2.0}])
    assert list(cols) == ["a", "b"]
    assert np.isnan(cols["a"][1]) and np.isnan(cols["b"][0])


@pytest.mark.parametrize(("n", "m"), [(5000, 2000), (2000, 2000), (300, 100)])
def test_ks_p_value_is_within_two_percent_of_the_exact_distribution(n, m):
    rng = np.random.default_rng(n + m)
    ref = np.sort(rng.normal(size=n))
    for shift in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3):
        d, p = ks_test(ref, rng.normal(shift, 1.0, size=m))
        exact = float(stats.kstwo.sf(d, np.round(n * m / (n + m))))
        if exact >= 1e-5:
            assert p == pytest.approx(exact, rel=0.02), (shift, d)
        else:
            assert p == pytest.approx(exact, rel=0.07), (shift, d)


def test_columns_from_dicts_reads_dict_subclasses_like_plain_dicts():
    from collections import Counter, defaultdict

    rows = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "c": 4.0}]  # same sizes, other keys
    expected = columns_from_dicts(rows)
    for kind in (Counter, lambda r: defaultdict(float, r)):
        wrapped = [kind(r) for r in rows]
        got = columns_from_dicts(wrapped)
        assert got.keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
        assert [dict(r) for r in wrapped] == rows
