"""Built-in drifting demo streams and the ``streamlearn produce`` command.

Each stream is an endless, seeded sequence of ``(features, label)`` pairs whose concept changes
over time, so a new user sees learning, drift alarms and recovery at once:

============  =====================================================================================
``sea``       SEA concepts (3 numeric features); abrupt concept drift every ``drift_every`` events
``agrawal``   Agrawal loan applications (9 features); the labelling function switches abruptly
``hyperplane``  rotating hyperplane (10 numeric features); slow incremental drift all the time
``stagger``   STAGGER shapes (3 categorical features); concepts recur in a cycle 0 → 1 → 2 → 0 …
``mixed``     10 numeric + 3 categorical features, a hidden linear concept re-drawn abruptly every
              ``drift_every`` events (the throughput benchmark's stream; generated in numpy blocks)
============  =====================================================================================

:func:`produce` writes a stream to Kafka as DESIGN.md's event messages ``{"id", "features",
"ts"[, "label"]}``. With ``label_delay=K`` the label of event *i* is not inline but sent to the
labels topic (``{"id", "label"}``) after event *i + K*; a ``unlabeled_fraction`` of events never
gets a label, which is what the service's performance estimation (CBPE / M-CBPE) is for.

>>> from itertools import islice
>>> [sorted(x) for x, _ in islice(iter_stream("sea", seed=1), 1)]
[['x0', 'x1', 'x2']]
>>> x, y = next(iter_stream("mixed", seed=1))
>>> len(x), sorted(k for k, v in x.items() if isinstance(v, str)), y in (0, 1)
(13, ['c0', 'c1', 'c2'], True)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

Event = tuple[dict[str, Any], Any]

DEFAULT_DRIFT_EVERY = 10_000


def _river_segments(make: Callable[[int, int], Any], concepts: list[int], drift_every: int, seed: int,
                    rename: Callable[[dict], dict[str, Any]]) -> Iterator[Event]:
    """Cycle through River generators ``make(concept, seed)``, ``drift_every`` events each."""
    for segment in itertools.count():
        concept = concepts[segment % len(concepts)]
        for x, y in itertools.islice(make(concept, seed + segment), drift_every):
            yield rename(x), y


def _named(x: dict) -> dict[str, Any]:
    # River's numeric-keyed generators: JSON object keys must be strings.
    return {f"x{k}": v for k, v in x.items()}


_STAGGER_NAMES = {
    "size": ("small", "medium", "large"),
    "color": ("red", "green", "blue"),
    "shape": ("square", "circle", "triangle"),
}


def _stagger_named(x: dict) -> dict[str, Any]:
    return {k: _STAGGER_NAMES[k][v] for k, v in x.items()}


def _sea(seed: int, drift_every: int) -> Iterator[Event]:
    from river.datasets import synth

    return _river_segments(lambda c, s: synth.SEA(variant=c, seed=s), [0, 1, 2, 3], drift_every, seed, _named)


def _agrawal(seed: int, drift_every: int) -> Iterator[Event]:
    from river.datasets import synth

    return _river_segments(lambda c, s: synth.Agrawal(classification_function=c, seed=s), [0, 2, 4, 6],
                           drift_every, seed, dict)


def _stagger(seed: int, drift_every: int) -> Iterator[Event]:
    from river.datasets import synth

    return _river_segments(lambda c, s: synth.STAGGER(classification_function=c, seed=s), [0, 1, 2],
                           drift_every, seed, _stagger_named)


def _hyperplane(seed: int, drift_every: int) -> Iterator[Event]:
    from river.datasets import synth

    # Incremental drift: the hyperplane turns a little after every event, forever.
    gen = synth.Hyperplane(seed=seed, n_features=10, n_drift_features=5, mag_change=0.001, sigma=0.1,
                           noise_percentage=0.05)
    return ((_named(x), y) for x, y in gen)


_MIXED_LEVELS = (
    ("c0", ("north", "south", "east", "west", "centre")),
    ("c1", ("web", "ios", "android", "store")),
    ("c2", ("bronze", "silver", "gold")),
)
_MIXED_BLOCK = 4096


def _mixed(seed: int, drift_every: int) -> Iterator[Event]:
    """10 numeric + 3 categorical features; y = 1[w·x + Σ b_c + noise > 0]; w, b re-drawn on drift."""
    rng = np.random.default_rng(seed)
    numeric = [f"x{i}" for i in range(10)]
    while True:
        w = rng.normal(size=10)
        biases = [rng.normal(size=len(levels)) for _, levels in _MIXED_LEVELS]
        remaining = drift_every
        while remaining > 0:
            n = min(_MIXED_BLOCK, remaining)
            remaining -= n
            X = rng.normal(size=(n, 10))
            codes = [rng.integers(len(levels), size=n) for _, levels in _MIXED_LEVELS]
            score = X @ w + sum(b[c] for b, c in zip(biases, codes, strict=True)) + rng.normal(scale=0.3, size=n)
            ys = (score > 0).astype(int).tolist()
            rows = np.round(X, 6).tolist()
            cats = [[levels[i] for i in c.tolist()] for (_, levels), c in zip(_MIXED_LEVELS, codes, strict=True)]
            for j in range(n):
                x = dict(zip(numeric, rows[j], strict=True))
                x["c0"], x["c1"], x["c2"] = cats[0][j], cats[1][j], cats[2][j]
                yield x, ys[j]


STREAMS: dict[str, Callable[[int, int], Iterator[Event]]] = {
    "sea": _sea,
    "agrawal": _agrawal,
    "hyperplane": _hyperplane,
    "stagger": _stagger,
    "mixed": _mixed,
}


def check_options(name: str, *, events: int = 0, label_delay: int = 0, unlabeled_fraction: float = 0.0,
                  drift_every: int = DEFAULT_DRIFT_EVERY, rate: float = 0.0) -> None:
    """Raise ``ValueError`` naming the first bad option of ``streamlearn produce``."""
    if name not in STREAMS:
        raise ValueError(f"--stream: unknown stream {name!r}; choose one of {', '.join(STREAMS)}")
    for option, value, ok, rule in (
        ("--events", events, events >= 0, "must be >= 0"),
        ("--label-delay", label_delay, label_delay >= 0, "must be >= 0"),
        ("--unlabeled-fraction", unlabeled_fraction, 0.0 <= unlabeled_fraction <= 1.0, "must be within [0, 1]"),
        ("--drift-every", drift_every, drift_every >= 1, "must be >= 1"),
        ("--rate", rate, rate >= 0, "must be >= 0 (0 = as fast as possible)"),
    ):
        if not ok:
            raise ValueError(f"{option}: {rule}, got {value}")


def iter_stream(name: str, seed: int = 42, drift_every: int = DEFAULT_DRIFT_EVERY) -> Iterator[Event]:
    """The endless ``(features, label)`` sequence of the built-in stream ``name``."""
    check_options(name, drift_every=drift_every)
    return STREAMS[name](seed, drift_every)


def iter_messages(name: str, events: int, *, label_delay: int = 0, unlabeled_fraction: float = 0.0,
                  seed: int = 42, drift_every: int = DEFAULT_DRIFT_EVERY, id_prefix: str = "",
                  clock: Callable[[], float] = time.time) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("event" | "label", message)`` in the order they go to Kafka.

    With ``label_delay == 0`` labels are inline; otherwise each label follows its event by
    ``label_delay`` events (the last ones after the final event). A seeded ``unlabeled_fraction``
    of events never gets a label.

    >>> msgs = list(iter_messages("sea", 3, label_delay=1, id_prefix="t-", clock=lambda: 0.0))
    >>> [(kind, m["id"]) for kind, m in msgs]
    [('event', 't-0'), ('event', 't-1'), ('label', 't-0'), ('event', 't-2'), ('label', 't-1'), ('label', 't-2')]
    """
    check_options(name, events=events, label_delay=label_delay, unlabeled_fraction=unlabeled_fraction,
                  drift_every=drift_every)
    mask_rng = np.random.default_rng(seed + 1)
    delayed: collections.deque[tuple[int, str, Any]] = collections.deque()
    stream = itertools.islice(iter_stream(name, seed, drift_every), events)
    for i, (x, y) in enumerate(stream):
        event_id = f"{id_prefix}{i}"
        event: dict[str, Any] = {"id": event_id, "features": x, "ts": clock()}
        labelled = unlabeled_fraction == 0.0 or mask_rng.random() >= unlabeled_fraction
        if labelled and label_delay == 0:
            event["label"] = y
        yield "event", event
        if labelled and label_delay:
            delayed.append((i, event_id, y))
        # The label of event j is due once event j + K has been written.
        while delayed and delayed[0][0] <= i - label_delay:
            _, label_id, label = delayed.popleft()
            yield "label", {"id": label_id, "label": label}
    while delayed:
        _, label_id, label = delayed.popleft()
        yield "label", {"id": label_id, "label": label}


