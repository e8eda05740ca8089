"""``guard(trainer)``: the one extra step that lets guards act before the Trainer loads its optimizer.

A ``TrainerCallback`` first hears of a run at ``on_train_begin``, after the Trainer has built the optimizer and
loaded its state from a checkpoint (where a changed trainable set dies with a bare ValueError). A guard that must
act earlier implements ``wire(trainer)``; :func:`guard` calls it, once, for every callback of the Trainer.

Example:
    >>> import trainer_guard
    >>> callbacks = [trainer_guard.ResumeGuard()]
    >>> trainer = trainer_guard.guard(Trainer(model=model, args=args, callbacks=callbacks))  # doctest: +SKIP
    >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TypeVar

from .errors import UsageError

__all__ = ["guard"]

T = TypeVar("T")

_WIRED_ATTR = "_trainer_guard_wired"


def guard(trainer: T) -> T:
    """Call ``wire(trainer)`` once on each callback in ``trainer.callback_handler`` that has it; return ``trainer``.

    Idempotent: calling it again wires only callbacks added since. Works with ``Trainer`` and its subclasses.

    Raises:
        UsageError: ``trainer`` has no ``callback_handler`` (not a transformers ``Trainer``).

    Example:
        >>> from trainer_guard import guard
        >>> trainer = guard(Trainer(model=model, args=args, callbacks=[ResumeGuard()]))  # doctest: +SKIP
    """
    handler = getattr(trainer, "callback_handler", None)
    if handler is None:
        raise UsageError(f"guard() expects a transformers Trainer (with a callback_handler), got "
                         f"{type(trainer).__name__}; build the Trainer with the guard callbacks, then pass it")
    # the wired callbacks themselves, not their id()s: a callback removed from the Trainer and freed leaves its id
    # to the next object, e.g. the replacement guard added with add_callback, which would then not be wired
    wired: list = trainer.__dict__.setdefault(_WIRED_ATTR, [])
    for cb in list(handler.callbacks):
        wire = getattr(cb, "wire", None)
        if callable(wire) and not any(w is cb for w in wired):
            wire(trainer)
            wired.append(cb)
    return trainer
