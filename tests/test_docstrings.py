"""Every ``Example:`` in the package's docstrings runs as written (those needing a Trainer or GPU say
``# doctest: +SKIP``)."""

import doctest
import importlib
import pkgutil

import pytest

import trainer_guard

MODULES = sorted(m.name for m in pkgutil.walk_packages(trainer_guard.__path__, "trainer_guard.")
                 if not m.name.endswith("__main__"))


def test_every_module_is_found():
    assert {"trainer_guard.core.conversion", "trainer_guard.core.checkpoint", "trainer_guard.callbacks.integrity",
            "trainer_guard.config"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run doctest -v)"
