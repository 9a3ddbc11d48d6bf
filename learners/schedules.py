"""Learning-rate schedules for learners that never stop learning.

Each schedule wraps a ``torch.optim`` optimizer like ``torch.optim.lr_scheduler`` does, but is
driven by the stream: call ``step(loss)`` once after every ``optimizer.step()`` with the loss of the
batch just learned (the prequential loss, measured before the update); it sets the learning rate
for the next optimizer step on every parameter group and returns it. A group may carry an
``"lr_scale"`` entry: its learning rate is the schedule's value times that scale.

``notify_drift(magnitude)`` tells the schedule that a drift detector fired; only
:class:`ShiftAwareLR` reacts. Schedules are picklable and have ``state_dict``/``load_state_dict``
(everything except the optimizer, which checkpoints itself).

>>> import torch
>>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
>>> sched = InfiniteLR(opt, lr=0.1, warmup_steps=2, cooldown_steps=4, constant_lr=0.01)
>>> [round(sched.step(), 4) for _ in range(7)]
[0.1, 0.1, 0.0868, 0.055, 0.0232, 0.01, 0.01]
>>> opt.param_groups[0]["lr"]
0.01
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch.optim import Optimizer


class _Schedule:
    """Shared machinery: step counter, writing the rate into the optimizer, (de)serialisation."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.t = 0
        self._lr = self._apply(self._compute())

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self._lr

    def step(self, loss: float | None = None) -> float:
        """Advance one step (``loss`` = the loss of the batch just learned); returns the new rate."""
        self.t += 1
        self._observe(loss)
        self._lr = self._apply(self._compute())
        return self._lr

    def notify_drift(self, magnitude: float) -> None:
        """A drift detector fired; only the shift-aware schedule reacts."""

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "optimizer"})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(copy.deepcopy(state))
        self._apply(self._lr)

    def _observe(self, loss: float | None) -> None:
        """Hook for schedules that learn from the loss stream."""

    def _compute(self) -> float:
        raise NotImplementedError

    def _apply(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: expected a non-negative finite number, got {value!r}")
    return value


def _cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1)."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class ConstantLR(_Schedule):
    """A fixed learning rate (the optimizer's current one when ``lr`` is omitted).

    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    >>> ConstantLR(opt).step(loss=1.0)
    0.5
    """

    def __init__(self, optimizer: Optimizer, lr: float | None = None) -> None:
        self.base_lr = _positive("lr", optimizer.param_groups[0]["lr"] if lr is None else lr)
        super().__init__(optimizer)

    def _compute(self) -> float:
        return self.base_lr


class WarmupStableDecayLR(_Schedule):
    """Linear warmup to ``lr``, ``stable_steps`` at ``lr``, cosine decay to ``min_lr``, then ``min_lr``.

    The usual schedule for a run of known length; on an endless stream keep ``min_lr`` > 0.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> s = WarmupStableDecayLR(opt, lr=1.0, warmup_steps=2, stable_steps=2, decay_steps=2, min_lr=0.1)
    >>> [round(s.step(), 3) for _ in range(7)]
    [1.0, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1]
    """

    def __init__(self, optimizer: Optimizer, lr: float, warmup_steps: int = 100, stable_steps: int = 10_000,
                 decay_steps: int = 10_000, min_lr: float = 0.0) -> None:
        self.base_lr = _positive("lr", lr)
        self.warmup_steps = int(_non_negative("warmup_steps", warmup_steps))
        self.stable_steps = int(_non_negative("stable_steps", stable_steps))
        self.decay_steps = int(_non_negative("decay_steps", decay_steps))
        self.min_lr = _non_negative("min_lr", min_lr)
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr: expected at most lr={lr}, got {min_lr}")
        super().__init__(optimizer)

    def _compute(self) -> float:
        t = self.t
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        t -= self.warmup_steps + self.stable_steps
        if t < 0:
            return self.base_lr
        if t < self.decay_steps:
            return _cosine(self.base_lr, self.min_lr, t / self.decay_steps)
        return self.min_lr


