"""End-to-end events/s through the local broker with the default model, against the raw
kafka-python consume + decode rate measured in the same run.

    .venv/bin/python -m bench.throughput [--events 200000] [--repeat 2]

The stream is ``mixed`` (10 numeric + 3 categorical features, labels inline), written once to the
embedded broker. Then, alternating ``--repeat`` times so that machine noise hits both alike:

- raw: a kafka-python consumer (the service's fetch settings, ``max_poll_records`` 5000) reads
  every event and ``orjson.loads`` it — the ceiling of any kafka-python service;
- end to end: a :class:`service.runtime.Service` with the default configuration (default learner,
  predictions published to the predictions topic, checkpoints every 30 s) consumes the same topic
  from the start until every event is learned; timed from ``start()`` returning to the last
  ``learned`` increment. A second configuration turns the predictions topic off.

``--no-monitor`` runs the service with ``monitor: {"enabled": false}`` (no drift detection, no
CBPE/M-CBPE): run it alternately with the default to measure what monitoring costs.

``--river ESTIMATOR`` replaces the default learner with a River estimator (dotted name under
``river``, no preprocessing), e.g. ``dummy.PriorClassifier``, which costs ~1 µs an event: what is
left is the service's own cost per event (decode, validation, routing, monitor, predictions topic).

``--stages`` also reports where the loop's time goes, in µs per event (:class:`StageTimer`).

Prints one JSON line and adds the run on top of ``bench/results/throughput.md`` (``--out``), below
its title, keeping every earlier run and note. Torch runs on the service's threads (``torch_threads``,
1 by default; before 6 Dec 2026 the bench set 1 itself while ``serve`` used one per core).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import orjson

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# the results file's title; each run is added right below it
TITLE = "# Throughput: end to end vs raw kafka-python consume + decode\n"


def write_stream(bootstrap: str, topic: str, n: int) -> float:
    from kafka import KafkaProducer

    from service.streams import iter_messages

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=1 << 20, max_request_size=16 << 20)
    t0 = time.perf_counter()
    for _, msg in iter_messages("mixed", n, seed=3):
        producer.send(topic, orjson.dumps(msg))
    producer.flush()
    producer.close()
    return n / (time.perf_counter() - t0)


def raw_rate(bootstrap: str, topic: str, n: int) -> float:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                             max_poll_records=5000, fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    seen = 0
    t0 = time.perf_counter()
    loads = orjson.loads
    while seen < n:
        for records in consumer.poll(timeout_ms=1000, max_records=5000).values():
            for rec in records:
                loads(rec.value)
            seen += len(records)
    elapsed = time.perf_counter() - t0
    consumer.close()
    return n / elapsed


class StageTimer:
    """Wall time of each stage of the service loop, in µs per event, from wrappers around the
    methods doing them (called once per batch, so the wrappers cost nothing measurable). The
    stages are exclusive; ``other`` is the rest of the loop (routing bookkeeping, prequential
    scores, pending store, counters, snapshots, lag, checkpoints) and waiting for the GIL.
    """

    METHODS = (  # stage, module, class, method
        ("receive + unpack (from the fetcher process)", "service.fetcher", "RecordFetcher", "poll"),
        ("route (+ decode what the fetcher did not)", "service.runtime", "Service", "_route"),
        ("predict (learner)", "service.runtime", "ModelRuntime", "_predict"),
        ("monitor", "drift.monitor", "ModelMonitor", "observe_predictions"),
        ("monitor", "drift.monitor", "ModelMonitor", "observe_outcomes"),
        ("predictions topic", "service.ingest", "PredictionPublisher", "publish"),
    )

    def __init__(self):
        self.seconds: dict[str, float] = dict.fromkeys([m[0] for m in self.METHODS] + ["learn (learner)"], 0.0)
        self._undo: list = []

    def _timed(self, stage: str, fn):
        seconds = self.seconds

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - t0
        return timed

    def __enter__(self) -> StageTimer:
        import importlib

        targets = [(stage, getattr(importlib.import_module(mod), cls), name) for stage, mod, cls, name in self.METHODS]
        runtime = importlib.import_module("service.runtime")
        if hasattr(runtime, "encode_predictions"):  # the batch payload is built in the loop
            targets.append(("predictions topic", runtime, "encode_predictions"))
        for stage, owner, name in targets:
            original = getattr(owner, name)
            self._undo.append((owner, name, original))
            setattr(owner, name, self._timed(stage, original))
        return self

    def watch(self, rt) -> None:
        """The learner's update time, from what the runtime hands its ``update_seconds`` histogram."""
        seconds, observe = self.seconds, rt.observe_update

        def observed(s: float) -> None:
            seconds["learn (learner)"] += s
            observe(s)
        rt.observe_update = observed

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)

    def per_event(self, n: int, elapsed: float) -> dict[str, float]:
        out = {stage: round(1e6 * s / n, 2) for stage, s in self.seconds.items()}
        out["other"] = round(1e6 * elapsed / n - sum(out.values()), 2)
        out["total"] = round(1e6 * elapsed / n, 2)
        return out


