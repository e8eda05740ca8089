"""``guard(trainer)``: wire a Trainer's guards explicitly (optional: guards given in ``callbacks=[...]`` wire their
Trainer themselves when it is built).

A ``TrainerCallback`` first hears of a run at ``on_train_begin``, after the Trainer has built the optimizer and
loaded its state from a checkpoint (where a changed trainable set dies with a bare ValueError). Guards that must act
earlier do so through :mod:`trainer_guard.callbacks.hooks`, which replaces the Trainer's own methods once.
:func:`guard` is what wires a Trainer whose guards were added with ``add_callback`` after it was built (their
``on_init_end`` never fired), or whose guards could not find it; calling it on a wired Trainer changes nothing.

Example:
    >>> import trainer_guard
    >>> callbacks = [trainer_guard.ResumeGuard()]
    >>> trainer = trainer_guard.guard(Trainer(model=model, args=args, callbacks=callbacks))  # doctest: +SKIP
    >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TypeVar

from .callbacks import hooks
from .errors import UsageError

__all__ = ["guard"]

T = TypeVar("T")


def guard(trainer: T) -> T:
    """Make ``trainer`` fire its guards' hooks (:func:`trainer_guard.callbacks.hooks.wire`) and call ``wire(trainer)``
    once on each other callback that has one; return ``trainer``.

    Idempotent: calling it again wires only callbacks added since. Works with ``Trainer`` and its subclasses.

    Raises:
        UsageError: ``trainer`` has no ``callback_handler`` (not a transformers ``Trainer``).

    Example:
        >>> from trainer_guard import guard
        >>> trainer = guard(Trainer(model=model, args=args, callbacks=[ResumeGuard()]))  # doctest: +SKIP
    """
    if getattr(trainer, "callback_handler", None) is None:
        raise UsageError(f"guard() expects a transformers Trainer (with a callback_handler), got "
                         f"{type(trainer).__name__}; build the Trainer with the guard callbacks, then pass it")
    return hooks.wire(trainer)
