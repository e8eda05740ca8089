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
from ..core.audit import UpdateAudit, auditable, summarize
from ..errors import UpdateAuditError
from .base import Guard

__all__ = ["UpdateAuditGuard"]


WARN_ONLY_CAUSES = frozenset({"stalled", "unrouted", "no_update"})


class UpdateAuditGuard(Guard):
    """Report trainable tensors that did not change while their group's LR was non-zero, and frozen ones that did.

    Baseline checksums are taken at the first ``on_step_begin`` (after any resume load and after every other
    callback's ``on_train_begin``). Checks run in ``on_optimizer_step`` (weights updated, gradients not yet
    zeroed): after the first optimizer step, then every ``every`` steps; a check is one checksum pass over the
    parameters. Each finding names the modules (layer indices folded), the tensor count and the likely cause: not
    in any optimizer group, group LR 0, no gradient reached it (``.grad`` None or all zero), frozen but in the
    optimizer, un-frozen, modified in place.

    Gradient accumulation needs nothing (one check per optimizer step). Steps skipped by a grad scaler (inf/nan),
    steps at LR 0 (warmup) and steps whose gradients are all exactly zero (no learning signal: RL with all-zero
    rewards) are not *effective*: a tensor is judged only after its group ran an effective step,
    gradient-based causes only after ``min_grad_steps`` of them (a LoRA A matrix has a zero gradient on its first
    step); until then it keeps its baseline and is re-checked alone once it has had them. Each tensor and cause is
    reported once. FSDP2 (DTensor) shards and DeepSpeed ZeRO-3 partitions are audited as whole tensors: checksums
    and gradient states are combined across ranks, so every rank reaches one verdict; DeepSpeed's optimizer says
    which parameters each group trains and whether a step had any gradient (its global norm). DeepSpeed ZeRO-1/2
    free the gradients in their step: a tensor that should have trained and did not is reported without its
    gradient's cause ("no_update", a warning: it may be a precision limit). FSDP1 flat and meta parameters are
    skipped, with a warning.

    Training dynamics that are not faults: a mixture-of-experts expert (``experts.3``, ``experts.expert_3``) with
    no gradient while another expert of its layer trained got no token from the router; it is judged only after
    ``every`` effective steps and then warns (a dead expert), naming ``ignore=["*.experts.*"]``. A
    ``requires_grad`` changed by a schedule after the first step (gradual (un)freezing) starts a new window for
    that tensor: it is judged as what it is now, so an un-frozen tensor the optimizer does not hold (the Trainer
    builds its optimizer from the tensors trainable at the start) is reported at that step. Every group at LR 0
    (``TrainingArguments.learning_rate=0``) is one finding that names that setting.

    Args:
        mode: ``"raise"`` an :class:`~trainer_guard.errors.UpdateAuditError` (same on every rank) or ``"warn"``.
            Updates too small for the weights' dtype ("stalled", e.g. bf16 norms at LR 1e-5) only warn, in both.
        every: full check every this many optimizer steps (besides the first one).
        min_grad_steps: effective steps before "no gradient"/"stalled" verdicts.
        ignore: ``fnmatch`` patterns of parameter names never audited (e.g. ``"*.experts.*"`` for MoE).
        backend: checksum backend, see :func:`trainer_guard.checksum.checksums`.

    Raises:
        UpdateAuditError: in ``raise`` mode, listing every finding by module with its cause and what to do.

    Example:
        >>> from trainer_guard import UpdateAuditGuard
        >>> guard = UpdateAuditGuard(mode="raise", every=100)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[guard])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    name = "update_audit"

    def __init__(self, mode: Literal["raise", "warn"] = "raise", every: int = 100, min_grad_steps: int = 2,
                 ignore: Sequence[str] = (), backend: Literal["auto", "triton", "cpu"] = "auto") -> None:
        super().__init__(mode=mode, every=every, min_grad_steps=min_grad_steps, ignore=list(ignore), backend=backend)
        self.findings: list = []
        self.audit: UpdateAudit | None = None
        self._model = None
        self._queued: list[str] = []
        self._told_silent = False

    @classmethod
    def _check_options(cls, options: dict[str, Any]) -> list[str]:
        return [f"{k}: must be >= 1, got {options[k]!r}; pass a positive number of optimizer steps"
                for k in ("every", "min_grad_steps") if options[k] < 1]

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        self.audit, self._model, self._queued, self._told_silent = None, model, [], False

    def on_step_begin(self, args, state, control, model=None, **kwargs: Any):
        # The baseline is taken just before the first forward: after any resume load and after every other
        # callback's on_train_begin (dtype casts, re-ties, LR-group edits), whatever the callback order.
        model = model if model is not None else self._model
        if self.audit is not None or model is None:
            return
        skip = self.options["ignore"]
        named = [(n, p) for n, p in model.named_parameters() if not any(fnmatch.fnmatch(n, s) for s in skip)]
        params = {n: p for n, p in named if auditable(p)}
        if len(params) < len(named):
            self.note(f"{len(named) - len(params)} FSDP1 flat, meta or empty parameters are not audited", "warning")
        self.audit = UpdateAudit(params, every=self.options["every"], min_grad_steps=self.options["min_grad_steps"],
                                 backend=self.options["backend"])
        self.audit.baseline()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs: Any):
        if self.audit is None or optimizer is None:
            return
        silent = self.audit.silent_steps
        new = self.audit.step(optimizer)
        self.findings.extend(new)
        if self.audit.silent_steps > silent and not self._told_silent:
            self._told_silent = True
            self.note(f"optimizer step {state.global_step + 1}: every gradient was exactly zero (no learning signal, "
                      f"e.g. RL rewards all zero so far); steps like it are not counted against any tensor")
        # "stalled" (gradient and LR present, updates below the dtype's resolution) is a precision limit, not a
        # wiring bug: common in pure-bf16 runs at small LRs, so it warns even in raise mode instead of stopping;
        # "no_update" may be one (ZeRO-1/2 keep no gradient to tell), and so does a dead expert ("unrouted").
        soft = [f for f in new if f.cause in WARN_ONLY_CAUSES]
        if soft and is_main_process():
            self.note(f"UpdateAuditGuard at optimizer step {state.global_step + 1} (warning only):\n  - "
                      + "\n  - ".join(summarize(soft)), "warning")
        self._queued.extend(summarize([f for f in new if f.cause not in WARN_ONLY_CAUSES]))
        steps, every = self.audit.steps, self.options["every"]
        # every rank meets in agree() at the same steps; re-checks in between only queue what they find
        if steps <= self.options["min_grad_steps"] + 1 or steps % every == 0 or world_size() == 1:
            self._flush(state.global_step + 1)

    def on_train_end(self, args, state, control, **kwargs: Any):
        self._flush(state.global_step)  # multi-process: findings of re-checks after the last verdict step
        # Let go of the model: a guard kept for its findings (or reused by the next Trainer) must not keep the
        # finished run's weights in memory after `del trainer, model`. The audit keeps its counts and checksums.
        self._model = None
        if self.audit is not None:
            self.audit.params = {}

    def _flush(self, step: int) -> None:
        lines, self._queued = self._queued, []
        header = (f"UpdateAuditGuard at optimizer step {step}: parameters that should train did not, or frozen "
                  f"ones changed")
        if self.options["mode"] == "raise":
            agree(lines, UpdateAuditError, header)
        elif lines and is_main_process():
            self.note(header + ":\n  - " + "\n  - ".join(lines), "warning")
