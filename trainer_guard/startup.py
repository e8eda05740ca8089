"""Zero-code activation: ``TRAINER_GUARD_CONFIG=default`` (or a YAML path) guards every ``Trainer`` of a process.

For programs that build the Trainer themselves and take no callbacks (``llamafactory-cli train``, ``trl sft``,
``accelerate launch run_clm.py``). The package installs ``trainer_guard_autoload.pth`` into site-packages (as
coverage's process-start hook does); Python runs its one line at every start, and it imports this module only
when the variable is set, so every process ``accelerate launch`` / ``torchrun`` starts (they inherit the
environment) is guarded too. :func:`install` patches nothing until ``transformers.trainer`` is imported; then
:func:`trainer_guard.callbacks.hooks.auto_guard` makes every Trainer built get the guards of the config (one set
per Trainer; a Trainer given guards already keeps its own).

Example:
    $ TRAINER_GUARD_CONFIG=default trl sft --model_name_or_path ... --output_dir out
    $ TRAINER_GUARD_CONFIG=/path/guards.yaml accelerate launch run_clm.py ...
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any

__all__ = ["ENV", "PTH_FILE", "PTH_LINE", "install", "make_callbacks"]

ENV = "TRAINER_GUARD_CONFIG"
PTH_FILE = "trainer_guard_autoload.pth"
#: the .pth line (site runs lines starting with ``import``); nothing is imported unless the variable is set
PTH_LINE = (f'import os; os.environ.get("{ENV}", "").strip() and '
            f'__import__("trainer_guard.startup").startup.install()\n')
_TARGET = "transformers.trainer"


def make_callbacks() -> list:
    """The guards ``TRAINER_GUARD_CONFIG`` names: ``default`` (or ``1``/``true``) the packaged default config, else
    a YAML path."""
    from .config import callbacks_from_yaml

    value = os.environ.get(ENV, "").strip()
    return callbacks_from_yaml(None if value.lower() in ("default", "1", "true", "yes", "on") else value)


def _patch() -> None:
    from transformers.trainer import Trainer

    from .callbacks import hooks

    hooks.auto_guard(Trainer, make_callbacks)


class _Loader(importlib.abc.Loader):
    """``transformers.trainer``'s own loader, then the patch."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _patch()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... as the real loader
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders give ``transformers.trainer``."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # once; the other finders find the real module
        from importlib.util import find_spec

        spec = find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Guard every Trainer built in this process when ``TRAINER_GUARD_CONFIG`` is set (idempotent)."""
    if not os.environ.get(ENV, "").strip():
        return
    if _TARGET in sys.modules:
        _patch()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
