"""AdapterSizeGuard: before the first step, say what training embed_tokens/lm_head in an adapter costs (R3, R4).

Targeting the embeddings (``modules_to_save`` or ``target_modules``) balloons the adapter toward the base model's
size and adds gradients and optimizer state for two ``vocab x hidden`` matrices, with no warning from PEFT or the
Trainer. This guard prints the numbers and the advice once per run: a later ``train()`` of the same model (a resume,
a second call on the same Trainer) repeats it only when the numbers changed. It never changes the run.
"""

from __future__ import annotations

from typing import Any, Literal

from ..core.preflight import PreflightReport, adapter_preflight
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
            self.note(message, self.options["level"])
            self._said = message
