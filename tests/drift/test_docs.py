"""The docstring examples of drift/ run and hold (they are part of the documentation)."""

import doctest
import importlib

import pytest

MODULES = ["calibration", "cbpe", "data_drift", "detectors", "mcbpe", "metrics", "monitor"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"drift.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"drift.{name} has no runnable example"
    assert result.failed == 0
