"""Prometheus metrics: a collector that reads every model's runtime state at scrape time.

Counts come from the runtime's own (checkpointed) counters rather than from process-local
``Counter`` objects, so after a restart ``/metrics`` continues from the restored values and agrees
with the status JSON. After a crash, though, the restored values are those of the last checkpoint,
below what Prometheus may already have scraped; Prometheus would read the drop as a counter reset
and ``increase()`` would count the whole restored value again (a burst of dead letters or drift
alarms that never happened, and the alerts on them). So the highest value each of these counters
was exported at is kept on disk beside the checkpoints (:class:`CounterFloor`), and a counter is
never exported below it: while the restarted service replays what it had learned after its last
checkpoint, ``/metrics`` holds at the old values and the status JSON shows the replay. Each :class:`service.runtime.Service` has its own registry (no global
state); the HTTP app renders it:

    body, content_type = service.metrics.exposition()

Two histograms are observed where the work happens, both labelled by ``model``:

- ``update_seconds``: one observation per ``learn_batch`` call of the ingest loop;
- ``predict_seconds``: one observation per HTTP prediction micro-batch, through the callable
  ``service.metrics.predict_observer(name)(seconds, n_instances)`` that the HTTP app hands its
  batcher (the histogram itself is ``service.metrics.predict_seconds``).

Every metric name is in DESIGN.md's contract, prefixed ``streamlearn_`` and labelled by ``model``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from service.runtime import ModelRuntime, Service

log = logging.getLogger(__name__)

PREFIX = "streamlearn_"
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DRIFT_KINDS = ("concept", "data", "prediction")


def _num(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class CounterFloor:
    """The highest value each counter series was exported at, persisted in a small JSON file, for
    one lineage of checkpoints (a fresh start begins a new one: its counts really start over).

    :meth:`raise_to_floor` lifts any sample below its floor and records new highs; the file is
    rewritten (temp file + rename) when a high moved, so it holds at least what any scrape has seen.
    An unreadable file is reported and ignored (the counters are then only as good as the
    checkpoint), and a failed write is reported once and never fails a scrape.

    >>> import tempfile, pathlib
    >>> from prometheus_client.core import CounterMetricFamily
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "floor.json"
    >>> fam = CounterMetricFamily("x", "", labels=["model"]); fam.add_metric(["m"], 10)
    >>> CounterFloor(path).raise_to_floor([fam], lineage="a")
    >>> restarted = CounterFloor(path)  # restored from a checkpoint taken at 7
    >>> low = CounterMetricFamily("x", "", labels=["model"]); low.add_metric(["m"], 7)
    >>> restarted.raise_to_floor([low], lineage="a"); low.samples[0].value
    10.0
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._write_failed = False
        self.lineage: str | None = None
        self.values: dict[str, float] = {}
        try:
            loaded = json.loads(path.read_text())
            self.lineage = str(loaded["lineage"])
            self.values = {str(k): float(v) for k, v in loaded["values"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring the counters' floor %s (%s): counters restart from the checkpoint's values",
                        path, exc)

    def raise_to_floor(self, families: Iterable[Metric], lineage: str) -> None:
        with self._lock:
            if lineage != self.lineage:  # another lineage: its counts owe nothing to these
                self.lineage, self.values = lineage, {}
            moved = False
            for fam in families:
                for i, sample in enumerate(fam.samples):
                    key = json.dumps([sample.name, sorted(sample.labels.items())])
                    floor = self.values.get(key)
                    if floor is not None and sample.value < floor:
                        fam.samples[i] = sample._replace(value=floor)
                    elif floor is None or sample.value > floor:
                        self.values[key] = float(sample.value)
                        moved = True
            if moved:
                self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"lineage": self.lineage, "values": self.values}))
            os.replace(tmp, self.path)
            self._write_failed = False
        except OSError as exc:
            if not self._write_failed:
                log.warning("cannot write the counters' floor %s (%s): after a crash, counters may go "
                            "back to the checkpoint's values", self.path, exc)
            self._write_failed = True


