"""HeadGuard: every checkpoint of a language model must be reloadable with its trained output head.

Answers field reports R5 (a model saved without ``lm_head``: loaded with ``AutoModel``) and R1b (head tied by hand
while ``tie_word_embeddings=False``: the save silently omits ``lm_head.weight``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from .._dist import agree, is_main_process
from ..core.head import missing_head_problems
from ..errors import HeadMissingError
from ..files import checkpoint_dir
from .base import Guard

__all__ = ["HeadGuard"]


class HeadGuard(Guard):
    """Check each checkpoint right after it is written (``on_save``): a config naming a causal, sequence-to-sequence,
    masked or vision-language LM (or the bare base model of a decoder-only or encoder-decoder family) with no
    output-head tensor stored and no tie declared reloads with a random head.

    ``on_save`` fires after the whole checkpoint is written, so the check sees exactly what a later
    ``from_pretrained`` will see. The main process reads the files; every rank raises the same error.
    ``trainer.save_model()`` fires no event: the guard checks that save too, through the hook the Trainer it was
    given to fires (:mod:`trainer_guard.callbacks.hooks`; a guard added with ``add_callback`` after the Trainer was
    built needs ``trainer_guard.guard(trainer)``); else check a final directory with ``trainer-guard doctor`` or
    :func:`trainer_guard.missing_head_problems`.

    Args:
        mode: ``"raise"`` stops training with :class:`~trainer_guard.errors.HeadMissingError` at the first bad
            checkpoint (the checkpoint stays on disk for inspection); ``"warn"`` logs and continues.

    Raises:
        HeadMissingError: in ``"raise"`` mode; the message names the checkpoint, the class and what to do. In any
            mode, on every rank, when the check of a checkpoint could not run (an unreadable config or weights file).

    Example:
        >>> from trainer_guard import HeadGuard
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[HeadGuard()])  # doctest: +SKIP
    """

    name = "head"

    def __init__(self, mode: Literal["raise", "warn"] = "raise") -> None:
        super().__init__(mode=mode)
        self.checked: list[str] = []

    def check(self, directory: str | os.PathLike, collective: bool = True) -> list[str]:
        """Check one saved directory and act per ``mode``; return the problems.

        ``collective``: every rank calls it and raises the same error (checkpoints); ``False``: the main process
        checks and raises alone, no rank waits for another (``trainer.save_model``, often called on one process).
        """
        problems: list[str] = []
        failed: list[str] = []
        if is_main_process() and os.path.isdir(directory):
            try:
                problems = missing_head_problems(directory)
            except Exception as e:  # an unreadable config.json or weight file: named, on every rank (collective)
                if not collective:
                    raise
                failed = [f"the head check of {os.fspath(directory)} could not run: {e}"]
        self.checked.append(os.fspath(directory))
        if collective:  # every rank, in every mode: a failed check stops them all alike, none is left waiting
            agree(failed + (problems if self.options["mode"] == "raise" else []), HeadMissingError)
        elif self.options["mode"] == "raise" and problems:
            raise HeadMissingError("\n".join(problems))
        for p in problems:
            self.note(p, "warning")
        return problems

    def on_save(self, args, state, control, **kwargs: Any):
        self.check(checkpoint_dir(args.output_dir, state.global_step))

    def after_save_model(self, trainer: Any, output_dir: str) -> None:
        """Also check what ``trainer.save_model(dir)`` writes (the final save fires no ``on_save``)."""
        self.check(output_dir, collective=False)