def service_rate(bootstrap: str, topic: str, n: int, predictions: bool, monitor: bool = True,
                 learner: dict | None = None, stages: StageTimer | None = None) -> tuple[float, dict]:
    """Events/s of a fresh service learning ``n`` events of ``topic``; its checkpoints go to a
    temporary directory removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="sl-bench-") as state_dir:
        return _timed_service(state_dir, tag, bootstrap, topic, n, predictions, monitor, learner, stages)


def _timed_service(state_dir: str, tag: str, bootstrap: str, topic: str, n: int, predictions: bool, monitor: bool,
                   learner: dict | None, stages: StageTimer | None) -> tuple[float, dict]:
    from service.config import load_settings
    from service.runtime import Service

    settings = load_settings(overrides={
        "state_dir": state_dir,
        "kafka": {"bootstrap": bootstrap, "group_id": f"bench-{tag}"},
        "models": {"default": {"topics": {
            "events": topic, "labels": f"bench-{tag}.labels", "dead_letter": f"bench-{tag}.dead-letter",
            "predictions": f"bench-{tag}.predictions" if predictions else None},
            "monitor": {} if monitor else {"enabled": False}, "learner": learner or {}}},
    })
    svc = Service(settings).start()
    try:
        rt = svc.models["default"]
        if stages is not None:
            stages.watch(rt)
        t0 = time.perf_counter()
        last, t_last = 0, t0
        while rt.learned < n:
            time.sleep(0.002)
            if rt.learned != last:
                last, t_last = rt.learned, time.perf_counter()
            if time.perf_counter() - t_last > 120:
                raise RuntimeError(f"stalled at {rt.learned} of {n}: {svc.error!r}")
        elapsed = time.perf_counter() - t0
        profile = stages.per_event(n, elapsed) if stages is not None else None  # before the loop idles
        status = rt.status()
    finally:
        svc.stop()
    return n / elapsed, {"stages": profile, "predicted": status["events"]["predicted"], "learned": status["events"]["learned"],
                         "prequential": status["prequential"], "model": type(getattr(rt.model, "estimator", rt.model)).__name__}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "throughput.md"))
    parser.add_argument("--no-monitor", action="store_true", help="monitoring off (drift + estimation)")
    parser.add_argument("--river", metavar="ESTIMATOR", help="a River estimator instead of the default learner, "
                        "e.g. dummy.PriorClassifier (no preprocessing)")
    parser.add_argument("--stages", action="store_true", help="also time each stage of the loop (µs per event)")
    args = parser.parse_args(argv)

    learner = {"learner": "river", "estimator": args.river, "preprocess": False} if args.river else None

    from service.broker import EmbeddedBroker, ensure_topics

    with EmbeddedBroker(port=0) as broker:
        topic = f"bench-{uuid.uuid4().hex[:8]}.events"
        ensure_topics(broker.bootstrap, [topic])
        produce_rate = write_stream(broker.bootstrap, topic, args.events)
        raw, e2e, e2e_nopred = [], [], []
        profiles: dict[bool, list[dict]] = {True: [], False: []}
        info: dict = {}
        for _ in range(args.repeat):
            raw.append(raw_rate(broker.bootstrap, topic, args.events))
            for predictions in (True, False):
                with StageTimer() if args.stages else contextlib.nullcontext() as stages:
                    rate, run = service_rate(broker.bootstrap, topic, args.events, predictions=predictions,
                                             monitor=not args.no_monitor, learner=learner, stages=stages)
                (e2e if predictions else e2e_nopred).append(rate)
                profiles[predictions].append(run["stages"])
                info = run if predictions else info
    result = {
        "bench": "throughput", "events": args.events, "repeat": args.repeat,
        "monitor": "off" if args.no_monitor else "on",
        "raw_consume_decode_events_per_s": round(statistics.median(raw)),
        "e2e_events_per_s": round(statistics.median(e2e)),
        "e2e_no_predictions_topic_events_per_s": round(statistics.median(e2e_nopred)),
        "ratio": round(statistics.median(e2e) / statistics.median(raw), 3),
        "produce_events_per_s": round(produce_rate),
        "model": info.get("model"), "river": args.river, "final_prequential": info.get("prequential"),
        "all_raw": [round(r) for r in raw], "all_e2e": [round(r) for r in e2e],
        "all_e2e_no_predictions": [round(r) for r in e2e_nopred],
        "stages_us_per_event": _median_profile(profiles[True]) if args.stages else None,
        "stages_us_per_event_no_predictions_topic": _median_profile(profiles[False]) if args.stages else None,
        "cpus": len(os.sched_getaffinity(0)), "machine_cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "command": "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(result))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the new run goes on top; everything already in the file (earlier runs, and the sections
    # people wrote about them) stays below it
    previous = out.read_text() if out.exists() else ""
    kept = previous.removeprefix(TITLE).lstrip("\n")
    learner_text = "River, `--river`" if args.river else "the default learner of `learners.build_model`"
    when = time.strftime("%d %b %Y %H:%M UTC", time.gmtime())
    out.write_text(f"""{TITLE}
