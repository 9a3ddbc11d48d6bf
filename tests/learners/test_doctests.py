"""The docstring examples of the learner modules run and say what they show."""

import doctest
import importlib

import pytest

MODULES = ["learners.encoder", "learners.backbone", "learners.kalman", "learners.estimator", "learners.protocol", "learners.registry"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
