"""setuptools entry (metadata in setup.cfg): ships ``trainer_guard_autoload.pth`` into site-packages.

The .pth (:data:`trainer_guard.startup.PTH_LINE`) is written by ``build_py``: into the build directory of a normal
wheel (its root is site-packages), and for ``pip install -e .`` (PEP 660 editable wheel, whose build directory is
not installed) into the root of the editable wheel being assembled.
"""

import os
import runpy

from setuptools import setup
from setuptools.command.build_py import build_py


def _pth() -> tuple[str, str]:
    """(file name, line) as trainer_guard/startup.py defines them (read without importing the package)."""
    startup = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer_guard", "startup.py"))
    return startup["PTH_FILE"], startup["PTH_LINE"]


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        name, line = _pth()
        target = self.build_lib
        if getattr(self, "editable_mode", False):  # editable_wheel sets install_lib to the wheel's root
            target = self.get_finalized_command("install").install_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, name), "w") as f:
            f.write(line)


setup(cmdclass={"build_py": BuildPyWithPth})
