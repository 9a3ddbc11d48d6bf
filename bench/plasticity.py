"""Plasticity and forgetting on permuted streams: UPGD (all variants) vs SGD vs Adam.

Streams are built from scikit-learn's bundled digits (1797 8×8 images, 10 classes; no download):

- label-permuted: every task draws a fresh random permutation of the 10 labels; the inputs stay.
  The features the network learned stay useful, the read-out must be re-learned: a pure test of
  plasticity (can it still learn a new task after hundreds of them?).
- input-permuted: every task draws a fresh random permutation of the 64 pixels; the labels stay.
  Earlier features become useless: plasticity and the cost of reusing a network that forgot.

Each task is ``--steps`` online micro-batches of ``--batch`` samples (drawn with replacement); on
every step the network first predicts the batch (counted towards the task's online accuracy),
then learns from it. The network is a ReLU MLP 64-128-128-10 without normalisation, the standard
setting in which SGD and Adam lose plasticity. Every optimizer runs on the same task sequence and
initial weights. Learning rates are fixed per optimizer (chosen on a separate short pilot on
another seed, see ``CONFIGS``), not tuned on the reported run.

    .venv/bin/python -m bench.plasticity            # 200 tasks per stream: ~8 min wall (1 thread)
    .venv/bin/python -m bench.plasticity --quick    # 40 tasks, ~1 min: a smoke run

Writes ``bench/results/plasticity.md`` (table), ``plasticity.json`` (per-task accuracies) and
``plasticity.svg`` (accuracy per task, moving average), or ``plasticity-quick.*`` with ``--quick``.
The target: UPGD's online accuracy over the last 10% of tasks is at least its accuracy over the
first 10%, while SGD/Adam lose plasticity or forget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits

from learners.upgd import UPGD

RESULTS = Path(__file__).parent / "results"

# Learning rates (and σ) picked by mean online accuracy on a pilot run with another seed (seed 1, 30
# label-permuted tasks × 250 steps): SGD {0.01, 0.03, 0.1, 0.3}, Adam {3e-4, 1e-3, 3e-3}, UPGD
# global {0.03, 0.1, 0.3} × σ {0.01, 0.1}, local/non-protecting {0.1, 0.3}, adaptive {1e-3, 3e-3} × σ
# {1e-3, 1e-2}; UPGD variants with β = 0.999 and λ = 1e-3. SGD and Adam also run at their second-best
# pilot rate, so that a collapse is not blamed on a rate that is merely too high.
#
# AdaUPGD adds σξ to the Adam-normalised direction m̂/(√v̂+ε), whose elements are O(1), where the
# other variants add it to the raw gradient (mean |g| of the weights here: 2e-3..2e-2); and its rates
# are ~100× smaller. With the same σ and λ its perturbation (lr·σ per step) and its shrinkage
# (lr·λ) are therefore ~1000× and ~100× weaker than the global variant's, too weak to move dead
# units (their gradient, hence their Adam direction, is exactly 0; only noise and decay reach them).
# "upgd-adaptive-learner" is the learner's optimizer as configured in learners/estimator.py
# (lr 1e-2, the peak of its schedule; σ 1e-3; λ 0). The "-noisy" rows scale σ and λ up; picked on
# full 200-task runs with seed 1 (label-permuted: lr {1e-3, 3e-3, 1e-2} × σ {1e-2, 0.1, 1} × λ {1e-3,
# 1e-2, 0.1}, then σ {3, 10}, λ {0.03, 0.3}, Adam betas (0.9, 0.99) and (0.99, 0.99); the best
# four on input-permuted too). σ 10, or λ ≤ 0.03 with σ 3, collapsed there; betas did not help.
# Seed 1, first → last 10%: "-noisy" label 0.722 → 0.711, input 0.712 → 0.702; "-noisy-lr3e-3"
# label 0.649 → 0.630, input 0.658 → 0.672 (global UPGD: 0.743 → 0.816, 0.649 → 0.661).
_UPGD = {"kind": "upgd", "beta_utility": 0.999, "weight_decay": 1e-3}
_ADAUPGD_NOISY = {**_UPGD, "variant": "adaptive", "sigma": 3.0, "weight_decay": 0.1}
CONFIGS: dict[str, dict[str, Any]] = {
    "sgd": {"kind": "sgd", "lr": 0.3},
    "sgd-lr0.1": {"kind": "sgd", "lr": 0.1},
    "adam": {"kind": "adam", "lr": 3e-3},
    "adam-lr1e-3": {"kind": "adam", "lr": 1e-3},
    "upgd": {**_UPGD, "variant": "global", "lr": 0.3, "sigma": 1e-2},
    "upgd-local": {**_UPGD, "variant": "local", "lr": 0.3, "sigma": 1e-2},
    "upgd-nonprotecting": {**_UPGD, "variant": "nonprotecting", "lr": 0.3, "sigma": 1e-2},
    "upgd-adaptive": {**_UPGD, "variant": "adaptive", "lr": 3e-3, "sigma": 1e-3},
    "upgd-adaptive-learner": {**_UPGD, "variant": "adaptive", "lr": 1e-2, "sigma": 1e-3, "weight_decay": 0.0},
    "upgd-adaptive-noisy": {**_ADAUPGD_NOISY, "lr": 1e-2},
    "upgd-adaptive-noisy-lr3e-3": {**_ADAUPGD_NOISY, "lr": 3e-3},
    # the product itself: the default KalmanClassifier (LayerNorm + GELU backbone, AdaUPGD as
    # configured in learners/estimator.py, Kalman head with learned γ), pixels as 64 numeric
    # features (so 64 numeric slots), predict_batch then learn_batch on the same micro-batches
    "learner": {"kind": "learner", "max_numeric": 64},
    # the same learner with its backbone trained by Adam instead of AdaUPGD: what UPGD adds there
    # (on the 200-task run, nothing measurable: LayerNorm, GELU and the Kalman head with learned γ
    # keep this architecture plastic with either optimizer; label 0.933 → 0.983, input 0.820 → 0.838)
    "learner-adam": {"kind": "learner", "max_numeric": 64, "optimizer": "adam"},
}


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def _optimizer(params, config: dict[str, Any], seed: int) -> torch.optim.Optimizer:
    config = dict(config)
    kind = config.pop("kind")
    if kind == "sgd":
        return torch.optim.SGD(params, **config)
    if kind == "adam":
        return torch.optim.Adam(params, **config)
    return UPGD(params, generator=torch.Generator().manual_seed(seed), **config)


def make_tasks(stream: str, tasks: int, steps: int, batch: int, seed: int):
    """Per task: (input tensor of the whole dataset, label tensor, sample indices (steps, batch))."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    for _ in range(tasks):
        if stream == "label-permuted":
            xs, ys = x, rng.permutation(10)[y]
        elif stream == "input-permuted":
            xs, ys = x[:, rng.permutation(64)], y
        else:
            raise ValueError(f"stream: expected 'label-permuted' or 'input-permuted', got {stream!r}")
        idx = rng.integers(0, len(y), size=(steps, batch))
        yield torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(ys), torch.from_numpy(idx)


