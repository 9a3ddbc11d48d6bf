"""The service runtime: one ingest loop thread, the single writer of every model.

:class:`Service` owns the Kafka consumer and producer, the embedded broker (when no bootstrap is
configured), the checkpoints and one :class:`ModelRuntime` per configured model. Its loop thread
polls the events and labels topics in batches, decodes them (:mod:`service.codec`), routes them to
the models (rule in :mod:`service.config`) and calls :meth:`ModelRuntime.process_events` /
:meth:`ModelRuntime.process_labels`. Everything that writes model state runs on that thread; HTTP
readers only see published :class:`learners.protocol.Predictor` snapshots, counters and status
dicts that the loop replaces whole.

Prequential honesty: a batch is predicted before any of it is learned; an unlabelled event's
prediction is stored and the label, whenever it comes, is scored against that stored prediction.

At-least-once: the loop checkpoints (models, monitors, pending stores, counters and the offset of
the next record of every partition) at ``checkpoint.interval_seconds`` and on shutdown, and commits
those offsets to Kafka only once the file is durable. A restart restores the newest readable
checkpoint and seeks to its offsets, so the events after it are replayed into the state from
before them: every count ends exactly where it would have without the crash.
"""

from __future__ import annotations

import bisect
import collections
import functools
import gc
import logging
import math
import operator
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson
import torch

from learners import as_stream_model, build_model
from learners.protocol import (
    FeatureRows,
    Predictor,
    ProbaRows,
    RowsRejected,
    failure,
    probabilities_of,
    rows_at_fault,
    score,
)
from service.checkpoint import CheckpointStore
from service.codec import (
    LABEL_KINDS,
    Event,
    Invalid,
    Label,
    check_label,
    decode_events,
    decode_labels,
    label_kind,
)
from service.config import ConfigError, ModelConfig, Settings
from service.fetcher import PartitionRecords, Record, RecordFetcher
from service.ingest import PredictionPublisher, encode_predictions, make_producer, tune_gc
from service.pending import PendingStore

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
HISTORY_POINTS = 3600
DRIFT_EVENTS_KEPT = 1000
_LOG_EPS = 1e-15
_JSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_JSON_OPTS)


class Prequential:
    """Sliding-window prequential metrics: accuracy + log-loss, or MAE + RMSE.

    >>> p = Prequential("classification", window=2)
    >>> p.add_classification([1, 0, 1], [1, 1, 1], [0.9, 0.4, 0.5]).round(4).tolist()
    [0.1054, 0.9163, 0.6931]
    >>> p.values()   # the last two
    {'accuracy': 0.5, 'log_loss': 0.8047189562170501, 'n': 2, 'window': 2}
    """

    def __init__(self, task: str, window: int):
        self.task = task
        self.window = window
        self._a: collections.deque[float] = collections.deque(maxlen=window)  # correct | abs error
        self._b: collections.deque[float] = collections.deque(maxlen=window)  # log loss | sq error

    def add_classification(self, preds: Sequence, ys: Sequence, p_true: Sequence[float]) -> np.ndarray:
        """Scores predictions; ``p_true`` is the probability each gave to the true label. Returns
        every row's log-loss; the window keeps the last ``window`` rows (a batch of the service
        is several windows long: only its tail is scored into it)."""
        if len(preds) != len(ys) or len(ys) != len(p_true):
            raise ValueError("preds, ys and p_true must have equal lengths")
        losses = -np.log(np.maximum(np.fromiter(p_true, dtype=float, count=len(p_true)), _LOG_EPS))
        tail = slice(-self.window, None)
        self._a.extend(map(float, map(operator.eq, preds[tail], ys[tail])))
        self._b.extend(losses[tail].tolist())
        return losses

    def add_regression(self, preds: Sequence[float], ys: Sequence[float]) -> np.ndarray:
        """Scores predictions; returns every row's absolute error."""
        if len(preds) != len(ys):
            raise ValueError("preds and ys must have equal lengths")
        errors = np.abs(np.asarray(preds, dtype=float) - np.asarray(ys, dtype=float))
        tail = errors[-self.window:]
        self._a.extend(tail.tolist())
        self._b.extend((tail * tail).tolist())
        return errors

    def values(self) -> dict[str, Any]:
        n = len(self._a)
        out: dict[str, Any] = {"n": n, "window": self.window}
        if self.task == "classification":
            out = {"accuracy": sum(self._a) / n if n else None,
                   "log_loss": sum(self._b) / n if n else None, **out}
        else:
            out = {"mae": sum(self._a) / n if n else None,
                   "rmse": math.sqrt(sum(self._b) / n) if n else None, **out}
        return out


def _make_monitor(task: str, config: dict[str, Any]) -> Any:
    from drift.monitor import build_monitor

    return build_monitor(task, config)


def _reaches_power_of_two(before: int, after: int) -> bool:
    """A count went from ``before`` to ``after`` past 1, 2, 4, 8, …: when a repeated failure is
    worth logging again (loud at first, then ever rarer, never a flood)."""
    return after > before and after.bit_length() > before.bit_length()


