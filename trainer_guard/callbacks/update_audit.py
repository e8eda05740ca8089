"""UpdateAuditGuard: trainable tensors that never change, frozen tensors that do (issue 8).

The costliest fine-tuning bugs are silent: a module marked trainable that is missing from the optimizer, sits in a
group with LR 0 or gets no gradient (report R3's embed_tokens/lm_head), or a frozen weight drifting (an in-place op,
a wrapper that un-freezes). The guard checksums every parameter at train begin (after any resume load) and
compares after the first optimizer step and every ``every`` steps, with the core in :mod:`trainer_guard.core.audit`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

from .._dist import agree, is_main_process, world_size
from ..core.audit import ParamFacts, audit, classify, grad_state, group_index, summarize
from ..core.checksum import checksums
from ..errors import UpdateAuditError
from .base import Guard

__all__ = ["UpdateAuditGuard"]


class UpdateAuditGuard(Guard):
    """Report trainable tensors that did not change while their group's LR was non-zero, and frozen ones that did.

    The baseline checksums are taken at the first ``on_step_begin`` (after any resume load and after every other
    callback's ``on_train_begin``). Checks run in ``on_optimizer_step`` (weights updated, gradients not yet zeroed): after the first optimizer step,
    then every ``every`` steps; a check costs one checksum pass over the parameters. Each finding names the module
    (layer indices folded), the tensor count and the likely cause: not in any optimizer group, group LR 0, no
    gradient reached it (``.grad`` None or all zero), frozen but in the optimizer, un-frozen, modified in place.
    Gradient accumulation is handled (one check per optimizer step); steps skipped by a grad scaler (inf/nan) and
    steps with LR 0 (warmup) do not count, and tensors that cannot be judged yet are re-checked at the next step,
    alone. Gradient-based causes wait for ``min_grad_steps`` effective steps (a LoRA A matrix has a zero gradient
    on its first step). Each tensor/cause is reported once.

    Args:
        mode: ``"raise"`` an :class:`~trainer_guard.errors.UpdateAuditError` (same on every rank) or ``"warn"``.
        every: full check every this many optimizer steps (besides the first one).
        min_grad_steps: effective steps before "no gradient"/"stalled" verdicts.
        ignore: ``fnmatch`` patterns of parameter names never audited (e.g. ``"*.experts.*"`` for MoE).
        backend: checksum backend, see :func:`trainer_guard.core.checksum.checksums`.

    Raises:
        UpdateAuditError: in ``raise`` mode, listing every finding by module with its cause and what to do.

    Example:
        >>> from trainer_guard import UpdateAuditGuard
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[UpdateAuditGuard(every=100)])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    name = "update_audit"

    def __init__(self, mode: Literal["raise", "warn"] = "raise", every: int = 100, min_grad_steps: int = 2,
                 ignore: Sequence[str] = (), backend: Literal["auto", "triton", "cpu"] = "auto") -> None:
        super().__init__(mode=mode, every=every, min_grad_steps=min_grad_steps, ignore=list(ignore), backend=backend)
        self.findings: list = []
        self._reset()

    @classmethod
    def _check_options(cls, options: dict[str, Any]) -> list[str]:
        return [f"{k}: must be >= 1, got {options[k]!r}; pass a positive number of optimizer steps"
                for k in ("every", "min_grad_steps") if options[k] < 1]

    def _reset(self) -> None:
        self._params: dict[str, Any] = {}
        self._base: dict[str, int] = {}  # baseline checksum per tensor
        self._trainable: dict[str, bool] = {}  # requires_grad at the baseline
        self._since: dict[str, int] = {}  # baseline -> index into self._snaps
        self._snaps: list[list[int]] = []  # cumulative effective steps per group, one snapshot per baseline
        self._effective: list[int] = []
        self._pending: dict[str, tuple[int | None, int]] = {}  # name -> (group, effective steps needed)
        self._queued: list[str] = []
        self._reported: set[tuple[str, str]] = set()
        self._steps = 0
        self._model = None

    def _sums(self, names) -> dict[str, int]:
        return checksums({n: self._params[n].detach() for n in names}, backend=self.options["backend"])

    def _rebase(self, sums: dict[str, int]) -> None:
        self._snaps.append(list(self._effective))
        for n, s in sums.items():
            self._base[n], self._since[n] = s, len(self._snaps) - 1
            self._trainable[n] = self._params[n].requires_grad

    # -- events ---------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        self._reset()
        self._model = model

    def on_step_begin(self, args, state, control, model=None, **kwargs: Any):
        # The baseline is taken just before the first forward: after any resume load and after every other
        # callback's on_train_begin (dtype casts, re-ties, LR-group edits), whatever the callback order.
        model = model if model is not None else self._model
        if self._params or model is None:
            return
        skip = self.options["ignore"]
        self._params = {n: p for n, p in model.named_parameters() if not any(fnmatch.fnmatch(n, s) for s in skip)}
        self._rebase(self._sums(self._params))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs: Any):
        if not self._params or optimizer is None:
            return
        groups = optimizer.param_groups
        self._effective += [0] * (len(groups) - len(self._effective))
        if not getattr(optimizer, "step_was_skipped", False):
            for i, g in enumerate(groups):
                self._effective[i] += float(g.get("lr", 0.0)) > 0
        self._steps += 1
        every = self.options["every"]
        verdict = self._steps <= self.options["min_grad_steps"] + 1 or self._steps % every == 0
        if self._steps == 1 or self._steps % every == 0:
            names = list(self._params)
        else:  # re-check a tensor that could not be judged only once it has had the effective steps it needs
            names = [n for n, (g, need) in self._pending.items() if self._eff(n, g) >= need]
        if names:
            self._check(names, optimizer)
        if verdict or world_size() == 1:
            self._flush(state.global_step + 1)

    def on_train_end(self, args, state, control, **kwargs: Any):
        self._flush(state.global_step)  # multi-process: findings of re-checks after the last verdict step

    def _eff(self, name: str, group: int | None) -> int:
        """Effective optimizer steps of ``group`` since ``name``'s baseline."""
        if group is None:
            return 0
        snap = self._snaps[self._since[name]]
        return self._effective[group] - (snap[group] if group < len(snap) else 0)

    def _check(self, names: list[str], optimizer) -> None:
        now = self._sums(names)
        status = classify({n: self._base[n] for n in names}, now)
        index = group_index(optimizer)
        self._effective += [0] * (len(optimizer.param_groups) - len(self._effective))
        facts = {}
        for n in names:
            p, g = self._params[n], index.get(id(self._params[n]))
            unchanged_trainable = status[n] == "same" and self._trainable[n]
            facts[n] = ParamFacts(
                trainable=self._trainable[n], trainable_now=p.requires_grad, group=g.index if g else None,
                lr=g.lr if g else None, initial_lr=g.initial_lr if g else None,
                weight_decay=g.weight_decay if g else 0.0, effective_steps=self._eff(n, g.index if g else None),
                grad=grad_state(p) if unchanged_trainable else "unknown",
                dtype=str(p.dtype).replace("torch.", ""), numel=p.numel())
        found, pending = audit(status, facts, self.options["min_grad_steps"])
        new = [f for f in found if (f.name, f.cause) not in self._reported]
        self._reported.update((f.name, f.cause) for f in new)
        self.findings.extend(new)
        if new:
            self._queued.extend(summarize(new))
        for n in names:
            self._pending.pop(n, None)
        for n in pending:  # wait for one effective step, or for min_grad_steps of them (gradient verdicts)
            f = facts[n]
            self._pending[n] = (f.group, 1 if f.effective_steps < 1 else self.options["min_grad_steps"])
        self._rebase({n: s for n, s in now.items() if n not in self._pending})

    def _flush(self, step: int) -> None:
        lines, self._queued = self._queued, []
        header = (f"UpdateAuditGuard at optimizer step {step}: parameters that should train did not, or frozen "
                  f"ones changed")
        if self.options["mode"] == "raise":
            agree(lines, UpdateAuditError, header)
        elif lines and is_main_process():
            self.note(header + ":\n  - " + "\n  - ".join(lines), "warning")
