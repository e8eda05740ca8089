"""Build guard callbacks from a YAML file (``configs/default.yaml``) or a dict.

The file is a mapping from guard name to its options (or ``true`` / ``false``); ``enabled: false`` turns a guard
off. Files are read with ``yaml.safe_load`` and no name in them is ever imported or executed: guard names are
looked up in :data:`trainer_guard.callbacks.GUARDS`. Every problem in a file is collected and raised as ONE
:class:`~trainer_guard.errors.ConfigError`.

Example:
    >>> from trainer_guard.config import callbacks_from_dict
    >>> [type(c).__name__ for c in callbacks_from_dict({"tied_weights": {"fix_config": True}})]
    ['TiedWeightsGuard']
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml

from .callbacks.base import coerce_options
from .errors import ConfigError

__all__ = ["callbacks_from_yaml", "callbacks_from_dict", "validate_config", "load_config", "default_config_path"]


def _guards() -> dict[str, type]:
    from .callbacks import GUARDS

    return GUARDS


def validate_config(cfg: Any) -> list[str]:
    """Every problem in config mapping ``cfg`` (empty list when valid)."""
    from .callbacks.base import option_problems

    guards = _guards()
    valid = ", ".join(guards)
    if cfg is None:
        return []
    if not isinstance(cfg, Mapping):
        return [f"the top level must be a mapping of guard names to options, got {type(cfg).__name__}"]
    problems = []
    for name, opts in cfg.items():
        if name not in guards:
            problems.append(f"unknown guard {name!r}; valid guards: {valid}")
            continue
        if isinstance(opts, bool) or opts is None:
            continue
        if not isinstance(opts, Mapping):
            problems.append(f"{name}: expected a mapping of options or true/false, got {opts!r}")
            continue
        opts = dict(opts)
        enabled = opts.pop("enabled", True)
        if not isinstance(enabled, bool):
            problems.append(f"{name}.enabled: got {enabled!r} ({type(enabled).__name__}); expected true or false")
        problems.extend(option_problems(guards[name], opts, name))
    return problems


def load_config(path: str | os.PathLike) -> dict:
    """Read a YAML config with ``yaml.safe_load`` (no validation)."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file such as "
                          f"configs/default.yaml") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {str(path)!r} is a directory; pass the path of a YAML file") from None


def _merge(cfg: dict, overrides: Mapping[str, Any]) -> dict:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}
    for name, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(name), Mapping):
            out[name].update(value)
        else:
            out[name] = dict(value) if isinstance(value, Mapping) else value
    return out


def callbacks_from_dict(cfg: Mapping[str, Any] | None, source: str = "config", **overrides: Any) -> list:
    """Instantiate the enabled guards of ``cfg`` in the library's canonical order.

    Args:
        cfg: ``{guard_name: {option: value} | bool}``.
        source: how to name the config in error messages.
        **overrides: same shape as ``cfg``; merged over it (``tied_weights={"fix_config": False}``).

    Raises:
        ConfigError: listing every problem, with the valid guards / options / values.
    """
    problems = validate_config(cfg)
    if not problems:
        cfg = _merge(dict(cfg or {}), overrides)
        problems = validate_config(cfg)
    if problems:
        raise ConfigError(f"Invalid trainer_guard {source}:\n  - " + "\n  - ".join(problems))
    guards = _guards()
    callbacks = []
    for name, cls in guards.items():
        if name not in cfg:
            continue
        opts = cfg[name]
        if opts is False:
            continue
        opts = dict(opts) if isinstance(opts, Mapping) else {}
        if not opts.pop("enabled", True):
            continue
        callbacks.append(cls(**coerce_options(cls, opts)))
    return callbacks


def callbacks_from_yaml(path: str | os.PathLike | None = None, **overrides: Any) -> list:
    """Read ``path`` with ``yaml.safe_load`` and return the enabled guard callbacks.

    ``path=None`` reads the default config shipped inside the package (the same file as ``configs/default.yaml``
    in the repository). A guard a file does not name is off.

    Example:
        >>> import trainer_guard
        >>> [type(c).__name__ for c in trainer_guard.callbacks_from_yaml()][:2]
        ['TiedWeightsGuard', 'DtypeGuard']
        >>> cbs = trainer_guard.callbacks_from_yaml("my_guards.yaml", integrity={"verify": "readback"})  # doctest: +SKIP
    """
    if path is None:
        path = default_config_path()
    return callbacks_from_dict(load_config(path), source=f"config {str(path)!r}", **overrides)


def default_config_path() -> str:
    """Path of the packaged default config (the same file as ``configs/default.yaml`` in the repository)."""
    from importlib import resources

    return str(resources.files("trainer_guard") / "data" / "default.yaml")
