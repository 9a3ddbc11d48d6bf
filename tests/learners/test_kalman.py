"""The Kalman head against closed forms: Bayesian linear regression, the full Kronecker filter."""

from __future__ import annotations

import math
import pickle
import statistics

import pytest
import torch

from learners.kalman import (
    KalmanHead,
    categorical_head_loss,
    gaussian_head_loss,
    log_probit_softmax_logits,
    probit_softmax,
)

f64 = torch.float64


def _data(n, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g, dtype=f64), torch.randn(n, k, generator=g, dtype=f64)


def test_gamma_one_equals_batch_bayesian_linear_regression():
    phi, Y = _data(n=60, m=6, k=3, seed=0)
    s_w2, s2 = 0.7, 0.3
    head = KalmanHead(6, 3, gamma=1.0, learn_gamma=False, sigma_w2=s_w2, sigma2=s2)
    head.update(phi[:25], Y[:25])
    head.update(phi[25:], Y[25:])
    precision = phi.T @ phi / s2 + torch.eye(6, dtype=f64) / s_w2
    cov = torch.linalg.inv(precision)
    torch.testing.assert_close(head.A, cov, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(head.M, cov @ phi.T @ Y / s2, rtol=1e-8, atol=1e-10)
    mean, var = head.predict(phi[:4])
    torch.testing.assert_close(mean, phi[:4] @ cov @ phi.T @ Y / s2, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var, ((phi[:4] @ cov) * phi[:4]).sum(1), rtol=1e-9, atol=1e-12)


def _kronecker_filter(batches, m, k, gamma, s_w2, s2):
    """The textbook Kalman filter on vec(W) ∈ R^{mk} (column-major: W[:, j] is block j)."""
    mean = torch.zeros(m * k, dtype=f64)
    cov = torch.eye(m * k, dtype=f64) * s_w2
    for phi, Y in batches:
        n = phi.shape[0]
        g = gamma**n
        mean = g * mean
        cov = g * g * cov + (1 - g * g) * s_w2 * torch.eye(m * k, dtype=f64)
        H = torch.kron(torch.eye(k, dtype=f64), phi)  # (nk × mk): vec(ΦW) = (I_k ⊗ Φ) vec(W)
        S = H @ cov @ H.T + s2 * torch.eye(n * k, dtype=f64)
        gain = cov @ H.T @ torch.linalg.inv(S)
        mean = mean + gain @ (Y.T.reshape(-1) - H @ mean)
        cov = cov - gain @ H @ cov
    return mean.reshape(k, m).T, cov


def test_shared_covariance_filter_equals_full_kronecker_filter():
    m, k, gamma, s_w2, s2 = 4, 3, 0.97, 1.3, 0.5
    batches = [_data(n, m, k, seed) for seed, n in enumerate([1, 5, 3, 8, 2])]
    head = KalmanHead(m, k, gamma=gamma, learn_gamma=False, sigma_w2=s_w2, sigma2=s2)
    for phi, Y in batches:
        head.update(phi, Y)
    mean, cov = _kronecker_filter(batches, m, k, gamma, s_w2, s2)
    torch.testing.assert_close(head.M, mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.kron(torch.eye(k, dtype=f64), head.A), cov, rtol=1e-9, atol=1e-10)


def test_batch_and_one_by_one_updates_agree():
    phi, Y = _data(n=40, m=5, k=2, seed=3)
    batch = KalmanHead(5, 2, learn_gamma=False, sigma2=0.2, space="observation")
    chunked = KalmanHead(5, 2, learn_gamma=False, sigma2=0.2, space="observation", max_chunk=7)
    weight = KalmanHead(5, 2, learn_gamma=False, sigma2=0.2, space="weight")
    single = KalmanHead(5, 2, learn_gamma=False, sigma2=0.2)
    loglik = batch.update(phi, Y)
    # the joint predictive likelihood factorises into the sequential one-step-ahead ones
    assert chunked.update(phi, Y) == pytest.approx(loglik, rel=1e-10)
    assert weight.update(phi, Y) == pytest.approx(loglik, rel=1e-10)
    assert sum(single.update(phi[i : i + 1], Y[i : i + 1]) for i in range(40)) / 40 == pytest.approx(loglik, rel=1e-10)
    for other in (chunked, weight, single):
        torch.testing.assert_close(other.M, batch.M, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(other.A, batch.A, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("space", ["observation", "weight"])
def test_both_update_spaces_learn_gamma_and_noise_alike(space):
    """With γ and σ² learned, the two spaces take the same adaptation steps (same rows, same state)."""
    heads = {s: KalmanHead(6, 2, gamma=0.99, sigma2=0.5, space=s) for s in ("observation", "weight")}
    for h in heads.values():
        h.learn_noise = True
    for seed in range(5):
        phi, Y = _data(n=50, m=6, k=2, seed=10 + seed)
        for h in heads.values():
            h.update(phi, Y)
    h, ref = heads[space], heads["observation"]
    assert h.gamma == pytest.approx(ref.gamma, rel=1e-9) and h.sigma2 == pytest.approx(ref.sigma2, rel=1e-9)
    assert h.gamma != pytest.approx(0.99, abs=1e-3) and h.sigma2 != pytest.approx(0.5, rel=1e-2)  # both moved
    torch.testing.assert_close(h.M, ref.M, rtol=1e-8, atol=1e-10)


def test_new_outputs_start_at_the_prior_and_match_a_filter_that_had_them_all_along():
    phi, Y = _data(n=30, m=4, k=3, seed=4)
    Y[:10, 2] = 0.0  # the third class did not exist for the first 10 rows: its target was 0
    late = KalmanHead(4, 2, learn_gamma=False)
    late.update(phi[:10], Y[:10, :2])
    late.add_outputs(1)
    late.update(phi[10:], Y[10:])
    full = KalmanHead(4, 3, learn_gamma=False)
    full.update(phi[:10], Y[:10])
    full.update(phi[10:], Y[10:])
    torch.testing.assert_close(late.M, full.M)


def test_covariance_stays_symmetric_positive_definite_over_1e5_steps():
    g = torch.Generator().manual_seed(5)
    head = KalmanHead(3, 2, gamma=1.0, learn_gamma=False, sigma2=0.05)
    drifting = KalmanHead(3, 2, gamma=0.999, learn_gamma=True, sigma2=0.05)
    steps, batch = 100_000, 25
    phis = torch.randn(steps // batch, batch, 3, generator=g, dtype=f64)
    phis[:, :, 2] *= 1e-3  # a badly scaled direction makes the conditioning worse
    Ys = torch.randn(steps // batch, batch, 2, generator=g, dtype=f64)
    for phi, Y in zip(phis, Ys, strict=True):
        head.update(phi, Y)
        drifting.update(phi, Y)
    for h in (head, drifting):
        assert torch.equal(h.A, h.A.T)
        assert float(torch.linalg.eigvalsh(h.A).min()) > 0.0
        assert torch.isfinite(h.M).all()
    assert head.steps == steps


def _simulate(gamma_true, steps, m=4, s2=0.1, seed=0):
    """y_t = w_tᵀφ_t + noise with w_t = γ w_{t-1} + N(0, (1-γ²) I): the head's own model."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, 1, generator=g, dtype=f64)
    phis = torch.randn(steps, 1, m, generator=g, dtype=f64)
    drift = torch.randn(steps, m, 1, generator=g, dtype=f64) * math.sqrt(1 - gamma_true**2)
    noise = torch.randn(steps, 1, 1, generator=g, dtype=f64) * math.sqrt(s2)
    head = KalmanHead(m, 1, sigma2=s2, sigma_w2=1.0, gamma_min=0.5)
    trace = []
    for t in range(steps):
        w = gamma_true * w + drift[t]
        head.update(phis[t], phis[t] @ w + noise[t])
        trace.append(head.gamma)
    return trace


@pytest.mark.parametrize("gamma_true", [0.99, 0.95])
def test_learned_gamma_recovers_the_true_drift(gamma_true):
    trace = _simulate(gamma_true, steps=6000)
    assert abs(statistics.mean(trace[-1500:]) - gamma_true) < 0.01


def test_gamma_stays_near_one_on_a_stationary_stream():
    trace = _simulate(1.0, steps=4000)
    assert statistics.mean(trace[-1000:]) > 0.995


def test_gamma_respects_its_floor():
    head = KalmanHead(2, 1, gamma_min=0.97, sigma2=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):  # targets unrelated to the past: the filter wants to forget everything
        head.update(torch.randn(1, 2, generator=g, dtype=f64), 10 * torch.randn(1, 1, generator=g, dtype=f64))
    assert head.gamma >= 0.97 - 1e-12


def test_probit_softmax_shrinks_uncertain_logits_towards_uniform():
    mean = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=f64)
    p = probit_softmax(mean, torch.tensor([0.0, 100.0], dtype=f64), scale=4.0)
    torch.testing.assert_close(p.sum(1), torch.ones(2, dtype=f64))
    assert p[0, 0] > p[1, 0] > 0.5


def test_closed_form_gradients_match_autograd():
    phi, Y = _data(n=7, m=4, k=3, seed=6)
    head = KalmanHead(4, 3, gamma=0.9, learn_noise=True, sigma_w2=0.8, sigma2=0.4)
    head.update(*_data(n=5, m=4, k=3, seed=7))
    A, M, n = head.A, head.M, phi.shape[0]
    delta = torch.tensor(head.delta, dtype=f64, requires_grad=True)
    log_s2 = torch.tensor(head.log_sigma2, dtype=f64, requires_grad=True)
    g = torch.exp(-0.5 * n * delta)
    S = phi @ (g**2 * A + (1 - g**2) * 0.8 * torch.eye(4, dtype=f64)) @ phi.T + torch.exp(log_s2) * torch.eye(n, dtype=f64)
    ll = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=f64), S).log_prob((Y - g * phi @ M).T).sum() / Y.numel()
    ll.backward()
    d_delta, d_log_s2 = head.loglik_gradients(phi @ A @ phi.T, phi @ phi.T, phi @ M, Y, n)
    assert d_delta == pytest.approx(float(delta.grad), rel=1e-9)
    assert d_log_s2 == pytest.approx(float(log_s2.grad), rel=1e-9)


def _head_state(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, m, generator=g, dtype=f64)
    return torch.randn(m, k, generator=g, dtype=f64), B @ B.T / m + 0.1 * torch.eye(m, dtype=f64)


def test_categorical_head_loss_gradients_match_autograd():
    phi, _ = _data(n=9, m=5, k=1, seed=8)
    M, A = _head_state(5, 4, seed=9)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    ours = categorical_head_loss(phi, torch.nn.functional.one_hot(target, 4).to(f64), M, A, scale=3.0)
    x = phi.clone().requires_grad_()
    log_s = torch.tensor(math.log(3.0), dtype=f64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        log_probit_softmax_logits(x @ M, ((x @ A) * x).sum(1), torch.exp(log_s)), target)
    loss.backward()
    assert ours.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    torch.testing.assert_close(ours.d_phi, x.grad, rtol=1e-10, atol=1e-12)
    assert ours.d_log_scale == pytest.approx(float(log_s.grad), rel=1e-10)


def test_gaussian_head_loss_gradients_match_autograd():
    phi, Y = _data(n=9, m=5, k=1, seed=10)
    M, A = _head_state(5, 1, seed=11)
    ours = gaussian_head_loss(phi, Y[:, 0], M, A, sigma2=0.3)
    x = phi.clone().requires_grad_()
    total = ((x @ A) * x).sum(1) + 0.3
    loss = 0.5 * (((Y[:, 0] - (x @ M)[:, 0]) ** 2) / total + torch.log(total)).mean()
    loss.backward()
    assert ours.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    torch.testing.assert_close(ours.d_phi, x.grad, rtol=1e-10, atol=1e-12)
    assert ours.schedule_loss == pytest.approx(float(((Y[:, 0] - phi @ M[:, 0]) ** 2).mean()), rel=1e-12)


def test_predictions_follow_every_update_and_dtype():
    # predict keeps the one-step prior between updates; it must never serve a stale one
    head = KalmanHead(4, 2, gamma=0.97, learn_noise=True)
    phi, Y = _data(n=30, m=4, k=2, seed=11)
    for start in range(0, 30, 10):
        for dtype in (torch.float32, torch.float64, torch.float32):
            mean, var = head.predict(phi[:5].to(dtype))
            M, A = head.prior(1)
            x = phi[:5]
            torch.testing.assert_close(mean, (x @ M).to(dtype))
            torch.testing.assert_close(var, ((x @ A) * x).sum(dim=1).to(dtype))
        head.update(phi[start : start + 10], Y[start : start + 10])
    head.add_outputs(1)
    assert head.predict(phi[:5])[0].shape == (5, 3)
    assert "_predictive" not in pickle.loads(pickle.dumps(head)).__dict__


@pytest.mark.parametrize("space", ["observation", "weight"])
def test_skipping_the_loglik_learns_the_same(space):
    phi, Y = _data(n=60, m=4, k=2, seed=12)
    full = KalmanHead(4, 2, gamma=0.98, learn_noise=True, space=space, max_chunk=16)
    lean = KalmanHead(4, 2, gamma=0.98, learn_noise=True, space=space, max_chunk=16)
    for start in range(0, 60, 20):
        assert isinstance(full.update(phi[start : start + 20], Y[start : start + 20]), float)
        assert lean.update(phi[start : start + 20], Y[start : start + 20], loglik=False) is None
    torch.testing.assert_close(lean.M, full.M, rtol=0, atol=0)
    torch.testing.assert_close(lean.A, full.A, rtol=0, atol=0)
    assert (lean.delta, lean.log_sigma2) == (full.delta, full.log_sigma2)


@pytest.mark.timeout(30)  # the jitter search used to loop for ever on a NaN
@pytest.mark.parametrize("rows", [4, 300], ids=["observation space", "weight space"])
def test_non_finite_features_raise_and_leave_the_head_as_it_was(rows):
    head = KalmanHead(6, n_outputs=2)
    phi, y = _data(rows, 6, 2, seed=3)
    head.update(phi, y)
    state = pickle.dumps(head)
    phi[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        head.update(phi, y)
    assert pickle.dumps(head) == state


def test_a_matrix_no_jitter_can_make_positive_definite_is_refused():
    assert torch.allclose(KalmanHead._cholesky(torch.eye(3, dtype=f64) - 1e-14), torch.eye(3, dtype=f64), atol=1e-6)
    with pytest.raises(FloatingPointError, match="not positive definite"):
        KalmanHead._cholesky(-torch.eye(3, dtype=f64))
    with pytest.raises(FloatingPointError, match="not positive definite"):
        KalmanHead._cholesky(torch.zeros(3, 3, dtype=f64))
