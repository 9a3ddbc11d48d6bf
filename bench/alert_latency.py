"""Time from a change in the stream to a firing alert, with the alert rules and Prometheus timings
exactly as shipped (deploy/prometheus/alerts.yml, 15 s scrape and evaluation intervals).

Each trial starts a fresh embedded broker, ``streamlearn serve`` and a real Prometheus (Debian
binary), then replays the compose demo's stream -- SEA concepts, abrupt concept change after
``--change-at`` events, ``--rate`` events/s, labels ``--label-delay`` events late, a fraction never
labelled -- and records:

- detection: when the service's concept-drift detector first fired (history's drift events), in
  events and seconds after the change point it caught (SEA's smaller concept changes can be missed;
  the stream changes again every ``--change-at`` events, and misses are counted);
- alert: when ``StreamlearnConceptDrift`` first appears firing in Prometheus' ``ALERTS`` series;
- with ``--no-events``, also when ``StreamlearnNoEventsIngested`` fires after the stream stops
  (about 10 minutes by construction: 5-minute rate window + 5-minute hold).

    .venv/bin/python -m bench.alert_latency --trials 3              # ~4 min
    .venv/bin/python -m bench.alert_latency --trials 1 --no-events --after-s 10 \
        --output alert_latency_no_events.json                     # + ~11 min

Writes bench/results/alert_latency.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml

from service.broker import EmbeddedBroker, free_port
from service.streams import make_producer, produce
from tests.conftest import ServeProcess
from tests.deploy.promql import PROMETHEUS_CONFIG, RULES
from tests.deploy.stack import Prometheus

RESULTS = Path(__file__).resolve().parent / "results"


def trial(args: argparse.Namespace, seed: int, workdir: Path) -> dict:
    interval = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["evaluation_interval"]
    tag = uuid.uuid4().hex[:8]
    topics = {kind: f"bench-{tag}.{kind}" for kind in ("events", "labels", "predictions", "dead_letter")}
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({"models": {"default": {"topics": topics}}}))
    with EmbeddedBroker(port=0) as broker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
        env.update(STREAMLEARN_CONFIG=str(config), STREAMLEARN_KAFKA_BOOTSTRAP=broker.bootstrap,
                   STREAMLEARN_HTTP_HOST="127.0.0.1", STREAMLEARN_HTTP_PORT=str(free_port()),
                   STREAMLEARN_STATE_DIR=str(workdir / "state"), PYTHONUNBUFFERED="1")
        serve = ServeProcess(env, workdir / "state", workdir / "serve.log").start()
        prometheus = Prometheus(workdir / "prometheus", f"127.0.0.1:{serve.port}", RULES.read_text(),
                                interval=interval)
        try:
            prometheus.start().wait_scraped(timeout=60)
            events = args.change_at + int(args.rate * args.after_s)
            producer = make_producer(broker.bootstrap)
            done = threading.Event()
            timing: dict[str, float] = {}

            def run() -> None:
                try:
                    timing["start"] = time.time()
                    produce(producer, "sea", events, events_topic=topics["events"], labels_topic=topics["labels"],
                            label_delay=args.label_delay, unlabeled_fraction=args.unlabeled_fraction,
                            seed=seed, drift_every=args.change_at, rate=args.rate, id_prefix=f"b{seed}-")
                    timing["stop"] = time.time()
                finally:
                    producer.close()
                    done.set()

            threading.Thread(target=run, daemon=True).start()
            fired: list[float] = []
            while not done.is_set() and not fired:
                time.sleep(1.0)
                fired = prometheus.firing_times("StreamlearnConceptDrift", timing["start"], time.time())
            done.wait()
            # SEA changes concept every change_at events; a change too small for the detector is
            # missed, so each latency is measured from the last change before the detection.
            changes = [timing["start"] + k * args.change_at / args.rate for k in range(1, (events - 1) // args.change_at + 1)]
            fired = fired or prometheus.firing_times("StreamlearnConceptDrift", timing["start"], time.time())
            detections = [e["ts"] for e in serve.get("/v1/models/default/history")["drift_events"]
                          if e["kind"] == "concept"]
            first = min(detections, default=None)
            caught = [c for c in changes if first is not None and c <= first]
            change = caught[-1] if caught else changes[0]
            result = {
                "seed": seed,
                "false_detection": first is not None and not caught,
                "missed_changes": max(0, len(caught) - 1),
                "detected_s": first - change if caught else None,
                "alert_s": fired[0] - change if fired and caught else None,
            }
            for key in ("detected_s", "alert_s"):
                if result[key] is not None:
                    result[key.replace("_s", "_events")] = round(result[key] * args.rate)
            if args.no_events and fired:
                deadline = time.monotonic() + 15 * 60
                quiet: list[float] = []
                while not quiet and time.monotonic() < deadline:
                    time.sleep(5.0)
                    quiet = prometheus.firing_times("StreamlearnNoEventsIngested", timing["stop"], time.time())
                result["no_events_alert_s"] = quiet[0] - timing["stop"] if quiet else None
            return result
        finally:
            prometheus.stop()
            serve.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500.0, help="events/s (the compose producer's rate)")
    parser.add_argument("--change-at", type=int, default=10_000, help="events before the concept changes")
    parser.add_argument("--after-s", type=float, default=60.0, help="seconds of stream after the change")
    parser.add_argument("--label-delay", type=int, default=200)
    parser.add_argument("--unlabeled-fraction", type=float, default=0.2)
    parser.add_argument("--no-events", action="store_true", help="also wait for the no-events alert")
    parser.add_argument("--output", default="alert_latency.json", help="file name under bench/results/")
    args = parser.parse_args()
    trials = []
    for seed in range(args.trials):
        with tempfile.TemporaryDirectory(prefix="alert-latency-") as tmp:
            trials.append(trial(args, seed, Path(tmp)))
        print(json.dumps(trials[-1]), flush=True)
    alerts = [t["alert_s"] for t in trials if t["alert_s"] is not None]
    summary = {
        "config": {k: v for k, v in vars(args).items()},
        "rules": "deploy/prometheus/alerts.yml as shipped",
        "prometheus_interval": yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"],
        "trials": trials,
        "alert_s_median": statistics.median(alerts) if alerts else None,
        "alert_s_max": max(alerts) if alerts else None,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| trial | changes missed | detector fired after | alert firing after | no-events alert after stop |")
    print("|---|---|---|---|---|")
    for t in trials:
        det = "–" if t["detected_s"] is None else f"{t['detected_s']:.1f} s ({t['detected_events']} events)"
        alert = "never" if t["alert_s"] is None else f"{t['alert_s']:.1f} s ({t['alert_events']} events)"
        quiet = t.get("no_events_alert_s")
        print(f"| {t['seed']} | {t['missed_changes']} | {det} | {alert} | {'–' if quiet is None else f'{quiet:.0f} s'} |")


if __name__ == "__main__":
    main()
