"""Base class shared by every guard: option validation from the ``__init__`` signature, logging, a report.

A guard's options are the keyword arguments of its ``__init__``; their type hints are the schema used both when
a guard is built in Python and when it is built from YAML (:func:`trainer_guard.callbacks_from_yaml`). Allowed
hints: ``bool``, ``int``, ``float``, ``str``, ``typing.Literal[...]``, ``Optional[X]`` and ``Sequence[str]``.
Extra value rules (ranges, cross-field checks) go in :meth:`Guard._check_options`.

Example:
    >>> from typing import Literal
    >>> class MyGuard(Guard):
    ...     name = "my_guard"
    ...     def __init__(self, mode: Literal["raise", "warn"] = "raise", every: int = 1):
    ...         super().__init__(mode=mode, every=every)
    >>> MyGuard(mode="warn").options["mode"]
    'warn'
"""

from __future__ import annotations

import inspect
import json
import os
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Optional

from transformers import TrainerCallback

from ..log import logger
from ..errors import ConfigError
from . import hooks

__all__ = ["Guard", "coerce_options", "option_problems", "option_schema"]


_MISSING = inspect.Parameter.empty


def option_schema(cls: type) -> dict[str, tuple[Any, Any]]:
    """Return ``{option: (type_hint, default)}`` read from ``cls.__init__``."""
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for pname, p in sig.parameters.items():
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[pname] = (hints.get(pname, Any), p.default)
    return out


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(hint) and type(value) in {type(a) for a in typing.get_args(hint)}
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


# YAML 1.1 (what yaml.safe_load reads) takes "1e-3" for a string; YAML 1.2 and every user take it for a number.
_FLOAT_TEXT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _accepts_float(hint: Any) -> bool:
    return hint is float or (typing.get_origin(hint) is typing.Union and float in typing.get_args(hint))


