"""The bounded pending-label store: predictions waiting for their label, joined by event id.

Bounded two ways: at most ``max_entries`` (the oldest is evicted first) and at most ``ttl_seconds``
old. Evictions are counted by cause, and the ids of recently evicted entries are remembered (as
many as ``max_entries``) so that a label arriving for one of them is counted as *late*, not
confused with a label for an id that was never seen.

>>> store = PendingStore(max_entries=2, ttl_seconds=60)
>>> store.put("a", {"x": 1}, 0, {0: 0.6, 1: 0.4}, now=0.0)
>>> store.put("b", {"x": 2}, 1, {0: 0.3, 1: 0.7}, now=1.0)
>>> store.put("c", {"x": 3}, 1, {0: 0.2, 1: 0.8}, now=2.0)   # evicts "a"
>>> store.pop("b")
Pending(x={'x': 2}, prediction=1, proba={0: 0.3, 1: 0.7}, ts=1.0)
>>> store.pop("a") is None, store.was_evicted("a"), store.evicted_capacity
(True, True, 1)
>>> store.expire(now=100.0), len(store), store.evicted_ttl
(1, 0, 1)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple


class Pending(NamedTuple):
    x: dict[str, Any]
    prediction: Any
    proba: dict[Any, float] | None
    ts: float


class PendingStore:
    # a prediction replaced by a later event with the same id (its label can join only one of them);
    # a class default, so that stores checkpointed before the counter existed read 0
    evicted_duplicate = 0

    def __init__(self, max_entries: int = 100_000, ttl_seconds: float = 3600.0):
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        # Insertion order is arrival order, so the oldest entry is always first (a re-sent id moves
        # to the end with its new prediction): both evictions pop from the front.
        self._entries: OrderedDict[str, Pending] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self.evicted_capacity = 0
        self.evicted_ttl = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, event_id: str, x: dict[str, Any], prediction: Any, proba: dict | None, now: float) -> None:
        entries = self._entries
        if event_id in entries:
            del entries[event_id]
            self.evicted_duplicate += 1
        entries[event_id] = Pending(x, prediction, proba, now)
        if len(entries) > self.max_entries:
            self._evict(entries.popitem(last=False)[0])
            self.evicted_capacity += 1

    def pop(self, event_id: str) -> Pending | None:
        return self._entries.pop(event_id, None)

    def was_evicted(self, event_id: str) -> bool:
        """Whether ``event_id`` left the store by eviction (forgets it: one late label is counted)."""
        return self._evicted.pop(event_id, 0) is None

    def expire(self, now: float) -> int:
        """Drop entries older than the TTL; returns how many."""
        entries, cutoff, n = self._entries, now - self.ttl_seconds, 0
        while entries:
            event_id, entry = next(iter(entries.items()))
            if entry.ts >= cutoff:
                break
            del entries[event_id]
            self._evict(event_id)
            n += 1
        self.evicted_ttl += n
        return n

    def _evict(self, event_id: str) -> None:
        self._evicted[event_id] = None
        if len(self._evicted) > self.max_entries:
            self._evicted.popitem(last=False)
