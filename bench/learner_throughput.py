"""Events/s of the recommended learner: predict + learn per micro-batch, on CPU or CUDA.

Events look like the service's target workload: 10 numeric and 3 categorical features, a binary
label that drifts. The learner is driven through its array path (``predict_proba_batch`` then
``learn_batch`` on lists of dicts, as the service does); River's LogisticRegression (with the
registry's scaler/one-hot pipeline, one event at a time) runs on the same events for reference.

    python -m bench.learner_throughput                    # CPU, 1 thread
    python -m bench.learner_throughput --device cuda      # the same on a GPU

The ratio to River at the largest micro-batch is also timed *paired*: the two models take turns
in short slices (A B B A …), so that a change in the host's speed during the run hits both alike.
Timed one after the other, as the per-size figures are, the ratio moved from 2.2× to 2.8× between
two runs of the same code on a shared host.

Prints one JSON line (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch

from learners import build_model


def make_events(n: int, seed: int = 0) -> tuple[list[dict[str, Any]], list[bool]]:
    rng = np.random.default_rng(seed)
    num = rng.normal(size=(n, 10))
    cats = rng.integers(0, 20, size=(n, 3))
    w = rng.normal(size=10)
    flip = np.arange(n) >= n // 2  # one abrupt concept change half way
    logits = num @ w + (cats[:, 0] % 3 == 0) * 1.5 - 0.5
    ys = ((logits > 0) ^ flip).tolist()
    xs = [
        {**{f"n{j}": float(num[i, j]) for j in range(10)}, **{f"c{j}": f"v{cats[i, j]}" for j in range(3)}}
        for i in range(n)
    ]
    return xs, ys


class LearnerLoop:
    """The recommended learner, prequential predict + learn over the events in micro-batches,
    resumable: each :meth:`run` goes on where the last one stopped."""

    def __init__(self, xs: list[dict], ys: list, batch: int, device: str, config: dict | None = None):
        self.xs, self.ys, self.batch, self.device = xs, ys, batch, device
        self.model = build_model({"task": "classification", "device": device, **(config or {})})
        self.at, self.correct, self.events = 0, 0, 0
        warm = min(len(xs), max(batch * 4, 64))
        for i in range(0, warm, batch):  # first calls pay for lazy initialisation
            self.model.predict_proba_batch(xs[i : i + batch])
            self.model.learn_batch(xs[i : i + batch], ys[i : i + batch])

    def run(self, seconds: float) -> tuple[int, float]:
        """Events handled and seconds taken, stopping after ``seconds``."""
        xs, ys, batch, model = self.xs, self.ys, self.batch, self.model
        cuda = self.device.startswith("cuda")
        # only the learner's calls are timed: scoring the predictions is the benchmark's own work
        # (~4% of a 256-row batch), which River's loop does not do either
        events, spent = 0, 0.0
        while spent < seconds:
            if self.at + batch > len(xs):
                self.at = 0
            i = self.at
            start = time.perf_counter()
            probas = model.predict_proba_batch(xs[i : i + batch])
            model.learn_batch(xs[i : i + batch], ys[i : i + batch])
            if cuda:
                torch.cuda.synchronize()
            spent += time.perf_counter() - start
            self.correct += sum(max(p, key=p.get) == y for p, y in zip(probas, ys[i : i + batch], strict=True) if p)
            self.at += batch
            events += batch
        self.events += events
        return events, spent


class RiverLoop:
    """River's LogisticRegression (the registry's pipeline), one event at a time, resumable."""

    def __init__(self, xs: list[dict], ys: list):
        self.xs, self.ys, self.at = xs, ys, 0
        self.model = build_model({"task": "classification", "learner": "river",
                                  "estimator": "linear_model.LogisticRegression"})

    def run(self, seconds: float) -> tuple[int, float]:
        xs, ys, model = self.xs, self.ys, self.model
        events, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(256):
                x, y = xs[self.at], ys[self.at]
                model.predict_proba_one(x)
                model.learn_one(x, y)
                self.at = (self.at + 1) % len(xs)
            events += 256
        return events, time.perf_counter() - start


def learner_rate(xs: list[dict], ys: list, batch: int, device: str, seconds: float,
                 config: dict | None = None) -> dict[str, float]:
    """Prequential predict+learn over the events (repeated until ``seconds`` have passed)."""
    loop = LearnerLoop(xs, ys, batch, device, config)
    events, elapsed = loop.run(seconds)
    return {"events_per_s": events / elapsed, "events": events, "accuracy": loop.correct / max(events, 1)}


def river_rate(xs: list[dict], ys: list, seconds: float) -> float:
    events, elapsed = RiverLoop(xs, ys).run(seconds)
    return events / elapsed


def paired_ratio(xs: list[dict], ys: list, batch: int, device: str, rounds: int, seconds: float,
                 config: dict | None = None) -> dict[str, Any]:
    """The learner's events/s at ``batch`` over River's, per round of one slice each, the order
    alternating (A B, B A, …) so that a linear drift of the host's speed cancels."""
    learner, river = LearnerLoop(xs, ys, batch, device, config), RiverLoop(xs, ys)
    ratios = []
    for r in range(rounds):
        rates = {}
        for loop in (learner, river) if r % 2 == 0 else (river, learner):
            events, elapsed = loop.run(seconds)
            rates[loop] = events / elapsed
        ratios.append(rates[learner] / rates[river])
    return {"batch": batch, "rounds": [round(v, 3) for v in ratios], "median": statistics.median(ratios),
            "seconds_per_slice": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--batches", default="1,16,256")
    parser.add_argument("--events", type=int, default=8192, help="distinct events (cycled)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per micro-batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--paired-rounds", type=int, default=8,
                        help="rounds of the paired learner/River timing at the largest micro-batch (0: off)")
    parser.add_argument("--config", default="{}", help="JSON overrides of the learner's settings (build_model)")
    parser.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = json.loads(args.config)
    xs, ys = make_events(args.events)
    result: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "workload": "10 numeric + 3 categorical features, binary, predict_proba_batch + learn_batch",
        "config": config,
        "learner": {},
    }
    for batch in (int(b) for b in args.batches.split(",")):
        result["learner"][str(batch)] = learner_rate(xs, ys, batch, device, args.seconds, config)
    result["river_logistic_regression_events_per_s"] = river_rate(xs, ys, args.seconds)
    if args.paired_rounds:
        largest = max(int(b) for b in args.batches.split(","))
        result["paired_ratio_to_river"] = paired_ratio(xs, ys, largest, device, args.paired_rounds, 1.0, config)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
