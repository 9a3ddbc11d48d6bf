"""Resident memory of the service after 100,000 and after 1,000,000 events: bounded state, no leak.

    .venv/bin/python -m bench.memory [--events 1000000] [--checkpoint-interval 30]

A ``streamlearn produce`` subprocess writes the ``mixed`` stream (10 numeric + 3 categorical
features) to the embedded broker with labels delayed by 100 events and 5% of events never
labelled; the pending-label store is capped at 10,000 entries. The never-labelled events fill it
by ~200,000 events (sooner when the service lags the producer, as labels then wait longer), so the
first measurement may see it half full; the monitor windows, history and prequential window are
at their bounds by then. The service (default configuration otherwise: default
learner, predictions published, checkpoints) runs in this process; its RSS (``VmRSS``) and that of
its two Kafka child processes (fetcher, prediction publisher) are sampled every 100,000 predicted
events, and the growth is taken on their sum.

Prints one JSON line and writes ``bench/results/memory.md``. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import uuid

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    parser.add_argument("--checkpoint-interval", type=float, default=30.0)
    parser.add_argument("--out", default=str(RESULTS / "memory.md"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from service.broker import EmbeddedBroker, ensure_topics
    from service.config import load_settings
    from service.runtime import Service

    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"mem-{tag}.events", "labels": f"mem-{tag}.labels",
              "predictions": f"mem-{tag}.predictions", "dead_letter": f"mem-{tag}.dead-letter"}
    samples: list[dict] = []
    with EmbeddedBroker(port=0) as broker, tempfile.TemporaryDirectory(prefix="sl-mem-") as state_dir:
        ensure_topics(broker.bootstrap, topics.values())
        settings = load_settings(overrides={
            "state_dir": state_dir,
            "kafka": {"bootstrap": broker.bootstrap, "group_id": f"mem-{tag}"},
            "checkpoint": {"interval_seconds": args.checkpoint_interval},
            "models": {"default": {"topics": topics, "pending": {"max_entries": 10_000}}},
        })
        svc = Service(settings).start()
        rt = svc.models["default"]
        writer = subprocess.Popen(
            [sys.executable, "-m", "service", "produce", "--stream", "mixed", "--events", str(args.events),
             "--label-delay", "100", "--unlabeled-fraction", "0.05", "--bootstrap", broker.bootstrap,
             "--events-topic", topics["events"], "--labels-topic", topics["labels"]],
            cwd=REPO, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
        t0 = time.perf_counter()
        target = args.every
        try:
            while target <= args.events:
                if svc.error is not None:
                    raise RuntimeError(f"service failed: {svc.error!r}")
                if rt.predicted >= target:
                    gc.collect()
                    s = rt.status()
                    own = rss_mib()
                    children = sum(rss_mib(pid) for pid in (svc.fetcher.pid, svc.publisher.pid))
                    samples.append({"events": rt.predicted, "rss_mib": round(own + children, 1),
                                    "service_mib": round(own, 1), "children_mib": round(children, 1),
                                    "pending": s["events"]["pending_labels"],
                                    "evicted": s["pending"]["evicted"]["capacity"] + s["pending"]["evicted"]["ttl"],
                                    "seconds": round(time.perf_counter() - t0, 1)})
                    print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
                    target += args.every
                time.sleep(0.05)
        finally:
            writer.wait()
            svc.stop()
    first = next(s for s in samples if s["events"] >= 100_000)
    last = samples[-1]
    growth = last["rss_mib"] / first["rss_mib"] - 1
    result = {"bench": "memory", "events": args.events, "rss_mib_at_100k": first["rss_mib"],
              "rss_mib_at_end": last["rss_mib"], "growth": round(growth, 4), "within_10_percent": abs(growth) <= 0.10,
              "samples": samples}
    print(json.dumps(result))
    rows = "\n".join(f"| {s['events']:,} | {s['rss_mib']:.1f} | {s['service_mib']:.1f} | {s['children_mib']:.1f} "
                     f"| {s['pending']:,} | {s['evicted']:,} | {s['seconds']} |"
                     for s in samples)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"""# Memory: RSS after 100,000 vs after {args.events:,} events

Command: `.venv/bin/python -m bench.memory --events {args.events}`
(stream `mixed`, labels delayed by 100 events, 5% never labelled, pending store capped at 10,000; default learner;
predictions published; checkpoint every {args.checkpoint_interval:g} s.)

RSS of the service and its Kafka child processes after 100,000 events: **{first['rss_mib']:.1f} MiB**; after
{last['events']:,}: **{last['rss_mib']:.1f} MiB** (growth {growth:+.1%}; target within ±10%).

| events predicted | RSS MiB, total | service process | fetcher + publisher | pending labels | pending evicted | seconds |
|---|---|---|---|---|---|---|
{rows}

Raw JSON line:

```
{json.dumps(result)}
```
""")
    return result


if __name__ == "__main__":
    main()
