"""The one place that replaces a ``Trainer``'s own methods, so guards can act where no callback event fires.

A ``TrainerCallback`` first hears of a run at ``on_train_begin``: after the Trainer loaded a checkpoint's weights,
built the optimizer and loaded its state (where a changed trainable set dies with a bare ValueError), and it hears
nothing of ``trainer.save_model(dir)``. :func:`wire` replaces six methods on ONE Trainer instance (never the class),
once, and each replacement fires a hook on every guard of that Trainer:

============================  ==========================================================================
hook                          fired
============================  ==========================================================================
``resolve_resume``            ``trainer.train(resume_from_checkpoint=...)`` called, first: a guard may
                              return another checkpoint to resume from (``None``: keep it)
``before_train``              right after, with the checkpoint resolved, before anything loads
``before_weights_load``       ``_load_from_checkpoint(checkpoint, model)``: before the weights load
``after_weights_load``        right after it, before the optimizer exists
``before_optimizer_create``   ``create_optimizer()``: before the optimizer is built
``before_optimizer_load``     ``_load_optimizer_and_scheduler(checkpoint)``: before its state loads
``after_save_model``          ``trainer.save_model(dir)`` by the user (not the checkpoint saves: ``on_save``)
============================  ==========================================================================

Guards fire in the fixed order of :data:`trainer_guard.callbacks.GUARDS` (other :class:`GuardHooks` after them, in
callback order), whatever the order of the Trainer's callback list; only guards that are callbacks of the Trainer
at that moment fire (a ``remove_callback`` stops a guard's hooks). A guard wires its Trainer itself at
``on_init_end`` (:func:`wire_calling_trainer`); :func:`trainer_guard.guard` wires explicitly, for guards added with
``add_callback`` after the Trainer was built. The one class-level replacement is :func:`auto_guard`'s
``Trainer.__init__`` (zero-code activation, :mod:`trainer_guard.startup`): it only adds guards to ``callbacks``.

Example:
    >>> from trainer_guard.callbacks import hooks
    >>> trainer = hooks.wire(Trainer(model=model, args=args, callbacks=[ResumeGuard()]))  # doctest: +SKIP
    >>> hooks.is_wired(trainer)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, Optional

from ..log import logger

__all__ = ["HOOKS", "auto_guard", "GuardHooks", "fire", "guards_of", "is_wired", "set_order", "wire", "wire_calling_trainer"]


HOOKS = ("resolve_resume", "before_train", "before_weights_load", "after_weights_load", "before_optimizer_create",
         "before_optimizer_load", "after_save_model")

_MARK = "_trainer_guard_hooks"  # the one "already wired" marker, in the Trainer instance's __dict__
_ORDER: dict[type, int] = {}  # guard class -> position (set_order, from GUARDS)
_warned_unfound = False


class GuardHooks:
    """The hooks a guard may implement; each does nothing unless overridden. ``trainer`` is the Trainer whose
    method fired it; every hook runs on every rank that runs the method."""

    def resolve_resume(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        """``trainer.train(resume_from_checkpoint)`` was called (``True``, a path or ``None``, as given, or as an
        earlier guard resolved it): return the checkpoint to resume from instead, or ``None`` to keep it."""
        return None

    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> None:
        """``trainer.train(resume_from_checkpoint)`` was called (``True``, a path or ``None``, as given, or as
        ``resolve_resume`` resolved it)."""

    def before_weights_load(self, trainer: Any, checkpoint: str, model: Any) -> None:
        """The Trainer is about to load ``checkpoint``'s weights (``model``: the wrapped model FSDP loads into, or
        ``None`` for ``trainer.model``)."""

    def after_weights_load(self, trainer: Any, checkpoint: str, model: Any) -> None:
        """The Trainer loaded ``checkpoint``'s weights; the optimizer is not built/loaded yet."""

    def before_optimizer_create(self, trainer: Any) -> None:
        """``trainer.create_optimizer()`` is about to run (``trainer.optimizer`` may already be set)."""

    def before_optimizer_load(self, trainer: Any, checkpoint: Optional[str]) -> None:
        """The Trainer is about to load the optimizer and scheduler state of ``checkpoint`` (``None``: nothing)."""

    def after_save_model(self, trainer: Any, output_dir: str) -> None:
        """``trainer.save_model(output_dir)`` (a user's final save) wrote ``output_dir``."""


def set_order(classes: Iterable[type]) -> None:
    """Fire hooks of these guard classes in this order (``GUARDS`` registers itself; called once at import)."""
    _ORDER.clear()
    _ORDER.update({cls: i for i, cls in enumerate(classes)})


def guards_of(trainer: Any) -> list[GuardHooks]:
    """``trainer``'s callbacks that implement hooks, in ``GUARDS`` order (others after, in callback order)."""
    handler = getattr(trainer, "callback_handler", None)
    mine = [cb for cb in getattr(handler, "callbacks", ()) if isinstance(cb, GuardHooks)]
    return sorted(mine, key=lambda cb: _ORDER.get(type(cb), len(_ORDER)))  # stable: ties keep callback order


def fire(trainer: Any, hook: str, *args: Any) -> None:
    """Call ``hook(trainer, *args)`` on each of :func:`guards_of` ``(trainer)``, in order."""
    for guard in guards_of(trainer):
        getattr(guard, hook)(trainer, *args)


def is_wired(trainer: Any) -> bool:
    """Whether :func:`wire` replaced ``trainer``'s methods."""
    return _MARK in getattr(trainer, "__dict__", {})


