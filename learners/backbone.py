"""Backbone: the feature map φ(x) under the head.

``Backbone(in_dim, hidden, depth)`` is an MLP of ``depth`` blocks ``Linear → LayerNorm → GELU``
(LayerNorm keeps the network trainable over long non-stationary streams, as the plasticity
literature found; GELU in its tanh form, which costs half of the exact erf form on a CPU and
scored the same on ``bench/quality.py``). The LayerNorms have no scale and shift of their own (the
next linear layer, or the head, has them): half the parameter tensors for the optimizer to walk,
9% more events/s in throughput mode, accuracy within 0.2 points. With ``passthrough`` the encoded input is concatenated
to the MLP features, so the head is a linear model on the raw encoding plus learned nonlinear
features (the learner's default leaves it off: see ``learners.estimator``). A constant
1 is appended (the head's bias). ``depth=0`` is the "no backbone" ablation: a linear model on the
encoded features.

The learner trains it through :meth:`Backbone.forward_for_backward` and
:meth:`Backbone.backward_from` (the head hands back ∂loss/∂φ in closed form): the same gradients as
autograd, bit for bit, in three quarters of the time (64 rows, 160 → 64 → 64: 0.18 ms against
0.24 ms for the module forward plus ``backward``, on one CPU thread).
"""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """MLP feature map with optional passthrough of the input and a bias feature.

    Examples
    --------
    >>> import torch
    >>> net = Backbone(in_dim=5, hidden=8, depth=2)
    >>> net.out_dim
    14
    >>> net(torch.zeros(3, 5)).shape
    torch.Size([3, 14])
    >>> Backbone(in_dim=5, depth=0).out_dim   # linear model on the encoding (+ bias)
    6
    """

    def __init__(self, in_dim: int, hidden: int = 64, depth: int = 1, passthrough: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden, elementwise_affine=False), nn.GELU(approximate="tanh")]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.depth = depth
        self.passthrough = passthrough or depth == 0
        self.out_dim = (in_dim if self.passthrough else 0) + (hidden if depth else 0) + 1

    def _flatten_parameters(self) -> None:
        """Parameters and gradients as views into one buffer each, in ``parameters()`` order, so
        that an optimizer step touches one tensor per kind instead of gathering them (see
        ``learners.upgd``). :meth:`backward_from` does it when it has gradients to allocate (the
        first time, and after a copy or unpickling, which keep the values but not the layout).
        The buffers are normal tensors even when this runs in inference mode (the learner's
        training pass): anything may update them in place later."""
        params = list(self.parameters())
        if not params:
            return
        sizes = [p.numel() for p in params]
        with torch.inference_mode(False), torch.no_grad():
            flat = torch.cat([p.reshape(-1) for p in params])
            grads = torch.zeros_like(flat)
            for p, value, grad in zip(params, flat.split(sizes), grads.split(sizes), strict=True):
                p.data = value.view_as(p)
                p.grad = grad.view_as(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, self._mlp(x, None))

    def _features(self, x: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """φ: [x if passthrough, the MLP's output, 1]."""
        parts = [x] if self.passthrough else []
        if hidden is not None:
            parts.append(hidden)
        parts.append(x.new_ones(x.shape[0], 1))
        return torch.cat(parts, dim=1)

    def _blocks(self) -> list[tuple[nn.Linear, nn.LayerNorm]]:
        """(linear, norm) of each block, listed once (iterating ``nn.Sequential`` costs ~8 µs, and
        a 256-row batch asks nine times). Copies and unpickled backbones list their own modules."""
        blocks = self.__dict__.get("_block_list")
        if blocks is None:  # (deepcopy and pickle keep the list pointing at the copy's own modules)
            modules = list(self.mlp)
            blocks = self._block_list = list(zip(modules[0::3], modules[1::3], strict=True))
        return blocks

    def _mlp(self, x: torch.Tensor, tape: list | None) -> torch.Tensor | None:
        """The blocks as functional calls (the module calls of ``nn.Sequential`` cost more than the
        arithmetic at these sizes); with ``tape``, what :meth:`backward_from` needs is kept."""
        if not self.depth:
            return None
        h = x
        for linear, norm in self._blocks():
            z = torch.addmm(linear.bias, h, linear.weight.T)
            a, mean, rstd = torch.native_layer_norm(z, norm.normalized_shape, None, None, norm.eps)
            if tape is not None:
                tape.append((h, z, mean, rstd, a))
            h = torch.nn.functional.gelu(a, approximate="tanh")
        return h

    def forward_for_backward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """φ(x) and what :meth:`backward_from` needs, without recording an autograd graph."""
        if torch.is_grad_enabled():  # (the learner calls both in inference mode: no ~2 µs context)
            with torch.no_grad():
                return self.forward_for_backward(x)
        tape: list[tuple[torch.Tensor, ...]] = []
        return self._features(x, self._mlp(x, tape)), tape

    def backward_from(self, tape: list[tuple[torch.Tensor, ...]], d_phi: torch.Tensor) -> None:
        """Write ∂loss/∂parameters into ``.grad`` (overwriting it) given ∂loss/∂φ.

        The same numbers as ``phi.backward(d_phi)`` on :meth:`forward`, written out: a small
        network pays the autograd engine's per-node bookkeeping more than the arithmetic (a
        quarter of the forward and backward of this one on a CPU).
        """
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.backward_from(tape, d_phi)
        blocks = self._blocks()
        start = self.out_dim - 1 - blocks[-1][0].out_features
        d = d_phi[:, start : self.out_dim - 1]
        for i in reversed(range(len(blocks))):
            linear, norm = blocks[i]
            h, z, mean, rstd, a = tape[i]
            d = torch.ops.aten.gelu_backward(d, a, approximate="tanh")
            d = torch.ops.aten.native_layer_norm_backward(d, z, norm.normalized_shape, mean, rstd, None, None,
                                                          [True, False, False])[0]
            if linear.weight.grad is None or linear.bias.grad is None:
                self._flatten_parameters()
            torch.mm(d.T, h, out=linear.weight.grad)
            torch.sum(d, dim=0, out=linear.bias.grad)
            if i:
                d = d @ linear.weight
