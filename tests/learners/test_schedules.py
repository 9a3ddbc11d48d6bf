"""Learning-rate schedules: closed forms, serialisation, and the shift-aware schedule on a drifting stream."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from learners.schedules import ConstantLR, InfiniteLR, ShiftAwareLR, WarmupStableDecayLR


def _optimizer(*lrs: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs])


def test_wsd_closed_form():
    opt = _optimizer(1.0)
    s = WarmupStableDecayLR(opt, lr=2.0, warmup_steps=4, stable_steps=3, decay_steps=10, min_lr=0.2)
    assert s.lr == pytest.approx(0.5)                      # warmup starts at lr/warmup, not 0
    rates = [s.step() for _ in range(30)]
    assert rates[:3] == pytest.approx([1.0, 1.5, 2.0])
    assert rates[3:6] == pytest.approx([2.0, 2.0, 2.0])
    for k in range(10):                                     # half-cosine from 2.0 to 0.2
        assert rates[6 + k] == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi * k / 10)))
    assert rates[16:] == pytest.approx([0.2] * 14)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_infinite_schedule_never_goes_below_its_constant():
    s = InfiniteLR(_optimizer(1.0), lr=1.0, warmup_steps=10, cooldown_steps=100, constant_lr=0.05)
    rates = [s.step(loss=1.0) for _ in range(1000)]
    assert max(rates) == pytest.approx(1.0)
    assert rates.index(max(rates)) == 8                     # reached at the end of warmup
    assert all(a >= b - 1e-12 for a, b in zip(rates[9:], rates[10:], strict=False))   # monotone after warmup
    assert rates[-1] == pytest.approx(0.05) and min(rates) >= 0.05 - 1e-12


def test_lr_scale_per_group_and_constant_default():
    opt = _optimizer(0.3, 0.3)
    opt.param_groups[1]["lr_scale"] = 0.1
    s = ConstantLR(opt)
    assert s.step(1.0) == pytest.approx(0.3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.03])


@pytest.mark.parametrize(
    "make",
    [lambda o: WarmupStableDecayLR(o, lr=1.0, warmup_steps=3, stable_steps=5, decay_steps=20, min_lr=0.1),
     lambda o: InfiniteLR(o, lr=1.0, warmup_steps=3, cooldown_steps=20),
     lambda o: ShiftAwareLR(o, lr_max=0.1, lr_min=1e-4, dim=5, fast=5, slow=20)],
)
def test_state_dict_and_pickle_resume_the_same_sequence(make):
    rng = np.random.default_rng(0)
    losses = rng.exponential(size=80)
    s = make(_optimizer(1.0))
    for loss in losses[:40]:
        s.step(float(loss))
    s.notify_drift(1.0)
    restored = make(_optimizer(1.0))
    restored.load_state_dict(s.state_dict())
    unpickled = pickle.loads(pickle.dumps(s))
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(s.lr)
    for loss in losses[40:]:
        expected = s.step(float(loss))
        assert restored.step(float(loss)) == pytest.approx(expected)
        assert unpickled.step(float(loss)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "make, field",
    [(lambda o: ConstantLR(o, lr=-1.0), "lr"),
     (lambda o: WarmupStableDecayLR(o, lr=1.0, min_lr=2.0), "min_lr"),
     (lambda o: InfiniteLR(o, lr=1.0, constant_lr=0.0), "constant_lr"),
     (lambda o: ShiftAwareLR(o, lr_max=0.1, lr_min=0.2), "lr_min"),
     (lambda o: ShiftAwareLR(o, lr_max=float("nan")), "lr_max"),
     (lambda o: ShiftAwareLR(o, lr_max=0.1, dim=0), "dim")],
)
def test_bad_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make(_optimizer(1.0))


# --- shift-aware schedule on a simulated drifting linear regression ---------------------------------

D, SIGMA = 10, 0.5
LR_MAX = 1.0 / (D + 2)   # the largest step of the optimal recursion for isotropic features


def _stream(seed: int, steps: int, tau: float, jump_at: int | None):
    """x ~ N(0, I); y = x·w*_t + N(0, σ²); w* takes N(0, τ²I) random-walk steps and jumps once."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, D))
    w = rng.standard_normal(D)
    targets = np.empty((steps, D))
    for t in range(steps):
        if t == jump_at:
            w = rng.standard_normal(D)
        targets[t] = w
        w = w + tau * rng.standard_normal(D)
    y = np.einsum("td,td->t", x, targets) + SIGMA * rng.standard_normal(steps)
    return x, targets, y


