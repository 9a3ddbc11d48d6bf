"""Decode and validate Kafka messages (events, labels) into typed records, or say why not.

A message that cannot be used becomes an :class:`Invalid` with a short ``reason`` (the label value
of ``streamlearn_dead_letters_total``) and a ``detail`` naming the field; it is never an exception.

>>> decode_event(b'{"id": "e1", "features": {"x": 1.5, "colour": "red", "seen": true, "z": null}}')
Event(id='e1', features={'x': 1.5, 'colour': 'red', 'seen': True, 'z': None}, label=None, ts=None, model=None)
>>> decode_event(b'{"id": 7, "features": {"x": [1, 2]}}')
Invalid(reason='bad_type', detail='features.x: expected a number, string, boolean or null, got array')
>>> decode_label(b'{"id": "e1", "label": 1e999}')
Invalid(reason='non_finite', detail='label: expected a finite number')
>>> decode_event(b'{"id": "e2", "features": {"x": NaN}}')
Invalid(reason='non_finite', detail='features.x: expected a finite number')
>>> decode_label(b'{"label": "cat"}')
Invalid(reason='missing_field', detail='id: required')

Event ids may be strings or integers (integers are turned into their decimal string, so a label
with ``"id": 7`` joins an event with ``"id": "7"``). A ``null`` label means "no label yet".
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import marshal
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

_SCALARS = (str, int, float, bool, type(None))
_LABEL_TYPES = (str, int, float, bool)
# orjson makes exactly these types (no subclasses): the batch paths compare types, not isinstance
_SCALAR_SET = frozenset(_SCALARS)
_LABEL_SET = frozenset(_LABEL_TYPES)
_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}

REASONS = ("not_json", "non_finite", "not_object", "missing_field", "bad_type", "unknown_model", "bad_label")


@dataclass(slots=True)
class Event:
    id: str
    features: dict[str, Any]
    label: Any = None
    ts: float | None = None
    model: str | None = None


@dataclass(slots=True)
class Label:
    id: str
    label: Any
    model: str | None = None


@dataclass(slots=True, frozen=True)
class Invalid:
    reason: str
    detail: str


def json_type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages that name what was found."""
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _non_finite_path(raw: bytes) -> str | None:
    """orjson refuses NaN/Infinity/1e999 outright; the lenient stdlib parser finds which field it was."""
    try:
        obj = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if type(value) is float and not math.isfinite(value):
            return path or "(document)"
        if type(value) is dict:
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in value.items())
        elif type(value) is list:
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


def _parse(raw: bytes) -> dict | Invalid:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        path = _non_finite_path(raw)
        if path is not None:
            return Invalid("non_finite", f"{path}: expected a finite number")
        return Invalid("not_json", f"not JSON: {exc}")
    except TypeError as exc:  # not bytes at all
        return Invalid("not_json", f"not JSON: {exc}")
    if type(obj) is not dict:
        return Invalid("not_object", f"expected a JSON object, got {json_type_name(obj)}")
    return obj


def _id(obj: dict) -> str | Invalid:
    value = obj.get("id")
    if type(value) is str:
        return value if value else Invalid("missing_field", "id: must not be empty")
    if type(value) is int:
        return str(value)
    if value is None:
        return Invalid("missing_field", "id: required")
    return Invalid("bad_type", f"id: expected a string or integer, got {json_type_name(value)}")


def _model(obj: dict) -> str | None | Invalid:
    value = obj.get("model")
    if value is None or type(value) is str:
        return value
    return Invalid("bad_type", f"model: expected a string, got {json_type_name(value)}")


def _label(value: Any, required: bool) -> Any:
    if value is None:
        return Invalid("missing_field", "label: required") if required else None
    if isinstance(value, _LABEL_TYPES):
        return value
    return Invalid("bad_type", f"label: expected a string, number or boolean, got {json_type_name(value)}")


