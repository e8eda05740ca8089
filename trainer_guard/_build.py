"""Build step (setup.cfg ``cmdclass``): ships ``trainer_guard_autoload.pth`` into site-packages. Not used at run time.

The .pth (:data:`trainer_guard.startup.PTH_LINE`) is written by ``build_py``: into the build directory of a normal
wheel (its root is site-packages), and for ``pip install -e .`` (PEP 660 editable wheel, whose build directory is
not installed) into the root of the editable wheel being assembled.
"""

from __future__ import annotations

import os
import runpy

from setuptools.command.build_py import build_py

__all__ = ["BuildPyWithPth"]


class BuildPyWithPth(build_py):
    """``build_py`` that also writes the zero-code activation's ``.pth`` at the root of what gets installed."""

    def run(self) -> None:
        super().run()
        # setuptools loads this file alone, before the package is importable: read startup.py's constants by path
        startup = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "startup.py"))
        name, line = startup["PTH_FILE"], startup["PTH_LINE"]
        target = self.build_lib
        if getattr(self, "editable_mode", False):  # editable_wheel sets install_lib to the wheel's root
            target = self.get_finalized_command("install").install_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, name), "w") as f:
            f.write(line)
