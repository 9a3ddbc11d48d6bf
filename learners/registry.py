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


def build_model(config: dict[str, Any] | None = None) -> Any:
    """Build an estimator from a config dict.

    Keys: ``task`` ("classification" | "regression"), ``learner`` ("river" picks a River estimator
    by ``estimator`` name with ``params``; ``preprocess`` (default True) puts a scaler/one-hot
    encoder in front of it).

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
    learner = config.pop("learner", "river")
    if learner == "river":
        default = "linear_model.LogisticRegression" if task == "classification" else "linear_model.LinearRegression"
        estimator = _river_estimator(config.pop("estimator", default), config.pop("params", {}))
        return _with_preprocessing(estimator) if config.pop("preprocess", True) else estimator
    raise ValueError(f"learner: unknown learner {learner!r}")
