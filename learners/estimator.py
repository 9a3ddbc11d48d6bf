"""The recommended learner: encoder → backbone → Kalman head, as River estimators.

:class:`KalmanClassifier` and :class:`KalmanRegressor` are River mini-batch estimators
(``learn_one``/``predict_one``/``predict_proba_one``/``learn_many``/``predict_many``/
``predict_proba_many``) and implement :class:`learners.protocol.StreamModel` natively
(``learn_batch``/``predict_batch``/``predict_proba_batch`` on lists of feature dicts,
``snapshot``, ``notify_drift``, ``diagnostics``).

One learning step on a micro-batch (``learn_one`` is a batch of one):

1. encode the rows as they were predicted (the encoder's scalers move after);
2. φ = backbone(x); predictive of the head *before* it sees the labels (weights drifted by γⁿ).
   When the batch was just predicted (the same rows, nothing learned in between), the first
   chunk's features and what the backward pass needs are the prediction's: no second forward;
3. loss = negative log predictive probability of the labels through the head (categorical, with
   the probit-adjusted softmax, for classification; Gaussian for regression); one optimizer step
   on the backbone (UPGD by default) per ``grad_batch`` rows, the learning-rate schedule observes
   each loss; the head's inverse temperature takes a normalised gradient step on the same loss;
4. Kalman update of the head with the (detached) features of step 2; γ and σ² adapt inside.

Defaults (what ``build_model`` returns) were chosen on ``bench/quality.py``: UPGD (adaptive
variant) at ``lr=1e-2`` under the shift-aware schedule, a 64-wide two-layer MLP (one layer scored
0.8385 / 0.7976 in accuracy / throughput mode, two 0.8533 / 0.8061) whose features alone feed the
head (passing the 160-wide encoding through as well made the head's covariance
225×225 for no accuracy: 0.8370 vs 0.8398 in accuracy mode, 0.7983 vs 0.7977 in throughput
mode), 32 numeric slots + 128 hashed buckets and no categorical crosses (crossing the first 8
categorical keys scored 0.8515 / 0.8055 against 0.8580 / 0.8120 without: on Agrawal the crosses of
high-cardinality keys filled the 128 buckets with collisions, and no stream gained from them),
learned γ and σ², no EMA serving weights (the head is fitted to the live backbone's features, so
EMA features lost 3.7 points of accuracy in the ablation).

Every part has its plain counterpart for ablations: ``optimizer`` (upgd | sgd | adam | adamw),
``learn_gamma``, ``head`` (kalman | softmax, a linear layer trained by the optimizer),
``lr_schedule`` (shift_aware | constant | wsd | infinite), ``ema`` (decay of the serving weights,
0 = off) and ``depth`` (0 = no backbone: a linear model on the encoded features).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from river import base
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from learners.backbone import Backbone
from learners.encoder import FeatureEncoder
from learners.kalman import (
    HeadLoss,
    KalmanHead,
    _NormalisedStep,
    categorical_head_loss,
    gaussian_head_loss,
    log_probit_softmax_logits,
)
from learners.protocol import ModelDiverged, ProbaRows

_OPTIMIZERS = ("upgd", "upgd_global", "upgd_local", "upgd_nonprotecting", "sgd", "adam", "adamw")
_SCHEDULES = ("shift_aware", "constant", "wsd", "infinite")
_HEADS = ("kalman", "softmax")
_DIVERGED = ("the learner diverged: its weights are not finite (streamlearn_learner_diverged); "
             "restore an earlier checkpoint")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if not isinstance(device, str):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None


def _step_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, skipping torch's wrapper around it when nothing would notice: the
    wrapper's profiler range and hook loops cost ~40 µs a call, a quarter of a UPGD step on the
    learner's backbone (four steps per 256-row batch). With a step hook registered (globally or on
    this optimizer) or the profiler on, the wrapped step runs, hooks and profiler range included."""
    step = type(optimizer).step
    if (getattr(step, "hooked", False) and not _global_optimizer_pre_hooks and not _global_optimizer_post_hooks
            and not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
            and not torch.autograd.profiler._is_profiler_enabled):
        step.__wrapped__(optimizer)
    else:
        optimizer.step()