def wire(trainer: Any) -> Any:
    """Replace ``trainer``'s methods (instance attributes; once per Trainer) so they fire the guard hooks; also call
    ``wire(trainer)`` once on each other callback that has one (the protocol :func:`trainer_guard.guard` offers).
    Idempotent; returns ``trainer``."""
    wired = trainer.__dict__.get(_MARK)
    if wired is None:
        wired = trainer.__dict__[_MARK] = []  # the non-guard callbacks whose own wire() ran
        _replace_methods(trainer)
    handler = getattr(trainer, "callback_handler", None)
    # the callbacks themselves, not their id()s: a removed, freed callback's id is reused by the next object
    for cb in list(getattr(handler, "callbacks", ())):
        own = getattr(cb, "wire", None)
        if not isinstance(cb, GuardHooks) and callable(own) and not any(w is cb for w in wired):
            own(trainer)
            wired.append(cb)
    return trainer


def _replace_methods(trainer: Any) -> None:
    """Replace each of the Trainer's methods below that it has (a stand-in may lack some) by one firing hooks."""

    def train(original):
        def train(resume_from_checkpoint: Any = None, *a: Any, **kw: Any):
            guards = guards_of(trainer)
            if guards:
                logger.info(f"trainer_guard: {len(guards)} guards active: "
                            f"{', '.join(type(g).__name__ for g in guards)}")
            for guard in guards_of(trainer):  # each may replace the checkpoint (True -> the newest complete one)
                resolved = guard.resolve_resume(trainer, resume_from_checkpoint)
                resume_from_checkpoint = resume_from_checkpoint if resolved is None else resolved
            fire(trainer, "before_train", resume_from_checkpoint)
            return original(resume_from_checkpoint, *a, **kw)
        return train

    def _load_from_checkpoint(original):
        def _load_from_checkpoint(resume_from_checkpoint: Any, model: Any = None, *a: Any, **kw: Any):
            fire(trainer, "before_weights_load", resume_from_checkpoint, model)
            out = original(resume_from_checkpoint, model, *a, **kw)
            fire(trainer, "after_weights_load", resume_from_checkpoint, model)
            return out
        return _load_from_checkpoint

    def create_optimizer(original):
        def create_optimizer(*a: Any, **kw: Any):
            fire(trainer, "before_optimizer_create")
            return original(*a, **kw)
        return create_optimizer

    def _load_optimizer_and_scheduler(original):
        def _load_optimizer_and_scheduler(checkpoint: Any, *a: Any, **kw: Any):
            fire(trainer, "before_optimizer_load", checkpoint)
            return original(checkpoint, *a, **kw)
        return _load_optimizer_and_scheduler

    def save_model(original):
        def save_model(output_dir: Any = None, _internal_call: bool = False):
            out = original(output_dir, _internal_call)
            if not _internal_call:  # checkpoints: on_save fires after the whole checkpoint is written
                fire(trainer, "after_save_model", os.fspath(output_dir or trainer.args.output_dir))
            return out
        return save_model

    for replace in (train, _load_from_checkpoint, create_optimizer, _load_optimizer_and_scheduler, save_model):
        original = getattr(trainer, replace.__name__, None)
        if callable(original):
            setattr(trainer, replace.__name__, replace(original))


def calling_trainer(callback: Any, depth: int = 40) -> Any:
    """The object up the call stack whose ``callback_handler`` holds ``callback`` (the Trainer whose ``__init__``
    fires ``on_init_end``, whatever its subclass), or ``None``."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "__dict__", {}).get("callback_handler")  # no getattr on arbitrary objects
        if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", ())):
            return owner
        frame = frame.f_back
    return None


def wire_calling_trainer(callback: GuardHooks) -> Any:
    """Wire the Trainer that is firing an event on ``callback`` (see :func:`calling_trainer`); return it. When it
    cannot be found and ``callback`` implements a hook, warn once (per process) to wire it with
    ``trainer_guard.guard(trainer)``."""
    global _warned_unfound
    trainer = calling_trainer(callback)
    if trainer is not None:
        return wire(trainer)
    if not _warned_unfound and any(getattr(type(callback), h) is not getattr(GuardHooks, h) for h in HOOKS):
        _warned_unfound = True
        logger.warning(f"trainer_guard: {type(callback).__name__} could not find the Trainer it belongs to, so its "
                       f"checks before the Trainer's checkpoint loads and of save_model() do not run; call "
                       f"trainer = trainer_guard.guard(trainer) after building the Trainer")
    return None


_AUTO = "_trainer_guard_auto"


def auto_guard(trainer_cls: type, make_callbacks: Callable[[], list]) -> None:
    """Zero-code activation (:mod:`trainer_guard.startup`): every ``trainer_cls`` built from now on, subclasses
    included, gets ``make_callbacks()`` added to its ``callbacks`` before its ``__init__`` runs (so the guards wire
    it at ``on_init_end`` as if the user had passed them), unless one of its callbacks already is a guard. The one
    class-level replacement: ``trainer_cls.__init__``, once (idempotent)."""
    init = trainer_cls.__init__
    if getattr(init, _AUTO, False):
        return
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind_partial(self, *args, **kwargs)
        given = list(bound.arguments.get("callbacks") or ())
        if not any(isinstance(cb, GuardHooks) or (isinstance(cb, type) and issubclass(cb, GuardHooks))
                   for cb in given):
            bound.arguments["callbacks"] = given + list(make_callbacks())
        init(*bound.args, **bound.kwargs)

    setattr(__init__, _AUTO, True)
    trainer_cls.__init__ = __init__
