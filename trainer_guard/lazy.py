"""Public names that load on first use (PEP 562), for a package whose import must stay light (no torch).

Example:
    >>> import types
    >>> pkg = types.ModuleType("demo_pkg")
    >>> pkg.__getattr__, pkg.__dir__ = lazy_exports(pkg.__dict__, {"sqrt": "math"})
    >>> pkg.sqrt(4.0)
    2.0
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(namespace: dict[str, Any], table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for a module whose globals are ``namespace``: public name -> the module that
    defines it (relative to the package, e.g. ``".checksum.disk"``, or absolute), imported on first access and
    cached in ``namespace``."""
    package = namespace.get("__name__")

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *namespace.get("__all__", table)})

    return __getattr__, __dir__