# Counters restored from checkpoints (the others restart at 0 with the process, a reset Prometheus handles)
_RESTORED_COUNTERS = ("events", "labels", "dead", "monitor_errors", "evictions", "drift_total")


class RuntimeCollector:
    """Yields the ``streamlearn_*`` families from each model's state."""

    def __init__(self, service: Service):
        self.service = service
        self.floor = CounterFloor(Path(service.settings.state_dir) / "metrics-floor.json")

    def describe(self) -> list[Metric]:
        return []  # state-dependent families: no describe-time registration checks

    def collect(self) -> Iterator[Metric]:
        runtimes = list(self.service.models.values())
        fams = {
            "events": CounterMetricFamily(PREFIX + "events", "Events by outcome (predicted, learned, dead_letter).",
                                          labels=["model", "outcome"]),
            "labels": CounterMetricFamily(PREFIX + "labels", "Labels by outcome: joined with their prediction, late "
                                          "for an evicted id, or unknown id on arrival (such a label waits "
                                          "for its event and, if it comes, is joined too).",
                                          labels=["model", "outcome"]),
            "dead": CounterMetricFamily(PREFIX + "dead_letters", "Messages sent to the dead-letter topic, by reason.",
                                        labels=["model", "reason"]),
            "monitor_errors": CounterMetricFamily(PREFIX + "monitor_errors", "Batches the drift and estimation "
                                                  "monitor failed on (predicting and learning went on).",
                                                  labels=["model"]),
            "evictions": CounterMetricFamily(PREFIX + "pending_evictions", "Pending predictions evicted before "
                                             "their label arrived, by cause (capacity, ttl, duplicate_id: replaced "
                                             "by a later event with the same id).",
                                             labels=["model", "cause"]),
            "pending": GaugeMetricFamily(PREFIX + "pending_labels", "Predictions waiting for their label.",
                                         labels=["model"]),
            "preq": GaugeMetricFamily(PREFIX + "prequential_metric", "Prequential (test-then-train) metric over a "
                                      "sliding window of scored predictions.", labels=["model", "metric", "window"]),
            "est": GaugeMetricFamily(PREFIX + "estimated_metric", "Performance estimated without labels.",
                                     labels=["model", "metric", "method"]),
            "real": GaugeMetricFamily(PREFIX + "realized_metric", "Metric realised once the labels of an analysis "
                                      "chunk arrived.", labels=["model", "metric"]),
            "drift_total": CounterMetricFamily(PREFIX + "drift_detected", "Drift alarms, by kind.",
                                               labels=["model", "kind"]),
            "drift_active": GaugeMetricFamily(PREFIX + "drift_active", "1 while a drift alarm of this kind is active.",
                                              labels=["model", "kind"]),
            "lr": GaugeMetricFamily(PREFIX + "learning_rate", "Current learning rate of the learner.", labels=["model"]),
            "gamma": GaugeMetricFamily(PREFIX + "kalman_gamma", "Current Kalman drift factor gamma.", labels=["model"]),
            "diverged": GaugeMetricFamily(PREFIX + "learner_diverged", "1 when the learner reports divergence.",
                                          labels=["model"]),
            "lag": GaugeMetricFamily(PREFIX + "consumer_lag", "Records behind the partition's high watermark.",
                                     labels=["model", "partition"]),
            "version": GaugeMetricFamily(PREFIX + "model_version", "Version of the published prediction snapshot.",
                                         labels=["model"]),
            "ckpt_s": GaugeMetricFamily(PREFIX + "checkpoint_seconds", "Duration of the last successful checkpoint.",
                                        labels=["model"]),
            "ckpt_fail": CounterMetricFamily(PREFIX + "checkpoint_failures", "Checkpoints that failed (since start).",
                                             labels=["model"]),
            "ckpt_ts": GaugeMetricFamily(PREFIX + "last_checkpoint_timestamp_seconds", "Unix time of the last durable "
                                         "checkpoint.", labels=["model"]),
            # /readyz as a metric, for the StreamlearnNotReady alert (deploy/prometheus/alerts.yml)
            "ready": GaugeMetricFamily(PREFIX + "ready", "1 once the service has started (checkpoint restored, "
                                       "Kafka connected) while its loop runs; 0 while it starts (/readyz).",
                                       labels=["model"]),
        }
        svc = self.service
        for rt in runtimes:
            self._model(rt, fams)
            m = [rt.name]
            fams["ready"].add_metric(m, float(bool(svc.ready)))
            if svc.checkpoint_seconds is not None:
                fams["ckpt_s"].add_metric(m, svc.checkpoint_seconds)
            fams["ckpt_fail"].add_metric(m, svc.checkpoint_failures)
            if svc.checkpoint_ts is not None:
                fams["ckpt_ts"].add_metric(m, svc.checkpoint_ts)
        lineage = svc.lineage
        if lineage is None:  # not restored yet: the counts are not known, and zeros would read as a reset
            for key in _RESTORED_COUNTERS:
                del fams[key]
        else:
            self.floor.raise_to_floor((fams[k] for k in _RESTORED_COUNTERS), lineage)
        yield from fams.values()

    @staticmethod
    def _model(rt: ModelRuntime, fams: dict) -> None:
        status = rt.status()
        m = rt.name
        ev = status["events"]
        fams["events"].add_metric([m, "predicted"], ev["predicted"])
        fams["events"].add_metric([m, "learned"], ev["learned"])
        fams["events"].add_metric([m, "dead_letter"], ev["dead_letters"])
        for outcome, n in status["labels"].items():
            fams["labels"].add_metric([m, outcome], n)
        for reason, n in sorted(status["dead_letters"].items()):
            fams["dead"].add_metric([m, reason], n)
        fams["monitor_errors"].add_metric([m], status["monitor_errors"])
        for cause, n in status["pending"]["evicted"].items():
            fams["evictions"].add_metric([m, cause], n)
        fams["pending"].add_metric([m], ev["pending_labels"])
        preq = status["prequential"]
        for name, value in preq.items():
            if name not in ("n", "window") and (v := _num(value)) is not None:
                fams["preq"].add_metric([m, name, str(preq["window"])], v)
        for method, values in (status["estimated"] or {}).items():
            if isinstance(values, dict):
                for metric, value in values.items():
                    if (v := _num(value)) is not None:
                        fams["est"].add_metric([m, metric, method], v)
        for metric, value in (status["realized"] or {}).items():
            if metric not in ("chunk", "labelled") and (v := _num(value)) is not None:
                fams["real"].add_metric([m, metric], v)
        for kind in DRIFT_KINDS:
            d = (status["drift"] or {}).get(kind) or {}
            fams["drift_total"].add_metric([m, kind], d.get("detected_total", 0))
            fams["drift_active"].add_metric([m, kind], float(bool(d.get("active", False))))
        if (v := _num(status["learning_rate"])) is not None:
            fams["lr"].add_metric([m], v)
        if (v := _num(status["kalman_gamma"])) is not None:
            fams["gamma"].add_metric([m], v)
        fams["diverged"].add_metric([m], float(status["diverged"]))
        for partition, lag in sorted(status["consumer_lag_partitions"].items()):
            fams["lag"].add_metric([m, partition], lag)
        fams["version"].add_metric([m], status["model_version"])


class ServiceMetrics:
    """The registry of one service: the runtime collector, two histograms, process metrics."""

    def __init__(self, service: Service):
        self.registry = CollectorRegistry()
        self.registry.register(RuntimeCollector(service))
        ProcessCollector(registry=self.registry)
        self.update_seconds = Histogram(PREFIX + "update_seconds", "Time of one learn_batch call of the ingest loop.",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.predict_seconds = Histogram(PREFIX + "predict_seconds", "Time of one HTTP prediction micro-batch on "
                                         "the published snapshot.", ["model"], buckets=LATENCY_BUCKETS,
                                         registry=self.registry)

    def predict_observer(self, model: str) -> Callable[[float, int], None]:
        """``observe(seconds, n)`` for one model's HTTP prediction batches."""
        child = self.predict_seconds.labels(model=model)
        return lambda seconds, n: child.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """``(body, content_type)`` of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
