"""The pending-label store is bounded by entries and age, and says what it evicted."""

from service.pending import PendingStore


def test_capacity_evicts_oldest_first_and_counts():
    store = PendingStore(max_entries=3, ttl_seconds=1e9)
    for i in range(10):
        store.put(str(i), {"i": i}, i % 2, None, now=float(i))
    assert len(store) == 3 and store.evicted_capacity == 7
    assert [store.pop(str(i)) is not None for i in range(10)] == [False] * 7 + [True] * 3


def test_ttl_expiry_and_late_labels_are_counted_once():
    store = PendingStore(max_entries=100, ttl_seconds=10)
    store.put("old", {}, 0, None, now=0.0)
    store.put("new", {}, 1, None, now=8.0)
    assert store.expire(now=12.0) == 1 and store.evicted_ttl == 1 and len(store) == 1
    assert store.was_evicted("old") and not store.was_evicted("old")  # one late label counted
    assert not store.was_evicted("never-seen")


def test_a_resent_id_keeps_the_newest_prediction_and_its_age():
    store = PendingStore(max_entries=2, ttl_seconds=10)
    store.put("a", {}, "first", None, now=0.0)
    store.put("b", {}, "b", None, now=1.0)
    store.put("a", {}, "second", None, now=5.0)  # moves to the back: "b" is now the oldest
    store.put("c", {}, "c", None, now=6.0)
    assert store.pop("b") is None and store.pop("a").prediction == "second"
    # the first prediction of "a" can never be joined now: counted, like any other eviction
    assert store.evicted_duplicate == 1 and store.evicted_capacity == 1


def test_remembered_evictions_are_bounded_too():
    store = PendingStore(max_entries=5, ttl_seconds=1e9)
    for i in range(1000):
        store.put(str(i), {}, 0, None, now=float(i))
    assert len(store._evicted) <= 5
