"""FeatureEncoder: any mix of values gives finite float32 rows of a fixed width; state pickles."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from learners.encoder import FeatureEncoder
from learners.protocol import FeatureRows, float_column, transpose

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
keys = st.sampled_from([f"k{i}" for i in range(12)]) | st.text(min_size=1, max_size=5)
rows = st.lists(st.dictionaries(keys, values, max_size=8), min_size=0, max_size=12)


@settings(max_examples=80, deadline=None)
@given(st.lists(rows, min_size=1, max_size=4))
def test_any_values_any_keys_give_finite_fixed_width_float32(batches):
    enc = FeatureEncoder(max_numeric=4, n_buckets=16, bins=4)
    for batch in batches:
        for update in (False, True):
            X = enc.encode(batch, update=update)
            assert X.dtype == np.float32 and X.shape == (len(batch), enc.width)
            assert np.isfinite(X).all()
            assert np.abs(X[:, : enc.max_numeric]).max(initial=0.0) <= enc.clip
    again = pickle.loads(pickle.dumps(enc))
    for batch in batches:
        np.testing.assert_array_equal(again.encode(batch), enc.encode(batch))


@settings(max_examples=60, deadline=None)
@given(rows)
# huge values of keys that share a hashed slot, the other batch rows adding unregistered keys: the
# slot's sum must not depend on which keys the batch holds (float addition is not associative)
@example([{"k5": None},
          {"k0": 437050046578690.0, "k1": None, "k6": None, "k3": False, "©": -9793714983341834,
           "\U00018cd9": 1.0625, "\x03á]\x9c": False, "000": True},
          {"k8": None, "TRUE": None, "k7": False},
          {"k0": None, "k2": False, "k9": None, "k4": False, "k10": False, "0": 0, "\x1f": 0, "00": 0}])
def test_rows_are_encoded_independently_of_their_batch_and_key_order(batch):
    enc = FeatureEncoder(max_numeric=4, n_buckets=16, bins=4)
    enc.encode(batch, update=True)
    X = enc.encode(batch)
    for i, row in enumerate(batch):
        shuffled = dict(reversed(list(row.items())))
        np.testing.assert_array_equal(enc.encode([shuffled])[0], X[i])


def test_standardisation_tracks_a_drifting_mean_and_clips():
    enc = FeatureEncoder(max_numeric=2, n_buckets=4, halflife=100)
    rng = np.random.default_rng(0)
    for mean in (0.0, 50.0):
        for _ in range(100):
            enc.encode([{"x": float(v)} for v in rng.normal(mean, 1.0, size=16)], update=True)
        assert abs(enc._mean[0] - mean) < 0.5 and abs(enc._var[0] - 1.0) < 0.3
    assert enc.encode([{"x": 1e9}])[0, 0] == enc.clip


@pytest.mark.parametrize("categories", ["vocabulary", "hash"])
def test_missing_values_are_mean_imputed_with_an_indicator(categories):
    enc = FeatureEncoder(max_numeric=2, n_buckets=64, categories=categories)
    enc.encode([{"x": 1.0, "c": "a"}, {"x": 3.0, "c": "b"}, {"x": None, "c": None}], update=True)
    X = enc.encode([{"x": None, "c": None}, {"c": "a"}, {"x": float("nan"), "c": "a"}])
    assert (X[:, 0] == 0.0).all()
    assert X[0, 2:].sum() == 2  # x=<missing> and c=<missing>
    np.testing.assert_array_equal(X[1], X[2])  # an absent key and a NaN mean the same


def test_new_keys_mid_stream_take_free_slots_and_hashing_bounds_the_rest():
    enc = FeatureEncoder(max_numeric=3, n_buckets=8, max_keys=5)
    enc.encode([{"a": 1.0}, {"a": 2.0}], update=True)
    enc.encode([{"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 7.0}], update=True)
    assert enc._slots == {"a": 0, "b": 1}
    for i in range(20):  # far more keys than slots: bounded state, still encodes
        X = enc.encode([{f"new{i}": float(i), f"cat{i}": "v"}], update=True)
        assert X.shape == (1, 11)
    assert len(enc._kinds) == 5 and max(enc._slots.values()) < 3


def test_dataframe_and_dicts_encode_identically():
    enc = FeatureEncoder(max_numeric=4, n_buckets=16, bins=4)
    rows = [{"x": 1.0, "c": "u", "b": True}, {"x": 2.5, "c": "v", "b": False}, {"x": None, "c": None, "b": True}]
    enc.encode(rows, update=True)
    frame = pd.DataFrame(rows)
    np.testing.assert_array_equal(enc.encode_frame(frame), enc.encode(rows))


def test_categories_hash_stably_across_processes():
    # CRC-32 of "'colour'\x1fred" is fixed; Python's hash() would change with PYTHONHASHSEED
    enc = FeatureEncoder(max_numeric=1, n_buckets=1024, categories="hash")
    X = enc.encode([{"colour": "red"}])
    import zlib

    assert X[0, 1 + zlib.crc32(b"'colour'\x1fred") % 1024] == 1.0
    assert math.isclose(float(X.sum()), 1.0)


@settings(max_examples=80, deadline=None)
@given(st.lists(rows, min_size=1, max_size=5))
def test_learning_right_after_predicting_the_same_rows_encodes_as_learning_alone(batches):
    # the second encoder learns on deep copies (never the predicted dict objects), so it always
    # reads the rows afresh; the first may reuse what it read to predict
    reuse = FeatureEncoder(max_numeric=4, n_buckets=16, bins=4, crosses=3)
    fresh = FeatureEncoder(max_numeric=4, n_buckets=16, bins=4, crosses=3)
    for batch in batches:
        predicted = reuse.encode(batch)
        np.testing.assert_array_equal(predicted, fresh.encode(pickle.loads(pickle.dumps(batch))))
        np.testing.assert_array_equal(reuse.encode(batch, update=True),
                                      fresh.encode(pickle.loads(pickle.dumps(batch)), update=True))
    assert reuse._kinds == fresh._kinds and reuse._slots == fresh._slots
    for name in ("_mean", "_var", "_count"):
        np.testing.assert_array_equal(getattr(reuse, name), getattr(fresh, name))
    reuse.encode(batches[-1])
    assert pickle.loads(pickle.dumps(reuse))._predicted is None  # the kept rows are not state


def test_a_learned_batch_is_encoded_as_it_was_predicted_and_the_scalers_move_after():
    enc = FeatureEncoder(max_numeric=2, n_buckets=4, halflife=10)
    first = enc.encode([{"x": 1.0}, {"x": 3.0}], update=True)  # a new slot: its first values set its scale
    assert first[:, 0].tolist() == [-1.0, 1.0]
    rows = [{"x": 10.0}, {"x": 12.0}]
    predicted = enc.encode(rows)
    learned = enc.encode(rows, update=True)
    assert learned is predicted  # the very matrix: the learner recognises its features by it
    read_afresh = FeatureEncoder(max_numeric=2, n_buckets=4, halflife=10)
    read_afresh.encode([{"x": 1.0}, {"x": 3.0}], update=True)
    np.testing.assert_array_equal(read_afresh.encode([dict(r) for r in rows], update=True), predicted)
    assert enc._mean[0] > 2.0 and read_afresh._mean[0] == enc._mean[0]  # then they moved
    assert (enc.encode(rows)[:, 0] < predicted[:, 0]).all()


def test_reuse_needs_the_same_row_objects():
    encoders = [FeatureEncoder(max_numeric=2, n_buckets=8) for _ in range(2)]
    for enc in encoders:
        enc.encode([{"x": 1.0}, {"x": 3.0}], update=True)
    rows = [{"x": 10.0}, {"x": 30.0}]
    encoders[0].encode(rows)
    other = [rows[0], {"x": -30.0}]  # equal length, one object differs: read afresh
    X = [enc.encode(other, update=True) for enc in encoders]
    np.testing.assert_array_equal(X[0], X[1])
    np.testing.assert_array_equal(encoders[0]._mean, encoders[1]._mean)


numbers_or_missing = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1.5", "-2", "nan", "red"]),  # numbers sent as text, and a word
)
schema_rows = st.lists(
    st.fixed_dictionaries(
        {"a": numbers_or_missing, "b": st.floats(-10, 10), "c": st.sampled_from(["x", "y", None])},
        optional={"late": numbers_or_missing},
    ),
    min_size=1, max_size=10,
)


@settings(max_examples=80, deadline=None)
@given(st.lists(schema_rows, min_size=1, max_size=4), st.sampled_from([1, 2, 8]))
def test_numeric_columns_read_as_one_block_encode_as_read_key_by_key(batches, max_numeric):
    # max_numeric=1 puts several keys in one slot (they add up); "red" sends the batch key by key
    block = FeatureEncoder(max_numeric=max_numeric, n_buckets=16, bins=3)
    per_key = FeatureEncoder(max_numeric=max_numeric, n_buckets=16, bins=3)
    per_key._numeric_block = lambda *args: False
    for batch in batches:
        for update in (False, True):
            np.testing.assert_array_equal(block.encode(batch, update=update), per_key.encode(batch, update=update))
    assert block._kinds == per_key._kinds and block._slots == per_key._slots
    for name in ("_mean", "_var", "_count"):
        np.testing.assert_array_equal(getattr(block, name), getattr(per_key, name))


def test_dict_subclasses_encode_like_plain_dicts_and_are_not_changed():
    from collections import Counter, defaultdict

    rows = [{"a": 1.0, "b": 2.0, "w": "x"}, {"a": 3.0, "w": "y"}, {"a": 5.0, "b": 1.0, "w": "x"}]
    plain = FeatureEncoder(max_numeric=4, n_buckets=16)
    counted = FeatureEncoder(max_numeric=4, n_buckets=16)
    defaulted = FeatureEncoder(max_numeric=4, n_buckets=16)
    for _ in range(2):  # the second time every key is registered: the fixed-schema path is tried
        expected = plain.encode(rows, update=True)
        as_counter = [Counter(r) for r in rows]
        as_default = [defaultdict(float, r) for r in rows]
        np.testing.assert_array_equal(counted.encode(as_counter, update=True), expected)
        np.testing.assert_array_equal(defaulted.encode(as_default, update=True), expected)
        assert [dict(r) for r in as_default] == rows  # no key added to the caller's rows


def test_the_vocabulary_gives_each_token_a_bucket_of_its_own_until_they_run_out():
    enc = FeatureEncoder(max_numeric=1, n_buckets=8)
    values = [f"v{i}" for i in range(12)]
    enc.encode([{"c": v} for v in values[:8]], update=True)
    X = enc.encode([{"c": v} for v in values[:8]])
    assert (X[:, 1:].sum(axis=1) == 1).all() and sorted(X[:, 1:].argmax(axis=1)) == list(range(8))
    enc.encode([{"c": v} for v in values[8:]], update=True)  # no bucket left: these share by hashing
    Y = enc.encode([{"c": v} for v in values])
    assert (Y[:, 1:].sum(axis=1) == 1).all() and len(enc._vocab) == 8
    np.testing.assert_array_equal(Y[:8], X)  # a bucket, once given, stays


def test_buckets_are_given_in_one_order_whatever_the_order_of_rows_and_keys():
    rows = [{"a": "x", "b": "y", "n": None}, {"b": "z", "a": "w", "n": 1.0}, {"a": "x", "n": 2.0, "b": "q"}]
    encoders = [FeatureEncoder(max_numeric=2, n_buckets=16) for _ in range(2)]
    encoders[0].encode(rows, update=True)
    encoders[1].encode([dict(reversed(list(r.items()))) for r in reversed(rows)], update=True)
    assert encoders[0]._vocab == encoders[1]._vocab
    np.testing.assert_array_equal(encoders[0].encode(rows), encoders[1].encode(rows))


def test_a_token_not_learned_yet_lights_no_bucket_and_changes_nothing():
    enc = FeatureEncoder(max_numeric=1, n_buckets=8)
    enc.encode([{"c": "seen"}], update=True)
    state = pickle.dumps(enc)
    X = enc.encode([{"c": "new"}, {"c": "seen"}])
    assert X[0, 1:].sum() == 0 and X[1, 1:].sum() == 1
    assert pickle.dumps(enc) == state
    enc.encode([{"c": "new"}, {"c": "seen"}], update=True)  # learning it gives it a bucket
    assert enc.encode([{"c": "new"}])[0, 1:].sum() == 1 and len(enc._vocab) == 2


def test_an_encoder_pickled_before_the_vocabulary_keeps_hashing():
    hashed = FeatureEncoder(max_numeric=1, n_buckets=64, categories="hash")
    hashed.encode([{"c": "red"}, {"c": "blue"}], update=True)
    state = hashed.__getstate__()
    del state["categories"], state["_vocab"]  # what a checkpoint of an older version holds
    old = FeatureEncoder.__new__(FeatureEncoder)
    old.__setstate__(state)
    rows = [{"c": "red"}, {"c": "green"}]
    np.testing.assert_array_equal(old.encode(rows), hashed.encode(rows))
    assert old.categories == "hash"


def test_a_batch_keeps_its_transposition_for_the_next_reader():
    rows = [{"x": float(i), "c": "ab"[i % 2]} for i in range(50)]
    enc = FeatureEncoder(max_numeric=4, n_buckets=8)
    enc.encode(rows, update=True)
    batch = FeatureRows(rows)
    np.testing.assert_array_equal(enc.encode(batch), enc.encode(list(rows)))
    table = transpose(batch, ["c", "x"])  # another reader, another key order: the encoder's table
    assert transpose(batch, ["x", "c"]) is table and table["x"] == tuple(float(i) for i in range(50))
    assert transpose(batch, ["x"]) is None  # rows hold more than that
    assert transpose(FeatureRows([*rows, {"x": 1.0}]), ["x", "c"]) is None  # a ragged batch


def test_a_batch_keeps_its_numeric_columns_for_the_next_reader():
    rows = [{"x": float(i), "n": [None, True, "2.5", 3][i % 4], "c": "ab"[i % 2]} for i in range(40)]
    enc = FeatureEncoder(max_numeric=4, n_buckets=8)
    enc.encode(rows, update=True)
    batch = FeatureRows(rows)
    np.testing.assert_array_equal(enc.encode(batch), enc.encode(list(rows)))
    table = transpose(batch, ["x", "n", "c"])
    x = float_column(batch, table, "x")
    assert float_column(batch, table, "x") is x and not x.flags.writeable  # converted once, shared
    np.testing.assert_array_equal(float_column(batch, table, "n"), np.asarray(table["n"], dtype=float))
    with pytest.raises(ValueError):
        float_column(batch, table, "c")  # as np.asarray would