def _make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float, seed: int, device):
    if name.startswith("upgd") and name in _OPTIMIZERS:
        from learners.upgd import UPGD

        # "upgd" is AdaUPGD (Adam moments inside the gate): on bench/quality.py it beat the SGD-like
        # global variant by a point at the same budget; the SGD-like variants want larger rates
        variant = "adaptive" if name == "upgd" else name.removeprefix("upgd_")
        gen = torch.Generator(device=device).manual_seed(seed)
        # the perturbation is read from a pool of normals: a fresh draw was a third of each step
        return UPGD(params, lr=lr, weight_decay=weight_decay, variant=variant,
                    sigma=1e-3 if variant == "adaptive" else 1e-2, generator=gen, noise_pool=1 << 18)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: expected one of {_OPTIMIZERS}, got {name!r}")


def _make_schedule(name: str, optimizer: torch.optim.Optimizer, lr: float):
    """``lr`` is the peak rate; schedules that settle somewhere settle at ``lr / 10`` (never 0)."""
    from learners import schedules

    if name == "shift_aware":
        return schedules.ShiftAwareLR(optimizer, lr_max=lr, lr_min=lr / 10)
    if name == "constant":
        return schedules.ConstantLR(optimizer, lr=lr)
    if name == "wsd":
        return schedules.WarmupStableDecayLR(optimizer, lr=lr, min_lr=lr / 10)
    if name == "infinite":
        return schedules.InfiniteLR(optimizer, lr=lr, constant_lr=lr / 10)
    raise ValueError(f"lr_schedule: expected one of {_SCHEDULES}, got {name!r}")


class LearnerDiverged(ModelDiverged):
    """The learner's weights are not finite."""


