"""AdapterSizeGuard: before the first step, say what training embed_tokens/lm_head in an adapter costs (R3, R4).

Targeting the embeddings (``modules_to_save`` or ``target_modules``) balloons the adapter toward the base model's
size and adds gradients and optimizer state for two ``vocab x hidden`` matrices, with no warning from PEFT or the
Trainer. This guard prints the numbers and the advice once per run: a later ``train()`` of the same model (a resume,
a second call on the same Trainer) repeats it only when the numbers changed, and a resume in a new process (which
reads the report from the checkpoint's ``trainer_guard_adapter_size.json``) repeats it at INFO. It never changes
the run.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from ..core.io import read_json, replace_json
from ..core.preflight import PreflightReport, adapter_preflight
from ..errors import TrainerGuardError
from ..files import ADAPTER_SIZE_FILE, checkpoint_dir
from .base import Guard
from .._dist import is_main_process

__all__ = ["AdapterSizeGuard"]


class AdapterSizeGuard(Guard):
    """Report the extra trainable parameters, adapter bytes and optimizer memory of trained embeddings/head.

    Args:
        level: log level of the report: ``"warning"`` (default) or ``"info"``.

    Attributes:
        last_report: the :class:`~trainer_guard.core.preflight.PreflightReport` of the last ``train()`` (or
            ``None`` when the embeddings are not trained inside an adapter); logged only when it differs from the
            report this guard already gave.

    Example:
        >>> from trainer_guard import AdapterSizeGuard
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...                   callbacks=[AdapterSizeGuard()])  # doctest: +SKIP
    """

    name = "adapter_size"

    def __init__(self, level: Literal["warning", "info"] = "warning") -> None:
        super().__init__(level=level)
        self.last_report: PreflightReport | None = None
        self._said: str | None = None  # the message already logged: one report per run, not one per train()

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        if model is None:
            return
        self.last_report = adapter_preflight(model, optim=str(getattr(args.optim, "value", args.optim)))
        message = self.last_report.message() if self.last_report is not None else None
        if message is not None and message != self._said and is_main_process():
            # the run's first process reported it at the level asked; the resume of that run says it at INFO
            self.note(message, "info" if message == self._reported_in(args, state) else self.options["level"])
            self._said = message

    @staticmethod
    def _reported_in(args: Any, state: Any) -> str | None:
        """The report the resumed checkpoint says its run already gave (``None``: none, or not a resume)."""
        if not state.global_step:
            return None
        path = os.path.join(checkpoint_dir(args.output_dir, state.global_step), ADAPTER_SIZE_FILE)
        try:
            return read_json(path).get("message") if os.path.isfile(path) else None
        except (OSError, ValueError, AttributeError, TrainerGuardError):
            return None

    def on_save(self, args, state, control, **kwargs: Any):
        ckpt = checkpoint_dir(args.output_dir, state.global_step)
        path = os.path.join(ckpt, ADAPTER_SIZE_FILE)
        record = {"format": 1, "message": self._said} if self._said else None  # None: an older run's file goes
        self.write_into_checkpoint(args, ckpt, lambda: replace_json(path, record), TrainerGuardError, path)
