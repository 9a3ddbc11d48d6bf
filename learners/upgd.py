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
The noise is one ``torch.randn(p.shape)`` per parameter with a gradient, in parameter-group order,
drawn only when σ > 0, from ``generator`` when given (it must live on the parameters' device) or
from torch's global RNG otherwise; the ``foreach`` (multi-tensor) and per-parameter paths draw the
same numbers and give the same result.

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

from collections.abc import Callable, Iterable
from typing import Any

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
        Use the multi-tensor (``torch._foreach_*``) path; ``None`` picks it whenever every
        parameter of the step lives on one device.
    generator
        A ``torch.Generator`` for the perturbation, for reproducible runs.
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
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma,
            variant=variant, betas=betas, eps=eps, foreach=foreach,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        self.generator = generator

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    # torch.optim.Optimizer pickles only defaults/state/param_groups; keep the noise generator too
    # so that a checkpointed learner resumes the same random stream. The state is stored as bytes,
    # not as the tensor ``get_state()`` returns: a fresh tensor pickles with a storage key taken
    # from its memory address, so two dumps of an unchanged optimizer would differ.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        gen = getattr(self, "generator", None)
        state["generator"] = None if gen is None else (str(gen.device), bytes(gen.get_state().numpy()))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        gen_state = state.pop("generator", None)
        super().__setstate__(state)
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
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("UPGD does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["utility"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["variant"] == "adaptive":
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            groups.append((group, params))
        if not groups:
            return loss

        foreach = [g["foreach"] for g, _ in groups]
        if all(f is None for f in foreach):
            devices = {p.device for _, params in groups for p in params}
            use_foreach = len(devices) == 1
        else:
            use_foreach = any(bool(f) for f in foreach)
        impl = _multi_tensor if use_foreach else _single_tensor
        impl(groups, self.state, self.generator)
        return loss


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


def _noise(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)


def _safe_eta(eta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """η clamped to the dtype's smallest positive normal: the η → 0⁺ limit for η ≤ 0."""
    return eta.to(device=like.device, dtype=like.dtype).clamp_min(torch.finfo(like.dtype).tiny)


def _local_scaled_utility(u_hat: torch.Tensor) -> torch.Tensor:
    """sigmoid(û / ‖û_row‖): rows are output units (dim 0) of a ≥2-D weight, else the whole tensor."""
    rows = u_hat.reshape(u_hat.shape[0], -1) if u_hat.dim() >= 2 else u_hat.reshape(1, -1)
    norm = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.sigmoid(rows / norm).reshape(u_hat.shape)


def _bias_corrections(group: dict[str, Any], states: list[dict[str, Any]]) -> list[float]:
    return [1.0 - group["beta_utility"] ** s["step"] for s in states]


def _single_tensor(groups, state, generator) -> None:
    """Per-parameter reference path."""
    eta = None
    for group, params in groups:
        beta = group["beta_utility"]
        beta1, beta2 = group["betas"]
        for p in params:
            st = state[p]
            st["utility"].mul_(beta).add_(p.grad * p, alpha=-(1.0 - beta))
            if group["variant"] == "adaptive":
                st["exp_avg"].lerp_(p.grad, 1.0 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            if group["variant"] in _GLOBAL_VARIANTS:
                top = (st["utility"] / (1.0 - beta ** st["step"])).max()
                eta = top if eta is None else torch.maximum(eta, top.to(eta.device))

    for group, params in groups:
        variant, lr, sigma = group["variant"], group["lr"], group["sigma"]
        beta1, beta2 = group["betas"]
        for p in params:
            st = state[p]
            u_hat = st["utility"] / (1.0 - group["beta_utility"] ** st["step"])
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
            if variant == "nonprotecting":
                if sigma > 0.0:
                    direction.add_(_noise(p, generator) * gate, alpha=sigma)
            else:
                if sigma > 0.0:
                    direction.add_(_noise(p, generator), alpha=sigma)
                direction.mul_(gate)
            if group["weight_decay"] != 0.0:
                p.mul_(1.0 - lr * group["weight_decay"])
            p.add_(direction, alpha=-lr)


def _multi_tensor(groups, state, generator) -> None:
    """Multi-tensor path: the same maths with ``torch._foreach_*`` kernels per group."""
    per_group = []
    maxima = []
    for group, params in groups:
        states = [state[p] for p in params]
        grads = [p.grad for p in params]
        utilities = [s["utility"] for s in states]
        beta = group["beta_utility"]
        torch._foreach_mul_(utilities, beta)
        torch._foreach_add_(utilities, torch._foreach_mul(grads, params), alpha=-(1.0 - beta))
        u_hat = torch._foreach_div(utilities, _bias_corrections(group, states))
        if group["variant"] == "adaptive":
            beta1, beta2 = group["betas"]
            torch._foreach_lerp_([s["exp_avg"] for s in states], grads, 1.0 - beta1)
            exp_avg_sq = [s["exp_avg_sq"] for s in states]
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
        if group["variant"] in _GLOBAL_VARIANTS:
            maxima.extend(torch._foreach_max(u_hat))
        per_group.append((group, params, states, grads, u_hat))
    eta = None
    if maxima:
        device, dtype = maxima[0].device, maxima[0].dtype
        same = all(m.device == device and m.dtype == dtype for m in maxima)
        eta = torch.stack(maxima).max() if same else max(m.to(device, torch.float64) for m in maxima)

    for group, params, states, grads, u_hat in per_group:
        variant, lr, sigma = group["variant"], group["lr"], group["sigma"]
        if variant == "local":
            scaled = [_local_scaled_utility(u) for u in u_hat]
        else:
            scaled = torch._foreach_div(u_hat, _safe_eta(eta, u_hat[0]))
            torch._foreach_sigmoid_(scaled)
        gates = scaled                      # fresh tensors: 1 − s in place
        torch._foreach_neg_(gates)
        torch._foreach_add_(gates, 1.0)
        if variant == "adaptive":
            beta1, beta2 = group["betas"]
            m_hat = torch._foreach_div([s["exp_avg"] for s in states],
                                       [1.0 - beta1 ** s["step"] for s in states])
            denom = torch._foreach_div([s["exp_avg_sq"] for s in states],
                                       [1.0 - beta2 ** s["step"] for s in states])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            direction = torch._foreach_div(m_hat, denom)
        else:
            direction = grads
        if sigma > 0.0:
            noise = [_noise(p, generator) for p in params]
            if variant == "nonprotecting":
                torch._foreach_mul_(noise, gates)
            direction = torch._foreach_add(direction, noise, alpha=sigma)   # a new list: grads stay
        if variant != "nonprotecting":
            # gates is a fresh list: gate the direction into it rather than into (possibly) the grads
            torch._foreach_mul_(gates, direction)
            direction = gates
        if group["weight_decay"] != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
        torch._foreach_add_(params, direction, alpha=-lr)
