"""Prequential quality of the recommended learner vs River's models and the learner's ablations.

Every model sees the same events in the same order and predicts each event before learning it.
River's models go one event at a time (``predict_one`` then ``learn_one``); the Kalman learner goes
through its array path (``predict_batch`` then ``learn_batch``) in micro-batches: 16 rows in
*accuracy mode*, 256 in *throughput mode*. Only model calls are timed (streams are materialised
first). Results: ``bench/results/quality.{json,md}`` and ``quality_rolling.svg``.

The speed target compares the throughput mode with River's LogisticRegression. One pass of the
throughput mode over a stream takes ~0.15 s, short enough for a pause of the (shared) host to
halve its figure: single passes gave 41k and 71k events/s on the same stream in two runs of the
same code. So these two models run ``--speed-passes`` times per stream (fresh models, taking turns:
River, learner, River, learner, …) and each one's time on the stream is the median of its passes;
the scores are the first pass's (every pass predicts the same: the models are seeded).

    python -m bench.quality                 # full run (~10k events per stream)
    python -m bench.quality --quick         # smoke run (1.5k events, fewer models)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from river import datasets
from river.datasets import synth

from learners import build_model

RESULTS = Path(__file__).parent / "results"
Stream = list[tuple[dict, Any]]


# -- streams --------------------------------------------------------------------------------------
def _take(ds: Iterable, n: int) -> Stream:
    return [(dict(x), y) for x, y in itertools.islice(ds, n)]


def _agrawal(fn: int, seed: int):
    return synth.Agrawal(classification_function=fn, seed=seed, perturbation=0.05)


def _agrawal_strings(stream: Stream) -> Stream:
    """Agrawal's nominal attributes as the strings an application would send."""
    names = {"elevel": "level", "car": "car", "zipcode": "zip"}
    return [({k: (f"{names[k]}{v}" if k in names else v) for k, v in x.items()}, y) for x, y in stream]


def _stagger_recurring(n: int) -> Stream:
    """STAGGER concepts 0 → 1 → 2 → 0 → 1 (recurring), features as strings."""
    sizes, colours, shapes = ("small", "medium", "large"), ("red", "green", "blue"), ("square", "circle", "triangle")
    out: Stream = []
    seg = n // 5
    for i, fn in enumerate([0, 1, 2, 0, 1]):
        for x, y in _take(synth.STAGGER(classification_function=fn, seed=10 + i, balance_classes=False), seg):
            out.append(({"size": sizes[x["size"]], "color": colours[x["color"]], "shape": shapes[x["shape"]]}, y))
    return out