def decode_event(raw: bytes) -> Event | Invalid:
    """``{"id", "features": {name: number | string | bool | null}, "label"?, "ts"?, "model"?}``."""
    obj = _parse(raw)
    if type(obj) is Invalid:
        return obj
    return _event(obj)


def _event(obj: dict) -> Event | Invalid:
    eid = _id(obj)
    if type(eid) is Invalid:
        return eid
    features = obj.get("features")
    if type(features) is not dict:
        if features is None:
            return Invalid("missing_field", "features: required")
        return Invalid("bad_type", f"features: expected an object, got {json_type_name(features)}")
    # One pass over the types; the slow loop below only runs to name the offending feature.
    if not all(isinstance(v, _SCALARS) for v in features.values()):
        for key, v in features.items():
            if not isinstance(v, _SCALARS):
                return Invalid("bad_type", f"features.{key}: expected a number, string, boolean or null, "
                                           f"got {json_type_name(v)}")
    label = _label(obj.get("label"), required=False)
    if type(label) is Invalid:
        return label
    ts = obj.get("ts")
    if ts is not None and (type(ts) not in (int, float) or not math.isfinite(ts)):
        return Invalid("bad_type", f"ts: expected a number of seconds, got {json_type_name(ts)}")
    model = _model(obj)
    if type(model) is Invalid:
        return model
    return Event(eid, features, label, None if ts is None else float(ts), model)


def decode_label(raw: bytes) -> Label | Invalid:
    """``{"id", "label", "model"?}``."""
    obj = _parse(raw)
    if type(obj) is Invalid:
        return obj
    return _label_message(obj)


def _label_message(obj: dict) -> Label | Invalid:
    eid = _id(obj)
    if type(eid) is Invalid:
        return eid
    label = _label(obj.get("label"), required=True)
    if type(label) is Invalid:
        return label
    model = _model(obj)
    if type(model) is Invalid:
        return model
    return Label(eid, label, model)


def decode_events(raws: Sequence[bytes]) -> list[Event | Invalid]:
    """:func:`decode_event` of each message, with the checks of a well-formed event (string id,
    scalar features, no or a valid label, ts and model) inlined in one loop: ~1 µs a message on
    top of ``orjson.loads`` instead of ~3. Anything else takes :func:`decode_event`'s path, which
    names what is wrong; the results are the same either way.

    >>> decode_events([b'{"id": "a", "features": {"x": 1}, "label": 0}', b'{"id": "b"}'])
    [Event(id='a', features={'x': 1}, label=0, ts=None, model=None), Invalid(reason='missing_field', detail='features: required')]
    """
    out: list[Event | Invalid] = []
    append, loads, scalars, labels = out.append, orjson.loads, _SCALAR_SET.issuperset, _LABEL_SET
    for raw in raws:
        try:
            obj = loads(raw)
        except (orjson.JSONDecodeError, TypeError):
            append(decode_event(raw))
            continue
        if type(obj) is dict:
            get = obj.get
            eid, features, label, ts, model = get("id"), get("features"), get("label"), get("ts"), get("model")
            if (type(eid) is str and eid and type(features) is dict and scalars(map(type, features.values()))
                    and (label is None or type(label) in labels)
                    and (ts is None or type(ts) is float or type(ts) is int)  # orjson: floats are finite
                    and (model is None or type(model) is str)):
                append(Event(eid, features, label, None if ts is None else float(ts), model))
                continue
            append(_event(obj))
        else:
            append(decode_event(raw))  # says what it is instead
    return out


