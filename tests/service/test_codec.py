"""The decoder never raises: random JSON and random bytes become an Event/Label or an Invalid."""

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.codec import (
    REASONS,
    Event,
    Invalid,
    Label,
    check_label,
    decode_event,
    decode_events,
    decode_label,
    decode_labels,
    pack,
    unpack,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False,
                                                                                allow_infinity=False) | st.text(max_size=8)


def _check(result, cls):
    assert isinstance(result, cls | Invalid)
    if isinstance(result, Invalid):
        assert result.reason in REASONS and result.detail
    return result


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(raw):
    _check(decode_event(raw), Event)
    _check(decode_label(raw), Label)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json_never_raises(value):
    raw = orjson.dumps(value)
    _check(decode_event(raw), Event)
    _check(decode_label(raw), Label)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "features", "label", "ts", "model", "other"]), json_values, max_size=6))
def test_random_event_shaped_objects_never_raise_and_valid_ones_keep_their_content(obj):
    result = _check(decode_event(orjson.dumps(obj)), Event)
    if isinstance(result, Event):
        assert result.id == str(obj["id"]) and result.features == obj["features"]
        assert all(v is None or isinstance(v, str | int | float | bool) for v in result.features.values())


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=10), st.dictionaries(st.text(max_size=6), scalars, max_size=8), scalars)
def test_well_formed_events_decode_exactly(eid, features, label):
    ev = decode_event(orjson.dumps({"id": eid, "features": features, "label": label, "ts": 1.5, "model": "m"}))
    assert ev == Event(eid, features, label, 1.5, "m")


@pytest.mark.parametrize(("raw", "reason", "field"), [
    (b"\xff\xfe", "not_json", "not JSON"),
    (b"[1, 2]", "not_object", "expected a JSON object"),
    (b'{"features": {}}', "missing_field", "id"),
    (b'{"id": "", "features": {}}', "missing_field", "id"),
    (b'{"id": 1.5, "features": {}}', "bad_type", "id"),
    (b'{"id": true, "features": {}}', "bad_type", "id"),
    (b'{"id": "a"}', "missing_field", "features"),
    (b'{"id": "a", "features": [1]}', "bad_type", "features"),
    (b'{"id": "a", "features": {"x": {"y": 1}}}', "bad_type", "features.x"),
    (b'{"id": "a", "features": {"x": 1e999}}', "non_finite", "features.x"),
    (b'{"id": "a", "features": {"x": -Infinity}}', "non_finite", "features.x"),
    (b'{"id": "a", "features": {"x": 1}, "label": [1]}', "bad_type", "label"),
    (b'{"id": "a", "features": {"x": 1}, "ts": "yesterday"}', "bad_type", "ts"),
    (b'{"id": "a", "features": {"x": 1}, "model": 3}', "bad_type", "model"),
])
def test_bad_events_name_the_field(raw, reason, field):
    bad = decode_event(raw)
    assert isinstance(bad, Invalid) and bad.reason == reason and bad.detail.startswith(field)
    # the batch decoder says the same, between good events
    good = b'{"id": "g", "features": {"x": 1.0}}'
    assert decode_events([good, raw, good]) == [decode_event(good), bad, decode_event(good)]


@pytest.mark.parametrize(("raw", "reason", "field"), [
    (b'{"id": "a"}', "missing_field", "label"),
    (b'{"id": "a", "label": null}', "missing_field", "label"),
    (b'{"id": "a", "label": {"k": 1}}', "bad_type", "label"),
    (b'{"label": 1}', "missing_field", "id"),
    (b'{"id": "a", "label": NaN}', "non_finite", "label"),
])
def test_bad_labels_name_the_field(raw, reason, field):
    bad = decode_label(raw)
    assert isinstance(bad, Invalid) and bad.reason == reason and bad.detail.startswith(field)
    good = b'{"id": "g", "label": 1}'
    assert decode_labels([good, raw, good]) == [decode_label(good), bad, decode_label(good)]


def test_integer_ids_join_string_ids():
    assert decode_label(b'{"id": 7, "label": 1}').id == decode_event(b'{"id": "7", "features": {}}').id


def test_regression_labels_must_be_numbers():
    assert check_label("cat", "regression").reason == "bad_label"
    assert check_label(True, "regression").reason == "bad_label"
    assert check_label(2.5, "regression") is None and check_label("cat", "classification") is None
    assert math.isfinite(decode_label(b'{"id": "a", "label": 2.5}').label)


event_like = st.fixed_dictionaries(
    {"id": st.text(max_size=4) | st.integers(0, 99), "features": st.dictionaries(st.text(max_size=3), scalars, max_size=5)},
    optional={"label": scalars | json_values, "ts": st.floats(0, 2e9) | st.integers(0, 2**40) | json_values,
              "model": st.text(max_size=3) | json_values, "other": json_values},
)
messages = st.one_of(
    st.binary(max_size=60),
    json_values.map(orjson.dumps),
    st.dictionaries(st.sampled_from(["id", "features", "label", "ts", "model"]), json_values, max_size=5).map(orjson.dumps),
    event_like.map(orjson.dumps),
    event_like.map(lambda e: orjson.dumps(e).replace(b"}", b', "x": NaN}', 1)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(messages, max_size=12))
def test_batch_decoders_agree_with_the_per_message_decoders(batch):
    assert decode_events(batch) == [decode_event(raw) for raw in batch]
    assert decode_labels(batch) == [decode_label(raw) for raw in batch]


@settings(max_examples=400, deadline=None)
@given(st.lists(messages, max_size=12))
def test_packed_batches_unpack_to_what_was_decoded(batch):
    # the fetcher process decodes and packs, the loop unpacks: the same items, in order, bad ones included
    for decoded in (decode_events(batch), decode_labels(batch)):
        assert unpack(pack(decoded)) == decoded