def weights_finite(net: nn.Module, head: KalmanHead | None) -> bool:
    """Every weight of the feature network and of the Kalman head (if any) is finite."""
    tensors = [*net.parameters(), *((head.M, head.A) if isinstance(head, KalmanHead) else ())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def most_probable(classes: list, P: np.ndarray) -> list:
    """Each row's most probable class (the first on ties); None for every row before any class."""
    return [classes[i] for i in P.argmax(axis=1).tolist()] if classes else [None] * len(P)


class KalmanPredictor:
    """Prediction with an encoder, a feature network and a head (live parts or frozen copies).

    :meth:`KalmanClassifier.snapshot` returns one holding copies, which later learning does not
    touch: it is what the service publishes to its HTTP readers.
    """

    def __init__(self, task: str, encoder: FeatureEncoder, net: nn.Module, head: Any, classes: list,
                 scale: float, y_mean: float, y_std: float, device: torch.device,
                 keep_features: Callable[[np.ndarray, torch.Tensor, list], None] | None = None):
        self.task = task
        # the live learner's view hands the features of what it predicts (encoded matrix, φ, the
        # backward pass's tape) to the learner, which learns the same rows next
        self.keep_features = keep_features
        self.encoder = encoder
        self.net = net
        self.head = head
        self.classes = classes
        self.scale = scale
        self.y_mean = y_mean
        self.y_std = y_std
        self.device = device

    @torch.inference_mode()
    def outputs(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n×K) or regression means (n,), from an encoded matrix.

        Raises :class:`LearnerDiverged` when the weights are not finite (every output would be
        NaN), and ``FloatingPointError`` when only some rows' outputs are (extreme features):
        callers get an error to act on, never NaN probabilities."""
        x = torch.from_numpy(X).to(self.device)
        phi = None
        if self.keep_features is not None:
            phi, tape = self.net["backbone"].forward_for_backward(x)
            self.keep_features(X, phi, tape)
        out = self._outputs(x, phi)
        if not bool(torch.isfinite(out).all()):
            if not weights_finite(self.net, self.head):
                raise LearnerDiverged(_DIVERGED)
            raise FloatingPointError("prediction: not finite for these features (extreme values?)")
        return out.cpu().numpy()

    def _outputs(self, x: torch.Tensor, phi: torch.Tensor | None = None) -> torch.Tensor:
        if phi is None:
            phi = self.net["backbone"](x)
        K = len(self.classes)
        if isinstance(self.head, KalmanHead):
            mean, var = self.head.predict(phi)
            if self.task == "regression":  # float64: targets may lie beyond float32's range
                return mean[:, 0].to(torch.float64) * self.y_std + self.y_mean
            # float64 softmax: probabilities that sum to 1 within double precision (River checks)
            logits = log_probit_softmax_logits(mean, var, self.scale).to(torch.float64)
            out = torch.softmax(logits, dim=1) if K else mean
        else:
            logits = self.net["linear"](phi)
            if self.task == "regression":
                return logits[:, 0].to(torch.float64) * self.y_std + self.y_mean
            out = torch.softmax(logits[:, :K], dim=1) if K else logits[:, :0]
        return out.to(torch.float64)

    def predict_proba_batch(self, xs: Sequence[dict]) -> list[dict[Hashable, float]]:
        return self._probas(self.outputs(self.encoder.encode(xs)))

    def predict_with_proba_batch(self, xs: Sequence[dict]) -> tuple[list[Any], list[dict[Hashable, float]]]:
        """The labels and the probabilities, from one pass (see :func:`learners.protocol.score`)."""
        P = self.outputs(self.encoder.encode(xs))
        return most_probable(self.classes, P), self._probas(P)

    def _probas(self, P: np.ndarray) -> ProbaRows:
        P.flags.writeable = False  # (one probability per class by construction)
        return ProbaRows(P, self.classes)

    def predict_batch(self, xs: Sequence[dict]) -> list[Any]:
        out = self.outputs(self.encoder.encode(xs))
        return out.tolist() if self.task == "regression" else most_probable(self.classes, out)


# the smallest value each numeric setting may take
_LOWEST = {"hidden": 1, "depth": 0, "grad_batch": 1, "max_numeric": 0, "n_buckets": 1, "max_classes": 2,
           "bins": 0, "crosses": 0, "lr": 0.0, "weight_decay": 0.0, "ema": 0.0, "halflife": 1e-9,
           "sigma_w2": 1e-12, "sigma2": 1e-12, "gamma_lr": 0.0}


class _KalmanLearner:
    """Shared machinery of :class:`KalmanClassifier` and :class:`KalmanRegressor`."""

    _task = "classification"
    categories = "hash"  # what a learner pickled before the parameter existed used (its encoder hashes)
    gamma_lr = 1e-3  # likewise (its head keeps stepping γ by 1e-3)

    def __init__(
        self,
        hidden: int = 64,
        depth: int = 2,
        passthrough: bool = False,
        head: str = "kalman",
        optimizer: str = "upgd",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        lr_schedule: str = "shift_aware",
        ema: float = 0.0,
        gamma: float = 1.0,
        learn_gamma: bool = True,
        gamma_min: float = 0.9,
        gamma_lr: float = 5e-4,
        sigma_w2: float = 1.0,
        sigma2: float = 1.0,
        max_numeric: int = 32,
        n_buckets: int = 128,
        categories: str = "vocabulary",
        bins: int = 0,
        crosses: int = 0,
        halflife: float = 2000.0,
        max_classes: int = 64,
        grad_batch: int = 64,
        device: str = "auto",
        seed: int = 42,
    ):
        self.hidden = hidden
        self.depth = depth
        self.passthrough = passthrough
        self.head = head
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.ema = ema
        self.gamma = gamma
        self.learn_gamma = learn_gamma
        self.gamma_min = gamma_min
        self.gamma_lr = gamma_lr
        self.sigma_w2 = sigma_w2
        self.sigma2 = sigma2
        self.max_numeric = max_numeric
        self.n_buckets = n_buckets
        self.categories = categories
        self.bins = bins
        self.crosses = crosses
        self.halflife = halflife
        self.max_classes = max_classes
        self.grad_batch = grad_batch
        self.device = device
        self.seed = seed
        self._build()

    def _build(self) -> None:
        if self.head not in _HEADS:
            raise ValueError(f"head: expected one of {_HEADS}, got {self.head!r}")
        for name, lowest in _LOWEST.items():
            value = getattr(self, name)
            integer = isinstance(lowest, int)
            if isinstance(value, bool) or not isinstance(value, int if integer else int | float) or not value >= lowest:
                raise ValueError(f"{name}: expected {'an integer' if integer else 'a number'} >= {lowest}, "
                                 f"got {value!r}")
        self._device = resolve_device(self.device)
        self._encoder = FeatureEncoder(self.max_numeric, self.n_buckets, halflife=self.halflife, bins=self.bins,
                                       crosses=self.crosses, categories=self.categories)
        regression = self._task == "regression"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = nn.ModuleDict({"backbone": Backbone(self._encoder.width, self.hidden, self.depth, self.passthrough)})
            if self.head == "softmax":
                net["linear"] = nn.Linear(net["backbone"].out_dim, 1 if regression else self.max_classes)
        self._net = net.to(self._device)
        self._kalman = None
        if self.head == "kalman":
            self._kalman = KalmanHead(
                net["backbone"].out_dim, n_outputs=1 if regression else 0, gamma=self.gamma,
                learn_gamma=self.learn_gamma, gamma_min=self.gamma_min, gamma_lr=self.gamma_lr, sigma_w2=self.sigma_w2,
                sigma2=self.sigma2, learn_noise=True, device=self._device,
                # one-hot targets: below ~0.05 the filter would take every label as noiseless
                sigma2_min=1e-6 if regression else 0.05,
                # γ's and σ²'s gradients from the first 32 rows of a batch (the head's default is
                # 64): their steps are normalised, so only the direction counts, and it is as good;
                # bench.quality throughput mode, seeds 42/1/2/3: 0.8110/0.8074/0.8104/0.8084 against
                # 0.8103/0.8069/0.8090/0.8086, 1.02× events/s at 256-row batches
                grad_rows=32,
            )
        params = [p for p in self._net.parameters() if p.requires_grad]
        self._optim = _make_optimizer(self.optimizer, params, self.lr, self.weight_decay, self.seed, self._device) if params else None
        self._schedule = _make_schedule(self.lr_schedule, self._optim, self.lr) if self._optim is not None else None
        self._ema = None
        if self.ema and params:
            from learners.ema import EMAWeights

            self._ema = EMAWeights(self._net, self.ema)
        self._classes: list[Hashable] = []
        self._class_index: dict[Hashable, int] = {}
        self._log_scale = math.log(5.0)  # inverse temperature of the Gaussian logits
        self._scale_step = _NormalisedStep(1e-2)
        self._y_mean, self._y_var, self._y_count = 0.0, 1.0, 0

    # -- StreamModel ------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self._task

    def _view(self) -> KalmanPredictor:
        net = self._ema.module if self._ema is not None else self._net
        # features worth keeping: the live backbone's (not the EMA's), trained through the head
        reusable = self._ema is None and self._kalman is not None and self._optim is not None
        return KalmanPredictor(self._task, self._encoder, net, self._kalman,
                               self._classes, math.exp(self._log_scale), self._y_mean, math.sqrt(self._y_var),
                               self._device, self._keep_predicted_features if reusable else None)

    def _keep_predicted_features(self, X: np.ndarray, phi: torch.Tensor, tape: list) -> None:
        self._predicted_features = (X, phi, tape)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_predicted_features", None)  # a cache of the last prediction, not state
        return state

    def predict_batch(self, xs: Sequence[dict]) -> list[Any]:
        return self._view().predict_batch(xs)

    def predict_proba_batch(self, xs: Sequence[dict]) -> list[dict[Hashable, float]]:
        return self._view().predict_proba_batch(xs)

    def predict_with_proba_batch(self, xs: Sequence[dict]) -> tuple[list[Any], list[dict[Hashable, float]]]:
        return self._view().predict_with_proba_batch(xs)

    def learn_batch(self, xs: Sequence[dict], ys: Sequence[Any]) -> None:
        if len(xs) != len(ys):
            raise ValueError(f"ys: {len(ys)} labels for {len(xs)} rows")
        if len(xs):
            if self.__dict__.get("_weights_diverged"):
                raise LearnerDiverged(_DIVERGED)
            target = self._targets(list(ys))  # validates the labels before any state changes
            try:
                self._learn_encoded(self._encoder.encode(xs, update=True), target)
            except FloatingPointError:
                # the Kalman head met non-finite features; if the weights are gone, so is learning
                # (checked here, not on every batch: the check costs ~0.1 ms): later batches are
                # refused at once, and the service dead-letters them instead of learning garbage
                if not weights_finite(self._net, self._kalman):
                    self._weights_diverged = True
                    raise LearnerDiverged(_DIVERGED) from None
                raise

    def snapshot(self) -> KalmanPredictor:
        net = self._ema.module if self._ema is not None else self._net
        return KalmanPredictor(
            self._task, self._encoder.frozen(), copy.deepcopy(net),
            self._kalman.frozen() if self._kalman is not None else None, list(self._classes),
            math.exp(self._log_scale), self._y_mean, math.sqrt(self._y_var), self._device,
        )

    def notify_drift(self, kind: str, magnitude: float) -> None:
        """A concept-drift alarm goes to the learning-rate schedule (the shift-aware one raises the
        rate by the excess loss it measured itself, so a false alarm does almost nothing). Data and
        prediction drift need no reaction here: the Kalman head's γ already tracks changes in how
        well the current weights predict."""
        if self._schedule is not None and kind == "concept":
            self._schedule.notify_drift(float(magnitude))

    def diagnostics(self) -> dict[str, Any]:
        lr = None
        if self._optim is not None:
            lr = float(self._optim.param_groups[0]["lr"])
        return {
            "learning_rate": lr,
            "kalman_gamma": self._kalman.gamma if self._kalman is not None else None,
            "diverged": not weights_finite(self._net, self._kalman),
        }

    # -- learning ---------------------------------------------------------------------------------
    def _targets(self, ys: list) -> torch.Tensor:
        """One-hot targets (classification, adding new classes) or standardised targets."""
        if self._task == "regression":
            y = np.asarray(ys, dtype=np.float64)
            if not np.isfinite(y).all():
                raise ValueError("y: regression targets must be finite numbers")
            self._update_target_scaler(y)
            return torch.from_numpy((y - self._y_mean) / math.sqrt(self._y_var)).to(self._device).unsqueeze(1)
        index = self._class_index
        try:  # every label already known (they were validated when their class was added);
            # through numpy: torch.tensor on a list of 256 ints takes 60 µs, this 14 µs
            codes = np.fromiter(map(index.__getitem__, ys), dtype=np.int64, count=len(ys))
            return torch.from_numpy(codes).to(self._device)
        except (KeyError, TypeError):
            pass
        new = []  # validated before any class is added, so a bad batch changes nothing
        for y in ys:
            try:
                known = y in index
            except TypeError:
                raise ValueError(f"y: labels must be hashable, got {type(y).__name__}") from None
            if not known:
                if y is None or (isinstance(y, float) and math.isnan(y)):
                    raise ValueError("y: a label is missing (None or NaN)")
                new.append(y)
        new = list(dict.fromkeys(new))
        if len(self._classes) + len(new) > self.max_classes:
            raise ValueError(f"y: more than max_classes={self.max_classes} classes (new: {new[:3]!r}); raise the "
                             "learner's max_classes if the stream really has that many")
        for y in new:
            self._add_class(y)
        return torch.tensor([index[y] for y in ys], device=self._device)

    def _add_class(self, label: Hashable) -> None:
        self._class_index[label] = len(self._classes)
        self._classes.append(label)
        if self._kalman is not None:
            self._kalman.add_outputs(1)

    def _update_target_scaler(self, y: np.ndarray) -> None:
        n = len(y)
        decay = 0.5 ** (n / self.halflife)
        w = max(1.0 - decay, n / (self._y_count + n))
        with np.errstate(over="ignore", invalid="ignore"):
            mu, var = float(y.mean()), float(y.var())
            diff = mu - self._y_mean
            if self._y_count == 0:
                mean, var = mu, max(var, 1e-12)
            else:
                mean = self._y_mean + w * diff
                var = max((1.0 - w) * self._y_var + w * var + w * (1.0 - w) * diff * diff, 1e-12)
        if not (math.isfinite(mean) and math.isfinite(var)):
            # one such target would make every later prediction inf/NaN: refused, nothing changed
            raise ValueError(f"y: targets this large cannot be learned (their spread overflows float64: "
                             f"{float(np.abs(y).max()):.3g} against a running mean of {self._y_mean:.3g})")
        self._y_mean, self._y_var = mean, var
        self._y_count += n

    def _learn_encoded(self, X: np.ndarray, target: torch.Tensor) -> None:
        # the encoder returns the very matrix it gave the last prediction when these are its rows
        # and nothing was learned since (learning clears both): then its features are these rows'
        kept = self.__dict__.pop("_predicted_features", None)
        predicted = kept[1:] if kept is not None and kept[0] is X else None
        # With the Kalman head nothing here needs autograd (closed-form head gradient, written-out
        # backward), so inference mode spares each of the ~600 small operations of a 256-row batch
        # the autograd bookkeeping (version counters, view tracking): 1.09x events/s in-process.
        # Parameters, gradients and optimizer state are created outside it (normal tensors, updated
        # in place); the Kalman head's M and A come out as inference tensors, which is fine because
        # every update replaces them and nothing writes into them.
        with torch.inference_mode() if self._kalman is not None else contextlib.nullcontext():
            self._learn_tensors(torch.from_numpy(X).to(self._device), target, predicted)

    def _learn_tensors(self, x: torch.Tensor, target: torch.Tensor, predicted: tuple | None = None) -> None:
        n = x.shape[0]
        prior = None
        if self._kalman is not None:  # the head's predictive for this batch, before it sees it
            M, A = self._kalman.prior(n)
            prior = (M.to(x.dtype), A.to(x.dtype))
            if self._task == "classification":
                target = F.one_hot(target, len(self._classes)).to(x.dtype)
        if self._optim is None:
            with torch.no_grad():
                phi = self._net["backbone"](x)
            if self._task == "classification" and self._kalman is not None:
                self._step_temperature(self._head_loss(phi, target, prior).d_log_scale)  # still calibrated
        else:
            # one backbone step per ``grad_batch`` rows: a large micro-batch gives as many steps
            # as the same events in small ones; each chunk's features are taken before its step
            parts = []
            backbone = self._net["backbone"]
            for start in range(0, n, self.grad_batch):
                chunk = slice(start, start + self.grad_batch)
                if self._kalman is not None:
                    # the loss gradient w.r.t. the features is closed-form, and the backbone's
                    # backward is written out: no autograd graph at all
                    if start == 0 and predicted is not None:  # the weights the prediction used
                        phi_c = predicted[0][chunk]
                        tape = [tuple(t[chunk] for t in layer) for layer in predicted[1]]
                    else:
                        phi_c, tape = backbone.forward_for_backward(x[chunk])
                    head_loss = self._head_loss(phi_c, target[chunk], prior)
                    backbone.backward_from(tape, head_loss.d_phi)
                    self._step_temperature(head_loss.d_log_scale)
                    schedule_loss = head_loss.schedule_loss
                else:
                    self._optim.zero_grad()
                    phi_c = backbone(x[chunk])
                    loss = self._softmax_loss(phi_c, target[chunk])
                    loss.backward()
                    schedule_loss = float(loss.detach())
                _step_optimizer(self._optim)
                if self._schedule is not None:
                    self._schedule.step(schedule_loss)
                if self._ema is not None:
                    self._ema.update(self._net)
                parts.append(phi_c.detach())
            phi = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self._kalman is not None:
            self._kalman.update(phi, target, loglik=False)

    def _head_loss(self, phi: torch.Tensor, target: torch.Tensor, prior: tuple) -> HeadLoss:
        """Negative log predictive probability of the targets (one-hot rows for classification)
        through the head, before it sees them."""
        M, A = prior
        if self._task == "regression":
            return gaussian_head_loss(phi, target[:, 0].to(phi.dtype), M, A, self._kalman.sigma2)
        return categorical_head_loss(phi, target, M, A, math.exp(self._log_scale))

    def _softmax_loss(self, phi: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The plain head of the ablation: a linear layer trained with the backbone."""
        out = self._net["linear"](phi)
        if self._task == "regression":
            return F.mse_loss(out[:, 0], target[:, 0].to(out.dtype))
        return F.cross_entropy(out[:, : len(self._classes)], target)

    def _step_temperature(self, d_log_scale: float) -> None:
        self._log_scale = min(max(self._log_scale - self._scale_step(d_log_scale), -3.0), 6.0)

    # -- River API ----------------------------------------------------------------------------------
    def learn_one(self, x: dict, y: Any) -> None:
        self.learn_batch([x], [y])

    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        if len(X) != len(y):
            raise ValueError(f"y: {len(y)} labels for {len(X)} rows")
        if len(X):
            target = self._targets(list(y))
            self._learn_encoded(self._encoder.encode_frame(X, update=True), target)

    @property
    def _raw_memory_usage(self) -> int:
        """Bytes of tensors and arrays held (River's memory checks use it)."""
        total = sum(p.numel() * p.element_size() for p in self._net.parameters())
        if self._kalman is not None:
            total += self._kalman.A.numel() * 8 + self._kalman.M.numel() * 8
        total += sum(len(m) for m in self._encoder._cache.values()) * 64
        return total + 64 * len(self._classes)

    @classmethod
    def _unit_test_params(cls):
        yield {"hidden": 8, "n_buckets": 32, "max_numeric": 16}

    def _unit_test_skips(self) -> set[str]:
        # One gradient step per micro-batch is not the same as one step per row (as for River's
        # own gradient-descent linear models).
        return {"check_learn_many_matches_learn_one"}


class KalmanClassifier(_KalmanLearner, base.MiniBatchClassifier):
    """Kalman-filter head on a UPGD-trained backbone, for classification (any hashable labels).

    Parameters
    ----------
    hidden, depth, passthrough
        Width and depth of the MLP backbone; ``passthrough`` also feeds the encoding itself to
        the head. ``depth=0`` means no backbone (linear Kalman model on the encoding).
    head
        ``"kalman"`` or ``"softmax"`` (a linear layer trained by the optimizer; ablation).
    optimizer, lr, weight_decay, lr_schedule
        Backbone optimizer (``"upgd"`` = AdaUPGD, ``"upgd_global"`` | ``"upgd_local"`` |
        ``"upgd_nonprotecting"`` = the SGD-like UPGD variants, ``"sgd"`` | ``"adam"`` | ``"adamw"``) and schedule
        (``"shift_aware"`` | ``"constant"`` | ``"wsd"`` | ``"infinite"``).
    ema
        Decay of the exponential moving average of the backbone used for predictions (0 = off).
    gamma, learn_gamma, gamma_min, gamma_lr
        Per-event drift coefficient of the head: initial value, learned online or fixed, floor,
        and the step (in δ = −2 log γ) of its normalised gradient step. The step sets a floor on
        how close to 1 γ can stay: δ is clamped at 0, so steps of a fixed size around it push γ
        down on average. On ``bench/quality.py`` (accuracy mode, seeds 42/1/2/3) 1e-3 scored
        0.8566/0.8573/0.8565/0.8595, below a fixed γ = 1 (0.8613, seed 42); 5e-4
        0.8638/0.8643/0.8617/0.8650; 3e-4 0.8629/0.8635/0.8609/0.8635; 1e-4 0.8624/0.8620.
        Throughput mode did not move (0.8101 → 0.8103 at seed 42).
    sigma_w2, sigma2
        Prior weight variance and initial observation noise of the head. σ² is learned online
        beside γ: the residual variance of one-hot targets is far below 1, and γ, learned on the
        predictive likelihood, is only meaningful against a calibrated noise level.
    max_numeric, n_buckets, categories, bins, crosses, halflife
        Feature encoder (see :class:`learners.encoder.FeatureEncoder`).
    max_classes
        Most classes the learner takes; a label beyond them is refused. It sizes the softmax
        ablation head; for the Kalman head it guards against a stream whose labels are ids.
    grad_batch
        Rows per backbone gradient step: a micro-batch of 256 makes 4 steps of 64 rows.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    seed
        Seeds the initial weights and UPGD's perturbations.

    Examples
    --------
    >>> from river import datasets, evaluate, metrics
    >>> model = KalmanClassifier(hidden=16, n_buckets=32)  # small, for a quick example
    >>> evaluate.progressive_val_score(datasets.Phishing(), model, metrics.Accuracy())
    Accuracy: 8...%
    >>> proba = model.predict_proba_one({"empty_server_form_handler": 1.0})
    >>> sorted(proba), round(sum(proba.values()), 6)
    ([False, True], 1.0)
    >>> model.learn_one({"colour": "blue"}, "a brand new class")
    >>> sorted(model.predict_proba_one({"colour": "blue"}), key=str)
    [False, True, 'a brand new class']
    """

    def predict_proba_one(self, x: dict) -> dict[Hashable, float]:
        return self.predict_proba_batch([x])[0]

    def predict_one(self, x: dict) -> Any:
        return self.predict_batch([x])[0]

    def predict_proba_many(self, X: pd.DataFrame) -> pd.DataFrame:
        P = self._view().outputs(self._encoder.encode_frame(X))
        return pd.DataFrame(P, index=X.index, columns=list(self._classes))

    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        P = self._view().outputs(self._encoder.encode_frame(X))
        return pd.Series(most_probable(self._classes, P), index=X.index, dtype=None if self._classes else object)

    @property
    def _multiclass(self) -> bool:
        return True


class KalmanRegressor(_KalmanLearner, base.MiniBatchRegressor):
    """Kalman-filter head on a UPGD-trained backbone, for regression (Gaussian predictive).

    The target is standardised online (exponentially weighted, like the features); the head's
    observation noise σ² is learned online beside γ. Parameters as for :class:`KalmanClassifier`.

    Examples
    --------
    >>> from river import datasets, evaluate, metrics
    >>> model = KalmanRegressor(hidden=16, n_buckets=32)
    >>> evaluate.progressive_val_score(datasets.TrumpApproval(), model, metrics.MAE())
    MAE: ...
    """

    _task = "regression"

    def predict_one(self, x: dict) -> float:
        return self.predict_batch([x])[0]

    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        return pd.Series(self._view().outputs(self._encoder.encode_frame(X)), index=X.index)