@dataclass
class ProduceReport:
    events: int
    labels: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def make_producer(bootstrap: str):
    """A kafka-python producer tuned for throughput: linger, large batches, acks from the leader."""
    from kafka import KafkaProducer

    # acks=1 needs idempotence off explicitly, or kafka-python warns on every start.
    return KafkaProducer(bootstrap_servers=bootstrap, acks=1, enable_idempotence=False, linger_ms=20,
                         batch_size=512 * 1024, max_request_size=8 * 1024 * 1024,
                         client_id="streamlearn-produce")


def produce(producer, stream: str, events: int, *, events_topic: str, labels_topic: str,
            label_delay: int = 0, unlabeled_fraction: float = 0.0, seed: int = 42,
            drift_every: int = DEFAULT_DRIFT_EVERY, rate: float = 0.0, id_prefix: str | None = None,
            progress: Callable[[int, int], None] | None = None,
            stop: Callable[[], bool] | None = None) -> ProduceReport:
    """Write ``events`` events of ``stream`` (and their labels) with ``producer``; flush before returning.

    ``rate`` > 0 paces production to that many events per second (0 = as fast as possible).
    ``id_prefix`` defaults to the stream name plus a random token, so two runs never share ids.
    ``stop()`` is polled between events (the demo's Ctrl-C).
    """
    check_options(stream, events=events, label_delay=label_delay, unlabeled_fraction=unlabeled_fraction,
                  drift_every=drift_every, rate=rate)
    prefix = f"{stream}-{secrets.token_hex(3)}-" if id_prefix is None else id_prefix
    dumps = orjson.dumps
    send = producer.send
    n_events = n_labels = 0
    start = time.perf_counter()
    messages = iter_messages(stream, events, label_delay=label_delay, unlabeled_fraction=unlabeled_fraction,
                             seed=seed, drift_every=drift_every, id_prefix=prefix)
    for kind, message in messages:
        if kind == "event":
            send(events_topic, dumps(message))
            n_events += 1
            if n_events % 64 == 0:
                # reported before the pacing sleep, and often: a live view that shows the service's
                # counts beside this one must not see more events predicted than produced
                if progress is not None:
                    progress(n_events, n_labels)
                if stop is not None and stop():
                    break
                if rate and (ahead := n_events / rate - (time.perf_counter() - start)) > 0:
                    time.sleep(ahead)
        else:
            send(labels_topic, dumps(message))
            n_labels += 1
    producer.flush()
    if progress is not None:
        progress(n_events, n_labels)
    return ProduceReport(n_events, n_labels, time.perf_counter() - start)


