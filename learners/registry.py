"""``build_model``: a config dict to a River-compatible estimator."""

from __future__ import annotations

import importlib
from typing import Any

from river import compose, preprocessing


def _river_estimator(dotted: str, params: dict[str, Any]) -> Any:
    """``"linear_model.LogisticRegression"`` (relative to ``river``) or a full dotted path."""
    module_name, _, class_name = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"learner.estimator: {dotted!r} is not a dotted class path")
    try:
        module = importlib.import_module(module_name if module_name.startswith("river") else f"river.{module_name}")
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"learner.estimator: no River estimator named {dotted!r}") from exc
    return cls(**params)


def _with_preprocessing(estimator: Any) -> Any:
    """Numeric features standardised, strings/bools one-hot encoded, missing values dropped."""
    numeric = compose.SelectType(int, float) | preprocessing.StandardScaler()
    categorical = compose.SelectType(str, bool) | preprocessing.OneHotEncoder()
    return compose.TransformerUnion(numeric, categorical) | estimator


def _kalman_estimator(task: str, settings: dict[str, Any]) -> Any:
    """The recommended learner; ``settings`` are its constructor parameters (unknown keys fail)."""
    import inspect

    from learners.estimator import KalmanClassifier, KalmanRegressor

    cls = KalmanClassifier if task == "classification" else KalmanRegressor
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"learner: unknown setting(s) {unknown} for the kalman learner; allowed: {sorted(allowed)}")
    return cls(**settings)


def build_model(config: dict[str, Any] | None = None) -> Any:
    """Build an estimator from a config dict.

    Keys: ``task`` ("classification" | "regression"), ``learner``: ``"kalman"`` (the default, the
    recommended learner: :class:`learners.estimator.KalmanClassifier` / ``KalmanRegressor``, every
    other key is one of its parameters, e.g. ``device``, ``optimizer``, ``hidden``) or ``"river"``
    (a River estimator by ``estimator`` name with ``params``; ``preprocess`` (default True) puts a
    scaler/one-hot encoder in front of it).

    >>> type(build_model({"task": "regression"})).__name__
    'KalmanRegressor'
    >>> build_model({"task": "classification", "hiden": 8})
    Traceback (most recent call last):
    ...
    ValueError: learner: unknown setting(s) ['hiden'] for the kalman learner; allowed: [...]

    >>> model = build_model({"task": "classification", "learner": "river",
    ...                      "estimator": "linear_model.LogisticRegression"})
    >>> model.learn_one({"x": 1.0, "colour": "red"}, True)
    >>> model.predict_one({"x": 1.0, "colour": "red"})
    True
    """
    config = dict(config or {})
    task = config.pop("task", "classification")
    if task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    learner = config.pop("learner", "kalman")
    if learner == "kalman":
        return _kalman_estimator(task, config)
    if learner == "river":
        default = "linear_model.LogisticRegression" if task == "classification" else "linear_model.LinearRegression"
        estimator = _river_estimator(config.pop("estimator", default), config.pop("params", {}))
        preprocess = config.pop("preprocess", True)
        if config:
            raise ValueError(f"learner: unknown setting(s) {sorted(config)} for a River learner; allowed: "
                             "['estimator', 'params', 'preprocess'] (the estimator's own parameters go in 'params')")
        return _with_preprocessing(estimator) if preprocess else estimator
    raise ValueError(f"learner: unknown learner {learner!r}")
