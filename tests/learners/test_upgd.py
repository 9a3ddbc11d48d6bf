"""UPGD against closed forms and a slow per-element pure-Python reference."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from learners.upgd import UPGD, VARIANTS, _contiguous_view


def _sigmoid(x: float) -> float:
    if x == -math.inf:
        return 0.0
    return 1.0 / (1.0 + math.exp(-x))


class ReferenceUPGD:
    """The update rules of learners/upgd.py written element by element with Python floats.

    Parameters are flat lists plus their shapes; noise values are passed in explicitly.
    """

    def __init__(self, shapes, groups):
        # groups: list of (indices of params, hyper-parameter dict)
        self.shapes = shapes
        self.groups = groups
        self.state = {}

    def step(self, params, grads, noises):
        for i, g in enumerate(grads):
            if g is None:
                continue
            st = self.state.setdefault(i, {"t": 0, "u": [0.0] * len(g), "m": [0.0] * len(g), "v": [0.0] * len(g)})
            st["t"] += 1
        hp_of = {i: hp for idx, hp in self.groups for i in idx}
        # 1. utility traces and Adam moments; global max over bias-corrected utilities
        u_hat = {}
        eta = -math.inf
        for i, g in enumerate(grads):
            if g is None:
                continue
            hp, st = hp_of[i], self.state[i]
            beta = hp["beta_utility"]
            b1, b2 = hp["betas"]
            for k in range(len(g)):
                st["u"][k] = beta * st["u"][k] + (1 - beta) * (-g[k] * params[i][k])
                st["m"][k] = b1 * st["m"][k] + (1 - b1) * g[k]
                st["v"][k] = b2 * st["v"][k] + (1 - b2) * g[k] * g[k]
            u_hat[i] = [x / (1 - beta ** st["t"]) for x in st["u"]]
            if hp["variant"] != "local":
                eta = max(eta, max(u_hat[i]))
        # 2. gates and updates
        for i, g in enumerate(grads):
            if g is None:
                continue
            hp, st = hp_of[i], self.state[i]
            n = len(g)
            if hp["variant"] == "local":
                shape = self.shapes[i]
                row = n // shape[0] if len(shape) >= 2 else n
                scaled = []
                for start in range(0, n, row):
                    chunk = u_hat[i][start:start + row]
                    norm = max(math.sqrt(sum(x * x for x in chunk)), 1e-12)
                    scaled.extend(_sigmoid(x / norm) for x in chunk)
            elif eta > 0:
                scaled = [_sigmoid(x / eta) for x in u_hat[i]]
            else:  # the documented η → 0⁺ limit
                scaled = [0.5 if x == 0 else _sigmoid(-math.inf) for x in u_hat[i]]
            b1, b2 = hp["betas"]
            for k in range(n):
                gate = 1 - scaled[k]
                xi = noises[i][k] if noises is not None else 0.0
                if hp["variant"] == "adaptive":
                    m_hat = st["m"][k] / (1 - b1 ** st["t"])
                    v_hat = st["v"][k] / (1 - b2 ** st["t"])
                    direction = m_hat / (math.sqrt(v_hat) + hp["eps"])
                else:
                    direction = g[k]
                if hp["variant"] == "nonprotecting":
                    update = direction + hp["sigma"] * xi * gate
                else:
                    update = (direction + hp["sigma"] * xi) * gate
                params[i][k] = params[i][k] * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * update


def _params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (2, 3), (1,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


HYPER = dict(lr=0.05, weight_decay=0.01, beta_utility=0.9, sigma=0.1, betas=(0.8, 0.95), eps=1e-8)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_per_element_reference_over_several_steps(variant, foreach):
    params = _params(0)
    shapes = [tuple(p.shape) for p in params]
    # two groups so that η is shared across groups; the second group has its own lr and β
    other = dict(HYPER, lr=0.02, beta_utility=0.5)
    opt = UPGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "beta_utility": 0.5}],
               variant=variant, foreach=foreach, generator=torch.Generator().manual_seed(7), **HYPER)
    ref = ReferenceUPGD(shapes, [([0, 1], dict(HYPER, variant=variant)), ([2, 3], dict(other, variant=variant))])
    ref_params = [p.detach().flatten().tolist() for p in params]
    noise_gen = torch.Generator().manual_seed(7)
    grad_gen = torch.Generator().manual_seed(3)
    for step in range(6):
        grads = [torch.randn(s, generator=grad_gen, dtype=torch.float64) for s in shapes]
        # parameter 1 has no gradient on odd steps: skipped, its step count lags behind
        has_grad = [True, step % 2 == 0, True, True]
        for p, g, h in zip(params, grads, has_grad, strict=True):
            p.grad = g.clone() if h else None
        # one draw per group over its parameters with a gradient, split in order
        noises = [None] * len(shapes)
        for members in ([0, 1], [2, 3]):
            live = [i for i in members if has_grad[i]]
            draw = torch.randn(sum(math.prod(shapes[i]) for i in live), generator=noise_gen, dtype=torch.float64)
            for i, part in zip(live, draw.split([math.prod(shapes[i]) for i in live]), strict=True):
                noises[i] = part.tolist()
        opt.step()
        ref.step(ref_params, [g.flatten().tolist() if h else None for g, h in zip(grads, has_grad, strict=True)],
                 noises)
        for p, r in zip(params, ref_params, strict=True):
            assert p.detach().flatten().tolist() == pytest.approx(r, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_foreach_and_per_parameter_paths_agree(variant):
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [UPGD(net.parameters(), lr=0.1, weight_decay=1e-3, sigma=0.05, beta_utility=0.99, variant=variant,
                 foreach=fe, generator=torch.Generator().manual_seed(11)) for net, fe in zip(nets, (False, True), strict=True)]
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kappa, gate", [(0.5, 1 - _sigmoid(1.0)), (-0.5, 1.0), (0.0, 0.5)])
def test_equal_utilities_give_sgd_scaled_by_the_closed_form_gate(kappa, gate, foreach):
    # Every element has utility -g*w = kappa: û/η = 1 when kappa > 0 (gate 1 - sigmoid(1)),
    # the η → 0⁺ limit gives gate 1 (plain SGD) when kappa < 0 and 1/2 when kappa = 0.
    w0 = torch.tensor([[1.0, -2.0, 4.0], [0.5, -0.25, 8.0]], dtype=torch.float64)
    g = -kappa / w0 if kappa != 0 else torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 6.0]], dtype=torch.float64)
    w = (w0 if kappa != 0 else torch.zeros_like(w0)).clone().requires_grad_()
    start = w.detach().clone()
    opt = UPGD([w], lr=0.1, sigma=0.0, weight_decay=0.0, beta_utility=0.9, foreach=foreach)
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), start - 0.1 * g * gate)


def test_local_variant_closed_form_with_equal_utilities():
    # a row of n equal positive utilities normalises to 1/sqrt(n) each
    w = torch.full((2, 4), 2.0, dtype=torch.float64, requires_grad=True)
    g = torch.full((2, 4), -0.25, dtype=torch.float64)
    opt = UPGD([w], lr=0.1, sigma=0.0, variant="local")
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 4), 2.0, dtype=torch.float64) + 0.1 * 0.25 * (1 - _sigmoid(0.5)))


def test_adaptive_first_step_is_sign_descent_scaled_by_the_gate():
    # step 1: m̂ = g, v̂ = g², so the direction is g/(|g| + eps) = sign(g) up to eps
    w0 = torch.tensor([1.0, 2.0, -4.0], dtype=torch.float64)
    g = -0.5 / w0
    w = w0.clone().requires_grad_()
    opt = UPGD([w], lr=0.1, sigma=0.0, variant="adaptive", eps=1e-12)
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.1 * torch.sign(g) * (1 - _sigmoid(1.0)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_positive_eta_and_missing_gradients_never_give_nan(variant):
    used = torch.zeros(4, 3, requires_grad=True)       # w = 0: every utility is exactly 0, η = 0
    unused = torch.randn(3, requires_grad=True)         # never receives a gradient
    empty = torch.zeros(0, 3, requires_grad=True)       # no elements: no maximum to take
    empty.grad = torch.zeros(0, 3)
    before_unused = unused.detach().clone()
    opt = UPGD([used, unused, empty], lr=0.1, sigma=0.1, variant=variant, generator=torch.Generator().manual_seed(0))
    for step in range(200):
        # gradients aligned with the weights: -g*w <= 0 everywhere, so η <= 0 on every step
        used.grad = used.detach().sign() * torch.rand(4, 3) + (1.0 if step == 0 else 0.0)
        opt.step()
        assert torch.isfinite(used).all()
    assert torch.equal(unused.detach(), before_unused)
    assert unused not in opt.state or not opt.state[unused]
    assert opt.state[used]["step"] == 200


def test_a_noise_pool_perturbs_with_standard_normals_that_change_every_step():
    # zero gradients and zero utilities: gate ½ everywhere, so w moves by exactly -lr·σ·ξ/2
    n, lr, sigma = 1000, 0.1, 1.0
    w = torch.zeros(n, requires_grad=True)
    opt = UPGD([w], lr=lr, sigma=sigma, beta_utility=0.5, generator=torch.Generator().manual_seed(0), noise_pool=4 * n)
    draws = []
    for _ in range(100):  # 100,000 numbers: the 4,000-number pool is redrawn three times
        before = w.detach().clone()
        w.grad = torch.zeros(n)
        opt.step()
        draws.append((before - w.detach()) / (lr * sigma * 0.5))
    xi = torch.stack(draws)
    assert abs(float(xi.mean())) < 0.02 and abs(float(xi.std()) - 1.0) < 0.02
    # consecutive steps: uncorrelated element by element (identical draws would correlate at 1)
    lag = torch.corrcoef(torch.stack([xi[:-1].reshape(-1), xi[1:].reshape(-1)]))[0, 1]
    assert abs(float(lag)) < 0.05
    assert len({tuple(d[:4].tolist()) for d in draws}) == len(draws)


def test_a_noise_pool_too_small_for_the_parameters_draws_afresh():
    w = torch.zeros(100, requires_grad=True)
    opt = UPGD([w], lr=0.1, sigma=1.0, generator=torch.Generator().manual_seed(0), noise_pool=399)
    w.grad = torch.zeros(100)
    opt.step()
    assert opt._pool is None and bool((w != 0).all())


@pytest.mark.parametrize("noise_pool", [0, 64])
def test_pickle_round_trip_continues_the_same_noise_stream(noise_pool):
    w = torch.randn(5, requires_grad=True)
    opt = UPGD([w], lr=0.1, sigma=0.5, generator=torch.Generator().manual_seed(3), noise_pool=noise_pool)
    w.grad = torch.randn(5)
    opt.step()
    clone_w, clone_opt = pickle.loads(pickle.dumps((w, opt)))
    for p, o in ((w, opt), (clone_w, clone_opt)):
        for _ in range(120):  # (past a redraw of the 64-number pool, which serves 512)
            p.grad = torch.ones(5)
            o.step()
    torch.testing.assert_close(w.detach(), clone_w.detach())


def test_two_dumps_of_an_unchanged_optimizer_are_equal():
    # River's clone/aliasing checks compare pickle bytes; the generator state must not pickle
    # as a fresh tensor (its storage key would be a memory address)
    w = torch.randn(5, requires_grad=True)
    opt = UPGD([w], lr=0.1, sigma=0.5, generator=torch.Generator().manual_seed(3), noise_pool=64)
    w.grad = torch.randn(5)
    opt.step()
    assert pickle.dumps(opt) == pickle.dumps(opt)


def test_state_dict_round_trip():
    w = torch.randn(5, requires_grad=True)
    opt = UPGD([w], variant="adaptive")
    w.grad = torch.randn(5)
    opt.step()
    fresh = UPGD([w], variant="adaptive")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[w]["step"] == 1
    torch.testing.assert_close(fresh.state[w]["utility"], opt.state[w]["utility"])


@pytest.mark.parametrize(
    "kwargs, field",
    [({"variant": "fancy"}, "variant"), ({"beta_utility": 1.0}, "beta_utility"), ({"lr": -1.0}, "lr"),
     ({"sigma": -0.1}, "sigma"), ({"weight_decay": -1.0}, "weight_decay"), ({"betas": (0.9, 1.0)}, "betas"),
     ({"eps": 0.0}, "eps")],
)
def test_bad_hyper_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UPGD([torch.zeros(2, requires_grad=True)], **kwargs)


def test_upgd_learns_a_regression_with_noise_on():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = UPGD(model.parameters(), lr=0.05, sigma=0.01, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    for _ in range(500):
        x = torch.randn(16, 4)
        loss = ((model(x) - x @ target.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_fused_state_pickles_each_buffer_once():
    params = [torch.randn(64, 64, requires_grad=True), torch.randn(64, requires_grad=True), torch.randn(64, 32, requires_grad=True)]
    opt = UPGD(params, variant="adaptive")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    param_bytes = sum(p.numel() * p.element_size() for p in params)  # the state's keys
    assert len(pickle.dumps(opt)) < 1.1 * (state_bytes + param_bytes)
    clone = pickle.loads(pickle.dumps(opt))
    for p, q in zip(opt.state, clone.state, strict=True):
        for key in ("utility", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(clone.state[q][key], opt.state[p][key])


@pytest.mark.parametrize("foreach", [False, True])
def test_a_loaded_state_continues_like_the_original(foreach):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(6, 4, requires_grad=True, generator=gen), torch.randn(6, requires_grad=True, generator=gen)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    opt = UPGD(params, variant="adaptive", sigma=0.0, foreach=foreach)
    other = UPGD(copies, variant="adaptive", sigma=0.0, foreach=foreach)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, q, g in zip(params, copies, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        if step == 2:  # replaces the state tensors the fused path was working on
            other.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch hands out references
            for p, q in zip(params, copies, strict=True):
                q.data.copy_(p.detach())
        else:
            other.step()
    for p, q in zip(params, copies, strict=True):
        torch.testing.assert_close(p.detach(), q.detach())


def test_an_unpickled_optimizer_takes_new_parameters():
    w = torch.randn(3, requires_grad=True)
    opt = pickle.loads(pickle.dumps(UPGD([w])))
    fresh = opt.param_groups[0]["params"][0]
    fresh.grad = torch.ones(3)
    opt.step()
    assert opt.state[fresh]["step"] == 1


def test_load_state_dict_keeps_the_noise_generator():
    # torch's load_state_dict goes through __setstate__; the generator is not part of a state_dict
    w = torch.zeros(4, requires_grad=True)
    opt = UPGD([w], sigma=0.5, generator=torch.Generator().manual_seed(1))
    w.grad = torch.ones(4)
    opt.step()
    generator = opt.generator
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.generator is generator


def _one_buffer(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` as views into one flat buffer, back to back (a flat parameter)."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameters_in_one_buffer_step_like_separate_ones(variant):
    separate = _params(4)
    flat = [p.requires_grad_() for p in _one_buffer(separate)]
    assert _contiguous_view(flat) is not None and _contiguous_view(separate) is None  # the in-place path runs
    opts = [UPGD(ps, variant=variant, generator=torch.Generator().manual_seed(2), **HYPER) for ps in (separate, flat)]
    grads = torch.Generator().manual_seed(9)
    for step in range(8):
        drawn = [torch.randn(p.shape, generator=grads, dtype=p.dtype) for p in separate]
        for p, g in zip(separate, drawn, strict=True):
            p.grad = g.clone()
        for p, g in zip(flat, _one_buffer(drawn), strict=True):
            p.grad = g
        if step == 5:  # tensors that leave the buffer: the step must follow them, not the stale buffer
            flat[1].data = flat[1].data.clone()
            flat[2].grad = flat[2].grad.clone()
        for opt in opts:
            opt.step()
        for a, b in zip(separate, flat, strict=True):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_steps_inside_and_outside_inference_mode_mix(foreach):
    # the learner steps in inference mode; its state must stay updatable by a step outside it
    inside, outside = _params(6), _params(6)
    opts = [UPGD(ps, variant="adaptive", foreach=foreach, generator=torch.Generator().manual_seed(3), **HYPER)
            for ps in (inside, outside)]
    grads = torch.Generator().manual_seed(4)
    for step in range(4):
        drawn = [torch.randn(p.shape, generator=grads, dtype=p.dtype) for p in inside]
        for ps in (inside, outside):
            for p, g in zip(ps, drawn, strict=True):
                p.grad = g.clone()
        with torch.inference_mode(step < 2):
            opts[0].step()
        opts[1].step()
    assert not any(v.is_inference() for s in opts[0].state.values() for v in s.values() if torch.is_tensor(v))
    for a, b in zip(inside, outside, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