def run(stream: str, config: dict[str, Any], tasks: int, steps: int, batch: int, seed: int
        ) -> tuple[list[float], dict[str, float]]:
    """Online (predict-then-learn) accuracy of every task, in order, and end-of-run diagnostics:
    the fraction of dead hidden ReLU units (zero on every input of the last task) and whether all
    weights are finite."""
    if config["kind"] == "learner":
        return run_learner(stream, config, tasks, steps, batch, seed)
    net = _mlp(seed)
    opt = _optimizer(net.parameters(), config, seed)
    accuracies = []
    for xs, ys, idx in make_tasks(stream, tasks, steps, batch, seed):
        correct = 0
        for rows in idx:
            xb, yb = xs[rows], ys[rows]
            logits = net(xb)
            correct += int((logits.argmax(dim=1) == yb).sum())
            loss = torch.nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        accuracies.append(correct / (steps * batch))
    with torch.no_grad():
        h1 = net[1](net[0](xs))
        h2 = net[3](net[2](h1))
        dead = float(torch.cat([(h1 <= 0).all(dim=0), (h2 <= 0).all(dim=0)]).float().mean())
        finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
    return accuracies, {"dead_units": dead, "finite": finite}


def run_learner(stream: str, config: dict[str, Any], tasks: int, steps: int, batch: int, seed: int
                ) -> tuple[list[float], dict[str, float]]:
    """:func:`run` for the recommended learner, through its public API on feature dicts (its GELU
    units have no "dead" state: that diagnostic is NaN)."""
    from learners import build_model

    model = build_model({"task": "classification", "device": "cpu", "seed": seed,
                         **{k: v for k, v in config.items() if k != "kind"}})
    names = [f"p{i}" for i in range(64)]
    accuracies = []
    for xs, ys, idx in make_tasks(stream, tasks, steps, batch, seed):
        rows_x = [dict(zip(names, row, strict=True)) for row in xs.tolist()]
        labels = ys.tolist()
        correct = 0
        for rows in idx.tolist():
            xb, yb = [rows_x[r] for r in rows], [labels[r] for r in rows]
            correct += sum(p == y for p, y in zip(model.predict_batch(xb), yb, strict=True))
            model.learn_batch(xb, yb)
        accuracies.append(correct / (steps * batch))
    return accuracies, {"dead_units": float("nan"), "finite": not model.diagnostics()["diverged"]}