def _sgd_regret(x, targets, y, rates=None, schedule=None, alarm_at=None):
    """Cumulative excess squared loss of prequential SGD; rates[t] or a schedule fed the losses."""
    w = np.zeros(D)
    regret = 0.0
    used = np.empty(len(y))
    for t in range(len(y)):
        lr = rates[t] if schedule is None else schedule.lr
        used[t] = lr
        err = x[t] @ w - y[t]
        regret += float(x[t] @ (w - targets[t])) ** 2
        w -= lr * err * x[t]
        if schedule is not None:
            if t == alarm_at:
                schedule.notify_drift(1.0)
            schedule.step(err * err)
    return regret, used


def _shift_aware() -> ShiftAwareLR:
    return ShiftAwareLR(_optimizer(1.0), lr_max=LR_MAX, lr_min=1e-4, dim=D)


STEPS, JUMP = 6000, 3000


@pytest.fixture(scope="module")
def drifting_runs():
    """Three seeds of a random-walk target with an abrupt jump half-way."""
    constants = np.geomspace(1e-3, 2 * LR_MAX, 14)
    cs = np.geomspace(0.3, 30, 12)
    t = np.arange(STEPS)
    totals = {"shift_aware": 0.0, "constant": np.zeros(len(constants)), "c/t": np.zeros(len(cs))}
    used = []
    for seed in range(3):
        x, targets, y = _stream(seed, STEPS, tau=0.003, jump_at=JUMP)
        regret, rates = _sgd_regret(x, targets, y, schedule=_shift_aware(), alarm_at=JUMP + 20)
        totals["shift_aware"] += regret
        used.append(rates)
        for i, c in enumerate(constants):
            totals["constant"][i] += _sgd_regret(x, targets, y, rates=np.full(STEPS, c))[0]
        for i, c in enumerate(cs):
            totals["c/t"][i] += _sgd_regret(x, targets, y, rates=np.minimum(LR_MAX, c / (t + 1)))[0]
    return totals, used


def test_shift_aware_beats_best_constant_and_best_c_over_t_in_hindsight(drifting_runs):
    totals, _ = drifting_runs
    assert totals["shift_aware"] < totals["constant"].min()
    assert totals["shift_aware"] < totals["c/t"].min()


def test_shift_aware_rate_rises_after_the_jump_then_decays(drifting_runs):
    _, used = drifting_runs
    for rates in used:
        before = rates[JUMP - 100:JUMP].mean()
        assert rates[JUMP + 20:JUMP + 60].mean() > 3 * before
        assert rates[JUMP:JUMP + 100].max() > 0.6 * LR_MAX
        assert rates[JUMP + 1000] < 0.5 * rates[JUMP:JUMP + 100].max()


def test_shift_aware_rate_rises_after_the_jump_from_its_own_loss_statistics():
    x, targets, y = _stream(0, STEPS, tau=0.003, jump_at=JUMP)
    schedule = _shift_aware()
    _, rates = _sgd_regret(x, targets, y, schedule=schedule)        # no notify_drift
    assert rates[JUMP + 20:JUMP + 60].mean() > 3 * rates[JUMP - 100:JUMP].mean()
    assert schedule.alarms >= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rate_decays_without_drift_and_never_reaches_zero(seed):
    x, targets, y = _stream(seed, 4000, tau=0.0, jump_at=None)
    _, rates = _sgd_regret(x, targets, y, schedule=_shift_aware())
    # the first fit: from lr_max down by 1/t-like decay (25x in the first 500 steps) ...
    assert rates[0] == pytest.approx(LR_MAX)
    assert rates[500] < rates[0] / 25
    # ... then it stays small: only the noise of its loss statistics keeps it above 1/t
    assert rates[500:].max() < 0.25 * LR_MAX
    assert rates.min() >= 1e-4


def test_false_alarm_does_almost_nothing_and_a_real_one_ramps():
    x, targets, y = _stream(2, 3000, tau=0.0, jump_at=None)
    base = _shift_aware()
    _, rates = _sgd_regret(x, targets, y, schedule=base)
    alarmed = _shift_aware()
    _, rates_alarm = _sgd_regret(x, targets, y, schedule=alarmed, alarm_at=2000)
    assert rates_alarm[2001:2100].max() < 1.5 * rates[2001:2100].max()
    assert alarmed.last_drift_magnitude == 1.0


def test_shift_aware_survives_early_alarms_missing_and_non_finite_losses():
    s = ShiftAwareLR(_optimizer(1.0), lr_max=0.1, lr_min=1e-3, dim=5)
    s.notify_drift(2.0)                                     # before any loss
    rates = [s.step(loss) for loss in (None, float("nan"), float("inf"), 1.0, None, 0.5, -0.0)]
    assert all(1e-3 <= r <= 0.1 for r in rates)
    assert all(math.isfinite(v) for v in (s.v, s.q_hat, s.floor))
    assert s.last_drift_magnitude == 2.0