def _config_error(model: str, section: str, exc: Exception) -> ConfigError:
    """``models.a.learner.hidden: …`` from a builder's ``hidden: …`` (or ``learner: …``)."""
    text = str(exc)
    key, sep, rest = text.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][\w.]*", key):
        path = f"{model}.{key}" if key.split(".")[0] == section else f"{model}.{section}.{key}"
        return ConfigError(f"invalid configuration:\n  {path}: {rest}")
    return ConfigError(f"invalid configuration:\n  {model}.{section}: {text}")


class ModelRuntime:
    """One model: learner, monitor, pending labels, counters, published snapshot, history.

    Only the service's loop thread calls the ``process_*`` methods; ``status()``, ``history()``,
    ``predictor()`` and ``snapshot()`` are safe from any thread.
    """

    def __init__(self, name: str, config: ModelConfig):
        self.name = name
        self.config = config
        self.task = config.task
        # what the config's own validation cannot see (the learner's and the monitor's settings) fails
        # here, as a configuration error naming the key
        try:
            self.model = as_stream_model(build_model(config.build_config()))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise _config_error(f"models.{name}", "learner", exc) from None
        try:
            self.monitor = _make_monitor(self.task, config.monitor)
        except (ValueError, TypeError) as exc:
            raise _config_error(f"models.{name}", "monitor", exc) from None
        self.pending = PendingStore(config.pending.max_entries, config.pending.ttl_seconds)
        # Labels that arrived before their event: id -> (label, arrival time), oldest first.
        self.early: collections.OrderedDict[str, tuple[Any, float]] = collections.OrderedDict()
        self.prequential = Prequential(self.task, config.prequential_window)
        self.predicted = 0
        self.learned = 0
        self.dead_letters: collections.Counter[str] = collections.Counter()  # every message, by reason
        self.dead_letter_events = 0  # of them, events (the rest are labels: labels["dead_letter"])
        self.monitor_errors = 0
        self.early_dropped = 0  # early labels whose event never came (capacity or TTL)
        self.labels: collections.Counter[str] = collections.Counter()  # joined | evicted | unknown | dead_letter
        self.history_points: collections.deque[dict] = collections.deque(maxlen=HISTORY_POINTS)
        self.drift_events: collections.deque[dict] = collections.deque(maxlen=DRIFT_EVENTS_KEPT)
        self.model_version = 0
        self.label_kind: str | None = None  # a classifier's: "string", "number" or "boolean", set by its first label
        self._published: tuple[int, Predictor] = (0, self.model.snapshot())
        self._learned_at_publish = 0
        self._last_publish = 0.0
        # Written by the service (loop thread), read by status(): replaced whole, never mutated.
        self.consumer_lag: dict[str, int] = {}
        self.checkpoint_info: dict[str, Any] = {"seq": None, "ts": None}
        # Publishes a batch of predictions (an ingest.encode_predictions payload) to a topic (set by the service).
        self.emit: Callable[[str, bytes], None] | None = None
        self.observe_update: Callable[[float], None] | None = None
        self._prequential_values: dict[str, Any] = self.prequential.values()
        self.publish_counts()
        self._monitor_status: dict[str, Any] = self.monitor.status()
        self._diagnostics: dict[str, Any] = self.model.diagnostics()
        self._last_point: tuple[float, int] | None = None

    # -- readers ---------------------------------------------------------------------------
    def snapshot(self) -> tuple[int, Predictor]:
        """``(model_version, predictor)`` currently published, read atomically."""
        return self._published

    def predictor(self) -> Predictor:
        return self._published[1]

    def status(self) -> dict[str, Any]:
        """The status JSON of the contract (plus ``task``, ``labels``, ``pending`` and ``realized``).

        Every count comes from one snapshot the writer publishes after each batch, so the numbers
        are always mutually consistent (``learned`` never runs ahead of ``labels.joined``).
        """
        mon, diag, counts = self._monitor_status, self._diagnostics, self._counts
        lag = self.consumer_lag
        return {
            "name": self.name,
            "task": self.task,
            "model_version": self._published[0],
            "events": counts["events"],
            "labels": counts["labels"],
            "dead_letters": counts["dead_letters"],
            "pending": counts["pending"],
            "prequential": self._prequential_values,
            "estimated": mon.get("estimated", {}),
            "realized": mon.get("realized", {}),
            "drift": mon.get("drift", {}),
            "learning_rate": diag.get("learning_rate"),
            "kalman_gamma": diag.get("kalman_gamma"),
            "diverged": bool(diag.get("diverged", False)),
            "monitor_errors": counts["monitor_errors"],
            "checkpoint": dict(self.checkpoint_info),
            "consumer_lag": sum(lag.values()),
            "consumer_lag_partitions": dict(lag),
        }

    def publish_counts(self) -> None:
        """Publishes the counters and prequential metrics for readers (writer thread, after each batch)."""
        n_pending = len(self.pending)
        self._prequential_values = self.prequential.values()
        self._counts = {
            "events": {"predicted": self.predicted, "learned": self.learned, "pending_labels": n_pending,
                       "dead_letters": self.dead_letter_events},
            "labels": {k: self.labels[k] for k in ("joined", "evicted", "unknown", "dead_letter")},
            "dead_letters": dict(self.dead_letters),
            "monitor_errors": self.monitor_errors,
            "pending": {"entries": n_pending, "max_entries": self.pending.max_entries,
                        "early_labels": len(self.early), "early_labels_dropped": self.early_dropped,
                        "ttl_seconds": self.pending.ttl_seconds,
                        "evicted": {"capacity": self.pending.evicted_capacity, "ttl": self.pending.evicted_ttl,
                                    "duplicate_id": self.pending.evicted_duplicate}},
        }

    def history(self, since: float | None = None) -> dict[str, list[dict]]:
        """The per-second points (those after ``since`` when given) and the drift events."""
        points = list(self.history_points)
        if since is not None:
            points = points[bisect.bisect_right([p["ts"] for p in points], since):]
        return {"points": points, "drift_events": list(self.drift_events)}

    # -- the writer ------------------------------------------------------------------------
    def _predict(self, xs: list[dict]) -> tuple[list, list | None]:
        return score(self.model, xs)

    def _predict_apart(self, xs: list[dict], failed: Exception) -> tuple[list[int], list, list | None, dict[int, str]]:
        """After the model failed on the whole batch (``failed``): the positions it can predict,
        their predictions (and probabilities), and the rows it cannot predict, with the reason."""
        parts: dict[int, tuple[list, list | None]] = {}

        def predict(i: int, j: int) -> None:
            parts[i] = self._predict(xs[i:j])

        rejected = rows_at_fault(predict, 0, len(xs), failed)
        kept = [i for i in range(len(xs)) if i not in rejected]
        runs = [parts[i] for i in sorted(parts)]
        preds = [p for run_preds, _ in runs for p in run_preds]
        probas = [p for _, run_probas in runs for p in run_probas] if self.task == "classification" else None
        return kept, preds, probas, rejected

    def _fit(self, xs: list[dict], ys: list) -> dict[int, str]:
        """Learn the rows; returns those the model rejected (position → reason). A model that
        raised without learning anything (see ``StreamModel.learn_batch``) is given each half of
        the batch in turn, down to single rows: one bad row must not cost the others."""

        def learn(i: int, j: int) -> dict[int, str] | None:
            try:
                self.model.learn_batch(xs[i:j], ys[i:j])
            except RowsRejected as exc:
                return {i + k: reason for k, reason in exc.rows.items()}
            return None

        return rows_at_fault(learn, 0, len(xs))

    def _learn(self, ids: list[str], xs: list[dict], preds: list, probas: list | None, ys: list) -> dict[int, str]:
        """Learn the labels and score the predictions made before they were seen; returns the
        rows the model rejected (position → reason), which are neither learned nor scored."""
        t0 = time.perf_counter()
        rejected = self._fit(xs, ys)
        if self.observe_update is not None:
            self.observe_update(time.perf_counter() - t0)
        if rejected:
            keep = [i for i in range(len(ys)) if i not in rejected]
            ids, xs, preds, ys = ([seq[i] for i in keep] for seq in (ids, xs, preds, ys))
            probas = None if probas is None else [probas[i] for i in keep]
            if not ys:
                return rejected
        if self.task == "classification":
            losses = self.prequential.add_classification(preds, ys, probabilities_of(probas, ys))
        else:
            losses = self.prequential.add_regression(preds, ys)
        self.learned += len(ys)
        self._on_drift(self._observe(self.monitor.observe_outcomes, ids, xs, probas, preds, ys, losses))
        return rejected

    def _observe(self, observe: Callable[..., list], *args: Any) -> list:
        """The monitor's view of a batch. Monitoring diagnoses; a failure in it is logged and
        counted (``monitor_errors`` in the status), and must never dead-letter events that were
        predicted and learned."""
        try:
            return observe(*args)
        except Exception:  # noqa: BLE001
            self.monitor_errors += 1
            if _reaches_power_of_two(self.monitor_errors - 1, self.monitor_errors):
                log.exception("model %s: the monitor failed on a batch (%d so far); predicting and learning go on",
                              self.name, self.monitor_errors)
            return []

    def _on_drift(self, events: list) -> None:
        for ev in events:
            self.model.notify_drift(ev.kind, ev.magnitude)
            self.drift_events.append({"ts": ev.ts, "kind": ev.kind, "magnitude": ev.magnitude})
            log.info("model %s: %s drift (magnitude %.3g)", self.name, ev.kind, ev.magnitude)

    def process_events(self, events: Sequence[Event]) -> dict[int, str]:
        """Predict every event; learn the labelled ones, keep the others pending. Returns the
        events the model rejected (position → reason): one it cannot predict is neither counted
        nor kept, one whose label it cannot learn was predicted but is not learned or scored."""
        if not events:
            return {}
        xs = FeatureRows([e.features for e in events])  # the encoder's transposition serves the monitor too
        at = None  # positions in ``events`` of the events predicted, when not all were
        rejected: dict[int, str] = {}
        try:
            preds, probas = self._predict(xs)
        except Exception as exc:  # noqa: BLE001 - find the events at fault, predict the others
            at, preds, probas, rejected = self._predict_apart(xs, exc)
            events, xs = [events[i] for i in at], [xs[i] for i in at]
            if not events:
                return rejected
        ids = [e.id for e in events]
        self.predicted += len(events)
        now = time.time()
        topic = self.config.topics.predictions
        if self.emit is not None and topic:
            # a learner's matrix goes as it is, with its classes: the publisher makes the dicts
            rows, classes = (probas.matrix, probas.classes) if isinstance(probas, ProbaRows) else (probas, None)
            self.emit(topic, encode_predictions(self.name, self._published[0], now, ids, preds, rows, classes=classes))
        ys = [e.label for e in events]
        if self.early:  # labels that came before their event: the prediction above is still honest
            take = self.early.pop
            for i, e in enumerate(events):
                if ys[i] is None and (parked := take(e.id, None)) is not None:
                    ys[i] = parked[0]
                    self.labels["joined"] += 1
        labelled = [y is not None for y in ys]
        self._on_drift(self._observe(self.monitor.observe_predictions, ids, xs, probas, preds, labelled))
        if all(labelled):
            unlearned = self._learn(ids, xs, preds, probas, ys)
        else:
            put = self.pending.put
            li: list[int] = []
            for i, e in enumerate(events):
                if labelled[i]:
                    li.append(i)
                else:
                    put(e.id, e.features, preds[i], probas[i] if probas is not None else None, now)
            unlearned = {}
            if li:
                unlearned = {li[i]: reason for i, reason in self._learn(
                    [ids[i] for i in li], [xs[i] for i in li], [preds[i] for i in li],
                    [probas[i] for i in li] if probas is not None else None, [ys[i] for i in li]).items()}
        self.publish_counts()
        if at is not None:
            unlearned = {at[i]: reason for i, reason in unlearned.items()}
        return {**rejected, **unlearned}

    def process_labels(self, labels: Sequence[Label]) -> dict[int, str]:
        """Join labels with their pending predictions. A label for an evicted id is counted as
        late (``evicted``); one for an id not seen yet is counted ``unknown`` and waits (bounded like
        the pending store) for its event, in case the label overtook it: if the event comes, the
        label is joined (and counted ``joined`` too). Returns the labels the model rejected
        (position → reason); they are not counted as joined, and their events' predictions go back
        to the pending store, so that a corrected label sent later still finds them."""
        ids, xs, preds, probas, ys, entries = [], [], [], [], [], []
        at: list[int] = []  # position in ``labels`` of each joined label
        now = time.time()
        for pos, lab in enumerate(labels):
            entry = self.pending.pop(lab.id)
            if entry is None:
                if self.pending.was_evicted(lab.id):
                    self.labels["evicted"] += 1
                else:
                    self._park(lab.id, lab.label, now)
                continue
            at.append(pos)
            entries.append(entry)
            ids.append(lab.id)
            xs.append(entry.x)
            preds.append(entry.prediction)
            probas.append(entry.proba)
            ys.append(lab.label)
        rejected: dict[int, str] = {}
        if ids:
            rejected = self._learn(ids, xs, preds, probas if self.task == "classification" else None, ys)
            self.labels["joined"] += len(ids) - len(rejected)
            for i in rejected:
                entry = entries[i]
                self.pending.put(ids[i], entry.x, entry.prediction, entry.proba, entry.ts)
        self.publish_counts()
        return {at[i]: reason for i, reason in rejected.items()}

    def _park(self, event_id: str, label: Any, now: float) -> None:
        self.labels["unknown"] += 1
        early = self.early
        early.pop(event_id, None)
        early[event_id] = (label, now)
        if len(early) > self.pending.max_entries:
            early.popitem(last=False)
            self.early_dropped += 1

    def _expire_early(self, now: float) -> None:
        early, cutoff = self.early, now - self.pending.ttl_seconds
        while early and next(iter(early.values()))[1] < cutoff:
            early.popitem(last=False)
            self.early_dropped += 1

    def count_dead_letter(self, reason: str, event: bool) -> None:
        """One message dead-lettered: an event (``event``) or a label."""
        self.dead_letters[reason] += 1
        if event:
            self.dead_letter_events += 1
        else:
            self.labels["dead_letter"] += 1

    def tick(self, now: float, publish_interval: float) -> None:
        """Housekeeping between batches: expire pending labels; every ``publish_interval`` publish a
        new snapshot (if anything was learned), refresh the monitor's status, add a history point."""
        self.pending.expire(now)
        self._expire_early(now)
        self.publish_counts()
        if now - self._last_publish < publish_interval:
            return
        self._last_publish = now
        if self.learned != self._learned_at_publish:
            self._learned_at_publish = self.learned
            self.model_version += 1
            self._published = (self.model_version, self.model.snapshot())
        self._monitor_status = self.monitor.status()
        self._diagnostics = self.model.diagnostics()
        if self._last_point is None or now - self._last_point[0] >= 1.0:
            self._add_history_point(now)

    def _add_history_point(self, now: float) -> None:
        rate = 0.0
        if self._last_point is not None:
            rate = (self.predicted - self._last_point[1]) / max(now - self._last_point[0], 1e-9)
        self._last_point = (now, self.predicted)
        est = self._monitor_status.get("estimated", {}) or {}
        pq = self._prequential_values
        point = {
            "ts": now, "events_predicted": self.predicted, "events_learned": self.learned,
            "events_per_s": rate, "pending_labels": len(self.pending),
            "learning_rate": self._diagnostics.get("learning_rate"),
            "kalman_gamma": self._diagnostics.get("kalman_gamma"),
        }
        if self.task == "classification":
            point.update(prequential_accuracy=pq.get("accuracy"),
                         estimated_accuracy_cbpe=(est.get("cbpe") or {}).get("accuracy"),
                         estimated_accuracy_mcbpe=(est.get("mcbpe") or {}).get("accuracy"),
                         realized_accuracy=(self._monitor_status.get("realized") or {}).get("accuracy"))
        else:
            point.update(prequential_mae=pq.get("mae"))
        self.history_points.append(point)

    # -- checkpoint ------------------------------------------------------------------------
    _STATE = ("model", "monitor", "pending", "early", "prequential", "predicted", "learned", "dead_letters",
              "dead_letter_events", "early_dropped", "labels", "history_points", "drift_events", "model_version",
              "label_kind")

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self._STATE}, "built_with": self.config.build_config()}

    def load_state(self, state: dict[str, Any]) -> None:
        from drift.monitor import NullMonitor

        built_with = state.get("built_with")  # (checkpoints from before it was kept: not compared)
        if built_with is not None and built_with != self.config.build_config():
            if built_with["task"] != self.task:
                raise ConfigError(
                    f"invalid configuration:\n  models.{self.name}.task: {self.task}, but its checkpoint holds a "
                    f"{built_with['task']} model; give the new model another name, or move the checkpoints away")
            # what it learned is worth more than the new settings: kept, and said
            log.warning("models.%s.learner: the checkpoint's model was built with %s and the configuration now says "
                        "%s; the checkpoint's model goes on (to start it afresh with the new settings, give the "
                        "model another name or move the checkpoints away)", self.name,
                        {k: v for k, v in built_with.items() if k != "task"} or "the defaults",
                        dict(self.config.learner) or "the defaults")

        # counters that checkpoints from older versions lack (dead letters were not told apart then)
        state = {"dead_letter_events": sum(state["dead_letters"].values()), "early_dropped": 0, "label_kind": None,
                 **state}
        for k in self._STATE:
            setattr(self, k, state[k])
        if isinstance(self.monitor, NullMonitor) == self.config.monitor.get("enabled", True):
            # monitoring was switched on or off since the checkpoint: the configuration wins
            self.monitor = _make_monitor(self.task, self.config.monitor)
        # Restored state keeps the configured bounds (they may have changed between runs).
        self.pending.max_entries = self.config.pending.max_entries
        self.pending.ttl_seconds = self.config.pending.ttl_seconds
        self._learned_at_publish = self.learned
        self._published = (self.model_version, self.model.snapshot())
        self._prequential_values = self.prequential.values()
        self._monitor_status = self.monitor.status()
        self._diagnostics = self.model.diagnostics()
        self.publish_counts()


