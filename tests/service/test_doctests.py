"""The examples in the service modules' docstrings run as written."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["service.codec", "service.ingest", "service.pending", "service.records", "service.runtime"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
