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

Prints one JSON line and writes ``bench/results/throughput.md``. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import uuid

import orjson

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
KEEP = "\n## Monitoring overhead"


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


def service_rate(bootstrap: str, topic: str, n: int, predictions: bool, monitor: bool = True,
                 learner: dict | None = None) -> tuple[float, dict]:
    from service.config import load_settings
    from service.runtime import Service

    tag = uuid.uuid4().hex[:8]
    settings = load_settings(overrides={
        "state_dir": tempfile.mkdtemp(prefix="sl-bench-"),
        "kafka": {"bootstrap": bootstrap, "group_id": f"bench-{tag}"},
        "models": {"default": {"topics": {
            "events": topic, "labels": f"bench-{tag}.labels", "dead_letter": f"bench-{tag}.dead-letter",
            "predictions": f"bench-{tag}.predictions" if predictions else None},
            "monitor": {} if monitor else {"enabled": False}, "learner": learner or {}}},
    })
    svc = Service(settings).start()
    rt = svc.models["default"]
    t0 = time.perf_counter()
    last, t_last = 0, t0
    while rt.learned < n:
        time.sleep(0.002)
        if rt.learned != last:
            last, t_last = rt.learned, time.perf_counter()
        if time.perf_counter() - t_last > 120:
            raise RuntimeError(f"stalled at {rt.learned} of {n}: {svc.error!r}")
    elapsed = time.perf_counter() - t0
    status = rt.status()
    svc.stop()
    return n / elapsed, {"predicted": status["events"]["predicted"], "learned": status["events"]["learned"],
                         "prequential": status["prequential"], "model": type(getattr(rt.model, "estimator", rt.model)).__name__}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "throughput.md"))
    parser.add_argument("--no-monitor", action="store_true", help="monitoring off (drift + estimation)")
    parser.add_argument("--river", metavar="ESTIMATOR", help="a River estimator instead of the default learner, "
                        "e.g. dummy.PriorClassifier (no preprocessing)")
    args = parser.parse_args(argv)

    import torch

    learner = {"learner": "river", "estimator": args.river, "preprocess": False} if args.river else None

    torch.set_num_threads(1)
    from service.broker import EmbeddedBroker, ensure_topics

    with EmbeddedBroker(port=0) as broker:
        topic = f"bench-{uuid.uuid4().hex[:8]}.events"
        ensure_topics(broker.bootstrap, [topic])
        produce_rate = write_stream(broker.bootstrap, topic, args.events)
        raw, e2e, e2e_nopred = [], [], []
        info: dict = {}
        for _ in range(args.repeat):
            raw.append(raw_rate(broker.bootstrap, topic, args.events))
            rate, info = service_rate(broker.bootstrap, topic, args.events, predictions=True,
                                      monitor=not args.no_monitor, learner=learner)
            e2e.append(rate)
            e2e_nopred.append(service_rate(broker.bootstrap, topic, args.events, predictions=False,
                                           monitor=not args.no_monitor, learner=learner)[0])
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
        "cpus": len(os.sched_getaffinity(0)), "machine_cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "command": "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(result))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the monitoring-overhead section (made from several alternating runs) survives a rerun
    previous = out.read_text() if out.exists() else ""
    kept = previous[previous.index(KEEP):] if KEEP in previous else ""
    learner_text = "River, `--river`" if args.river else "the default learner of `learners.build_model`"
    out.write_text(f"""# Throughput: end to end vs raw kafka-python consume + decode

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

Raw JSON line:

```
{json.dumps(result)}
```
""" + kept)
    return result


if __name__ == "__main__":
    main()