def coerce_options(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as YAML meant them: exponent-notation strings (``"1e-3"``) become floats where the option takes
    one, and a YAML boolean becomes ``"off"`` / ``"on"`` where the option is a choice among those words (YAML 1.1
    reads an unquoted ``off`` as ``False``)."""
    schema = option_schema(cls)
    out = {}
    for k, v in options.items():
        hint = schema[k][0] if k in schema else None
        if hint is not None and _accepts_float(hint) and isinstance(v, str) and _FLOAT_TEXT.match(v):
            v = float(v)
        elif (hint is not None and isinstance(v, bool) and typing.get_origin(hint) is typing.Literal
              and ("on" if v else "off") in typing.get_args(hint)):
            v = "on" if v else "off"
        out[k] = v
    return out


def option_problems(cls: type, options: dict[str, Any], where: str) -> list[str]:
    """Every problem with ``options`` for guard class ``cls``; ``where`` prefixes each message."""
    schema = option_schema(cls)
    options = coerce_options(cls, options)
    problems = []
    for key in options:
        if key not in schema:
            valid = ", ".join(sorted(schema)) or "(none)"
            problems.append(f"{where}: unknown option {key!r}; valid options: {valid}")
    typed_ok = {}
    for key, value in options.items():
        if key not in schema:
            continue
        hint, _ = schema[key]
        if _type_ok(value, hint):
            typed_ok[key] = value
        elif typing.get_origin(hint) is typing.Literal:
            problems.append(f"{where}.{key}: got {value!r}; expected {_describe(hint)}")
        else:
            problems.append(f"{where}.{key}: got {value!r} ({type(value).__name__}); expected {_describe(hint)}")
    full = {k: d for k, (_, d) in schema.items() if d is not _MISSING}
    full.update(typed_ok)
    # value rules see every well-typed option; a badly typed one (already reported) falls back to its default
    problems.extend(f"{where}.{msg}" for msg in cls._check_options(full))
    return problems


def _py(value: Any) -> str:
    return "..." if value is Ellipsis else repr(value)  # ... stands for "a value of yours"


def _yaml(value: Any) -> str:
    """``value`` as a YAML flow scalar or list (what a user types after ``key:``); ``...`` for a value of yours."""
    if value is Ellipsis:
        return "..."
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        return value if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value) else json.dumps(value)
    return repr(value)


class Guard(hooks.GuardHooks, TrainerCallback):
    """A ``TrainerCallback`` with validated options and a short human report of what it did.

    Subclasses set ``name`` (the YAML key) and call ``super().__init__(**options)`` from an ``__init__`` whose
    keyword arguments carry type hints. What must happen where no callback event fires (before the Trainer's
    checkpoint loads, after ``trainer.save_model``) goes in the hook methods of
    :class:`~trainer_guard.callbacks.hooks.GuardHooks`, fired by :mod:`trainer_guard.callbacks.hooks`.

    Raises:
        ConfigError: an option has the wrong type or a bad value; the message lists every problem.
    """

    name: ClassVar[str] = "guard"
    #: set by :func:`trainer_guard.callbacks_from_dict` / ``callbacks_from_yaml`` (the config's description): the
    #: user configured this guard in YAML, so advice names the YAML key (:meth:`advise`)
    from_config: Optional[str] = None

    def __init__(self, **options: Any) -> None:
        problems = option_problems(type(self), options, type(self).__name__)
        if problems:
            raise ConfigError("Invalid options:\n  - " + "\n  - ".join(problems))
        self.options = options
        self.events: list[str] = []

    @classmethod
    def _check_options(cls, options: dict[str, Any]) -> list[str]:
        """Return messages ``"option: problem; what to do"`` for values of the right type but wrong value."""
        return []

    def advise(self, **options: Any) -> str:
        """How to set ``options`` on this guard, in the terms the user configured it in: ``ResumeGuard(mode='fix')``
        in Python, ``resume: {mode: fix}`` in your trainer_guard YAML for a guard built from YAML.

        Example:
            >>> from trainer_guard import ResumeGuard, callbacks_from_dict
            >>> ResumeGuard().advise(mode="fix")
            "ResumeGuard(mode='fix')"
            >>> callbacks_from_dict({"resume": True})[0].advise(mode="fix")
            'resume: {mode: fix} in your trainer_guard YAML'
        """
        if self.from_config is None:
            return f"{type(self).__name__}({', '.join(f'{k}={_py(v)}' for k, v in options.items())})"
        yaml = f"{self.name}: {{{', '.join(f'{k}: {_yaml(v)}' for k, v in options.items())}}}"
        if self.from_config == "axolotl":  # trainer_guard.integrations.axolotl: one key of the axolotl config
            return f"trainer_guard: {{{yaml}}} in your axolotl config"
        return f"{yaml} in your trainer_guard YAML"

    def note(self, message: str, level: str = "info") -> None:
        """Log ``message`` through transformers logging and keep it for :meth:`report`."""
        self.events.append(message)
        getattr(logger, level)(f"[{type(self).__name__}] {message}")

    def write_into_checkpoint(self, args: Any, ckpt: str, write: Callable[[], Any], error: type,
                              what: str) -> Any:
        """Run ``write()`` where the Trainer writes checkpoint ``ckpt`` (``args.should_save``, the directory exists),
        then agree on its outcome on every rank (:func:`trainer_guard._dist.agreed_call`): a full disk on the
        writer stops every rank with the same ``error`` naming ``what`` (the file), instead of leaving the others
        waiting in the next collective. Every rank must call it. Returns ``write()``'s result (``None`` elsewhere)."""
        from .._dist import agreed_call

        return agreed_call(args.should_save and os.path.isdir(ckpt), write, error,
                           f"{what} could not be written; free disk space or fix the output_dir, then resume from "
                           f"the previous checkpoint:")

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Wire the Trainer being built (its ``__init__`` fires this) so it fires the guards' hooks: ``callbacks=[...]``
        alone gives every protection. A subclass overriding ``on_init_end`` calls ``super().on_init_end(...)``."""
        hooks.wire_calling_trainer(self)

    def wire(self, trainer: Any) -> None:
        """Make ``trainer`` fire this guard's hooks (:func:`trainer_guard.callbacks.hooks.wire`; idempotent, one
        wiring per Trainer serves all its guards)."""
        hooks.wire(trainer)

    def is_callback_of(self, trainer: Any) -> bool:
        """Whether this guard is (still) one of ``trainer``'s callbacks. The hooks fire only on those: a guard
        that ``trainer.remove_callback()``/``pop_callback()`` took out stops acting through them."""
        handler = getattr(trainer, "callback_handler", None)
        return handler is None or any(cb is self for cb in handler.callbacks)

    def report(self) -> list[str]:
        """What this guard did so far, one line per action, oldest first."""
        return list(self.events)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"
