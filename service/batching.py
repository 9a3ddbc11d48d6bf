"""Micro-batching for HTTP predictions.

Concurrent ``predict`` calls for one model are coalesced into one batch that runs on the model's
published :class:`learners.protocol.Predictor` snapshot in a worker thread:

- the learner (the single writer) is never blocked by readers, and readers never see a
  half-updated model — a snapshot is immutable once published, and every instance of a batch is
  scored by the same snapshot, whose ``model_version`` is returned with it;
- the event loop keeps accepting requests while a batch runs; whatever arrives meanwhile forms
  the next batch (up to ``max_batch`` instances), so batches grow with load by themselves;
- from idle, the first request waits ``max_wait_s`` (about a millisecond) for company.

If a batch raises, each of its requests is re-run on its own, so one request that trips the model
fails alone instead of taking its neighbours down with it; it fails with
:class:`learners.protocol.RowsRejected` naming the instances the model cannot score. A model that
cannot predict at all (:class:`learners.protocol.ModelUnavailable`) fails every request of the
batch with that error at once.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from learners.protocol import ModelUnavailable, Predictor, RowsRejected, rows_at_fault, score


@dataclass(frozen=True)
class Scored:
    """The predictions for one request: labels (floats for a regressor) and probabilities."""

    model_version: int
    labels: list[Any]
    probas: list[dict[Any, float]] | None  # None for a regressor


def _located(predictor: Predictor, xs: Sequence[dict[str, Any]], exc: Exception) -> Exception:
    """The instances of a failed request that the model cannot score (:class:`RowsRejected`), or
    the request's own error when each of them scores alone."""
    rows = rows_at_fault(lambda i, j: score(predictor, xs[i:j]) and None, 0, len(xs), exc)
    return RowsRejected(rows) if rows else exc


class MicroBatcher:
    """Coalesces concurrent predictions for one model.

    ``snapshot()`` returns the ``(model_version, predictor)`` pair currently published by the
    learner (``ModelRuntime.snapshot``); it is called once per batch. ``observe(seconds, n)`` receives
    the time each batch of ``n`` instances took on the model (``streamlearn_predict_seconds``).

    >>> import asyncio
    >>> from learners import as_stream_model, build_model
    >>> model = as_stream_model(build_model({"task": "classification"}))
    >>> model.learn_batch([{"x": 1.0}, {"x": -1.0}], [True, False])
    >>> batcher = MicroBatcher(lambda: (7, model.snapshot()))
    >>> async def two_requests():
    ...     return await asyncio.gather(batcher.predict([{"x": 2.0}]), batcher.predict([{"x": -2.0}]))
    >>> [(r.model_version, r.labels) for r in asyncio.run(two_requests())]
    [(7, [True]), (7, [False])]
    >>> batcher.batches, batcher.close()
    (1, None)
    """

    def __init__(self, snapshot: Callable[[], tuple[int, Predictor]], *, max_batch: int = 1024,
                 max_wait_s: float = 0.001, observe: Callable[[float, int], None] | None = None,
                 name: str = "model"):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s: must be >= 0, got {max_wait_s}")
        self._snapshot = snapshot
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._observe = observe
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"predict-{name}")
        self._pending: collections.deque[tuple[Sequence[dict], asyncio.Future]] = collections.deque()
        self._pending_n = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0  # how many batches ran (observability and tests)

    async def predict(self, xs: Sequence[dict[str, Any]]) -> Scored:
        """Score ``xs`` (one request) in the next batch."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.get_loop() is not loop or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._drain(), name="micro-batcher")
        future = loop.create_future()
        self._pending.append((xs, future))
        self._pending_n += len(xs)
        self._wakeup.set()
        return await future

    def _take(self) -> list[tuple[Sequence[dict], asyncio.Future]]:
        """Requests for the next batch: at least one, then as many as fit into ``max_batch``."""
        batch = [self._pending.popleft()]
        size = len(batch[0][0])
        while self._pending and size + len(self._pending[0][0]) <= self.max_batch:
            request = self._pending.popleft()
            size += len(request[0])
            batch.append(request)
        self._pending_n -= size
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if self._pending_n < self.max_batch and self.max_wait_s:
                await asyncio.sleep(self.max_wait_s)  # from idle: give concurrent requests a moment
            while self._pending:
                batch = self._take()
                live = [(xs, f) for xs, f in batch if not f.done()]  # a cancelled client needs no answer
                if live:
                    results = await loop.run_in_executor(self._executor, self._run, [xs for xs, _ in live])
                    for (_, future), result in zip(live, results, strict=True):
                        if future.done():
                            continue
                        if isinstance(result, BaseException):
                            future.set_exception(result)
                        else:
                            future.set_result(result)
            self._wakeup.clear()

    def _run(self, requests: list[Sequence[dict]]) -> list[Scored | BaseException]:
        """Worker thread: one snapshot, one model pass for all requests; isolate failures."""
        version, predictor = self._snapshot()
        xs = [x for request in requests for x in request]
        start = time.perf_counter()
        try:
            labels, probas = score(predictor, xs)
        except ModelUnavailable as exc:
            return [copy.copy(exc) for _ in requests]  # one each: raising one object in many tasks would tangle its traceback
        except Exception as exc:
            if len(requests) == 1:
                return [_located(predictor, xs, exc)]
            return [r for request in requests for r in self._run([request])]
        finally:
            if self._observe is not None:
                self._observe(time.perf_counter() - start, len(xs))
        self.batches += 1
        out: list[Scored | BaseException] = []
        i = 0
        for request in requests:
            j = i + len(request)
            out.append(Scored(version, labels[i:j], probas[i:j] if probas is not None else None))
            i = j
        return out

    def close(self) -> None:
        """Stop the worker (pending requests are cancelled) and its thread."""
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.cancel()
        self._pending_n = 0
        self._executor.shutdown(wait=False, cancel_futures=True)
