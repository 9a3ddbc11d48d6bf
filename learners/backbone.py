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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x] if self.passthrough else []
        if self.depth:
            parts.append(self.mlp(x))
        parts.append(x.new_ones(x.shape[0], 1))
        return torch.cat(parts, dim=1)
