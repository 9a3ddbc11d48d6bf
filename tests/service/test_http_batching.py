"""The predict micro-batcher: coalescing, bounds, failure isolation, and consistent snapshots."""

from __future__ import annotations

import asyncio
import threading

import pytest

from learners import ModelUnavailable, RowsRejected, as_stream_model, build_model
from service.batching import MicroBatcher, score


def trained_model():
    model = as_stream_model(build_model({"task": "classification", "learner": "river"}))
    model.learn_batch([{"x": float(i % 5 - 2)} for i in range(200)], [i % 5 > 2 for i in range(200)])
    return model


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_and_get_their_own_answers():
    model = trained_model()
    snapshot = model.snapshot()
    sizes: list[int] = []
    batcher = MicroBatcher(lambda: (3, snapshot), max_batch=64, max_wait_s=0.002,
                           observe=lambda seconds, n: sizes.append(n))
    requests = [[{"x": float(i % 7 - 3)}] * (1 + i % 3) for i in range(60)]

    async def many():
        return await asyncio.gather(*(batcher.predict(xs) for xs in requests))

    results = run(many())
    batcher.close()
    assert batcher.batches < len(requests) / 4  # coalesced
    assert max(sizes) <= 64 and sum(sizes) == sum(len(r) for r in requests)
    for xs, result in zip(requests, results, strict=True):
        labels, probas = score(snapshot, xs)
        assert result.model_version == 3
        assert result.labels == labels and result.probas == probas


def test_a_request_larger_than_max_batch_runs_alone():
    model = trained_model()
    sizes: list[int] = []
    batcher = MicroBatcher(lambda: (1, model.snapshot()), max_batch=8, observe=lambda s, n: sizes.append(n))

    async def two():
        return await asyncio.gather(batcher.predict([{"x": 1.0}] * 20), batcher.predict([{"x": 1.0}] * 3))

    big, small = run(two())
    batcher.close()
    assert len(big.labels) == 20 and len(small.labels) == 3
    assert sorted(sizes) == [3, 20]


class Picky:
    """A predictor that rejects one particular input (a model bug, say)."""

    task = "classification"

    def predict_proba_batch(self, xs):
        if any(x.get("poison") for x in xs):
            raise ValueError("cannot score poison")
        return [{True: 0.75, False: 0.25} for _ in xs]

    def predict_batch(self, xs):
        return [True for _ in xs]


def test_a_failing_request_fails_alone():
    batcher = MicroBatcher(lambda: (1, Picky()), max_wait_s=0.005)

    async def mixed():
        return await asyncio.gather(batcher.predict([{"x": 1}]), batcher.predict([{"poison": True}]),
                                    batcher.predict([{"x": 2}, {"x": 3}]), return_exceptions=True)

    ok1, bad, ok2 = run(mixed())
    batcher.close()
    assert isinstance(bad, RowsRejected) and bad.rows == {0: "ValueError: cannot score poison"}
    assert ok1.labels == [True] and ok2.labels == [True, True]


def test_a_failing_request_names_the_instances_the_model_cannot_score():
    batcher = MicroBatcher(lambda: (1, Picky()), max_wait_s=0)
    xs = [{"x": 1}] * 40 + [{"poison": True}] + [{"x": 2}] * 50 + [{"poison": True}]
    with pytest.raises(RowsRejected) as caught:
        run(batcher.predict(xs))
    batcher.close()
    assert sorted(caught.value.rows) == [40, 91]


class Diverged:
    """A predictor that cannot predict at all, and counts how often it was asked."""

    task = "classification"

    def __init__(self):
        self.calls = 0

    def predict_proba_batch(self, xs):
        self.calls += 1
        raise ModelUnavailable("the learner diverged")

    predict_batch = predict_proba_batch


def test_a_model_that_cannot_predict_fails_every_request_of_the_batch_in_one_pass():
    model = Diverged()
    batcher = MicroBatcher(lambda: (1, model), max_wait_s=0.005)

    async def three():
        return await asyncio.gather(*(batcher.predict([{"x": i}] * (i + 1)) for i in range(3)), return_exceptions=True)

    results = run(three())
    batcher.close()
    assert all(isinstance(r, ModelUnavailable) and "diverged" in str(r) for r in results)
    assert len({id(r) for r in results}) == 3  # one exception each
    assert model.calls == 1  # not re-run request by request, nor row by row


def test_readers_see_whole_snapshots_while_the_learner_learns():
    """Every answer equals what the snapshot of its model_version predicts: never a half-updated model."""
    model = trained_model()
    published = {0: model.snapshot()}
    current = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def learner():
        version = 0
        while not stop.is_set():
            model.learn_batch([{"x": float(version % 9 - 4)}] * 50, [version % 2 == 0] * 50)
            version += 1
            snap = model.snapshot()
            with lock:
                published[version] = snap
                current[0] = version

    def snapshot():
        with lock:
            return current[0], published[current[0]]

    batcher = MicroBatcher(snapshot, max_batch=32, max_wait_s=0.001)
    xs = [{"x": float(i % 9 - 4)} for i in range(9)]

    async def readers():
        out = []
        for _ in range(40):
            out.extend(await asyncio.gather(*(batcher.predict(xs) for _ in range(5))))
        return out

    thread = threading.Thread(target=learner)
    thread.start()
    try:
        results = run(readers())
    finally:
        stop.set()
        thread.join()
        batcher.close()
    versions = {r.model_version for r in results}
    assert len(versions) > 3  # the model moved while readers read
    for r in results:
        assert (r.labels, r.probas) == score(published[r.model_version], xs)


@pytest.mark.parametrize(("max_batch", "max_wait_s"), [(0, 0.001), (4, -1.0)])
def test_bad_settings_are_refused(max_batch, max_wait_s):
    with pytest.raises(ValueError, match="max_batch" if max_batch < 1 else "max_wait_s"):
        MicroBatcher(lambda: (0, Picky()), max_batch=max_batch, max_wait_s=max_wait_s)
