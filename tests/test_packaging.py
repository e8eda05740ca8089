"""What `pip install trainer_guard` (a wheel, not the editable checkout) ships: every module and the default config.

A sub-directory without ``__init__.py`` is a namespace package that ``packages = find:`` leaves out of the wheel:
the editable install used by the tests still imports it, so only this test notices.
"""

import os

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_source_directory_is_a_package_the_wheel_includes():
    found = set(find_packages(ROOT, include=["trainer_guard*"]))
    with_code = {os.path.relpath(d, ROOT).replace(os.sep, ".")
                 for d, _, files in os.walk(os.path.join(ROOT, "trainer_guard"))
                 if "__pycache__" not in d and any(f.endswith(".py") for f in files)}
    assert with_code - found == set(), "add an __init__.py to these directories"


def test_default_config_ships_inside_the_package():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert "data/*.yaml" in cfg["options.package_data"]["trainer_guard"]
    data = os.path.join(ROOT, "trainer_guard", "data", "default.yaml")
    with open(data, encoding="utf-8") as f, open(os.path.join(ROOT, "configs", "default.yaml"), encoding="utf-8") as g:
        assert f.read() == g.read()


def test_every_public_name_loads_lazily_and_resolves():
    """``trainer_guard`` imports its names on first use (PEP 562): each one in ``__all__`` must still resolve."""
    import trainer_guard
    from trainer_guard import errors

    assert set(errors.__all__) <= set(vars(trainer_guard))  # the errors are light: imported eagerly
    for name in trainer_guard.__all__:
        assert getattr(trainer_guard, name) is not None, name
    assert set(trainer_guard.__all__) <= set(dir(trainer_guard))
    namespace = {}
    exec("from trainer_guard import *", namespace)
    assert set(trainer_guard.__all__) <= set(namespace)
    assert namespace["TiedWeightsGuard"] is trainer_guard.callbacks.tied_weights.TiedWeightsGuard
    from trainer_guard.demo import default_config_path  # re-exported lazily there too

    assert default_config_path is trainer_guard.default_config_path


def test_unknown_attribute_is_an_attribute_error_naming_it():
    import pytest

    import trainer_guard

    with pytest.raises(AttributeError, match="'trainer_guard' has no attribute 'NoSuchGuard'"):
        trainer_guard.NoSuchGuard
    assert not hasattr(trainer_guard, "NoSuchGuard")
    with pytest.raises(ImportError, match="NoSuchGuard"):
        exec("from trainer_guard import NoSuchGuard", {})
