"""UPGD: utility-based perturbed gradient descent (Elsayed & Mahmood, ICLR 2024).

Plain SGD on a stream that never ends loses plasticity (units die, weights grow) and forgets what
it learned before a shift. UPGD keeps an online estimate of how much each weight matters and gates
both the gradient step and an injected Gaussian perturbation by how *un*important the weight is:
useful weights are protected, useless ones keep being moved and re-randomised.

For every parameter element ``w`` with gradient ``g`` at step ``t`` (the parameter's own count of
steps with a gradient):

    u  ← β·u + (1 − β)·(−g·w)                       utility trace (first-order Taylor estimate of
                                                    the loss increase if ``w`` were set to 0)
    û  = u / (1 − β^t)                              bias-corrected
    s  = sigmoid(û / η)                             scaled utility in (0, 1)
    gate = 1 − s

and with ``ξ ~ N(0, 1)``, learning rate ``lr``, decoupled weight decay ``λ``, noise scale ``σ``:

    "global"        η = max û over *all* parameters of all global-style groups;
                    w ← w·(1 − lr·λ) − lr·(g + σξ)·gate
    "nonprotecting" same η; only the perturbation is gated, the gradient is not:
                    w ← w·(1 − lr·λ) − lr·(g + σξ·gate)
    "local"         no global η: each row of a weight matrix (the incoming weights of one output
                    unit; a whole tensor for biases) is L2-normalised, s = sigmoid(û / ‖û_row‖);
                    w ← w·(1 − lr·λ) − lr·(g + σξ)·gate
    "adaptive"      AdaUPGD: global η, Adam's bias-corrected moments m̂, v̂ of g inside the gate:
                    w ← w·(1 − lr·λ) − lr·(m̂ / (√v̂ + ε) + σξ)·gate

These follow the reference implementation (github.com/mohmdelsayed/upgd, ``weight_upgd`` and
``AdaptiveUPGD``) with two deliberate differences:

* η is the maximum of the *bias-corrected* utilities. The reference divides bias-corrected utilities
  by the maximum of the uncorrected traces, so for the first ~1/(1−β) steps every ratio is inflated
  by 1/(1−β^t) and the gate is nearly binary; with one step count per parameter the correction
  cancels here and ``û/η = u/max u`` at every step.
* η ≤ 0 (no weight has positive utility, e.g. the first step from all-zero weights, or all weights
  currently hurt) is defined as the limit η → 0⁺: weights with negative utility get gate 1 (fully
  plastic), weights with zero utility gate ½. The reference divides by η as is, which gives 0/0 = NaN
  at η = 0 and, for η < 0, flips the ordering so that the *most harmful* weights are protected. In
  code η is clamped to the smallest positive normal number of the dtype, which yields exactly that
  limit without infinities reaching the update (sigmoid(−inf) = 0).

Parameters without a gradient (or without elements) are skipped entirely (no state change, no noise drawn, no part in η).
The noise is one ``torch.randn(n)`` per parameter group, n the number of elements of the group's
parameters that have a gradient, split over them in order; it is drawn only when σ > 0, from
``generator`` when given (it must live on the parameters' device) or from torch's global RNG
otherwise. The fused and per-parameter paths draw the same numbers and agree up to rounding.
With ``noise_pool=P`` the n numbers are instead read at a uniformly random offset of a pool of P
standard normals, redrawn whenever it has served 8·P numbers: each number perturbs ~8 steps, at
different positions. On a CPU the normal draw is a large part of what a small network's step
costs (15k elements: 50 µs of a ~160 µs step; a read from the pool: 8 µs), while each step's
perturbation is still standard normal elementwise and independent of the previous step's
at every position unless two offsets coincide.

The fused path (``foreach``) keeps each group's state in one contiguous buffer per kind (utility,
Adam moments); ``state[p]`` holds views into them, so ``state_dict()`` and per-parameter access work
as usual while a step is under twenty kernels on one flat tensor (scalars such as the bias
corrections folded into them) rather than that many per parameter. On a CPU the per-kernel cost,
not the arithmetic, is what a step of a small network pays: the learner's backbone (4 tensors,
15k elements) took 0.32 ms a step with ``torch._foreach_*`` lists and takes 0.18 ms fused, 0.04 ms
of it the normal draw. Parameters (and gradients) that already lie back to back in one buffer,
as :class:`learners.backbone.Backbone` lays them out, are read and updated there in place, with no
gathering copy and no split of the update (the whole ``step()`` on that backbone: 0.19 → 0.13 ms).
AdaUPGD's moments and m̂/(√v̂ + ε) come from torch's fused Adam kernel run on a scratch buffer
(:meth:`_FlatState.adam_direction`: one kernel instead of seven, a step ~94 → ~80 µs).
A group runs fused when its parameters with a gradient share a device, a
dtype and a step count (one bias correction for all); otherwise, and with ``foreach=False``, it runs
per parameter.

>>> import torch
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Linear(3, 1)
>>> opt = UPGD(model.parameters(), lr=0.1, sigma=1e-3, generator=torch.Generator().manual_seed(1))
>>> for _ in range(50):
...     x = torch.randn(8, 3)
...     loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
...     opt.zero_grad()
...     loss.backward()
...     opt.step()
>>> bool(loss < 0.5)
True
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

VARIANTS = ("global", "local", "nonprotecting", "adaptive")
# Variants whose scaled utility divides by the global maximum utility η.
_GLOBAL_VARIANTS = ("global", "nonprotecting", "adaptive")


class UPGD(Optimizer):
    """Utility-based perturbed gradient descent; see the module docstring for the update rules.

    Parameters
    ----------
    params
        Parameters or parameter groups, as for any ``torch.optim`` optimizer. ``variant`` may be
        set per group; η is shared by all groups with a global-style variant.
    lr
        Step size (a schedule in ``learners.schedules`` may overwrite it every step).
    weight_decay
        Decoupled weight decay λ: weights shrink by ``lr·λ`` per step, outside the gate.
    beta_utility
        Decay β of the utility trace, in [0, 1).
    sigma
        Standard deviation of the perturbation (0 disables it and draws no random numbers).
    variant
        ``"global"``, ``"local"``, ``"nonprotecting"`` or ``"adaptive"``.
    betas, eps
        Adam's moment decays and denominator constant, used by ``"adaptive"`` only.
    foreach
        Use the fused path (state in one flat buffer per group); ``None`` picks it whenever
        every parameter of a group has one device and dtype.
    generator
        A ``torch.Generator`` for the perturbation, for reproducible runs.
    noise_pool
        0: a fresh normal draw every step (the reference); P > 0: read each step's perturbation
        from a pool of P standard normals (see the module docstring). Groups with more elements
        than P/4 draw afresh.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        beta_utility: float = 0.999,
        sigma: float = 1e-3,
        variant: str = "global",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        foreach: bool | None = None,
        generator: torch.Generator | None = None,
        noise_pool: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma,
            variant=variant, betas=betas, eps=eps, foreach=foreach,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        self.generator = generator
        if noise_pool < 0:
            raise ValueError(f"noise_pool: expected an integer >= 0, got {noise_pool!r}")
        self.noise_pool = int(noise_pool)
        self._pool: torch.Tensor | None = None
        self._pool_left = 0  # numbers the pool may still serve before it is redrawn
        self._flat: dict[int, _FlatState] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def _flat_states(self, groups: list[tuple[dict[str, Any], list[torch.Tensor], list[dict[str, Any]]]]
                     ) -> list[_FlatState | None]:
        """The fused state of each group (rebuilt when its parameters or state tensors changed),
        or None where the per-parameter path runs."""
        out = []
        for group, params, states in groups:
            if not _fusable(group, params, states):
                out.append(None)
                continue
            key = id(group)
            flat = self._flat.get(key)
            if flat is None or not flat.holds(params, states):
                with torch.inference_mode(False):  # see _init_state
                    flat = self._flat[key] = _FlatState(params, states)
            out.append(flat)
        return out

    # torch.optim.Optimizer pickles only defaults/state/param_groups; keep the noise generator too
    # so that a checkpointed learner resumes the same random stream. The state is stored as bytes,
    # not as the tensor ``get_state()`` returns: a fresh tensor pickles with a storage key taken
    # from its memory address, so two dumps of an unchanged optimizer would differ.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        gen = getattr(self, "generator", None)
        state["generator"] = None if gen is None else (str(gen.device), bytes(gen.get_state().numpy()))
        # the pool too (a restored learner goes on with the same perturbations), as bytes like the
        # generator; the optimizer's state proper is what state_dict() holds, the pool is not in it
        pool = getattr(self, "_pool", None)
        state["noise_pool"] = (getattr(self, "noise_pool", 0), getattr(self, "_pool_left", 0),
                               None if pool is None else (str(pool.device), pool.dtype, bytes(pool.cpu().numpy())))
        # a view would pickle its whole flat buffer; (buffer, offset, shape) pickles the buffer once
        state["state"] = {p: {k: _ViewOf(v._base, v.storage_offset() - v._base.storage_offset(), tuple(v.shape))
                              if isinstance(v, torch.Tensor) and v._base is not None else v
                              for k, v in s.items()} for p, s in state["state"].items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickling passes a "generator" entry; load_state_dict calls this too, without one, and
        # the optimizer keeps the generator it has
        keep_generator = "generator" not in state and hasattr(self, "generator")
        gen_state = state.pop("generator", None)
        pool_state = state.pop("noise_pool", None)
        state["state"] = defaultdict(dict, {p: {k: v.view() if isinstance(v, _ViewOf) else v for k, v in s.items()}
                                            for p, s in state["state"].items()})
        super().__setstate__(state)
        self._flat = {}
        if keep_generator:
            return
        self.noise_pool, self._pool_left, self._pool = 0, 0, None  # (pickled before the pool existed)
        if pool_state is not None:
            self.noise_pool, self._pool_left, pool = pool_state
            if pool is not None:
                device, dtype, data = pool
                self._pool = torch.frombuffer(bytearray(data), dtype=dtype).to(device)
        self.generator = None
        if gen_state is not None:
            device, rng_state = gen_state
            self.generator = torch.Generator(device=device)
            self.generator.set_state(torch.frombuffer(bytearray(rng_state), dtype=torch.uint8))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One UPGD step over every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            if not params:
                continue
            states = []
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("UPGD does not support sparse gradients")
                state = self.state[p]
                if not state:
                    _init_state(state, p, group["variant"])
                state["step"] += 1
                states.append(state)
            groups.append((group, params, states))
        if not groups:
            return loss

        flats = self._flat_states(groups)
        _step(groups, self._noise, flats)
        return loss

    def _noise(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """n standard normals on ``like``'s device and dtype, not to be written into (a view of the
        pool, unless drawn afresh)."""
        pool = self._pool
        if self.noise_pool < 4 * n:
            return torch.randn(n, generator=self.generator, device=like.device, dtype=like.dtype)
        if pool is None or self._pool_left < n or pool.device != like.device or pool.dtype != like.dtype:
            pool = self._pool = torch.randn(self.noise_pool, generator=self.generator, device=like.device,
                                            dtype=like.dtype)
            self._pool_left = 8 * self.noise_pool
        self._pool_left -= n
        at = int(torch.randint(self.noise_pool - n + 1, (1,), generator=self.generator, device=like.device))
        return pool[at : at + n]


def _init_state(state: dict[str, Any], p: torch.Tensor, variant: str) -> None:
    # normal tensors even when the first step runs in inference mode (as the learner's training
    # pass does): an inference tensor could not be updated in place by a later step outside it
    with torch.inference_mode(False):
        state["step"] = 0
        state["utility"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if variant == "adaptive":
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _check_group(group: dict[str, Any]) -> None:
    if group["variant"] not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {group['variant']!r}")
    if not 0.0 <= group["beta_utility"] < 1.0:
        raise ValueError(f"beta_utility: expected 0 <= beta_utility < 1, got {group['beta_utility']}")
    if group["lr"] < 0.0:
        raise ValueError(f"lr: expected lr >= 0, got {group['lr']}")
    if group["sigma"] < 0.0:
        raise ValueError(f"sigma: expected sigma >= 0, got {group['sigma']}")
    if group["weight_decay"] < 0.0:
        raise ValueError(f"weight_decay: expected weight_decay >= 0, got {group['weight_decay']}")
    beta1, beta2 = group["betas"]
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas: expected both in [0, 1), got {group['betas']}")
    if group["eps"] <= 0.0:
        raise ValueError(f"eps: expected eps > 0, got {group['eps']}")


class _ViewOf(NamedTuple):
    """A state tensor that is a view into a flat buffer, as pickled."""

    base: torch.Tensor
    offset: int
    shape: tuple[int, ...]

    def view(self) -> torch.Tensor:
        n = math.prod(self.shape)
        return self.base.reshape(-1)[self.offset : self.offset + n].view(self.shape)


class _FlatState:
    """One group's state tensors as contiguous buffers, with ``state[p][key]`` views into them.

    Tied to the exact parameters (with a gradient) of the step that built it; a step with other
    parameters, or state replaced by ``load_state_dict`` or unpickling, builds a new one from the
    current values.
    """

    def __init__(self, params: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
        self.ids = [id(p) for p in params]
        self.sizes = [p.numel() for p in params]
        self.keys = [k for k, v in states[0].items() if isinstance(v, torch.Tensor)]
        self.buffers: dict[str, torch.Tensor] = {}
        for key in self.keys:
            flat = torch.cat([s[key].reshape(-1) for s in states])
            for s, part, p in zip(states, flat.split(self.sizes), params, strict=True):
                s[key] = part.view_as(p)
            self.buffers[key] = flat
        self.views = [s[k] for s in states for k in self.keys]
        self._param_span = _Span(params)
        self._grad_span = _Span([p.grad for p in params])
        self._direction: torch.Tensor | None = None  # AdaUPGD's scratch (adam_direction)
        self._adam_step: torch.Tensor | None = None

    def params(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The parameters as one 1-D view when they lie back to back in one buffer, else None."""
        return self._param_span.over(params)

    def grads(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The same for their gradients."""
        return self._grad_span.over([p.grad for p in params])

    def holds(self, params: list[torch.Tensor], states: list[dict[str, Any]]) -> bool:
        """Built for these parameters, and their state tensors are still its views
        (``load_state_dict`` and unpickling replace them)."""
        if self.ids != [id(p) for p in params]:
            return False
        views = iter(self.views)
        return all(s.get(k) is next(views) for s in states for k in self.keys)

    def split(self, flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [part.view_as(p) for part, p in zip(flat.split(self.sizes), params, strict=True)]

    def adam_direction(self, grad: torch.Tensor, group: dict[str, Any], step: int) -> torch.Tensor:
        """Adam's moments moved by ``grad``, and m̂/(√v̂ + ε) (bias-corrected at ``step``), in one
        kernel: torch's fused Adam stepping a zeroed buffer by a rate of −1. Seven kernels over the
        buffer before (lerp, two for each of v and the denominator, the division), ~23 µs on the
        learner's backbone against ~9, and no ``sqrt`` of the zero v of weights that never had a
        gradient (torch's CPU ``sqrt_`` takes ~5 ns for each zero, ten times a positive value)."""
        direction = self._direction
        if direction is None or direction.shape != grad.shape or direction.dtype != grad.dtype \
                or direction.device != grad.device:
            with torch.inference_mode(False):  # scratch, but a normal tensor like the state (see _init_state)
                direction = self._direction = torch.zeros_like(grad)
                self._adam_step = torch.zeros((), dtype=torch.float32, device=grad.device)
        else:
            direction.zero_()
        self._adam_step.fill_(step)
        beta1, beta2 = group["betas"]
        torch._fused_adam_([direction], [grad], [self.buffers["exp_avg"]], [self.buffers["exp_avg_sq"]], [],
                           [self._adam_step], lr=-1.0, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"],
                           amsgrad=False, maximize=False)
        return direction


class _Span:
    """A 1-D view over tensors that lie back to back, in order, in one contiguous buffer (a flat
    parameter or gradient buffer such as :class:`learners.backbone.Backbone` keeps): the fused
    path then reads and writes them in place, with no ``cat`` of the tensors and no ``split`` of
    the update (over a quarter of a small network's step on a CPU). Rebuilt when the tensors change."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.ptrs = [t.data_ptr() for t in tensors]
        self.view = _contiguous_view(tensors)

    def over(self, tensors: list[torch.Tensor]) -> torch.Tensor | None:
        ptrs = [t.data_ptr() for t in tensors]
        if ptrs != self.ptrs:
            self.ptrs, self.view = ptrs, _contiguous_view(tensors)
        return self.view


def _contiguous_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    first = tensors[0]
    storage, end, total = first.untyped_storage().data_ptr(), first.data_ptr(), 0
    for t in tensors:
        if (t.data_ptr() != end or not t.is_contiguous() or t.dtype != first.dtype
                or t.untyped_storage().data_ptr() != storage):
            return None
        end += t.numel() * t.element_size()
        total += t.numel()
    return first.detach().as_strided((total,), (1,))


def _fusable(group: dict[str, Any], params: list[torch.Tensor], states: list[dict[str, Any]]) -> bool:
    """The fused path needs one device, one dtype and one step count (one bias correction) per
    group; anything else (a parameter that missed steps for lack of a gradient) runs per parameter."""
    if group["foreach"] is False:
        return False
    device, dtype, step = params[0].device, params[0].dtype, states[0]["step"]
    return (all(s["step"] == step for s in states)
            and all(p.device == device and p.dtype == dtype for p in params))


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)


def _safe_eta(eta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """η clamped to the dtype's smallest positive normal: the η → 0⁺ limit for η ≤ 0."""
    return eta.to(device=like.device, dtype=like.dtype).clamp_min(torch.finfo(like.dtype).tiny)


def _local_scaled_utility(u_hat: torch.Tensor) -> torch.Tensor:
    """sigmoid(û / ‖û_row‖): rows are output units (dim 0) of a ≥2-D weight, else the whole tensor."""
    rows = u_hat.reshape(u_hat.shape[0], -1) if u_hat.dim() >= 2 else u_hat.reshape(1, -1)
    norm = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.sigmoid(rows / norm).reshape(u_hat.shape)


def _step(groups, noise_of: Callable[[int, torch.Tensor], torch.Tensor], flats) -> None:
    """Two passes: utilities and moments of every group (and the global η), then the updates."""
    pending = []
    maxima = []
    for (group, params, states), flat in zip(groups, flats, strict=True):
        if flat is not None:
            acc, top = _accumulate_flat(group, params, states, flat)
            tops = [top]
        else:
            acc = _accumulate(group, params, states)
            tops = [u.max() for u in acc if u.numel()]
        if group["variant"] in _GLOBAL_VARIANTS:
            maxima.extend(tops)
        pending.append(acc)
    eta = None
    if maxima:
        device, dtype = maxima[0].device, maxima[0].dtype
        same = all(m.device == device and m.dtype == dtype for m in maxima)
        eta = (torch.stack(maxima).max() if len(maxima) > 1 else maxima[0]) if same else \
            max(m.to(device, torch.float64) for m in maxima)
    for (group, params, states), flat, acc in zip(groups, flats, pending, strict=True):
        total = sum(p.numel() for p in params)
        noise = None
        if group["sigma"] > 0.0:
            noise = noise_of(total, params[0])
        if flat is not None:
            _apply_flat(group, params, states, flat, acc, eta, noise)
        else:
            noises = noise.split([p.numel() for p in params]) if noise is not None else [None] * len(params)
            for p, st, u, xi in zip(params, states, acc, noises, strict=True):
                _apply(group, p, st, u, eta, None if xi is None else xi.view_as(p))


def _accumulate(group, params, states) -> list[torch.Tensor]:
    """Per-parameter reference path, first pass: traces and moments; returns the û."""
    beta = group["beta_utility"]
    beta1, beta2 = group["betas"]
    u_hat = []
    for p, st in zip(params, states, strict=True):
        st["utility"].mul_(beta).add_(p.grad * p, alpha=-(1.0 - beta))
        if group["variant"] == "adaptive":
            st["exp_avg"].lerp_(p.grad, 1.0 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        u_hat.append(st["utility"] / (1.0 - beta ** st["step"]))
    return u_hat


def _apply(group, p, st, u_hat, eta, xi) -> None:
    """Per-parameter reference path, second pass: gate and update one parameter."""
    variant, lr, sigma = group["variant"], group["lr"], group["sigma"]
    beta1, beta2 = group["betas"]
    if variant == "local":
        gate = 1.0 - _local_scaled_utility(u_hat)
    else:
        gate = 1.0 - torch.sigmoid(u_hat / _safe_eta(eta, u_hat))
    if variant == "adaptive":
        m_hat = st["exp_avg"] / (1.0 - beta1 ** st["step"])
        v_hat = st["exp_avg_sq"] / (1.0 - beta2 ** st["step"])
        direction = m_hat / (v_hat.sqrt() + group["eps"])
    else:
        direction = p.grad.clone()
    if xi is not None:
        direction.add_(xi * gate if variant == "nonprotecting" else xi, alpha=sigma)
    if variant != "nonprotecting":
        direction.mul_(gate)
    if group["weight_decay"] != 0.0:
        p.mul_(1.0 - lr * group["weight_decay"])
    p.add_(direction, alpha=-lr)


def _accumulate_flat(group, params, states, flat: _FlatState
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """Fused path, first pass, on the group's flat buffers: returns (the flat gradient, the
    parameters' in-place view or None, AdaUPGD's m̂/(√v̂ + ε) or None) and max û."""
    beta = group["beta_utility"]
    grad = flat.grads(params)
    if grad is None:
        grad = _flatten([p.grad for p in params])
    weights = flat.params(params)
    utility = flat.buffers["utility"]
    utility.mul_(beta).addcmul_(grad, _flatten(params) if weights is None else weights, value=-(1.0 - beta))
    direction = None
    if group["variant"] == "adaptive":
        direction = flat.adam_direction(grad, group, states[0]["step"])
    return (grad, weights, direction), utility.max().div_(1.0 - beta ** states[0]["step"])


def _apply_flat(group, params, states, flat: _FlatState, acc, eta, noise) -> None:
    """Fused path, second pass. The same update as :func:`_apply`, with the scalars folded so that
    few kernels touch the whole buffer: 1 − sigmoid(û/η) = sigmoid(−u/(c·η)) with c = 1 − β^t;
    every parameter moves by ``−alpha·update``."""
    variant, lr, sigma = group["variant"], group["lr"], group["sigma"]
    grad, weights, direction = acc
    step = states[0]["step"]
    utility = flat.buffers["utility"]
    correction = 1.0 - group["beta_utility"] ** step
    if variant == "local":
        gate = torch.cat([(1.0 - _local_scaled_utility(u / correction)).reshape(-1) for u in flat.split(utility, params)])
    else:
        tiny = torch.finfo(utility.dtype).tiny
        neg_scale = eta.to(device=utility.device, dtype=utility.dtype).mul(-correction).clamp_max_(-tiny)
        gate = utility.div(neg_scale).sigmoid_()
    if variant == "adaptive":
        if noise is not None:  # gate·(m̂/(√v̂ + ε) + σξ) = σ·gate·(ξ + direction/σ)
            update = gate.mul_(torch.add(noise, direction, alpha=1.0 / sigma))
            alpha = lr * sigma
        else:
            update = gate.mul_(direction)
            alpha = lr
    elif variant == "nonprotecting":
        update = grad.addcmul(noise, gate, value=sigma) if noise is not None else grad
        alpha = lr
    elif noise is not None:
        update = gate.mul_(noise.add(grad, alpha=1.0 / sigma))
        alpha = lr * sigma
    else:
        update = gate.mul_(grad)
        alpha = lr
    if weights is not None:
        if group["weight_decay"] != 0.0:
            weights.mul_(1.0 - lr * group["weight_decay"])
        weights.add_(update, alpha=-alpha)
        return
    if group["weight_decay"] != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
    torch._foreach_add_(params, flat.split(update, params), alpha=-alpha)