class InfiniteLR(_Schedule):
    """Linear warmup to ``lr``, cosine cooldown to ``constant_lr``, then constant forever.

    The "infinite" schedule for continual pre-training: it never decays to zero, so the learner
    keeps adapting, and it needs no stream length.
    """

    def __init__(self, optimizer: Optimizer, lr: float, warmup_steps: int = 100, cooldown_steps: int = 1000,
                 constant_lr: float | None = None) -> None:
        self.base_lr = _positive("lr", lr)
        self.warmup_steps = int(_non_negative("warmup_steps", warmup_steps))
        self.cooldown_steps = int(_non_negative("cooldown_steps", cooldown_steps))
        self.constant_lr = _positive("constant_lr", lr / 10 if constant_lr is None else constant_lr)
        if self.constant_lr > self.base_lr:
            raise ValueError(f"constant_lr: expected at most lr={lr}, got {constant_lr}")
        super().__init__(optimizer)

    def _compute(self) -> float:
        t = self.t
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        t -= self.warmup_steps
        if t < self.cooldown_steps:
            return _cosine(self.base_lr, self.constant_lr, t / self.cooldown_steps)
        return self.constant_lr


class ShiftAwareLR(_Schedule):
    """Step size that follows the optimal recursion for a drifting target (Fahrbach et al., ICML 2023).

    Model. For SGD on linear regression with ``dim`` isotropic features, observation noise of
    variance ``σ²`` and a target that takes a random-walk step adding ``q`` to the expected excess
    loss per step, the expected excess loss ``v_t`` of the iterate obeys, with step size ``η``,
    ``v_{t+1} = v_t(1 − 2η + (dim+2)η²) + η²·dim·σ² + q``. Minimising over ``η`` gives the
    Kalman-gain recursion

        η_t = v_t / (c·v_t + σ̂²),      v_{t+1} = (1 − η_t)·v_t + q̂,

    with ``c = dim + 2`` and ``σ̂² = dim·(loss noise floor)``. Without drift (q̂ = 0) it decays like
    ``1/t``; with drift it settles at ``η ≈ √(q̂/σ̂²)``, a floor that grows with the drift rate. The
    learning rate handed to the optimizer is ``lr_max·c·η_t`` (``c·η ∈ [0, 1)``; ``lr_max`` is the
    largest stable step, the one that would fit a single observation exactly), never below
    ``lr_min``: on a stream that never ends the rate never anneals to zero.

    With any step ``η`` (the rate actually used, after clamping) the recursion is advanced in its
    general form ``v ← v + (−2η + cη²)·v + η²σ̂² + q̂``, which equals ``(1 − η)v + q̂`` at the optimal η.

    Estimation from the loss stream (all in loss units, ``ℓ_t`` = loss of step ``t``):

    * ``m_fast``, ``m_slow``: bias-corrected exponentially weighted means of ``ℓ`` with horizons
      ``fast`` and ``slow`` steps; early on the slow horizon is capped at ``t/4`` so that the
      losses of the first fit do not linger in the statistics below.
    * noise floor: a leaky running minimum of ``m_slow`` — it follows ``m_slow`` down at once and
      creeps up towards it with horizon ``floor_horizon`` (a problem that truly became noisier is
      recognised eventually; the excess loss of a drifting phase is not mistaken for noise soon).
      From the loss alone a steady drift cannot be told from a higher noise floor, so the floor
      horizon bounds how long a steady drift is remembered. A running minimum of a noisy mean sits
      below the true floor; one standard error of ``m_slow`` is added back where the excess is
      measured, since a floor that is too low reads as drift and feeds itself (a larger step
      leaves a larger excess).
    * drift: the model predicts ``E[ℓ_t − ℓ_{t−1}] = (−2η + cη²)(ℓ_{t−1} − floor) + η²σ̂² + q``, so
      ``q_obs`` = observed change − predicted change without drift is a one-step measurement of
      ``q``, on raw losses so that level and change stay aligned in time. ``q̂`` is ``q_obs``
      averaged over ``fast`` and then ``slow`` steps, floored at 0: drift only ever adds excess
      loss, and a negative mean means learning went faster than modelled. Averaged differences
      telescope, so v carries the noise of a smoothed loss level, not a random walk of noise.

    Alarms. A jump of the loss is an impulse to ``v``, not a drift rate: left in the filters it
    would keep the step size up for ``slow`` steps after the model has re-fitted. On an alarm, and
    for ``fast`` steps after it, whatever the drift filters gathered since the last calm step (the
    excess loss they would still feed into ``v``) is moved into ``v`` over about ``ramp_steps``
    steps and the filters are reset to their calm values. "Calm" means ``m_fast`` within 2 standard
    errors of ``m_slow``; while it is, nothing is converted, so a false alarm changes almost nothing. Alarms come from ``notify_drift`` (a detector fired; ``magnitude``, in the
    detector's units, is kept in ``last_drift_magnitude``) or from the schedule itself when
    ``m_fast`` exceeds ``m_slow`` by ``alarm_threshold`` standard errors of ``m_fast`` — at most once
    per ``slow`` steps and not during the first ``slow`` steps, because under a steady drift the
    loss level wanders and resetting the filters each time would forget the drift rate
    (``math.inf`` turns the own alarm off). ``alarms`` counts alarm episodes.

    Losses that are ``None`` or not finite advance the recursion without a measurement.

    Choosing ``dim``: the rate stays near ``lr_max`` for about ``dim`` steps and then decays like
    ``lr_max·dim/t`` while nothing drifts. For a neural backbone the effective dimension is large:
    on permuted digits (a task change every 100 steps, UPGD backbone) ``dim=100`` cost 11 points of
    online accuracy against a constant rate while ``dim=1000`` matched it, hence the default.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = ShiftAwareLR(opt, lr_max=0.1, lr_min=1e-4, dim=10)
    >>> first = sched.step(1.0)
    >>> rates = [sched.step(0.5) for _ in range(2000)]
    >>> 1e-4 <= rates[-1] < rates[100] < first <= 0.1
    True
    """

    def __init__(self, optimizer: Optimizer, lr_max: float, lr_min: float = 0.0, dim: float = 1000.0,
                 fast: int = 50, slow: int = 1000, floor_horizon: int = 20_000, ramp_steps: int = 30,
                 alarm_threshold: float = 4.0) -> None:
        self.lr_max = _positive("lr_max", lr_max)
        self.lr_min = _non_negative("lr_min", lr_min)
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min: expected at most lr_max={lr_max}, got {lr_min}")
        self.dim = _positive("dim", dim)
        self.c = self.dim + 2.0
        self.fast = _positive("fast", fast)
        self.slow = _positive("slow", slow)
        self.floor_horizon = _positive("floor_horizon", floor_horizon)
        self.ramp_steps = max(1, int(_positive("ramp_steps", ramp_steps)))
        if not alarm_threshold > 0:     # math.inf is allowed: no own alarm
            raise ValueError(f"alarm_threshold: expected a positive number, got {alarm_threshold!r}")
        self.alarm_threshold = float(alarm_threshold)
        self.v = math.inf           # excess-loss belief; infinite until the first loss sets the scale
        self.q_hat = 0.0
        self.floor: float | None = None
        self.eta = 1.0 / self.c
        self.m_fast = _EWMean(self.fast)
        self.m_slow = _EWMean(self.slow)
        self.m_sq = _EWMean(self.slow)
        self._floor_se = 0.0
        self._fast_se = 0.0
        self._q_fast = _EWMean(self.fast)
        self._q_filter = _EWMean(self.slow)
        self._pending = 0.0         # excess loss an alarm still has to add to v (ramped)
        self._ramp_rate = 0.0
        self._alarm_left = 0        # steps an alarm keeps converting filtered drift into v
        self._calm = (0.0, 0.0)     # drift filters' values at the last step without a level shift
        self.alarms = 0
        self._last_alarm = 0        # no own alarm during the first fit, nor within `slow` steps of one
        self._previous: tuple[float, float] | None = None   # (loss, η used right after it)
        self.last_drift_magnitude: float | None = None
        super().__init__(optimizer)

    @property
    def noise(self) -> float:
        """σ̂² = dim × the loss noise floor."""
        return self.dim * (self.floor or 0.0)

    @property
    def excess(self) -> float:
        """Measured excess loss ẽ = m_fast − noise floor (0 before the first loss)."""
        return 0.0 if self.floor is None else self.m_fast.value - self.floor

    def notify_drift(self, magnitude: float) -> None:
        self.last_drift_magnitude = float(magnitude)
        self._raise_alarm()

    def _raise_alarm(self) -> None:
        self._last_alarm = self.t
        if self._alarm_left == 0:
            self.alarms += 1
            self._ramp_rate = 0.0
        self._alarm_left = int(self.fast)
        self._convert_drift()

    def _convert_drift(self) -> None:
        """Turn the drift the filters gathered since the last calm step into a ramped bump of v.

        Left in the filters, a jump of the loss would be read as a drift *rate* for ``slow`` steps
        and keep the step size up long after the model has re-fitted. A filter holding ``x`` above
        its calm value would still add ``x·horizon`` to v in total: that amount is moved to the ramp
        at once and the filter reset to calm. A false alarm finds the filters calm: nothing moves.
        """
        if self.m_fast.value - self.m_slow.value < 2.0 * self._fast_se:
            return              # the loss level is where it was: nothing to convert (yet)
        calm_fast, calm_slow = self._calm
        amount = (self._q_fast.value - calm_fast) * self.fast + (self._q_filter.value - calm_slow) * self.slow
        self._q_fast.reset(calm_fast)
        self._q_filter.reset(calm_slow)
        self.q_hat = max(calm_slow, 0.0)
        self._pending = max(self._pending + amount, 0.0)
        self._ramp_rate = max(self._ramp_rate, self._pending / self.ramp_steps)

    def _observe(self, loss: float | None) -> None:
        # The step just taken used the clamped rate; in units of the recursion that is η_used.
        eta = self._lr / (self.lr_max * self.c)
        if loss is not None and math.isfinite(loss):
            loss = float(loss)
            if self.floor is None:
                # No information yet on how much of the first loss is excess: start from the
                # largest step, which the recursion reaches for v ≫ σ̂².
                self.v = self.c * loss
            self.m_fast.update(loss)
            rate = self._slow_rate()
            self.m_slow.update(loss, rate=rate)
            self.m_sq.update(loss * loss, rate=rate)
            # standard error of m_slow (an EW mean has about 2/rate effective samples)
            variance = max(self.m_sq.value - self.m_slow.value ** 2, 0.0)
            self._floor_se = math.sqrt(variance * rate / 2.0)
            self._fast_se = math.sqrt(variance / (2.0 * self.fast))
            if self.floor is None or self.t < 2 * self.fast or self.m_slow.value < self.floor:
                # (a running minimum over means of a handful of losses would catch a lucky one)
                self.floor = self.m_slow.value
            else:
                self.floor += (self.m_slow.value - self.floor) / self.floor_horizon
            if self._previous is not None:
                # One-step drift measurement on raw losses: the filter below averages it, and
                # differencing raw losses keeps the level and the change in step (a filtered level
                # lags behind the change the recursion predicts from it).
                prev_loss, prev_eta = self._previous
                excess = prev_loss - self.floor - self._floor_se
                q_obs = loss - prev_loss - self._expected_change(excess, prev_eta)
                smooth = self._q_fast.update(q_obs)
                self.q_hat = max(self._q_filter.update(smooth, rate=self._slow_rate()), 0.0)
            self._previous = (loss, eta)
            shift = self.m_fast.value - self.m_slow.value
            if self._alarm_left > 0:
                self._alarm_left -= 1
                self._convert_drift()
            elif self.t - self._last_alarm > self.slow and shift > self.alarm_threshold * self._fast_se:
                # the loss level rose by more than `alarm_threshold` standard errors: our own alarm
                self._raise_alarm()
            elif shift < 2.0 * self._fast_se:
                self._calm = (self._q_fast.value, self._q_filter.value)
        v = self.v + self._expected_change(self.v, eta) + self.q_hat
        step = min(self._pending, self._ramp_rate)
        self._pending -= step
        self.v = max(v + step, self._v_min())

    def _slow_rate(self) -> float:
        """Horizon ``min(slow, t/4)``: the first fit's losses leave the slow statistics quickly."""
        return max(1.0 / self.slow, 4.0 / self.t)

    def _expected_change(self, v: float, eta: float) -> float:
        """E[Δ excess] without drift after a step of size η: −2ηv + cη²v + η²σ̂² (−ηv at the optimum)."""
        return -2.0 * eta * v + self.c * eta * eta * v + eta * eta * self.noise

    def _v_min(self) -> float:
        """The excess-loss belief at which the rate equals ``lr_min``."""
        r = self.lr_min / self.lr_max
        return self.noise * r / (self.c * (1.0 - r)) if r < 1.0 else math.inf

    def _compute(self) -> float:
        if math.isinf(self.v):
            self.eta = 1.0 / self.c
        else:
            denominator = self.c * self.v + self.noise
            self.eta = self.v / denominator if denominator > 0 else 1.0 / self.c
        return min(max(self.lr_max * self.c * self.eta, self.lr_min), self.lr_max)


class _EWMean:
    """Bias-corrected exponentially weighted mean with a horizon of ``horizon`` observations."""

    def __init__(self, horizon: float) -> None:
        self.rate = 1.0 / horizon
        self._raw = 0.0
        self._weight = 0.0

    @property
    def value(self) -> float:
        return self._raw / self._weight if self._weight > 0 else 0.0

    def reset(self, value: float) -> None:
        """Set the mean to ``value`` keeping its weight (so later updates move it as before)."""
        self._raw = value * self._weight

    def update(self, x: float, rate: float | None = None) -> float:
        rate = min(self.rate if rate is None else rate, 1.0)
        self._raw += rate * (x - self._raw)
        self._weight += rate * (1.0 - self._weight)
        return self.value