def summarise(accuracies: list[float]) -> dict[str, float]:
    k = max(1, len(accuracies) // 10)
    first, last = float(np.mean(accuracies[:k])), float(np.mean(accuracies[-k:]))
    return {"first_10pct": first, "last_10pct": last, "change": last - first, "mean": float(np.mean(accuracies))}


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


COLOURS = {"sgd": "#d62728", "sgd-lr0.1": "#e377c2", "adam": "#ff7f0e", "adam-lr1e-3": "#8c564b", "upgd": "#1f77b4", "upgd-local": "#2ca02c",
           "upgd-nonprotecting": "#9467bd", "upgd-adaptive": "#17becf", "upgd-adaptive-learner": "#7f7f7f",
           "upgd-adaptive-noisy": "#bcbd22", "upgd-adaptive-noisy-lr3e-3": "#000080", "learner": "#000000",
           "learner-adam": "#aaaaaa"}


def svg(results: dict[str, dict[str, list[float]]], title: str) -> str:
    """Small dependency-free line chart: one panel per stream, moving average over 10 tasks."""
    width, height, pad = 460, 300, 45
    legend_rows = (len(next(iter(results.values()))) + 2) // 3
    panels = []
    for p, (stream, runs) in enumerate(results.items()):
        x0 = p * (width + 20)
        n = max(len(a) for a in runs.values())
        lo = min(min(a) for a in runs.values())
        lo = max(0.0, np.floor(lo * 10) / 10)

        def px(i, n=n, x0=x0):
            return x0 + pad + (width - pad - 10) * i / max(n - 1, 1)

        def py(a, lo=lo):
            return height - pad - (height - pad - 30) * (a - lo) / (1.0 - lo)

        parts = [f'<text x="{x0 + width / 2}" y="18" text-anchor="middle" font-size="13">{stream}</text>',
                 f'<line x1="{px(0)}" y1="{py(lo)}" x2="{px(n - 1)}" y2="{py(lo)}" stroke="#888"/>',
                 f'<line x1="{px(0)}" y1="{py(lo)}" x2="{px(0)}" y2="{py(1.0)}" stroke="#888"/>',
                 f'<text x="{x0 + width / 2}" y="{height - 8}" text-anchor="middle" font-size="11">task</text>']
        for tick in np.linspace(lo, 1.0, 5):
            parts.append(f'<text x="{px(0) - 4}" y="{py(tick) + 4}" text-anchor="end" font-size="10">{tick:.2f}</text>')
        for tick in (0, n // 2, n - 1):
            parts.append(f'<text x="{px(tick)}" y="{py(lo) + 14}" text-anchor="middle" font-size="10">{tick + 1}</text>')
        for legend, (name, acc) in enumerate(runs.items()):
            smooth = _moving_average(acc, 10)
            points = " ".join(f"{px(i):.1f},{py(a):.1f}" for i, a in enumerate(smooth))
            colour = COLOURS.get(name, "#444")
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
            lx, ly = x0 + pad + 140 * (legend % 3), height + 12 + 14 * (legend // 3)
            parts.append(f'<text x="{lx}" y="{ly}" font-size="11" fill="{colour}">— {name}</text>')
        panels.append("\n".join(parts))
    total_width = len(results) * (width + 20)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width}" height="{height + 20 + 14 * legend_rows}" '
            f'font-family="sans-serif"><title>{title}</title>\n' + "\n".join(panels) + "\n</svg>\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 tasks per stream: a smoke run")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per stream (default 200, quick 40)")
    parser.add_argument("--steps", type=int, default=None, help="micro-batches per task (default 100, quick 50)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizers", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    parser.add_argument("--streams", default="label-permuted,input-permuted")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tasks = args.tasks or (40 if args.quick else 200)
    steps = args.steps or (50 if args.quick else 100)
    names = [n for n in args.optimizers.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            parser.error(f"--optimizers: unknown optimizer {n!r}; choose from {', '.join(CONFIGS)}")

    results: dict[str, dict[str, list[float]]] = {}
    diagnostics: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for stream in args.streams.split(","):
        results[stream], diagnostics[stream], seconds[stream] = {}, {}, {}
        for name in names:
            start = time.perf_counter()
            results[stream][name], diagnostics[stream][name] = run(stream, CONFIGS[name], tasks, steps,
                                                                   args.batch, args.seed)
            seconds[stream][name] = time.perf_counter() - start
            s = summarise(results[stream][name])
            print(f"{stream:15s} {name:26s} first10% {s['first_10pct']:.3f} last10% {s['last_10pct']:.3f} "
                  f"mean {s['mean']:.3f} dead {diagnostics[stream][name]['dead_units']:.2f} "
                  f"({seconds[stream][name]:.0f} s)", flush=True)

    suffix = "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.plasticity", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# Plasticity on permuted digits ({tasks} tasks × {steps} steps × batch {args.batch}, seed {args.seed})",
             "", f"`{command}` — online (predict-then-learn) accuracy per task; first/last 10% of tasks.", "",
             "| stream | optimizer | settings | first 10% | last 10% | change | mean | dead units at end | seconds |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for stream, runs in results.items():
        for name, acc in runs.items():
            s = summarise(acc)
            settings = ", ".join(f"{k}={v}" for k, v in CONFIGS[name].items() if k != "kind")
            settings = settings.replace("beta_utility", "β").replace("weight_decay", "λ").replace("sigma", "σ")
            diag = diagnostics[stream][name]
            dead = ("—" if np.isnan(diag["dead_units"]) else f"{diag['dead_units']:.0%}") + (
                "" if diag["finite"] else " (weights not finite)")
            lines.append(f"| {stream} | {name} | {settings} | {s['first_10pct']:.3f} | {s['last_10pct']:.3f} | "
                         f"{s['change']:+.3f} | {s['mean']:.3f} | {dead} | {seconds[stream][name]:.0f} |")
    (args.out / f"plasticity{suffix}.md").write_text("\n".join(lines) + "\n")
    payload = {"tasks": tasks, "steps": steps, "batch": args.batch, "seed": args.seed, "configs": CONFIGS,
               "diagnostics": diagnostics, "seconds": seconds,
               "accuracy_per_task": {st: {n: [round(a, 4) for a in acc] for n, acc in runs.items()}
                                     for st, runs in results.items()}}
    (args.out / f"plasticity{suffix}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.out / f"plasticity{suffix}.svg").write_text(svg(results, "online accuracy per task (moving average of 10)"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