def _mixed_recurring(n: int) -> Stream:
    """Mixed (booleans + numbers) alternating between its two concepts every n/4 events."""
    out: Stream = []
    for i in range(4):
        out += [({f"f{k}": v for k, v in x.items()}, y)
                for x, y in _take(synth.Mixed(classification_function=i % 2, seed=20 + i), n // 4)]
    return out


def build_streams(n: int) -> dict[str, tuple[str, Stream]]:
    """name → (kind, events); kind is binary | multiclass | regression."""
    half = n // 2
    return {
        "sea_abrupt": ("binary", _take(synth.SEA(variant=0, noise=0.1, seed=1), half)
                       + _take(synth.SEA(variant=3, noise=0.1, seed=2), n - half)),
        "agrawal_abrupt": ("binary", _agrawal_strings(_take(_agrawal(0, 4), half) + _take(_agrawal(2, 5), n - half))),
        "agrawal_gradual": ("binary", _agrawal_strings(_take(synth.ConceptDriftStream(
            _agrawal(1, 7), _agrawal(4, 8), position=half, width=n // 5, seed=9), n))),
        "hyperplane_incremental": ("binary", _take(synth.Hyperplane(
            seed=11, n_features=10, n_drift_features=5, mag_change=0.001, noise_percentage=0.05), n)),
        "rbf_incremental": ("multiclass", _take(synth.RandomRBFDrift(
            seed_model=12, seed_sample=13, n_classes=5, n_features=10, n_centroids=50, change_speed=0.001,
            n_drift_centroids=25), n)),
        "led_gradual": ("multiclass", _take(synth.ConceptDriftStream(
            synth.LEDDrift(seed=14, noise_percentage=0.1, irrelevant_features=True, n_drift_features=0),
            synth.LEDDrift(seed=15, noise_percentage=0.1, irrelevant_features=True, n_drift_features=7),
            position=half, width=n // 5, seed=16), n)),
        "stagger_recurring": ("binary", _stagger_recurring(n)),
        "mixed_recurring": ("binary", _mixed_recurring(n)),
        "bananas": ("binary", _take(datasets.Bananas(), n)),
        "image_segments": ("multiclass", _take(datasets.ImageSegments(), n)),
        "friedman_gradual": ("regression", _take(synth.FriedmanDrift(
            drift_type="gra", position=(n // 3, 2 * n // 3), transition_window=n // 10, seed=17), n)),
        "trump_approval": ("regression", _take(datasets.TrumpApproval(), n)),
    }


# -- models -------------------------------------------------------------------------------------
def _river(task: str, estimator: str, **params: Any) -> Callable[[], Any]:
    """A River model through the contract's ``build_model``; the linear ones get its scaler and
    one-hot encoder (trees split on raw values and take strings as they are)."""
    preprocess = estimator.startswith("linear_model.")
    return lambda: build_model({"task": task, "learner": "river", "estimator": estimator, "params": params,
                                "preprocess": preprocess})


def river_models(kind: str, quick: bool) -> dict[str, Callable[[], Any]]:
    if kind == "regression":
        models = {
            "river_linear": _river("regression", "linear_model.LinearRegression"),
            "river_hat": _river("regression", "tree.HoeffdingAdaptiveTreeRegressor", seed=42),
            "river_arf": _river("regression", "forest.ARFRegressor", seed=42),
        }
    else:
        linear = "linear_model.LogisticRegression" if kind == "binary" else "linear_model.SoftmaxRegression"
        models = {
            "river_linear": _river("classification", linear),
            "river_hat": _river("classification", "tree.HoeffdingAdaptiveTreeClassifier", seed=42),
            "river_arf": _river("classification", "forest.ARFClassifier", seed=42),
        }
    if quick:
        models.pop("river_arf")
    return models


# Ablations of the recommended learner (accuracy mode); each swaps one part for its plain counterpart.
ABLATIONS: dict[str, dict[str, Any]] = {
    "opt_upgd_global": {"optimizer": "upgd_global", "lr": 0.1},
    "opt_sgd": {"optimizer": "sgd", "lr": 1e-2},
    "opt_adam": {"optimizer": "adam"},
    "opt_adamw": {"optimizer": "adamw", "weight_decay": 1e-2},
    "gamma_fixed": {"learn_gamma": False},
    "head_softmax": {"head": "softmax", "lr": 1e-2},
    "lr_constant": {"lr_schedule": "constant"},
    "lr_wsd": {"lr_schedule": "wsd"},
    "lr_infinite": {"lr_schedule": "infinite"},
    "ema_on": {"ema": 0.99},
    "backbone_none": {"depth": 0},
}


def kalman_factory(kind: str, config: dict[str, Any]) -> Callable[[], Any]:
    task = "regression" if kind == "regression" else "classification"
    return lambda: build_model({"task": task, "device": "cpu", **config})


# -- evaluation -----------------------------------------------------------------------------------
def _score(kind: str, preds: list, ys: list) -> float:
    if kind == "regression":
        return float(np.mean([abs(float(p) - float(y)) for p, y in zip(preds, ys, strict=True)]))
    return float(np.mean([p == y for p, y in zip(preds, ys, strict=True)]))


def run_river(model: Any, stream: Stream) -> tuple[list, float]:
    preds = []
    t0 = time.perf_counter()
    for x, y in stream:
        preds.append(model.predict_one(x))
        model.learn_one(x, y)
    return preds, time.perf_counter() - t0


def run_batched(model: Any, stream: Stream, batch: int) -> tuple[list, float]:
    preds: list = []
    xs_all = [x for x, _ in stream]
    ys_all = [y for _, y in stream]
    t0 = time.perf_counter()
    for i in range(0, len(stream), batch):
        xs, ys = xs_all[i : i + batch], ys_all[i : i + batch]
        preds += model.predict_batch(xs)
        model.learn_batch(xs, ys)
    return preds, time.perf_counter() - t0


def run_fresh(factory: Callable[[], Any], stream: Stream, batch: int | None) -> tuple[list, float]:
    """A new model from ``factory`` over the stream: one event at a time (``batch`` None) or batched."""
    model = factory()
    return run_river(model, stream) if batch is None else run_batched(model, stream, batch)


def rolling(kind: str, preds: list, ys: list, window: int) -> list[float]:
    if kind == "regression":
        err = np.abs(np.asarray(preds, dtype=float) - np.asarray(ys, dtype=float))
    else:
        err = np.asarray([p == y for p, y in zip(preds, ys, strict=True)], dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(err)])
    idx = np.arange(window, len(err) + 1, max(1, window // 4))
    return ((csum[idx] - csum[idx - window]) / window).tolist()


SPEED_PAIR = ("river_linear", "kalman_thr")  # the models of the speed target


def evaluate(streams: dict[str, tuple[str, Stream]], default: dict[str, Any], ablations: dict[str, dict[str, Any]],
             quick: bool, skip_river: bool = False, log: Callable[[str], None] = print,
             speed_passes: int = 1) -> dict[str, Any]:
    results: dict[str, Any] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for name, (kind, stream) in streams.items():
        ys = [y for _, y in stream]
        rows: dict[str, dict[str, float]] = {}
        preds_by_model: dict[str, list] = {}
        runs: list[tuple[str, Callable[[], Any], int | None]] = [
            (m, f, None) for m, f in river_models(kind, quick).items() if not skip_river
        ]
        runs += [("kalman_acc", kalman_factory(kind, default), 16), ("kalman_thr", kalman_factory(kind, default), 256)]
        runs += [(f"abl_{a}", kalman_factory(kind, {**default, **cfg}), 16) for a, cfg in ablations.items()]
        passes: dict[str, list[float]] = {}
        for model_name, factory, batch in runs:
            preds, seconds = run_fresh(factory, stream, batch)
            passes[model_name] = [seconds]
            rows[model_name] = {"score": _score(kind, preds, ys), "seconds": seconds,
                                "events_per_s": len(stream) / seconds}
            preds_by_model[model_name] = preds
            log(f"{name:24s} {model_name:18s} {rows[model_name]['score']:.4f}  {len(stream) / seconds:9.0f} ev/s")
        timed = [(m, f, b) for m, f, b in runs if m in SPEED_PAIR]
        for _ in range(speed_passes - 1):
            for model_name, factory, batch in timed:
                _, seconds = run_fresh(factory, stream, batch)
                passes[model_name].append(seconds)
        if speed_passes > 1:
            for model_name, _, _ in timed:
                seconds = float(np.median(passes[model_name]))
                rows[model_name].update(seconds=seconds, events_per_s=len(stream) / seconds,
                                        passes_seconds=passes[model_name])
                log(f"{name:24s} {model_name:18s} median of {speed_passes} passes {len(stream) / seconds:9.0f} ev/s")
        results[name] = {"kind": kind, "events": len(stream), "models": rows}
        window = max(50, len(stream) // 20)
        curves[name] = {m: rolling(kind, preds_by_model[m], ys, window)
                        for m in ("kalman_acc", "kalman_thr", "river_linear", "river_hat", "river_arf") if m in preds_by_model}
    return {"streams": results, "curves": curves, "summary": summarise(results)}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    clf = {k: v for k, v in results.items() if v["kind"] != "regression"}
    river_names = [m for m in next(iter(clf.values()))["models"] if m.startswith("river_")] if clf else []

    def mean_of(model: str) -> float:
        return float(np.mean([v["models"][model]["score"] for v in clf.values()]))

    def speed(model: str) -> float:  # total events / total seconds over all streams
        events = sum(v["events"] for v in results.values())
        return events / sum(v["models"][model]["seconds"] for v in results.values())

    best_river = (float(np.mean([max(v["models"][m]["score"] for m in river_names) for v in clf.values()]))
                  if river_names else float("nan"))
    out = {
        "accuracy_mode_mean": mean_of("kalman_acc"),
        "throughput_mode_mean": mean_of("kalman_thr"),
        "river_best_per_stream_mean": best_river,
        **{f"{m}_mean": mean_of(m) for m in river_names},
        "ablation_means": {m: mean_of(m) for m in next(iter(clf.values()))["models"] if m.startswith("abl_")},
        "events_per_s": {m: speed(m) for m in next(iter(results.values()))["models"]},
        "regression_mae": {k: {m: r["score"] for m, r in v["models"].items()}
                           for k, v in results.items() if v["kind"] == "regression"},
    }
    out["target_accuracy_mode"] = out["accuracy_mode_mean"] > best_river
    if "river_arf_mean" in out:
        out["target_throughput_mode_vs_arf"] = out["throughput_mode_mean"] > out["river_arf_mean"]
    if "river_linear" in out["events_per_s"]:
        out["throughput_speedup_vs_river_linear"] = out["events_per_s"]["kalman_thr"] / out["events_per_s"]["river_linear"]
    return out


# -- reports ------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    streams = report["streams"]
    models = list(next(iter(streams.values()))["models"])
    lines = [f"# Prequential quality ({report['meta']['command']})", "",
             f"{report['meta']['events']} events per stream (bundled datasets: up to their length), "
             f"torch threads = 1, {report['meta']['machine']}. Accuracy (classification, higher is better) "
             "/ MAE (regression, lower is better). `kalman_acc` = default learner, micro-batch 16; "
             "`kalman_thr` = micro-batch 256; `abl_*` = ablations at micro-batch 16; River models one event at a time.",
             "", "| stream | kind | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for name, v in streams.items():
        cells = [f"{v['models'][m]['score']:.4f}" for m in models]
        lines.append(f"| {name} | {v['kind']} | " + " | ".join(cells) + " |")
    s = report["summary"]
    lines += ["", "## Summary (classification streams)", "",
              "| quantity | value |", "|---|---|",
              f"| default learner, accuracy mode (batch 16), mean accuracy | {s['accuracy_mode_mean']:.4f} |",
              f"| default learner, throughput mode (batch 256), mean accuracy | {s['throughput_mode_mean']:.4f} |",
              f"| River best model per stream (chosen in hindsight), mean | {s['river_best_per_stream_mean']:.4f} |"]
    if math.isnan(s["river_best_per_stream_mean"]):
        lines.pop()  # --skip-river: no River models in this run
    lines += [f"| {k.removesuffix('_mean')}, mean | {v:.4f} |" for k, v in s.items() if k.startswith("river_") and k.endswith("_mean") and k != "river_best_per_stream_mean"]
    lines += [f"| {k}, mean | {v:.4f} |" for k, v in s["ablation_means"].items()]
    if not math.isnan(s["river_best_per_stream_mean"]):
        lines += [f"| target: accuracy mode > River best per stream | {s['target_accuracy_mode']} |"]
    if "target_throughput_mode_vs_arf" in s:
        lines.append(f"| target: throughput mode > ARF mean | {s['target_throughput_mode_vs_arf']} |")
    if "throughput_speedup_vs_river_linear" in s:
        lines.append(f"| throughput mode speed / River linear speed (all streams) | {s['throughput_speedup_vs_river_linear']:.2f}× |")
    passes = report["meta"].get("speed_passes", 1)
    lines += ["", "## Events per second (learn + predict, all streams, 1 core)", ""]
    if passes > 1:
        lines += [f"{' and '.join(SPEED_PAIR)}: each stream's time is the median of {passes} passes, the two "
                  "models taking turns; the others: one pass.", ""]
    lines += ["| model | events/s |", "|---|---|"]
    lines += [f"| {m} | {v:,.0f} |" for m, v in s["events_per_s"].items()]
    return "\n".join(lines) + "\n"


def svg(report: dict[str, Any]) -> str:
    """Small multiples of rolling accuracy/MAE over the stream for the main models."""
    curves = report["curves"]
    colours = {"kalman_acc": "#d62728", "kalman_thr": "#ff9896", "river_linear": "#1f77b4",
               "river_hat": "#2ca02c", "river_arf": "#9467bd"}
    w, h, cols = 300, 170, 3
    rows = math.ceil(len(curves) / cols)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * w}" height="{rows * h + 30}" '
             'font-family="sans-serif" font-size="10">', '<rect width="100%" height="100%" fill="white"/>']
    for i, (name, lines) in enumerate(curves.items()):
        ox, oy = (i % cols) * w + 35, (i // cols) * h + 15
        pw, ph = w - 50, h - 45
        values = [v for series in lines.values() for v in series]
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        parts.append(f'<text x="{ox}" y="{oy - 3}" font-weight="bold">{name}</text>')
        parts.append(f'<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        parts.append(f'<text x="{ox - 3}" y="{oy + 8}" text-anchor="end">{hi:.2f}</text>')
        parts.append(f'<text x="{ox - 3}" y="{oy + ph}" text-anchor="end">{lo:.2f}</text>')
        for model, series in lines.items():
            if len(series) < 2:
                continue
            pts = " ".join(f"{ox + pw * j / (len(series) - 1):.1f},{oy + ph * (1 - (v - lo) / (hi - lo)):.1f}"
                           for j, v in enumerate(series))
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colours[model]}" stroke-width="1.2"/>')
    for j, (model, colour) in enumerate(colours.items()):
        parts.append(f'<text x="{10 + j * 140}" y="{rows * h + 20}" fill="{colour}">■ {model}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


DEFAULT_LEARNER: dict[str, Any] = {}  # the registry's defaults: what build_model returns


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1.5k events, no ARF, 3 ablations")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--streams", default=None, help="comma-separated subset")
    parser.add_argument("--ablations", default=None, help="comma-separated subset ('none' for none)")
    parser.add_argument("--config", default="{}", help="JSON overrides of the default learner's parameters")
    parser.add_argument("--out", default=str(RESULTS), help="directory for quality.{json,md} and the SVG")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    parser.add_argument("--skip-river", action="store_true", help="only the Kalman learner and its ablations")
    parser.add_argument("--speed-passes", type=int, default=5,
                        help="timed passes per stream of the throughput mode and River's LogisticRegression "
                             "(the speed target), taking turns; each one's time is the median")
    args = parser.parse_args(argv)
    if args.speed_passes < 1:
        parser.error("--speed-passes: expected an integer >= 1")
    torch.set_num_threads(1)
    n = args.events or (1500 if args.quick else 10_000)
    streams = build_streams(n)
    if args.streams:
        streams = {k: streams[k] for k in args.streams.split(",")}
    ablations = ABLATIONS
    if args.ablations:
        ablations = {} if args.ablations == "none" else {k: ABLATIONS[k] for k in args.ablations.split(",")}
    elif args.quick:
        ablations = {k: ABLATIONS[k] for k in ("opt_adam", "gamma_fixed", "backbone_none")}
    default = {**DEFAULT_LEARNER, **json.loads(args.config)}
    report = evaluate(streams, default, ablations, args.quick, skip_river=args.skip_river,
                      speed_passes=args.speed_passes)
    command = "python -m bench.quality " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    report["meta"] = {"command": command.strip(), "events": n, "default_overrides": default,
                      "speed_passes": args.speed_passes,
                      "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    (out / f"quality{suffix}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"quality{suffix}.md").write_text(markdown(report))
    (out / f"quality{suffix}_rolling.svg").write_text(svg(report))
    print(json.dumps(report["summary"], indent=1))
    return report


if __name__ == "__main__":
    main()
