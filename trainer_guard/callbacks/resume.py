"""ResumeGuard: when training continues, the trainable set is the one that was saved, or the user hears about it.

Answers field report R3: a LoRA run that also trained ``embed_tokens`` and ``lm_head`` was continued with those
modules frozen (1,134,559,232 -> 167,772,160 trainable) and nothing said so; today the same resume dies in the
Trainer's optimizer load with a ValueError naming neither modules nor counts.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from .._dist import agree
from ..core.io import read_json, replace_json
from ..core.head import stored_tensor_names
from ..core.ties import declared_tie, describe_tie_change, tied_now_untied_then
from ..core.trainable import (TRAINABLE_FILE, adapter_dir, adapter_load_gaps, add_modules_to_save,
                              add_to_trainer_groups, adapter_source, adapted_module, canonical_name,
                              continuation_problems, count_table,
                              frozen_adapter_params, hyperparameter_changes, mark_adapter_training, missing_copies,
                              optimizer_layout, read_adapter_config, trainable_record)
from ..errors import ResumeMismatchError
from ..files import OPTIMIZER, TIES_FILE, checkpoint_dir
from .base import Guard

__all__ = ["ResumeGuard"]


class ResumeGuard(Guard):
    """Record the trainable set at every save; verify it whenever training continues.

    Covers ``trainer.train(resume_from_checkpoint=...)``, a fresh run continuing from a saved adapter directory
    (``adapter_dir``, or detected when the model was loaded from a directory holding ``adapter_config.json``), and
    a PEFT adapter loaded frozen (``PeftModel.from_pretrained`` without ``is_trainable=True``). A table of trainable
    counts is logged at train begin (a healthy continuation: one line, "trainable set matches ..."). The check runs
    BEFORE the Trainer builds and loads the optimizer, through the hooks of the Trainer the guard was given to
    (:mod:`trainer_guard.callbacks.hooks`); a guard added with ``add_callback`` after the Trainer was built needs
    :func:`trainer_guard.guard`, else a changed set dies in the optimizer load with a bare ValueError.

    Args:
        mode: ``"raise"`` a :class:`~trainer_guard.errors.ResumeMismatchError`; ``"fix"``: restore the recorded
            trainable set (before the optimizer is built when wired, so restored parameters land in their groups;
            the layout is then checked against the checkpoint's); ``"warn"``: log and continue.
        adapter_dir: saved adapter (or checkpoint) directory a fresh run continues from.
        write_record: write ``trainer_guard_trainable.json`` into every checkpoint (main process only).

    Raises:
        ResumeMismatchError: modules whose trainable counts differ, with counts, and what to do (``"raise"`` and
            ``"fix"`` modes; in ``"fix"`` mode when the set cannot be restored); on every rank when
            ``trainer_guard_trainable.json`` could not be written.

    Example:
        >>> from trainer_guard import ResumeGuard
        >>> trainer = Trainer(model, args, callbacks=[ResumeGuard()])  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
    """

    name = "resume"

    def __init__(self, mode: Literal["raise", "fix", "warn"] = "raise", adapter_dir: Optional[str] = None,
                 write_record: bool = True) -> None:
        super().__init__(mode=mode, adapter_dir=adapter_dir, write_record=write_record)
        self.checked: Optional[str] = None  # what was verified in the current train() call
        self._warned: set[str] = set()
        self._compared: Optional[str] = None  # the checkpoint/adapter directory the last check compared with
        self._differs = False  # whether a check of the current train() call found a difference
        self.fixed: dict = {}

    # -- hooks: run before the Trainer builds / loads the optimizer (trainer_guard.callbacks.hooks) ----------
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> None:
        self._forget()

    def before_weights_load(self, trainer: Any, checkpoint: str, model: Any) -> None:
        self.verify(trainer.model, checkpoint)

    def before_optimizer_create(self, trainer: Any) -> None:
        if self.checked is None and trainer.optimizer is None:
            self.verify(trainer.model, None)

    def before_optimizer_load(self, trainer: Any, checkpoint: Optional[str]) -> None:
        if checkpoint is not None:
            self.verify(trainer.model, checkpoint, optimizer=trainer.optimizer)

    # -- the check ------------------------------------------------------------------------------------------
    def _source(self, model: Any) -> Optional[str]:
        return self.options["adapter_dir"] or adapter_source(model)

    def verify(self, model: Any, checkpoint: Optional[str], optimizer: Any = None, late: bool = False) -> None:
        """Compare ``model``'s trainable set with ``checkpoint`` (or the adapter source); act per ``mode``.

        ``late``: called after the optimizer was loaded from a checkpoint, when mode='fix' can no longer help.
        """
        key = f"{checkpoint}|{optimizer is not None}"
        if self.checked == key:
            return
        source = checkpoint or self._source(model)
        ties = self._tie_changes(model, checkpoint)
        problems, recorded = continuation_problems(model, source, optimizer, ignore_modules={
            adapted_module(a) for g in ties for a in g[1:]})
        if ties:  # not a trainable-set change: the tie differs, and no mode='fix' of the set can mend that
            where = os.path.basename(os.path.normpath(checkpoint))
            problems = [describe_tie_change(g, where, True, declared_tie(model)) for g in ties] + problems
        self._compared, self._differs = source, self._differs or bool(problems)
        self._note_hyperparameters(model, source, recorded, optimizer)
        if ties and self.options["mode"] != "warn":
            self.checked = key
            agree(problems, ResumeMismatchError, f"ResumeGuard: {where} cannot be resumed by this model as built; "
                                                 f"no training step ran")
        if problems and self.options["mode"] == "fix" and optimizer is None and not late:
            problems = self._fix(model, source, recorded, problems, loads=checkpoint is not None)
        elif problems and self.options["mode"] == "fix" and late:
            problems = problems + ["mode='fix' needs trainer = trainer_guard.guard(trainer) before train(), so the "
                                   "set is restored before the optimizer is built and loaded"]
        self.checked = key
        if not problems and self.options["mode"] == "warn":
            return
        saved = f"{os.path.basename(os.path.normpath(source))} ({source})" if source else "the active adapter's config"
        name = getattr(model, "active_adapter", "default")
        named = f"adapter_name={name!r}, " if isinstance(name, str) and name != "default" else ""
        where = adapter_dir(model, source) or "adapter_dir"
        cfg = model.peft_config.get(name) if isinstance(name, str) and hasattr(model, "peft_config") else None
        cfg_name = type(cfg).__name__ if cfg is not None else "LoraConfig"  # IA3Config, AdaLoraConfig, ...
        redo = (f"load the adapter as saved (PeftModel.from_pretrained(base, {where!r}, {named}is_trainable=True), "
                f"or the saved {cfg_name} with its modules_to_save)"
                if hasattr(model, "peft_config") else "set requires_grad as in the saved run")
        header = (f"ResumeGuard: the trainable set differs from {saved}; no training step ran. To continue as saved, "
                  f"{redo}, or set {self.advise(mode='fix')}; {self.advise(mode='warn')} goes on")
        if self.options["mode"] == "warn":
            for p in problems:
                if p not in self._warned:  # the same line is not repeated at the optimizer load
                    self.note(p, "warning")
                    self._warned.add(p)
        else:  # on every rank, with or without problems: another rank's may be the ones to stop for
            agree(problems, ResumeMismatchError, header)

    @staticmethod
    def _tie_changes(model: Any, checkpoint: Optional[str]) -> list[list[str]]:
        """Tie groups of ``model`` that ``checkpoint`` stores untied (adapter checkpoints hold no base weights)."""
        if not checkpoint or hasattr(model, "peft_config") or not os.path.isdir(checkpoint):
            return []
        # A group the checkpoint's tie record (TiedWeightsGuard, at save) lists as one tie was tied then, even when
        # each name is stored: DeepSpeed's save (accelerate's get_state_dict clones every tensor) and FSDP2's
        # FULL_STATE_DICT leave transformers no shared storage to store once. Was a false 'tie change at resume'
        # on every DeepSpeed resume of a tied model.
        try:
            record = os.path.join(checkpoint, TIES_FILE)
            recorded = read_json(record).get("groups", []) if os.path.isfile(record) else []
        except (OSError, ValueError, AttributeError):
            recorded = []
        try:
            return tied_now_untied_then(model, stored_tensor_names(checkpoint), recorded)
        except Exception:  # an unreadable checkpoint is IntegrityGuard's to report, not a tie change
            return []

    def _note_hyperparameters(self, model: Any, source: Optional[str], recorded: dict, optimizer: Any) -> None:
        """Warn (never stop) when a resumed group has another LR / weight decay than the checkpoint's: the Trainer's
        optimizer load restores the checkpoint's values, so the new ones would be silently ignored."""
        if optimizer is None or not source or not recorded.get("optimizer"):
            return
        if not os.path.isfile(os.path.join(source, OPTIMIZER)):  # nothing restores them: the new values apply
            return
        where = os.path.basename(os.path.normpath(source))
        for line in hyperparameter_changes(recorded["optimizer"], optimizer_layout(optimizer, model), where):
            msg = (f"{line}: the Trainer restores {where}'s values from optimizer.pt and scheduler.pt, so training "
                   f"continues with those and the new ones are ignored; to train with the new values, start a new "
                   f"run from {where}'s weights instead of resuming it")
            if msg not in self._warned:
                self.note(msg, "warning")
                self._warned.add(msg)

    def _fix(self, model: Any, source: Optional[str], recorded: dict, problems: list[str],
             loads: bool = False) -> list[str]:
        """Restore missing modules_to_save copies (trained values from ``source``), then set requires_grad to the
        recorded set (or enable frozen adapter params); undo the requires_grad changes when that is not enough.

        ``loads``: the Trainer loads ``source`` next (a resume): wrappers it cannot load make the fix impossible."""
        saved = None if recorded or not source else read_adapter_config(adapter_dir(model, source))
        copies, unrestorable = missing_copies(model, recorded, saved, source)
        gaps = adapter_load_gaps(model, source) if loads else []
        if gaps:
            where = os.path.basename(os.path.normpath(source))
            unrestorable = unrestorable + [
                f"{', '.join(gaps)}: a modules_to_save copy or trainable tokens now, none saved in {where}, so the "
                f"Trainer's load (PeftModel.load_adapter) would fail with a KeyError; remove them from the LoraConfig "
                f"(modules_to_save / trainable_token_indices) to resume {where} as saved"]
        if unrestorable:  # checked before any change: the model stays as it was
            return problems + [p + " (mode='fix' cannot restore this)" for p in unrestorable]
        if copies:
            add_modules_to_save(model, copies, source)
            self.note(f"fix: added modules_to_save copies of {', '.join(copies)} to the adapter, with their trained "
                      f"values from {source}", "warning")
        params = {canonical_name(n): p for n, p in model.named_parameters()}
        want = frozen_adapter_params(model)
        if recorded:
            want.update({n: params[n] for n in recorded["params"] if n in params and not params[n].requires_grad})
        drop = {n: p for n, p in params.items() if recorded and p.requires_grad and n not in recorded["params"]}
        for p in want.values():
            p.requires_grad_(True)
        for p in drop.values():
            p.requires_grad_(False)
        left, _ = continuation_problems(model, source)
        if left:  # not fixable by trainability alone: leave the model as it was
            for p in want.values():
                p.requires_grad_(False)
            for p in drop.values():
                p.requires_grad_(True)
            return [p + " (mode='fix' cannot restore this by trainability alone)" for p in left]
        self.fixed = dict(want)
        if want:
            mark_adapter_training(model)  # it trains now; saved configs say so
        for msg in problems:
            self.note(f"fixed, trainable set restored to the checkpoint's (before the fix: {msg})", "warning")
        return []

    # -- events ---------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        if model is None:
            return
        if self.checked is None:  # not wired: check now (too late to protect the optimizer load)
            ckpt = checkpoint_dir(args.output_dir, state.global_step) if state.global_step else None
            ckpt = ckpt if ckpt and os.path.isdir(ckpt) else None
            custom = optimizer is not None and len(optimizer.param_groups) != 2
            self.fixed = {}
            self.verify(model, ckpt, optimizer if ckpt else None, late=bool(ckpt) or custom)
            if self.fixed and optimizer is not None:  # 2 groups checked above: the Trainer's own layout
                add_to_trainer_groups(optimizer, self.fixed)
        continued = bool(state.global_step) or self._source(model) is not None  # R3: check the count after a reload
        table = "trainable parameters at train begin:\n" + count_table(trainable_record(model))
        if continued and self._compared and not self._differs:  # healthy: one line, the table for who asks
            self.note(table, "debug")
            self.note(f"trainable set matches {os.path.basename(os.path.normpath(self._compared))}")
        else:  # after a difference (mode='warn'/'fix'), the counts it left; a fresh run's at INFO
            self.note(table, "warning" if continued else "info")
        # Every check of this train() call ran by now (the wired ones come before train begin). Forget it, so the
        # next train() checks again even when this one ends without on_train_end (an exception, Ctrl-C).
        self._forget()

    def on_train_end(self, args, state, control, **kwargs: Any):
        self._forget()

    def _forget(self) -> None:
        """Forget the checks of the current train() call (the next one checks again)."""
        self.checked, self._warned, self._compared, self._differs = None, set(), None, False

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        if model is None:
            return
        ckpt = checkpoint_dir(args.output_dir, state.global_step)
        path = os.path.join(ckpt, TRAINABLE_FILE)

        def write() -> None:  # no record: remove an earlier run's, left in a reused checkpoint dir
            record = trainable_record(model, optimizer, state.global_step) if self.options["write_record"] else None
            replace_json(path, record)

        self.write_into_checkpoint(args, ckpt, write, ResumeMismatchError, path)
