"""EMAWeights: the bias-corrected exponential moving average of a module's weights."""

from __future__ import annotations

import pickle

import pytest
import torch

from learners.ema import EMAWeights


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999])
def test_average_equals_the_bias_corrected_weighted_mean_of_the_snapshots(decay):
    net = _net()
    ema = EMAWeights(net, decay)
    gen = torch.Generator().manual_seed(1)
    snapshots = []
    for _ in range(25):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        snapshots.append([p.detach().clone() for p in net.parameters()])
        ema.update(net)
    n = len(snapshots)
    weights = [(1 - decay) * decay ** (n - 1 - i) for i in range(n)]
    total = sum(weights)        # = 1 - decay**n: the bias correction
    for k, averaged in enumerate(ema.module.parameters()):
        expected = sum(w * s[k] for w, s in zip(weights, snapshots, strict=True)) / total
        torch.testing.assert_close(averaged, expected)
    assert ema.updates == n


def test_copy_is_frozen_buffers_are_copied_and_the_source_is_untouched():
    net = _net()
    ema = EMAWeights(net, 0.9)
    net.train()
    net(torch.randn(8, 3))           # moves the BatchNorm running statistics
    before = [p.detach().clone() for p in net.parameters()]
    ema.update(net)
    assert all(not p.requires_grad for p in ema.module.parameters())
    torch.testing.assert_close(ema.module[1].running_mean, net[1].running_mean)
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    assert ema.module is not net


def test_restarts_when_the_module_grows():
    net = torch.nn.Linear(3, 2)
    ema = EMAWeights(net, 0.9)
    ema.update(net)
    grown = torch.nn.Linear(3, 3)    # a head that gained a class
    ema.update(grown)
    assert ema.module.weight.shape == (3, 3) and ema.updates == 1
    torch.testing.assert_close(ema.module.weight, grown.weight.detach())


def test_pickles_and_continues():
    net = _net()
    ema = EMAWeights(net, 0.8)
    ema.update(net)
    clone = pickle.loads(pickle.dumps(ema))
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    clone.update(net)
    torch.testing.assert_close(clone.module[0].weight, ema.module[0].weight)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2.0])
def test_bad_decay_names_the_field(decay):
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(torch.nn.Linear(1, 1), decay)
