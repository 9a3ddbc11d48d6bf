"""Events/s of the recommended learner: predict + learn per micro-batch, on CPU or CUDA.

Events look like the service's target workload: 10 numeric and 3 categorical features, a binary
label that drifts. The learner is driven through its array path (``predict_proba_batch`` then
``learn_batch`` on lists of dicts, as the service does); River's LogisticRegression (with the
registry's scaler/one-hot pipeline, one event at a time) runs on the same events for reference.

    python -m bench.learner_throughput                    # CPU, 1 thread
    python -m bench.learner_throughput --device cuda      # the same on a GPU

Prints one JSON line (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import platform
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


def learner_rate(xs: list[dict], ys: list, batch: int, device: str, seconds: float) -> dict[str, float]:
    """Prequential predict+learn over the events (repeated until ``seconds`` have passed)."""
    model = build_model({"task": "classification", "device": device})
    warm = min(len(xs), max(batch * 4, 64))
    for i in range(0, warm, batch):  # first calls pay for lazy initialisation
        model.predict_proba_batch(xs[i : i + batch])
        model.learn_batch(xs[i : i + batch], ys[i : i + batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    events, correct, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(xs) - batch + 1, batch):
            probas = model.predict_proba_batch(xs[i : i + batch])
            model.learn_batch(xs[i : i + batch], ys[i : i + batch])
            correct += sum(max(p, key=p.get) == y for p, y in zip(probas, ys[i : i + batch], strict=True) if p)
            events += batch
            if time.perf_counter() - start >= seconds:
                break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"events_per_s": events / elapsed, "events": events, "accuracy": correct / max(events, 1)}


def river_rate(xs: list[dict], ys: list, seconds: float) -> float:
    model = build_model({"task": "classification", "learner": "river", "estimator": "linear_model.LogisticRegression"})
    events, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x, y in zip(xs, ys, strict=True):
            model.predict_proba_one(x)
            model.learn_one(x, y)
            events += 1
            if events % 256 == 0 and time.perf_counter() - start >= seconds:
                break
    return events / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--batches", default="1,16,256")
    parser.add_argument("--events", type=int, default=8192, help="distinct events (cycled)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per micro-batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    xs, ys = make_events(args.events)
    result: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "workload": "10 numeric + 3 categorical features, binary, predict_proba_batch + learn_batch",
        "learner": {},
    }
    for batch in (int(b) for b in args.batches.split(",")):
        result["learner"][str(batch)] = learner_rate(xs, ys, batch, device, args.seconds)
    result["river_logistic_regression_events_per_s"] = river_rate(xs, ys, args.seconds)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
