"""One error base: every exception class modelbake defines is a ModelbakeError, so the CLI (and a service)
catches the project's refusals in one place; the parity gate says which of its three checks failed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np
import pytest

import modelbake
from modelbake.errors import ModelbakeError, first_line


def test_every_exception_class_of_the_package_has_the_one_base() -> None:
    defined = []
    for info in pkgutil.walk_packages(modelbake.__path__, "modelbake."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        defined += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__
        ]
    assert len(defined) >= 10, defined
    assert [cls.__qualname__ for cls in defined if not issubclass(cls, ModelbakeError)] == []


def test_the_parity_gate_names_which_check_failed() -> None:
    from modelbake.producers.onnx_export import NonFiniteOutput, ShapeMismatch, compare

    ref = [np.ones((2, 4), np.float32)]
    with pytest.raises(ShapeMismatch):
        compare(ref, [np.ones((2, 5), np.float32)])
    with pytest.raises(NonFiniteOutput):
        compare(ref, [np.full((2, 4), np.inf, np.float32)])


def test_first_line_keeps_one_line_and_bounds_it() -> None:
    exc = ValueError("the first line\n" + "x" * 1000)
    assert first_line(exc) == "ValueError: the first line"
    assert first_line(ValueError("y" * 400), with_type=False) == "y" * 300 + "..."
    assert first_line(KeyError(), with_type=False) == "KeyError"
