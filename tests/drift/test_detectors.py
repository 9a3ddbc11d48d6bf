"""Concept drift detectors on streams with known change points (seeded)."""

import numpy as np
import pytest

from drift.detectors import DETECTORS, ConceptDriftDetector, _has_adwin_internals, split_means

CHANGE = 5000


def error_stream(seed: int, before: float = 0.1, after: float = 0.3, n: int = 2 * CHANGE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rates = np.where(np.arange(n) < CHANGE, before, after)
    return (rng.random(n) < rates).astype(float)


def loss_stream(seed: int, n: int) -> np.ndarray:
    """A continuous loss whose scale rises 1.5x at n // 2 (for KSWIN, which needs one)."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(size=n)) * np.where(np.arange(n) < n // 2, 1.0, 1.5)


def detect(name: str, signal: np.ndarray):
    return ConceptDriftDetector(name).update_many(signal, signal, ts=0.0)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_detector_fires_soon_after_the_change(name):
    if name == "kswin":
        signal, change = loss_stream(0, 6000), 3000
    else:
        signal, change = error_stream(0), CHANGE
    after = [e for e in detect(name, signal) if e.evidence["detected_at"] >= change]
    assert after, f"{name} missed the change"
    assert after[0].evidence["detected_at"] - change < 1000


# KSWIN costs ~1 ms per update (a KS test on a 1000-value window): one seed keeps the suite fast.
@pytest.mark.parametrize(("name", "seed"), [("adwin", 0), ("adwin", 1), ("adwin", 2), ("kswin", 0)])
def test_quiet_detectors_stay_quiet_on_a_stationary_stream(name, seed):
    rng = np.random.default_rng(100 + seed)
    n = 6000 if name == "kswin" else 20000
    signal = np.abs(rng.normal(size=n)) if name == "kswin" else (rng.random(n) < 0.2).astype(float)
    assert detect(name, signal) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adwin_has_no_false_alarm_before_the_change_and_measures_the_excess_error(seed):
    events = detect("adwin", error_stream(seed))
    assert len(events) == 1
    ev = events[0]
    assert ev.kind == "concept"
    assert CHANGE <= ev.evidence["detected_at"] < CHANGE + 500
    assert abs(ev.evidence["index"] - CHANGE) < 200  # the located change point
    assert ev.magnitude == pytest.approx(0.2, abs=0.06)  # 0.3 - 0.1
    assert ev.magnitude == ev.evidence["excess_loss"]


def test_a_recovery_is_not_a_concept_drift_event():
    det = ConceptDriftDetector("adwin")
    falling = error_stream(3, before=0.4, after=0.1)
    assert det.update_many(falling, falling, ts=0.0) == []
    assert det.improvements >= 1
    both = ConceptDriftDetector("adwin", direction="both")
    assert len(both.update_many(falling, falling, ts=0.0)) >= 1


def test_magnitude_is_the_excess_of_the_loss_stream_not_the_error():
    errors = error_stream(4)
    losses = errors * 2.0 + 0.1  # a loss twice as steep as the error
    (ev,) = ConceptDriftDetector("adwin").update_many(errors, losses, ts=5.0)
    assert ev.magnitude == pytest.approx(2 * (ev.evidence["post_mean"] - ev.evidence["pre_mean"]))
    assert ev.ts == 5.0


def test_split_means_finds_a_step():
    values = np.r_[np.zeros(300), np.ones(100)]
    assert split_means(values) == (300, 0.0, 1.0)


def test_bad_names_and_inputs_are_named():
    with pytest.raises(ValueError, match="detector: unknown 'cusum'"):
        ConceptDriftDetector("cusum")
    with pytest.raises(ValueError, match="signal: detector 'ddm' needs 0/1 errors"):
        ConceptDriftDetector("ddm").update_many([0.5], [0.5], ts=0.0)


@pytest.mark.parametrize("name", ["adwin", "ddm", "page_hinkley"])
def test_a_batch_gives_the_detections_of_the_same_values_one_at_a_time(name):
    signal = np.r_[error_stream(3), error_stream(4, before=0.3, after=0.05)]
    losses = signal * 2.0 + 0.5
    batch = ConceptDriftDetector(name).update_many(signal, losses, ts=1.0)
    single = ConceptDriftDetector(name)
    one_by_one = [e for i in range(len(signal)) for e in single.update_many(signal[i : i + 1], losses[i : i + 1], ts=1.0)]
    assert len(batch) >= 1
    assert [e.to_dict() for e in batch] == [e.to_dict() for e in one_by_one]


def test_adwin_in_batches_detects_and_ends_exactly_as_rivers_own_update():
    # update_many drives ADWIN's window directly (its Python wrapper costs 2/3 of a value): the
    # detections and the state, mid-batch and at a batch's very end, must be River's own.
    from river import drift

    signal = np.r_[error_stream(3), error_stream(4, before=0.3, after=0.05), error_stream(5, before=0.05)]
    river_adwin, detected_at, states = drift.ADWIN(), [], []
    for i, v in enumerate(signal.tolist()):
        river_adwin.update(v)
        if river_adwin.drift_detected:
            detected_at.append(i)
        states.append((river_adwin.drift_detected, river_adwin.width, river_adwin.total, river_adwin.variance))
    assert len(detected_at) >= 3
    det = ConceptDriftDetector("adwin", min_gap=1, direction="both")
    assert _has_adwin_internals(det.detector)  # the fast path runs with the River installed here
    # batch ends: one right at a detection (the reset is still due), one just after, one mid-way
    cuts = [0, detected_at[0] + 1, detected_at[1] + 2, detected_at[1] + 700, len(signal)]
    events = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        events += det.update_many(signal[a:b], signal[a:b], ts=0.0)
        ours = det.detector
        assert (ours.drift_detected, ours.width, ours.total, ours.variance) == states[b - 1]
    assert [e.evidence["detected_at"] for e in events] == detected_at
