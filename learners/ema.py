"""Exponential moving average of a module's weights, for serving (a temporal ensemble).

An online learner's weights jitter from batch to batch (and UPGD perturbs them on purpose);
predicting with an average of recent weights is smoother and usually more accurate, while the
learner keeps training the raw weights.

The average is bias-corrected like Adam's moments: after ``n`` updates it is the EW mean of the
``n`` weight snapshots it saw, normalised by ``1 − decay^n``, so the initial weights do not weigh
on the early averages. Without storing the uncorrected sum this is the recursion

    avg_n = avg_{n−1} + α_n·(w_n − avg_{n−1}),    α_n = (1 − decay) / (1 − decay^n),

whose first step (α_1 = 1) copies the weights. Buffers (e.g. normalisation statistics) are copied,
not averaged. If the module's parameters change shape or names (a head that grew a class), the
average restarts from the current weights.

>>> import torch
>>> net = torch.nn.Linear(2, 1)
>>> ema = EMAWeights(net, decay=0.9)
>>> with torch.no_grad():
...     _ = net.weight.fill_(1.0)
>>> ema.update(net)
>>> ema.module.weight.tolist()     # first update copies: no pull towards the initial weights
[[1.0, 1.0]]
>>> with torch.no_grad():
...     _ = net.weight.fill_(3.0)
>>> ema.update(net)
>>> [round(v, 4) for v in ema.module.weight[0].tolist()]   # (0.9·0.1·1 + 0.1·3) / (1 − 0.81)
[2.0526, 2.0526]
"""

from __future__ import annotations

import copy

import torch


class EMAWeights:
    """Bias-corrected exponential moving average of ``module``'s parameters.

    Parameters
    ----------
    module
        The module being trained; a frozen copy of it holds the average (``.module``).
    decay
        Weight of the past per update, in [0, 1); the average spans about ``1/(1 − decay)`` updates.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected 0 <= decay < 1, got {decay!r}")
        self.decay = float(decay)
        self._restart(module)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged copy, to predict with."""
        return self._module

    @property
    def updates(self) -> int:
        """Number of weight snapshots in the current average."""
        return self._updates

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Fold the current weights of ``module`` into the average."""
        source = dict(module.named_parameters())
        target = dict(self._module.named_parameters())
        if source.keys() != target.keys() or any(source[k].shape != target[k].shape for k in source):
            self._restart(module)
            target = dict(self._module.named_parameters())
        self._updates += 1
        alpha = (1.0 - self.decay) / (1.0 - self.decay ** self._updates)
        names = list(source)
        if names:
            torch._foreach_lerp_([target[k] for k in names], [source[k].detach() for k in names], alpha)
        for name, buffer in module.named_buffers():
            self._module.get_buffer(name).copy_(buffer)

    def _restart(self, module: torch.nn.Module) -> None:
        self._module = copy.deepcopy(module)
        for p in self._module.parameters():
            p.grad = None
        self._module.requires_grad_(False)
        self._updates = 0