def add_produce_arguments(parser: argparse.ArgumentParser,
                          bootstrap_help: str = "Kafka bootstrap servers (default: STREAMLEARN_KAFKA_BOOTSTRAP, "
                                                "else localhost:9092)") -> None:
    """The options of ``streamlearn produce`` (the demo reuses the stream ones)."""
    parser.add_argument("--stream", default="sea", choices=sorted(STREAMS),
                        help="built-in drifting stream (default: %(default)s)")
    parser.add_argument("--events", type=int, default=100_000, help="number of events to write (default: %(default)s)")
    parser.add_argument("--label-delay", type=int, default=0,
                        help="labels follow their event by K events on the labels topic; 0 = inline "
                             "(default: %(default)s)")
    parser.add_argument("--unlabeled-fraction", type=float, default=0.0,
                        help="fraction of events that never get a label (default: %(default)s)")
    parser.add_argument("--drift-every", type=int, default=DEFAULT_DRIFT_EVERY,
                        help="events between concept changes, abrupt/recurring streams (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="random seed of the stream (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="events per second; 0 = as fast as possible (default: %(default)s)")
    parser.add_argument("--bootstrap", default=None, help=bootstrap_help)
    parser.add_argument("--model", default="default",
                        help="configured model whose topics to write to (default: %(default)s)")
    parser.add_argument("--events-topic", default=None, help="override the model's events topic")
    parser.add_argument("--labels-topic", default=None, help="override the model's labels topic")
    parser.add_argument("--id-prefix", default=None, help="event id prefix (default: stream name + random token)")


def run_produce(args: argparse.Namespace) -> int:
    """``streamlearn produce``: write a demo stream to the topics of a configured model."""
    from service.broker import BrokerError, ensure_topics
    from service.config import load_settings

    try:
        check_options(args.stream, events=args.events, label_delay=args.label_delay,
                      unlabeled_fraction=args.unlabeled_fraction, drift_every=args.drift_every, rate=args.rate)
        settings = load_settings(getattr(args, "config", None))
    except ValueError as exc:  # a bad option or configuration: say which, no traceback
        raise SystemExit(f"streamlearn produce: {exc}") from None
    model = settings.models.get(args.model)
    if model is None:
        raise SystemExit(f"streamlearn produce: --model: no model named {args.model!r}; "
                         f"configured: {', '.join(settings.models)}")
    bootstrap = args.bootstrap or settings.kafka.bootstrap or "127.0.0.1:9092"
    events_topic = args.events_topic or model.topics.events
    labels_topic = args.labels_topic or model.topics.labels
    try:
        ensure_topics(bootstrap, {events_topic, labels_topic}, partitions=settings.kafka.partitions, timeout=15)
    except BrokerError as exc:
        raise SystemExit(f"streamlearn produce: {exc} (--bootstrap or STREAMLEARN_KAFKA_BOOTSTRAP)") from None
    producer = make_producer(bootstrap)
    last = [time.monotonic()]

    def progress(events: int, labels: int) -> None:
        if time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            print(f"produced {events} events, {labels} labels", flush=True)

    try:
        report = produce(producer, args.stream, args.events, events_topic=events_topic, labels_topic=labels_topic,
                         label_delay=args.label_delay, unlabeled_fraction=args.unlabeled_fraction, seed=args.seed,
                         drift_every=args.drift_every, rate=args.rate, id_prefix=args.id_prefix, progress=progress)
    finally:
        producer.close()
    print(f"produced {report.events} events to {events_topic} and {report.labels} labels to {labels_topic} "
          f"in {report.seconds:.2f} s ({report.events_per_s:,.0f} events/s)", flush=True)
    return 0