STOP_TIMEOUT_SECONDS = 120.0
WARMUP_CHUNK = 64


class _DeadLetter(NamedTuple):
    topic: str
    value: bytes
    headers: list[tuple[str, bytes]]


class Service:
    """The running service: Kafka in and out, the loop thread, checkpoints, every model."""

    def __init__(self, settings: Settings):
        from service.metrics import ServiceMetrics

        if settings.torch_threads:  # process-wide: torch has one intra-op pool for every thread
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.models: dict[str, ModelRuntime] = {n: ModelRuntime(n, c) for n, c in settings.models.items()}
        self.metrics = ServiceMetrics(self)
        self.ready = False
        self.bootstrap: str | None = settings.kafka.bootstrap
        self.broker = None
        self.producer = None
        self.publisher: PredictionPublisher | None = None
        self.fetcher: RecordFetcher | None = None
        self.checkpoints = CheckpointStore(settings.state_dir / "checkpoints", settings.checkpoint.keep)
        self.checkpoint_seq: int | None = None
        self.checkpoint_ts: float | None = None
        self.checkpoint_seconds: float | None = None
        self.checkpoint_failures = 0
        self._failing = 0  # checkpoints failed in a row
        # which line of checkpoints the state descends from (set by the restore; new on a fresh start)
        self.lineage: str | None = None
        self.offsets: dict[tuple[str, int], int] = {}
        self.lag: dict[tuple[str, int], int] = {}
        self.error: BaseException | None = None
        # dead letters the producer could not write, with why: sent again before the next checkpoint
        self._undelivered: collections.deque[tuple[_DeadLetter, BaseException]] = collections.deque()
        self.on_fatal: Callable[[], None] | None = None  # called from the loop thread if it dies
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gc_threshold: tuple[int, int, int] | None = None  # the process's GC settings before start()
        self._events_topics: dict[str, list[ModelRuntime]] = collections.defaultdict(list)
        self._labels_topics: dict[str, list[ModelRuntime]] = collections.defaultdict(list)
        for rt in self.models.values():
            self._events_topics[rt.config.topics.events].append(rt)
            self._labels_topics[rt.config.topics.labels].append(rt)
            rt.observe_update = self.metrics.update_seconds.labels(model=rt.name).observe

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, cancelled: threading.Event | None = None) -> Service:
        """Broker (if needed), topics, producers, restore, consumer, loop thread. Returns when ready.

        ``cancelled`` (set by a signal) calls the start off between its steps and during the wait
        for Kafka, with :class:`service.broker.Cancelled`; ``stop()`` then undoes what was done."""
        from service.broker import Cancelled, EmbeddedBroker, PortInUse, ensure_topics

        def go_on() -> None:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("stopped while starting")

        kcfg = self.settings.kafka
        if self.bootstrap is None:
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            self.broker = EmbeddedBroker(kcfg.embedded_port, log_file=str(self.settings.state_dir / "broker.log"))
            try:
                self.broker.start()
            except PortInUse as exc:
                raise PortInUse(f"{exc}: set STREAMLEARN_KAFKA_BOOTSTRAP to use that Kafka, or "
                                "kafka.embedded_port (STREAMLEARN_KAFKA_EMBEDDED_PORT) to a free port") from None
            self.bootstrap = self.broker.bootstrap
            log.warning("STREAMLEARN_KAFKA_BOOTSTRAP is not set: started the embedded broker (tansu, "
                        "memory storage) on %s; its topics vanish when the service stops", self.bootstrap)
        ensure_topics(self.bootstrap, self.settings.topics(), kcfg.partitions, cancelled=cancelled)
        go_on()
        self.producer = make_producer(self.bootstrap, kcfg)
        if any(rt.config.topics.predictions for rt in self.models.values()):
            self.publisher = PredictionPublisher(self.bootstrap, kcfg)
            publish = functools.partial(self.publisher.publish, stopping=self._stop)  # a stop ends a blocked wait
            for rt in self.models.values():
                rt.emit = publish
        go_on()
        self._restore()
        go_on()
        events, labels = set(self._events_topics), set(self._labels_topics)
        # the fetcher decodes what it can tell apart (a topic of both kinds is decoded here, both ways)
        decode = {**dict.fromkeys(events - labels, "events"), **dict.fromkeys(labels - events, "labels")}
        self.fetcher = RecordFetcher(self.bootstrap, kcfg, events | labels, self.offsets,
                                     chunk_size=self._chunk_size(), decode=decode)
        self._stop.clear()
        self._gc_threshold = tune_gc()
        self._thread = threading.Thread(target=self._run, name="streamlearn-loop", daemon=True)
        self._thread.start()
        self.ready = True
        log.info("serving models %s from %s", ", ".join(self.models), self.bootstrap)
        return self

    def stop(self) -> None:
        """Finish the batch in hand, checkpoint, commit, close. Idempotent."""
        self.ready = False
        self._stop.set()
        if self._thread is not None:
            # bounded: each of the loop's waits on Kafka is, but a stop must end whatever hangs
            self._thread.join(STOP_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                self.error = self.error or RuntimeError(
                    f"the ingest loop did not stop within {STOP_TIMEOUT_SECONDS:.0f} s; the events since checkpoint "
                    f"{self.checkpoint_seq} are replayed at the next start")
                log.error("%s", self.error)
            self._thread = None
        if self._gc_threshold is not None:
            gc.unfreeze()
            gc.set_threshold(*self._gc_threshold)
            self._gc_threshold = None
        if self.fetcher is not None:
            self.fetcher.close()  # after the final checkpoint's commit
            self.fetcher = None
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        if self.producer is not None:
            self.producer.close()
            self.producer = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def producer_send(self, topic: str, value: dict[str, Any]):
        """Produce a JSON message; returns kafka-python's future (``.get(timeout)`` waits for the ack).

        The HTTP labels/learn routes use this, so their messages take the same path as Kafka input.
        """
        return self.producer.send(topic, _dumps(value))

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        kcfg, publish = self.settings.kafka, self.settings.publish_interval_seconds
        interval = self.settings.checkpoint.interval_seconds
        last_ckpt = time.monotonic()
        try:
            while not self._stop.is_set():
                self.fetcher.set_chunk_size(self._chunk_size())
                for chunk in self.fetcher.poll(kcfg.poll_timeout_ms / 1000):
                    self.handle(chunk)
                now = time.time()
                self._update_lag()
                for rt in self.models.values():
                    rt.tick(now, publish)
                if time.monotonic() - last_ckpt >= interval:
                    self.checkpoint()
                    last_ckpt = time.monotonic()
            if not self.checkpoint():  # stopping must not look clean when the last state is not saved
                raise RuntimeError("the shutdown checkpoint failed (see above); a restart resumes from "
                                   f"checkpoint {self.checkpoint_seq}, whose offsets are the last committed")
        except BaseException as exc:  # the loop dying is fatal: say so loudly, /readyz goes false
            self.error = exc
            self.ready = False
            log.exception("the ingest loop stopped")
            if self.on_fatal is not None:
                self.on_fatal()

    def _chunk_size(self) -> int:
        """Records the loop takes at a time: ``max_poll_records``, except while the models together
        have predicted fewer events than that. Every event of a chunk is predicted before any is
        learned, so a fresh model facing a backlog would otherwise predict thousands of events with
        no training at all. Chunks start at ``WARMUP_CHUNK`` records and grow with the events
        predicted (the largest power of two not above them): full size after about 8,000 events.
        (Not the least experienced model: one that is rarely routed to would keep every chunk small.)"""
        seen = sum(rt.predicted for rt in self.models.values())
        return min(self.settings.kafka.max_poll_records, max(WARMUP_CHUNK, 1 << (max(seen, 1).bit_length() - 1)))

    def handle(self, batch: dict) -> None:
        """One poll's records: every events partition first, then labels, then the offsets."""
        for tp, records in batch.items():
            if tp.topic in self._events_topics:
                self._handle_events(tp.topic, records)
        for tp, records in batch.items():
            if tp.topic in self._labels_topics:
                self._handle_labels(tp.topic, records)
        for tp, records in batch.items():
            self.offsets[(tp.topic, tp.partition)] = records[-1].offset + 1

    def _route(self, topic: str, topic_models: list[ModelRuntime], records: PartitionRecords, decode) -> dict:
        """Decoded records grouped by model; bad ones dead-lettered."""
        items = records.decoded if records.decoded is not None else decode(records.values)
        single = topic_models[0] if len(topic_models) == 1 else None
        if single is not None and not any(type(it) is Invalid or it.model is not None for it in items):
            return {single.name: (single, items, records)}  # the usual batch: one model, nothing to sort out
        routed: dict[str, tuple[ModelRuntime, list, list]] = {}
        if single is not None:
            routed[single.name] = (single, [], [])
        for rec, item in zip(records, items, strict=True):
            if type(item) is Invalid:
                self._dead_letter(topic, rec, item, topic_models)
                continue
            if item.model is None:
                targets = topic_models
            else:
                rt = self.models.get(item.model)
                if rt is None:
                    self._dead_letter(topic, rec, Invalid("unknown_model", f"model: no model named {item.model!r}"),
                                      topic_models)
                    continue
                targets = [rt]
            for rt in targets:
                entry = routed.setdefault(rt.name, (rt, [], []))
                entry[1].append(item)
                entry[2].append(rec)
        return routed

    def _checked(self, topic: str, rt: ModelRuntime, items: list, recs: Sequence[Record]) -> tuple[list, Sequence[Record]]:
        """The items (and their records) whose label suits the model (a number for a regressor, the
        kind of the first label for a classifier: that one fixes it); the others dead-lettered."""
        if rt.task == "classification":
            rt.label_kind = label_kind(rt.label_kind, (i.label for i in items))
            if rt.label_kind is None or all(type(i.label) in LABEL_KINDS[rt.label_kind] or i.label is None
                                            for i in items):
                return items, recs
        good, good_recs = [], []
        for item, rec in zip(items, recs, strict=True):
            if item.label is not None and (bad := check_label(item.label, rt.task, rt.label_kind)) is not None:
                self._dead_letter(topic, rec, bad, [rt])
            else:
                good.append(item)
                good_recs.append(rec)
        return good, good_recs

    def _handle_events(self, topic: str, records: PartitionRecords) -> None:
        for rt, items, recs in self._route(topic, self._events_topics[topic], records, decode_events).values():
            items, recs = self._checked(topic, rt, items, recs)
            if items:
                self._guarded(rt, rt.process_events, items, topic, recs)

    def _handle_labels(self, topic: str, records: PartitionRecords) -> None:
        for rt, items, recs in self._route(topic, self._labels_topics[topic], records, decode_labels).values():
            items, recs = self._checked(topic, rt, items, recs)
            if items:
                self._guarded(rt, rt.process_labels, items, topic, recs)

    def _guarded(self, rt: ModelRuntime, fn, items: list, topic: str, recs: Sequence[Record]) -> None:
        """The loop never dies on input: what the model rejects is dead-lettered with the reason
        (the rows it named, or the whole batch if processing failed in any other way)."""
        try:
            rejected = fn(items)
        except Exception as exc:  # noqa: BLE001
            log.exception("model %s failed on a batch of %d from %s; dead-lettering it", rt.name, len(recs), topic)
            rejected = dict.fromkeys(range(len(recs)), failure(exc))
        else:
            before = rt.dead_letters["model_error"]
            if rejected and _reaches_power_of_two(before, before + len(rejected)):
                first = min(rejected)
                log.warning("model %s rejected %d of %d messages from %s (offset %d: %s); dead-lettering them "
                            "(%d so far)", rt.name, len(rejected), len(recs), topic, recs[first].offset,
                            rejected[first], before + len(rejected))
        for i, reason in rejected.items():
            self._dead_letter(topic, recs[i], Invalid("model_error", reason), [rt])

    def _dead_letter(self, topic: str, rec, bad: Invalid, models: list[ModelRuntime]) -> None:
        headers = [("reason", bad.reason.encode()), ("detail", bad.detail.encode()),
                   ("topic", topic.encode()), ("partition", str(rec.partition).encode()),
                   ("offset", str(rec.offset).encode())]
        value = rec.value if isinstance(rec.value, bytes) else bytes(rec.value or b"")
        limit = self.settings.kafka.dead_letter_max_bytes
        if len(value) > limit:
            headers.append(("truncated_from", str(len(value)).encode()))
            value = value[:limit]
        for dlq in {rt.config.topics.dead_letter for rt in models}:
            self._send_dead_letter(_DeadLetter(dlq, value, headers))
        for rt in models:
            rt.count_dead_letter(bad.reason, event=topic in self._events_topics)

    def _send_dead_letter(self, letter: _DeadLetter) -> None:
        """Sends without waiting. A letter the producer refuses at once or the broker rejects later
        is kept and sent again before the next checkpoint, which waits for it: the offsets of its
        record are committed only once it is written, and the loop never stops over it."""
        try:
            future = self.producer.send(letter.topic, letter.value, headers=letter.headers)
        except Exception as exc:  # noqa: BLE001 - too large, buffer full, no metadata: retried at the checkpoint
            self._undelivered.append((letter, exc))
            return
        future.add_errback(lambda exc: self._undelivered.append((letter, exc)))

    def _redeliver_dead_letters(self) -> None:
        """Writes the dead letters that failed and waits for each; raises (failing the checkpoint,
        which is counted and retried) while one still cannot be written."""
        timeout = self.settings.kafka.request_timeout_ms / 1000
        while self._undelivered:
            letter, exc = self._undelivered[0]
            log.warning("a dead letter to %s (%d bytes) was not written (%s); sending it again",
                        letter.topic, len(letter.value), failure(exc))
            try:
                self.producer.send(letter.topic, letter.value, headers=letter.headers).get(timeout=timeout)
            except Exception as again:
                raise RuntimeError(
                    f"a dead letter to {letter.topic} cannot be written ({failure(again)}); the offsets of its "
                    f"record stay uncommitted until it is (dead letters carry at most "
                    f"kafka.dead_letter_max_bytes={self.settings.kafka.dead_letter_max_bytes} bytes of the "
                    "original)") from again
            self._undelivered.popleft()

    def _update_lag(self) -> None:
        lag: dict[tuple[str, int], int] = {}
        for tp, hw in self.fetcher.highwaters.items():
            pos = self.offsets.get(tp)
            if hw is not None:
                lag[tp] = max(0, hw - (pos if pos is not None else hw))
        self.lag = lag
        for rt in self.models.values():
            topics = (rt.config.topics.events, rt.config.topics.labels)
            rt.consumer_lag = {f"{t}:{p}": v for (t, p), v in lag.items() if t in topics}

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self) -> bool:
        """Checkpoint now (loop thread only); on success commit the offsets it covers."""
        t0 = time.perf_counter()
        now = time.time()
        try:
            diverged = [name for name, rt in self.models.items() if rt.model.diagnostics().get("diverged")]
            if diverged:
                # a checkpoint now would hold the non-finite weights, and the kept ones rotate out in
                # keep × interval (90 s by default): the last good one must stay to be restored
                raise RuntimeError(f"model(s) {', '.join(diverged)} diverged: checkpoints are held, so that "
                                   f"checkpoint {self.checkpoint_seq} stays the newest to restore (docs/runbook.md)")
            # Dead letters and predictions of the covered records are durable before their offsets.
            self.producer.flush(timeout=self.settings.kafka.request_timeout_ms / 1000)
            self._redeliver_dead_letters()
            if self.publisher is not None:
                self.publisher.flush()
            state = {"format": CHECKPOINT_FORMAT, "ts": now, "lineage": self.lineage, "offsets": dict(self.offsets),
                     "models": {n: rt.state_dict() for n, rt in self.models.items()}}
            seq = self.checkpoints.save(state)
        except Exception:  # noqa: BLE001 - a failed checkpoint is counted and retried next interval
            self.checkpoint_failures += 1
            self._failing += 1
            if _reaches_power_of_two(self._failing - 1, self._failing):  # a traceback each interval was a flood
                log.exception("checkpoint failed (%d in a row; logged at the 1st, 2nd, 4th …)", self._failing)
            return False
        if self._failing:
            log.info("checkpoint %d written, after %d failed in a row", seq, self._failing)
            self._failing = 0
        self.checkpoint_seq, self.checkpoint_ts = seq, now
        self.checkpoint_seconds = time.perf_counter() - t0
        for rt in self.models.values():
            rt.checkpoint_info = {"seq": seq, "ts": now}
        if self.offsets:  # the fetcher commits between polls; a failure is logged, the checkpoint holds them
            self.fetcher.commit(self.offsets)
        return True

    def _restore(self) -> None:
        found = self.checkpoints.load_latest()
        if found is None:
            log.info("no checkpoint in %s: starting fresh", self.checkpoints.directory)
            self.lineage = uuid.uuid4().hex
            return
        seq, state = found
        self.lineage = state.get("lineage") or uuid.uuid4().hex  # (checkpoints from before lineages)
        read = set(self._events_topics) | set(self._labels_topics)
        self.offsets = {tp: o for tp, o in state["offsets"].items() if tp[0] in read}
        dropped = sorted({t for t, _ in state["offsets"]} - read)
        if dropped:
            log.info("checkpoint %d holds offsets of topics no model reads now, dropped: %s", seq, ", ".join(dropped))
        for name, rt_state in state["models"].items():
            if name in self.models:
                self.models[name].load_state(rt_state)
                self.models[name].checkpoint_info = {"seq": seq, "ts": state["ts"]}
            else:
                log.warning("checkpoint %d holds model %r, which is no longer configured", seq, name)
        self.checkpoint_seq, self.checkpoint_ts = seq, state["ts"]
        log.info("restored checkpoint %d (%s)", seq,
                 ", ".join(f"{t}:{p}@{o}" for (t, p), o in sorted(self.offsets.items())) or "no offsets")