## Run of {when}{_commit()}

Command: `{result['command']}`
({result['cpus']} of {result['machine_cpus']} CPUs, 1-min load {result['load_average_1m']} at the end, Python {result['python']},
embedded tansu broker, one partition,
stream `mixed`: 10 numeric + 3 categorical features, labels inline; model `{result['model']}` ({learner_text}); medians of {args.repeat} alternating runs.)

| measurement | events/s |
|---|---|
| raw kafka-python consume + `orjson.loads` | {result['raw_consume_decode_events_per_s']:,} |
| end to end (decode, validate, predict, publish predictions, score, learn{", monitor" if not args.no_monitor else "; monitoring off"}) | {result['e2e_events_per_s']:,} |
| end to end without the predictions topic | {result['e2e_no_predictions_topic_events_per_s']:,} |
| ratio end to end / raw | {result['ratio']:.2f} |

Targets: end to end ≥ 50% of raw and ≥ 20,000 events/s.
{_stages_table(result)}
Raw JSON line:

```
{json.dumps(result)}
```

""" + kept)
    return result


def _commit() -> str:
    """`` at commit `abc1234` `` when run from a git checkout (with `+` if it has changes), else ``""``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=RESULTS).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=RESULTS).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f", at commit `{head}{'+' if dirty else ''}`"


def _median_profile(profiles: list[dict]) -> dict[str, float]:
    return {stage: round(statistics.median(p[stage] for p in profiles), 2) for stage in profiles[0]}


def _stages_table(result: dict) -> str:
    a, b = result["stages_us_per_event"], result["stages_us_per_event_no_predictions_topic"]
    if not a:
        return ""
    rows = "\n".join(f"| {stage} | {a[stage]:.1f} | {b[stage]:.1f} |" for stage in a)
    return f"""
Where the loop's time goes (`--stages`; wall time, µs per event, medians):

| stage | end to end | without the predictions topic |
|---|---|---|
{rows}
"""


if __name__ == "__main__":
    main()
