"""DtypeGuard: parameters in a dtype other than the model's are cast (or reported) before the first step.

Answers field report R2: a bf16 Llama whose output head was replaced by ``nn.Linear(emb_dim, num_classes)``
(float32) fails at the first forward with "mat1 and mat2 must have the same dtype".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from .._dist import agree, world_size
from ..core.dtype import DtypeReport, autocast_safe, cast_mismatches, find_dtype_mismatches
from ..errors import DtypeMismatchError
from .base import Guard

__all__ = ["DtypeGuard"]


class DtypeGuard(Guard):
    """Find parameters whose dtype differs from the model's dominant floating dtype; cast, raise or warn.

    Checked when the Trainer is built (``on_init_end``: before the optimizer and any distributed wrapper exist,
    the safe moment to cast) and again at ``on_train_begin``. Quantised weights (by dtype/type), PEFT's fp32
    adapter weights, modules the model class keeps in fp32 and modules matching ``keep_fp32`` are left alone.

    Args:
        mode: ``"fix"`` casts the mismatched parameters to the dominant dtype (logged, one line per parameter);
            ``"raise"`` raises :class:`~trainer_guard.errors.DtypeMismatchError` listing them; ``"warn"`` logs them.
        keep_fp32: module-name patterns kept in their dtype on purpose (``fnmatch`` on the full module name, or a
            name segment), e.g. ``["*norm*", "score"]``.
        respect_model_fp32: keep the modules the model's class keeps in fp32 (``_keep_in_fp32_modules``).
        allow_peft_adapters: keep PEFT adapter weights (LoRA A/B), which PEFT stores in fp32 on purpose.
        cast_under_autocast: in ``"fix"`` mode, also cast parameters wider than the model's dtype (a float32 head
            on a bf16 model) when the Trainer runs under mixed-precision autocast (``bf16=True`` / ``fp16=True``).
            Default ``False``: autocast already runs them without the R2 error, so they are left in their higher
            precision and only reported (casting would change a run that works).

    Raises:
        DtypeMismatchError: in ``"raise"`` mode; or in ``"fix"`` mode when a mismatch appears only at train begin
            on a multi-process run (the model is already wrapped; cast before building the Trainer).

    Example:
        >>> from trainer_guard import DtypeGuard
        >>> model.lm_head = torch.nn.Linear(64, 2)  # fp32 head on a bf16 model  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[DtypeGuard()])  # doctest: +SKIP
    """

    name = "dtype"

    def __init__(
        self,
        mode: Literal["fix", "raise", "warn"] = "fix",
        keep_fp32: Sequence[str] = (),
        respect_model_fp32: bool = True,
        allow_peft_adapters: bool = True,
        cast_under_autocast: bool = False,
    ) -> None:
        super().__init__(mode=mode, keep_fp32=list(keep_fp32), respect_model_fp32=respect_model_fp32,
                         allow_peft_adapters=allow_peft_adapters, cast_under_autocast=cast_under_autocast)
        self._said: set[tuple] = set()  # notes already given (the check runs at init and again at train begin)

    @classmethod
    def _check_options(cls, options: dict[str, Any]) -> list[str]:
        bad = [p for p in options.get("keep_fp32", ()) if not p.strip()]
        return [f"keep_fp32: empty pattern in {list(options['keep_fp32'])!r}; remove it"] if bad else []

    def check(self, model: nn.Module, optimizer: Any = None, when: str = "train begin",
              autocast: str | None = None) -> list[str]:
        """Check ``model`` and act per ``mode``; return what was done (one line per cast or finding).

        ``autocast``: the mixed-precision setting the Trainer runs under (``"bf16=True"``), ``None`` for none.
        """
        o = self.options
        report = find_dtype_mismatches(model, o["keep_fp32"], o["respect_model_fp32"], o["allow_peft_adapters"])
        for issue in report.kept:
            self.note(f"kept {issue} ({issue.reason})", "debug")
        if not autocast:  # a kept float32 nn.Linear in a bf16 model meets bf16 inputs: R2's error at step 1
            doomed = [i for i in autocast_safe(DtypeReport(report.dominant, report.kept))
                      if i.module_type == "Linear" and i.reason.startswith("keep_fp32")]
            if doomed and self._once(("doomed", tuple(i.name for i in doomed))):
                self.note(f"keep_fp32 keeps {', '.join(str(i) for i in doomed)} in a {report.dominant} model, and "
                          f"the Trainer runs without autocast: an nn.Linear in float32 fed {report.dominant} "
                          f"activations fails at the first step with 'mat1 and mat2 must have the same dtype'. Train "
                          f"with bf16=True/fp16=True (autocast), or remove the pattern from keep_fp32", "warning")
        if autocast and o["mode"] == "fix" and not o["cast_under_autocast"]:
            safe = autocast_safe(report)
            if safe:
                report.mismatched = [i for i in report.mismatched if i not in safe]
                report.kept += safe
            if safe and self._once(("autocast", tuple(i.name for i in safe))):
                self.note(f"left {len(safe)} parameter(s) wider than the model's {report.dominant} as they are: "
                          f"{', '.join(str(i) for i in safe[:4])}{', ...' if len(safe) > 4 else ''}. The Trainer runs "
                          f"under autocast ({autocast}), which trains them without the dtype error, in their higher "
                          f"precision; cast_under_autocast=True casts them (found at {when})", "warning")
        problems = [str(i) for i in report.mismatched]
        header = (f"{type(model).__name__}: the model's dominant dtype is {report.dominant} but "
                  f"{len(problems)} parameter(s) differ (found at {when})")
        advice = (f"Create the new module with dtype={report.dominant} (or call .to({report.dominant}) on it), "
                  f"use {self.advise(mode='fix')} to cast automatically, or list modules that must stay in their "
                  f"dtype in keep_fp32.")
        mode = o["mode"]
        if mode == "fix" and when == "train begin" and world_size() > 1:
            mode = "raise"  # DDP/FSDP buckets are already built; casting now would break them
        message = header + ":\n  - " + "\n  - ".join(problems) + "\n" + advice
        if mode == "raise":
            agree([message] if problems else [], DtypeMismatchError)
            return []
        if not problems:
            return []
        if mode == "warn":
            self.note(message, "warning")
            return problems
        done = cast_mismatches(model, report, optimizer)
        for msg in done:
            self.note(f"{msg} (found at {when})", "warning")
        return done

    def _once(self, key: tuple) -> bool:
        """True the first time ``key`` is seen."""
        if key in self._said:
            return False
        self._said.add(key)
        return True

    def on_init_end(self, args, state, control, model=None, **kwargs: Any):
        super().on_init_end(args, state, control, model=model, **kwargs)  # wires the Trainer's hooks
        if model is not None:
            self.check(model, when="init", autocast=_autocast(args))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        if model is not None:
            self.check(model, optimizer, when="train begin", autocast=_autocast(args))


def _autocast(args: Any) -> str | None:
    """The Trainer's mixed-precision autocast setting (``"bf16=True"``/``"fp16=True"``), or ``None``."""
    return next((f"{k}=True" for k in ("bf16", "fp16") if getattr(args, k, False) is True), None)
