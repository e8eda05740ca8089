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

import difflib
import os
from collections.abc import Mapping
from typing import Any

import yaml

from .callbacks.base import coerce_options, option_schema
from .errors import ConfigError

__all__ = ["callbacks_from_yaml", "callbacks_from_dict", "validate_config", "load_config", "default_config_path"]


def _guards() -> dict[str, type]:
    from .callbacks import GUARDS

    return GUARDS


def _did_you_mean(name: Any, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``name``, or ``""``."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6) if isinstance(name, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_config(cfg: Any) -> list[str]:
    """Every problem in config mapping ``cfg`` (empty list when valid); a mistyped name gets a suggestion."""
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
            problems.append(f"unknown guard {name!r}{_did_you_mean(name, list(guards))}; valid guards: {valid}")
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
        schema = sorted(option_schema(guards[name]))
        for key in [k for k in opts if k not in schema]:  # reported here, with a suggestion for a typo
            del opts[key]
            problems.append(f"{name}: unknown option {key!r}{_did_you_mean(key, schema + ['enabled'])}; valid "
                            f"options: {', '.join(schema) or '(none)'}")
        problems.extend(option_problems(guards[name], opts, name))
    return problems


def load_config(path: str | os.PathLike) -> dict:
    """Read a YAML config with ``yaml.safe_load`` (no validation of the guards and options).

    Raises:
        ConfigError: the file is missing or unreadable, not YAML, or gives one key twice in a mapping (YAML would
            silently keep the last one: a guard configured twice, an option that does not apply), or ``path`` is
            not a path (an int would be read as an open file descriptor, and closed).
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ConfigError(f"config path must be the path of a YAML file (str or os.PathLike), got "
                          f"{type(path).__name__}; to pass the guards' options as a mapping, use "
                          f"callbacks_from_dict(...)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
            f.seek(0)
            duplicate = _duplicate_key(yaml.compose(f, Loader=yaml.SafeLoader))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file such as "
                          f"configs/default.yaml") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r} is not a usable config: its YAML is nested too deeply") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {str(path)!r} is a directory; pass the path of a YAML file") from None
    except OSError as e:  # permissions, a symlink loop, a path through a file
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
    if duplicate:
        raise ConfigError(f"config file {str(path)!r}: {duplicate}")
    return cfg or {}


def _duplicate_key(root: yaml.Node | None) -> str | None:
    """The first key given twice in one mapping of a composed YAML document, described with its lines, or None.

    Works on the node graph ``yaml.compose`` builds (nothing is constructed); ``<<`` merge keys, which may be
    overridden on purpose, are not counted.
    """
    todo, seen_nodes = [root] if root is not None else [], set()
    while todo:
        node = todo.pop()
        if id(node) in seen_nodes:  # an alias: the same node again
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    where = first.setdefault((key.tag, key.value), key.start_mark.line + 1)
                    if where != key.start_mark.line + 1:
                        return (f"key {key.value!r} is given twice (lines {where} and {key.start_mark.line + 1}); "
                                f"YAML would keep only the last one: merge them into one entry")
            todo += [n for pair in reversed(node.value) for n in reversed(pair)]  # document order, outer first
        elif isinstance(node, yaml.SequenceNode):
            todo += reversed(node.value)
    return None


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
        guard = cls(**coerce_options(cls, opts))
        guard.from_config = source  # its advice names the YAML key
        callbacks.append(guard)
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