def decode_labels(raws: Sequence[bytes]) -> list[Label | Invalid]:
    """:func:`decode_label` of each message, the well-formed ones on an inlined path (as
    :func:`decode_events`).

    >>> decode_labels([b'{"id": "a", "label": "cat"}', b'{"id": "b", "label": [1]}'])
    [Label(id='a', label='cat', model=None), Invalid(reason='bad_type', detail='label: expected a string, number or boolean, got array')]
    """
    out: list[Label | Invalid] = []
    append, loads, labels = out.append, orjson.loads, _LABEL_SET
    for raw in raws:
        try:
            obj = loads(raw)
        except (orjson.JSONDecodeError, TypeError):
            append(decode_label(raw))
            continue
        if type(obj) is dict:
            get = obj.get
            eid, label, model = get("id"), get("label"), get("model")
            if type(eid) is str and eid and type(label) in labels and (model is None or type(model) is str):
                append(Label(eid, label, model))
                continue
            append(_label_message(obj))
        else:
            append(decode_label(raw))  # says what it is instead
    return out


def pack(items: Sequence[Event | Label | Invalid]) -> bytes:
    """Decoded messages (all :class:`Event` or :class:`Label`, any of them :class:`Invalid`) as
    bytes for another process of the same Python: the fields of the well-formed ones as columns,
    and (position, reason, detail) of the others, in one ``marshal`` call. The fetcher process
    decodes its records and the loop unpacks them: a 5,000-event batch of the service's
    13-feature events unpacks in ~0.8 µs an event, decoding it took the loop ~3.

    >>> unpack(pack(decode_events([b'{"id": "a", "features": {"x": 1.5}}', b'[1]'])))
    [Event(id='a', features={'x': 1.5}, label=None, ts=None, model=None), Invalid(reason='not_object', detail='expected a JSON object, got array')]
    """
    good = [it for it in items if type(it) is not Invalid]
    bad = [(i, it.reason, it.detail) for i, it in enumerate(items) if type(it) is Invalid] if len(good) < len(items) else []
    kind = type(good[0]).__name__ if good else None
    fields = _FIELDS.get(kind, ())
    return marshal.dumps((kind, [[getattr(it, f) for it in good] for f in fields], bad))


def unpack(data: bytes) -> list[Event | Label | Invalid]:
    """The messages :func:`pack` packed, in their order."""
    kind, columns, bad = marshal.loads(data)
    good = list(map(_KINDS[kind], *columns)) if kind is not None else []
    if not bad:
        return good
    out: list[Event | Label | Invalid] = []
    rest = iter(good)
    at = 0
    for i, reason, detail in bad:
        out.extend(itertools.islice(rest, i - at))
        out.append(Invalid(reason, detail))
        at = i + 1
    out.extend(rest)
    return out


_KINDS = {"Event": Event, "Label": Label}
_FIELDS = {kind: [f.name for f in dataclasses.fields(cls)] for kind, cls in _KINDS.items()}


LABEL_KINDS = {"string": (str,), "number": (int, float), "boolean": (bool,)}


def label_kind(known: str | None, labels: Iterable[Any]) -> str | None:
    """The kind of label a classifier takes: ``known`` (its own, once fixed), else that of the first
    of ``labels`` that is not None (None when there is none). ``"string"``, ``"number"`` or
    ``"boolean"``: a classifier keeps to one, since labels of two kinds may print as one JSON key
    (``"1"`` and ``1`` in ``proba``) or be one class (``true == 1``).

    >>> label_kind(None, [None, 1, "a"]), label_kind("string", [1])
    ('number', 'string')
    """
    if known is not None:
        return known
    first = next((label for label in labels if label is not None), None)
    return None if first is None else next(kind for kind, types in LABEL_KINDS.items() if type(first) in types)


def check_label(label: Any, task: str, kind: str | None = None) -> Invalid | None:
    """A label the decoder accepted may still not suit the model: a regressor takes numbers, a
    classifier labels of the ``kind`` its first label had."""
    if task == "regression":
        if type(label) not in (int, float):
            return Invalid("bad_label", f"label: expected a number for a regression model, got {json_type_name(label)}")
    elif kind is not None and type(label) not in LABEL_KINDS[kind]:
        return Invalid("bad_label", f"label: expected a {kind} like this model's other labels, got "
                                    f"{json_type_name(label)} {label!r} (labels of two types may share a JSON key, "
                                    "\"1\" and 1, or be one class, true and 1)")
    return None
