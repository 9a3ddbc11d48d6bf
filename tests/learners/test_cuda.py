"""The recommended learner on a GPU behaves as on the CPU (runs only where CUDA is present)."""

import math
import pickle

import numpy as np
import pytest
import torch

from learners import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _stream(n: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    rng = np.random.default_rng(seed)
    num = rng.normal(size=(n, 4))
    cat = rng.integers(0, 5, size=n)
    ys = ((num[:, 0] - num[:, 1] + (cat == 2)) > 0).astype(int).tolist()
    xs = [{"a": num[i, 0], "b": num[i, 1], "c": num[i, 2], "d": num[i, 3], "k": f"v{cat[i]}"} for i in range(n)]
    return xs, ys


def _prequential(model, xs, ys, batch=32):
    probas = []
    for i in range(0, len(xs), batch):
        probas += model.predict_proba_batch(xs[i : i + batch])
        model.learn_batch(xs[i : i + batch], ys[i : i + batch])
    return probas


def test_auto_device_is_cuda_and_matches_the_cpu_run():
    xs, ys = _stream(2048)
    gpu = build_model({"task": "classification", "device": "auto"})
    cpu = build_model({"task": "classification", "device": "cpu"})
    p_gpu, p_cpu = _prequential(gpu, xs, ys), _prequential(cpu, xs, ys)
    acc = [np.mean([max(p, key=p.get) == y for p, y in zip(ps, ys, strict=True) if p]) for ps in (p_gpu, p_cpu)]
    assert acc[0] > 0.8
    assert abs(acc[0] - acc[1]) < 0.02
    diffs = [abs(a[k] - b[k]) for a, b in zip(p_gpu[:256], p_cpu[:256], strict=True) for k in a]
    assert max(diffs) < 1e-3, "the first batches must agree closely before rounding differences compound"
    diag = gpu.diagnostics()
    assert not diag["diverged"] and math.isfinite(diag["kalman_gamma"])


def test_snapshot_of_a_cuda_model_serves_and_pickles():
    xs, ys = _stream(512)
    model = build_model({"task": "classification", "device": "cuda"})
    _prequential(model, xs, ys)
    snap = model.snapshot()
    before = snap.predict_proba_batch(xs[:64])
    model.learn_batch(xs[:256], [1 - y for y in ys[:256]])  # the writer moves on; the snapshot must not
    assert snap.predict_proba_batch(xs[:64]) == before
    clone = pickle.loads(pickle.dumps(model))
    assert clone.predict_proba_batch(xs[:8]) == model.predict_proba_batch(xs[:8])
