"""Kalman-filter head over features φ(x) ∈ R^m (Titsias et al., ICLR 2024).

State-space model, one time step per event::

    W_t = γ W_{t-1} + N(0, (1 - γ²) σ_w² I)        W ∈ R^{m×K}
    y_t = W_tᵀ φ_t + N(0, σ² I_K)

The K output columns share one m×m covariance A (the covariance update does not depend on the
targets), the mean is M (m×K). A micro-batch of n rows is treated as n steps of drift applied at
once (``γ**n``, variance ``(1 - γ^{2n}) σ_w²``) followed by a joint update, so γ means the same
thing whatever the batch size. Per batch Φ (n×m), targets Y (n×K):

    M⁻ = γⁿ M,  A⁻ = γ²ⁿ A + (1 - γ²ⁿ) σ_w² I,  S = Φ A⁻ Φᵀ + σ² I_n = L Lᵀ
    W  = L⁻¹ Φ A⁻,  M = M⁻ + Wᵀ L⁻¹ (Y - Φ M⁻),  A = A⁻ - Wᵀ W   (then re-symmetrised)

Only triangular solves against the Cholesky factor, never an explicit inverse. Large batches are
cut into chunks of ``max_chunk`` rows, updated one after the other with no drift in between, which
is the same posterior (a batch update equals sequential updates) at O(chunk³) instead of O(n³).

When a batch has many more rows than features (n² > 2m²) the same update is done in weight space,
where every factorisation is m×m and the rows only enter through ΦᵀΦ and ΦᵀY. With
``A⁻ = C Cᵀ`` (Cholesky), ``U = Φ C`` (never formed: ``UᵀU = CᵀΦᵀΦC``) and ``I + UᵀU/σ² = R Rᵀ``::

    A = (C R⁻ᵀ)(C R⁻ᵀ)ᵀ,   M = M⁻ + C R⁻ᵀ R⁻¹ Uᵀ(Y - Φ M⁻) / σ²
    log|S| = n log σ² + 2 Σ log diag R,   eᵀS⁻¹e = (‖e‖² − ‖R⁻¹Uᵀe‖²/σ²) / σ²

(Woodbury and the matrix determinant lemma): the same posterior and likelihood, and A comes out
as a Gram matrix, positive definite by construction.

γ is learned online: before each update, one normalised (RMS-scaled) gradient-ascent step on the
one-step-ahead predictive log-likelihood ``log N(vec Y | vec(Φ M⁻), I_K ⊗ S)`` with respect to
δ, where ``γ = exp(-δ/2)``, ``δ ∈ [0, -2 log γ_min]``. With ``learn_noise`` the observation noise
σ² is learned the same way (through ``log σ²``). A is kept in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

_LOG_2PI = math.log(2.0 * math.pi)


class _NormalisedStep:
    """Adam-style step size for one scalar: ``lr · g / sqrt(E[g²])`` (bias corrected).

    The gradient of a log-likelihood w.r.t. δ swings by orders of magnitude with the batch size,
    the feature scale and the state of the filter; normalising it makes ``lr`` a step in δ units.
    """

    def __init__(self, lr: float, beta: float = 0.99):
        self.lr = lr
        self.beta = beta
        self.sq = 0.0
        self.t = 0

    def __call__(self, grad: float) -> float:
        if not math.isfinite(grad):
            return 0.0
        self.t += 1
        self.sq = self.beta * self.sq + (1.0 - self.beta) * grad * grad
        rms = math.sqrt(self.sq / (1.0 - self.beta**self.t))
        return self.lr * grad / (rms + 1e-12)


class KalmanHead:
    """Multi-output linear-Gaussian filter with a shared covariance and a learned drift γ.

    Parameters
    ----------
    dim
        Feature dimension m.
    n_outputs
        Initial number of output columns K (classes are added with :meth:`add_outputs`).
    gamma
        Initial per-event drift coefficient γ ∈ (0, 1].
    learn_gamma
        Adapt γ online on the predictive log-likelihood (else it stays fixed).
    gamma_min
        Floor on γ.
    gamma_lr
        Step in δ units per update of the normalised gradient step.
    sigma_w2
        Prior (and stationary) variance of each weight.
    sigma2
        Observation noise variance.
    learn_noise
        Adapt σ² online too, by the same normalised step on ``log σ²``.
    sigma2_min
        Floor on the learned σ².
    max_chunk
        Largest block of rows updated jointly. The cost per row is O(m² + chunk·m + chunk²):
        with m ≈ 200 features, 128-row blocks were ~18% faster than 256 (and 64 no faster).
    grad_rows
        Rows of a batch used for the γ/σ² gradient.
    space
        ``"observation"`` (n×n innovation covariance, chunked), ``"weight"`` (m×m) or ``"auto"``:
        weight space when ``n² > 2m²``, where it needs fewer operations. Both give the same
        posterior.
    device
        Torch device of the state.

    Examples
    --------
    >>> import torch
    >>> head = KalmanHead(dim=2, n_outputs=1, sigma2=0.01, learn_gamma=False)
    >>> phi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    >>> loglik = head.update(phi, torch.tensor([[2.0], [-1.0], [1.0]], dtype=torch.float64))
    >>> mean, var = head.predict(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    >>> round(float(mean), 1)   # w ≈ (2, -1) fits all three rows
    0.0
    """

    def __init__(
        self,
        dim: int,
        n_outputs: int = 0,
        gamma: float = 1.0,
        learn_gamma: bool = True,
        gamma_min: float = 0.9,
        gamma_lr: float = 1e-3,
        sigma_w2: float = 1.0,
        sigma2: float = 1.0,
        learn_noise: bool = False,
        sigma2_min: float = 1e-6,
        max_chunk: int = 128,
        grad_rows: int = 64,
        space: str = "auto",
        device: str | torch.device = "cpu",
    ):
        if not 0.0 < gamma <= 1.0 or not 0.0 < gamma_min <= 1.0:
            raise ValueError("gamma and gamma_min must lie in (0, 1]")
        if space not in ("auto", "observation", "weight"):
            raise ValueError(f"space: expected 'auto', 'observation' or 'weight', got {space!r}")
        self.space = space
        self.dim = int(dim)
        self.learn_gamma = bool(learn_gamma)
        self.learn_noise = bool(learn_noise)
        self.sigma_w2 = float(sigma_w2)
        self.max_chunk = int(max_chunk)
        self.grad_rows = int(grad_rows)
        self.delta_max = -2.0 * math.log(gamma_min)
        self.delta = min(-2.0 * math.log(gamma), self.delta_max)
        self.log_sigma2 = math.log(sigma2)
        self.log_sigma2_min = math.log(sigma2_min)
        self._delta_step = _NormalisedStep(gamma_lr)
        self._noise_step = _NormalisedStep(gamma_lr * 5)
        dev = torch.device(device)
        self.M = torch.zeros(self.dim, int(n_outputs), dtype=torch.float64, device=dev)
        self.A = torch.eye(self.dim, dtype=torch.float64, device=dev) * self.sigma_w2
        self.steps = 0

    # -- parameters --------------------------------------------------------------------------
    @property
    def gamma(self) -> float:
        return math.exp(-0.5 * self.delta)

    @property
    def sigma2(self) -> float:
        return math.exp(self.log_sigma2)

    @property
    def n_outputs(self) -> int:
        return self.M.shape[1]

    def add_outputs(self, k: int = 1) -> None:
        """New output columns start at the prior mean 0 (they were 0 for every past target)."""
        self.M = torch.cat([self.M, self.M.new_zeros(self.dim, k)], dim=1)

    # -- prediction ----------------------------------------------------------------------------
    def prior(self, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M⁻, A⁻)`` after ``steps`` events of drift."""
        g = self.gamma**steps
        A = self.A * (g * g)
        A.diagonal().add_((1.0 - g * g) * self.sigma_w2)
        return self.M * g, A

    def predict(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive mean ``φᵀM⁻`` (n×K) and latent variance ``φᵀA⁻φ`` (n,) one event ahead.

        Computed in φ's floating dtype (float32 features: float32 products, half the time of
        float64); the state itself stays float64. The one-step prior in that dtype is kept until
        the state changes (every update replaces M and A), so a run of predictions between two
        updates pays for it once.
        """
        dtype = phi.dtype if phi.is_floating_point() else self.M.dtype
        kept = self.__dict__.get("_predictive")
        if kept is None or kept[0] is not self.M or kept[1] is not self.A or kept[2] != (self.delta, dtype):
            M, A = self.prior(1)
            kept = self._predictive = (self.M, self.A, (self.delta, dtype), M.to(dtype), A.to(dtype))
        M, A, phi = kept[3], kept[4], phi.to(dtype)
        return phi @ M, ((phi @ A) * phi).sum(dim=1)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_predictive", None)  # derived from M, A and δ
        return state

    # -- learning -------------------------------------------------------------------------------
    def update(self, phi: torch.Tensor, Y: torch.Tensor, loglik: bool = True) -> float | None:
        """Learn a batch; returns the predictive log-likelihood per row before the update (None
        with ``loglik=False``, which skips computing it)."""
        Y = Y.detach().to(self.A.dtype)
        n = phi.shape[0]
        if n == 0:
            return 0.0 if loglik else None
        if self.space == "weight" or (self.space == "auto" and n * n > 2 * self.dim * self.dim):
            return self._update_weight_space(phi.detach(), Y, loglik)
        phi = phi.detach().to(self.A.dtype)
        if n > self.max_chunk:
            total = 0.0
            for start in range(0, n, self.max_chunk):
                part = self._update_block(phi[start : start + self.max_chunk], Y[start : start + self.max_chunk],
                                          steps=n if start == 0 else 0, loglik=loglik)
                if loglik:
                    total += part * min(self.max_chunk, n - start)
            return total / n if loglik else None
        return self._update_block(phi, Y, steps=n, loglik=loglik)

    def _update_block(self, phi: torch.Tensor, Y: torch.Tensor, steps: int, loglik: bool) -> float | None:
        n, K = Y.shape
        APt = self.A @ phi.T  # m×n
        F = phi @ self.M  # ΦM
        if steps and (self.learn_gamma or self.learn_noise) and K > 0:
            # the gradient needs O(rows³); a leading block of ``grad_rows`` rows is an unbiased
            # estimate of the per-observation gradient and the normalised step only uses its scale
            r = min(n, self.grad_rows)
            head = phi[:r]
            self._adapt(head @ APt[:, :r], head @ head.T, F[:r], Y[:r], steps)
        g = self.gamma**steps
        g2 = g * g
        # A⁻Φᵀ first, then S = Φ(A⁻Φᵀ) + σ²I: one n×n product instead of ΦAΦᵀ and ΦΦᵀ apart
        G = (APt * g2).add_(phi.T, alpha=(1.0 - g2) * self.sigma_w2)
        S = phi @ G
        S.diagonal().add_(self.sigma2)
        L = self._cholesky(S)
        Z = torch.linalg.solve_triangular(L, Y - g * F, upper=False)  # L⁻¹(Y - ΦM⁻)
        value = None
        if loglik:
            logdet = 2.0 * torch.log(torch.diagonal(L)).sum()
            value = float(-0.5 * ((Z * Z).sum() + K * logdet + n * K * _LOG_2PI)) / n
        W = torch.linalg.solve_triangular(L, G.T, upper=False)  # n×m
        A = self.A * g2
        A.diagonal().add_((1.0 - g2) * self.sigma_w2)
        A.addmm_(W.T, W, alpha=-1.0)
        self.A = 0.5 * (A + A.T)
        if K:
            self.M = self.M * g + W.T @ Z
        self.steps += n
        return value

    def _update_weight_space(self, phi: torch.Tensor, Y: torch.Tensor, loglik: bool) -> float | None:
        n, K = Y.shape
        dtype = self.A.dtype
        if (self.learn_gamma or self.learn_noise) and K > 0:
            head = phi[: self.grad_rows].to(dtype)
            self._adapt(head @ self.A @ head.T, head @ head.T, head @ self.M, Y[: head.shape[0]], n)
        # The rows enter only through ΦᵀΦ and ΦᵀY (UᵀU = CᵀΦᵀΦC, Uᵀe = Cᵀ(ΦᵀY − ΦᵀΦM⁻)): two
        # products over the n rows instead of four (ΦC, UᵀU, ΦM⁻, Uᵀe), every other one m×m. Φᵀ
        # is laid out contiguously, in the state's dtype, by one copy: ΦᵀΦ as Φᵀ(Φᵀ)ᵀ is the
        # fastest form of the product on a CPU (5,000 × 65 in float64: 1.1 ms, 1.4 as Φᵀ @ Φ).
        phi_t = torch.empty((phi.shape[1], n), dtype=dtype, device=phi.device).copy_(phi.T)
        gram = phi_t @ phi_t.T
        phi_y = phi_t @ Y
        M, A = self.prior(n)
        C = self._cholesky(A)
        s2 = self.sigma2
        inner = C.T @ gram @ C
        inner.div_(s2).diagonal().add_(1.0)
        R = self._cholesky(inner)
        residual = phi_y - gram @ M  # Φᵀ(Y − ΦM⁻)
        Z = torch.linalg.solve_triangular(R, C.T @ residual, upper=False)  # R⁻¹Uᵀe, m×K
        value = None
        if loglik:
            logdet = n * math.log(s2) + 2.0 * torch.log(torch.diagonal(R)).sum()
            # ‖e‖² = ‖Y‖² − 2⟨M⁻, ΦᵀY⟩ + ⟨M⁻, ΦᵀΦM⁻⟩ (float64: no cancellation worth the name)
            sq = (Y * Y).sum() - (M * (phi_y + residual)).sum()
            quad = (sq - (Z * Z).sum() / s2) / s2
            value = float(-0.5 * (quad + K * logdet + n * K * _LOG_2PI)) / n
        V = torch.linalg.solve_triangular(R, C.T, upper=False)  # R⁻¹Cᵀ: A = VᵀV
        A = V.T @ V
        self.A = 0.5 * (A + A.T)
        if K:
            self.M = M + (V.T @ Z) / s2
        self.steps += n
        return value

    def _adapt(self, P1, P0, F, Y, steps) -> None:
        grads = self.loglik_gradients(P1, P0, F, Y, steps)
        if grads is None:  # no gradient to follow (and nothing changes, not even the step sizes' state)
            return
        grad_delta, grad_log_s2 = grads
        if self.learn_gamma:
            self.delta = min(max(self.delta + self._delta_step(grad_delta), 0.0), self.delta_max)
        if self.learn_noise:
            # batches under 16 rows move σ² at the per-event rate of 16-row batches: on one-hot
            # targets the Gaussian likelihood is misspecified and pulls σ² down, so 16× more steps
            # per event at batch 1 would let σ² collapse and the filter overreact to every label
            rate = min(max(steps / 16.0, 1.0 / 16.0), 1.0)
            step = self._noise_step(grad_log_s2) * rate
            self.log_sigma2 = min(max(self.log_sigma2 + step, self.log_sigma2_min), 6.0)

    def loglik_gradients(self, P1, P0, F, Y, steps) -> tuple[float, float] | None:
        """∂/∂δ and ∂/∂log σ² of the predictive log-likelihood per scalar observation; None when
        the predictive covariance S has no Cholesky factor (rounding, or non-finite features).

        With ``S = g²P1 + (1-g²)σ_w²P0 + σ²I``, ``R = Y - gF``, ``α = S⁻¹R`` and ``g = γⁿ``:
        ``∂ll/∂θ = -tr(αᵀ ∂R) + ½ tr(αᵀ ∂S α) - ½ K tr(S⁻¹ ∂S)`` with ``∂S/∂g = 2g(P1 - σ_w²P0)``,
        ``∂R/∂g = -F``, ``∂g/∂δ = -n g / 2`` and ``∂S/∂log σ² = σ²I``. S⁻¹ is formed once from
        the Cholesky factor (the rows are few: ``grad_rows``), and every trace is an elementwise
        sum with it.
        """
        g = self.gamma**steps
        g2 = g * g
        s2 = self.sigma2
        S = P0.mul((1.0 - g2) * self.sigma_w2).add_(P1, alpha=g2)
        S.diagonal().add_(s2)
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            return None
        K = Y.shape[1]
        S_inv = torch.cholesky_inverse(L)
        alpha = S_inv @ torch.sub(Y, F, alpha=g)
        dS = torch.sub(P1, P0, alpha=self.sigma_w2).mul_(2.0 * g)
        d_g = (alpha * F).sum() + 0.5 * ((dS @ alpha) * alpha).sum() - 0.5 * K * (S_inv * dS).sum()
        d_s = 0.5 * s2 * ((alpha * alpha).sum() - K * S_inv.diagonal().sum())
        d_g, d_s = torch.stack((d_g, d_s)).tolist()
        if self.steps == 0:
            # the state is still the stationary prior (M = 0, A = σ_w² I), which drift leaves as it
            # is: the likelihood does not depend on γ, and d_g is rounding noise (±1e-16) that the
            # normalised step would turn into a full step of γ_lr, in a direction set by rounding
            d_g = 0.0
        return d_g * (-0.5 * steps * g) / Y.numel(), (d_s if self.learn_noise else 0.0) / Y.numel()

    @staticmethod
    def _cholesky(S: torch.Tensor) -> torch.Tensor:
        """Cholesky factor of a covariance that rounding may have left slightly indefinite: the
        smallest jitter that works is added, up to 1 % of the mean variance. Beyond that, or with
        non-finite entries (features from a diverged backbone), S is no covariance and this raises
        ``FloatingPointError`` rather than search for a jitter that cannot exist."""
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) == 0:
            return L
        if not bool(torch.isfinite(S).all()):
            raise FloatingPointError("kalman head: non-finite covariance (the features are not finite: "
                                     "has the backbone diverged?)")
        scale = float(S.diagonal().abs().mean())
        jitter = 1e-10 * scale
        while 0.0 < jitter <= 1e-2 * scale:  # (a zero diagonal gets no jitter: it is refused below)
            S = S + jitter * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
            L, info = torch.linalg.cholesky_ex(S)
            if int(info) == 0:
                return L
            jitter *= 10.0
        raise FloatingPointError("kalman head: the covariance is not positive definite, even with jitter")

    # -- utilities --------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> KalmanHead:
        self.M = self.M.to(device)
        self.A = self.A.to(device)
        return self

    def frozen(self) -> KalmanHead:
        """A copy with cloned tensors, for a read-only snapshot."""
        new = object.__new__(KalmanHead)
        new.__dict__.update(self.__getstate__())
        new.M = self.M.clone()
        new.A = self.A.clone()
        return new


def probit_softmax(mean: torch.Tensor, var: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Class probabilities from Gaussian logits ``N(scale·mean, scale²·var)`` (var shared per row).

    The probit-style approximation ``E[softmax(f)] ≈ softmax(μ / sqrt(1 + π/8 · v))`` shrinks the
    logits of uncertain rows towards uniform; ``scale`` is an inverse temperature learned online
    on the categorical log-likelihood (regression on one-hot targets gives logits in ~[0, 1]).
    """
    return torch.softmax(log_probit_softmax_logits(mean, var, scale), dim=-1)


def log_probit_softmax_logits(mean: torch.Tensor, var: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """The adjusted logits of :func:`probit_softmax` (feed them to ``cross_entropy``)."""
    return scale * mean / torch.sqrt(1.0 + (math.pi / 8.0) * scale * scale * var).unsqueeze(-1)


class HeadLoss(NamedTuple):
    """A predictive loss through the head and its gradients (the head's state held fixed)."""

    loss: float        # mean over rows
    d_phi: torch.Tensor  # ∂loss/∂φ (n×m)
    d_log_scale: float   # ∂loss/∂log(inverse temperature); 0 for regression
    schedule_loss: float  # what a learning-rate schedule should observe (a nonnegative excess loss)


def categorical_head_loss(phi: torch.Tensor, onehot: torch.Tensor, M: torch.Tensor, A: torch.Tensor,
                          scale: float) -> HeadLoss:
    """Mean cross-entropy of one-hot targets under :func:`probit_softmax` of the head's predictive.

    The gradients are written out rather than taken by autograd: with ``ν = 1 + (π/8)s²v``,
    ``z = s·μ·ν^{-½}`` and ``r = softmax(z) − onehot`` (divided by n), ``∂/∂μ = r·s·ν^{-½}``,
    ``∂/∂v = −(π/16)s²ν^{-1}·Σ_k r_k z_k`` and ``∂/∂log s = Σ r·z·ν^{-1}``; ``μ = φᵀM`` and
    ``v = φᵀAφ`` (A symmetric) give ``∂/∂φ = (∂/∂μ)Mᵀ + 2(∂/∂v)Aφ``. A dozen tensor operations
    instead of the three dozen autograd nodes of the same expression.
    """
    n = phi.shape[0]
    c = (math.pi / 8.0) * scale * scale
    Aphi = phi @ A
    inv_nu = (Aphi * phi).sum(dim=1).mul_(c).add_(1.0).reciprocal_()
    z_scale = inv_nu.sqrt().mul_(scale).unsqueeze(1)
    logits = (phi @ M).mul_(z_scale)
    logp = torch.log_softmax(logits, dim=1)
    loss = -float((logp * onehot).sum()) / n
    r = logp.exp_().sub_(onehot).div_(n)
    rz = (r * logits).sum(dim=1).mul_(inv_nu)
    d_phi = torch.addmm(Aphi.mul_(rz.mul(-c).unsqueeze(1)), r.mul_(z_scale), M.T)
    return HeadLoss(loss, d_phi, float(rz.sum()), loss)


def gaussian_head_loss(phi: torch.Tensor, target: torch.Tensor, M: torch.Tensor, A: torch.Tensor,
                       sigma2: float) -> HeadLoss:
    """Mean Gaussian negative log predictive density ``½[(t − μ)²/τ + log τ]``, ``τ = v + σ²``
    (constant dropped), with ``∂/∂μ = −(t − μ)/τ`` and ``∂/∂v = ½(1/τ − (t − μ)²/τ²)`` (over n).
    The schedule observes the squared error (in standardised units), an excess over a noise floor.
    """
    n = phi.shape[0]
    Aphi = phi @ A
    tau = (Aphi * phi).sum(dim=1).add_(sigma2)
    err = target - (phi @ M)[:, 0]
    sq = err * err
    loss = float(0.5 * (sq / tau + torch.log(tau)).sum()) / n
    d_mean = (-err / tau).div_(n)
    d_var = (1.0 / tau - sq / (tau * tau)).mul_(0.5 / n)
    d_phi = torch.addmm(Aphi.mul_(2.0 * d_var.unsqueeze(1)), d_mean.unsqueeze(1), M.T)
    return HeadLoss(loss, d_phi, 0.0, float(sq.mean()))
