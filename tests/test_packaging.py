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
