"""The backbone: its functional forward against its own modules, its written-out backward against autograd."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from learners.backbone import Backbone
from learners.upgd import _contiguous_view


@pytest.mark.parametrize("passthrough", [False, True])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_backward_from_gives_autograds_gradients(depth, passthrough):
    torch.manual_seed(depth)
    net = Backbone(in_dim=10, hidden=8, depth=depth, passthrough=passthrough).double()
    x = torch.randn(7, 10, dtype=torch.float64)
    phi = net(x)
    d_phi = torch.randn_like(phi)
    phi.backward(d_phi)
    expected = [p.grad.clone() for p in net.parameters()]
    for p in net.parameters():  # stale values that backward_from must overwrite, not add to
        p.grad.fill_(3.0)
    phi_manual, tape = net.forward_for_backward(x)
    net.backward_from(tape, d_phi)
    torch.testing.assert_close(phi_manual, phi.detach(), rtol=0, atol=0)
    for p, g in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)


def test_backward_from_creates_missing_gradients():
    net = Backbone(in_dim=4, hidden=3, depth=2, passthrough=False)
    phi, tape = net.forward_for_backward(torch.randn(5, 4))
    assert not phi.requires_grad
    net.backward_from(tape, torch.ones_like(phi))
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())


@pytest.mark.parametrize("passthrough", [False, True])
def test_forward_is_what_its_modules_compute(passthrough):
    torch.manual_seed(0)
    net = Backbone(in_dim=6, hidden=5, depth=2, passthrough=passthrough)
    x = torch.randn(4, 6)
    parts = ([x] if passthrough else []) + [net.mlp(x), torch.ones(4, 1)]
    torch.testing.assert_close(net(x), torch.cat(parts, dim=1), rtol=0, atol=0)
    assert Backbone(in_dim=6, depth=0)(x).shape == (4, 7)


@pytest.mark.parametrize("copy_of", [lambda net: net, copy.deepcopy, lambda net: pickle.loads(pickle.dumps(net))])
def test_gradients_land_in_one_buffer_and_stay_autograds(copy_of):
    # the optimizer steps such a buffer in place (learners.upgd); the layout must never change a value
    torch.manual_seed(1)
    net = Backbone(in_dim=6, hidden=5, depth=2, passthrough=False).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    phi, tape = net.forward_for_backward(x)
    net.backward_from(tape, torch.randn_like(phi))  # lays the buffers out
    net = copy_of(net)
    before = [p.detach().clone() for p in net.parameters()]
    reference = copy.deepcopy(net)
    for p in reference.parameters():
        p.grad = None
    d_phi = torch.randn_like(phi)
    reference(x).backward(d_phi)
    phi, tape = net.forward_for_backward(x)
    net.backward_from(tape, d_phi)
    params = list(net.parameters())
    assert _contiguous_view(params) is not None and _contiguous_view([p.grad for p in params]) is not None
    for p, value, ref in zip(params, before, reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0)
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_buffers_laid_out_in_inference_mode_are_normal_tensors():
    # the learner trains in inference mode; autograd (and in-place updates) must still work after
    net = Backbone(in_dim=6, hidden=5, depth=2, passthrough=False)
    x = torch.randn(4, 6)
    with torch.inference_mode():
        phi, tape = net.forward_for_backward(x)
        net.backward_from(tape, torch.ones_like(phi))
    assert not any(p.is_inference() or p.grad.is_inference() for p in net.parameters())
    net(x).sum().backward()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(p.grad, alpha=-0.1)
