"""EmbeddingLRGuard: the input embeddings and the output head train at their own learning rate (reports R3, R4).

Practitioners give trained ``embed_tokens``/``lm_head`` about 1/10 of the LR; the Trainer has no way to say so and
logs only group 0's LR. Works with ``callbacks=[...]`` alone, resume included. The Trainer writes ``optimizer.pt``
before ``on_save`` and, on resume, loads it into a fresh optimizer with its own groups before ``on_train_begin``, so
checkpoints must hold that layout: the guard splits the groups at each step's ``on_pre_optimizer_step`` and merges
them back (every parameter to its place, moments untouched) at ``on_step_end``, so the optimizer has the Trainer's
layout everywhere but inside the optimizer and scheduler steps, and the Trainer itself writes ``optimizer.pt``/
``scheduler.pt`` in it. A save found with the groups split anyway makes ``on_save`` rewrite both files atomically
into that layout. Each checkpoint gets ``trainer_guard_embedding_lr.json`` describing the split; on resume the split
is simply made again.

Sharded runs: under FSDP2 the optimizer holds the model's DTensor parameters (accelerate's ``prepare`` switches the
Trainer's optimizer to them), so the split above works unchanged and ``optimizer_0/`` is written in the Trainer's
layout. DeepSpeed ZeRO flattens each param group into one partition when it wraps the optimizer, so there the groups
are split once, as the Trainer creates its optimizer (``before_optimizer_create``), and stay split for the run and in
its checkpoints. FSDP1 (flat parameters) and a DeepSpeed-built optimizer (an "optimizer" section in its config) are
refused with the reason."""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Optional

from .._dist import agree
from ..core.io import atomic_write_json, read_json, replace_json
from ..core.lr_groups import (
    ROLE_KEY,
    SPLIT_FILE,
    Split,
    atomic_torch_save,
    base_layout_optimizer_state,
    base_layout_scheduler_state,
    embedding_parameters,
    group_lrs,
    merge_param_groups,
    peak_lr,
    sharded_optimizer_problems,
    split_param_groups,
    tied_rate_problems,
    unwrap_optimizer,
)
from ..core.sharding import engine
from ..errors import EmbeddingLRError
from ..files import OPTIMIZER, SCHEDULER, checkpoint_dir
from .base import Guard

__all__ = ["EmbeddingLRGuard"]

_RATE_OPTIONS = ("ratio", "lr", "embed_ratio", "embed_lr", "head_ratio", "head_lr")


class EmbeddingLRGuard(Guard):
    """Give the trainable embedding / output-head parameters their own learning rate, schedule kept.

    The parameters are found by identity (``get_input_embeddings()``/``get_output_embeddings()``: full weights,
    the active PEFT ``modules_to_save`` copy, LoRA A/B on those modules, trainable tokens). Each of the optimizer's
    groups is split so weight decay is preserved; every new group follows the Trainer's schedule (warmup, linear,
    cosine) scaled by its factor. Per-group LRs are added to the logs as ``learning_rate/embeddings``,
    ``learning_rate/lm_head`` or ``learning_rate/tied``.

    Args:
        ratio: LR of embeddings and head as a fraction of the LR of the optimizer group they come from (the
            Trainer's ``learning_rate`` in its own optimizer); default 0.1 for a part given no other rate.
        lr: absolute peak LR of embeddings and head instead; each added group gets ``lr`` over the peak LR of the
            group it came from, so this holds also in an optimizer not built from ``args.learning_rate``
            (``Trainer(optimizers=...)``, a subclass's ``create_optimizer``). Ratios are fractions of that group's
            LR.
        embed_ratio, embed_lr: the same for the input embeddings only (override ``ratio``/``lr``).
        head_ratio, head_lr: the same for the output head only.
        when_absent: what to do when no embedding/head parameter is trainable: ``"warn"``, ``"ignore"``, or
            ``"raise"`` (catches report R3's adapter reload where they silently stopped training).
        log_lrs: add each group's LR to the Trainer's logs (seen by callbacks after this one, the printed log and
            ``state.log_history``; report_to integrations run before user callbacks and do not see them).

    Attributes:
        record: the split in force (role, source group, positions, factor, names per added group), also written
            to each checkpoint as ``trainer_guard_embedding_lr.json``.

    Raises:
        ConfigError: invalid options (two rates for one part; a rate <= 0, infinite or NaN).
        EmbeddingLRError: a tied embedding/head asked for two different rates; DeepSpeed or FSDP1 (FSDP2 is
            supported: the groups hold its DTensor parameters); an absolute LR
            while the Trainer's ``learning_rate`` is 0; an Adafactor group with ``relative_step=True`` holding
            them; nothing trainable with ``when_absent="raise"``.

    Example:
        >>> from trainer_guard import EmbeddingLRGuard
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   callbacks=[EmbeddingLRGuard(ratio=0.1)])  # doctest: +SKIP
    """

    name = "embedding_lr"

    def __init__(self, ratio: Optional[float] = None, lr: Optional[float] = None,
                 embed_ratio: Optional[float] = None, embed_lr: Optional[float] = None,
                 head_ratio: Optional[float] = None, head_lr: Optional[float] = None,
                 when_absent: Literal["warn", "ignore", "raise"] = "warn", log_lrs: bool = True) -> None:
        super().__init__(ratio=ratio, lr=lr, embed_ratio=embed_ratio, embed_lr=embed_lr, head_ratio=head_ratio,
                         head_lr=head_lr, when_absent=when_absent, log_lrs=log_lrs)
        self.split: Split | None = None
        self._optimizer: Any = None
        self._scheduler: Any = None
        self._step_lrs: dict[str, float] = {}
        self._plan: tuple[dict, dict, dict] | None = None
        self._fixed: Split | None = None  # DeepSpeed: the split made once, at the optimizer's creation
        self._created = False  # DeepSpeed: the Trainer's optimizer was created (and checked) in this train()
        self._resume: str | None = None
        self.record: dict[str, Any] = {}  # the split in force, as written to each checkpoint's sidecar

    @classmethod
    def _check_options(cls, o: dict[str, Any]) -> list[str]:
        probs = [f"{k}: got {o[k]!r}; must be a finite number > 0 (ratios are fractions of the Trainer's LR, e.g. "
                 f"0.1)" for k in _RATE_OPTIONS if o.get(k) is not None and not 0 < o[k] < math.inf]
        for a, b in (("ratio", "lr"), ("embed_ratio", "embed_lr"), ("head_ratio", "head_lr")):
            if o.get(a) is not None and o.get(b) is not None:
                probs.append(f"{a}/{b}: both given ({o[a]!r}, {o[b]!r}); give one of them")
        return probs

    # -- rates ------------------------------------------------------------------------------------------------
    _ROLES = (("embeddings", "embed"), ("lm_head", "head"))

    def _asked(self, prefix: str) -> str | None:
        """The option that sets a role's rate (``embed_lr``, ``embed_ratio``, then ``lr``, ``ratio``), or ``None``."""
        return next((k for k in (f"{prefix}_lr", f"{prefix}_ratio", "lr", "ratio")
                     if self.options.get(k) is not None), None)

    def rates(self, base_lr: float) -> tuple[dict[str, float], dict[str, str]]:
        """``({role: factor}, {role: how it was asked})`` for a Trainer LR of ``base_lr``."""
        o, factors, how = self.options, {}, {}
        for role, prefix in self._ROLES:
            key = self._asked(prefix)
            if key is None:
                factors[role], how[role] = 0.1, "the default ratio 0.1"
                continue
            if key.endswith("lr") and not base_lr > 0:
                raise EmbeddingLRError(f"{key}={o[key]!r} is an absolute LR but the Trainer's learning_rate is "
                                       f"{base_lr!r}; give a ratio instead, or a learning_rate > 0")
            factors[role] = o[key] / base_lr if key.endswith("lr") else float(o[key])
            how[role] = f"{key}={o[key]!r}"
        return factors, how

    def targets(self) -> dict[str, float]:
        """``{role: lr}`` for the roles given an absolute LR (``lr``, ``embed_lr``, ``head_lr``). Each added group
        gets ``lr`` over the peak LR of the group it came from, so the role trains at that LR also in an optimizer
        not built from ``args.learning_rate`` (``Trainer(optimizers=...)``, a subclass's ``create_optimizer``)."""
        return {role: float(self.options[key]) for role, prefix in self._ROLES
                for key in [self._asked(prefix)] if key is not None and key.endswith("lr")}

    # -- hooks (trainer_guard.callbacks.hooks) ------------------------------------------------------------------
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> None:
        """Merge the groups back before each ``trainer.train()``.

        A run stopped inside the optimizer step (an exception or Ctrl-C between ``on_pre_optimizer_step`` and
        ``on_step_end``: in ``optimizer.step()``, the scheduler step or an ``on_optimizer_step`` callback) leaves the
        Trainer's optimizer split, and the next ``train()`` on the same Trainer reuses it: its optimizer load (resume)
        fails with "loaded state dict has a different number of parameter groups" and a new scheduler would be built
        over the split groups. No event fires before either, so the merge happens here."""
        self._merge()
        self._fixed, self._created, ckpt = None, False, resume_from_checkpoint
        if ckpt is True:
            from transformers.trainer_utils import get_last_checkpoint

            ckpt = get_last_checkpoint(trainer.args.output_dir)
        self._resume = os.fspath(ckpt) if isinstance(ckpt, (str, os.PathLike)) else None

    def before_optimizer_create(self, trainer: Any) -> None:
        """DeepSpeed: split the groups once, as the Trainer creates its optimizer.

        ZeRO (stages 1-3) flattens each of the optimizer's param groups into one fp32 partition when
        ``deepspeed.initialize`` wraps it (right after the Trainer created the optimizer and its scheduler), and
        steps each group at that group's ``lr``: it keeps the groups and their LRs, but they cannot change per step
        any more. So under DeepSpeed the Trainer's own optimizer is built here (``create_optimizer`` of its class,
        which the wrapped call then returns) and split for the whole run; the scheduler is then built over every
        group, and DeepSpeed's checkpoints hold that layout (a resume with the guard splits the same way)."""
        if engine() != "deepspeed" or trainer.optimizer is not None or trainer.model is None:
            return
        optimizer = type(trainer).create_optimizer(trainer)  # the Trainer's (or its subclass's) own, unwired
        roles, factors, problems = self._problems(trainer.args, trainer.model, optimizer)
        ckpt = self._resume
        if (any(roles.values()) and ckpt and os.path.isdir(ckpt) and not os.path.isfile(os.path.join(ckpt, SPLIT_FILE))
                and any(n.startswith("global_step") for n in os.listdir(ckpt))):
            problems.append(f"{os.path.basename(os.path.normpath(ckpt))} was trained without EmbeddingLRGuard's "
                            f"groups, and DeepSpeed restores its optimizer state per param group, so it cannot load "
                            f"into the split groups; resume it without EmbeddingLRGuard, or start a new run from its "
                            f"weights with the guard")
        agree(problems, EmbeddingLRError, "EmbeddingLRGuard cannot run; nothing was changed:")
        self._created = True
        if any(roles.values()):
            self._fixed = split_param_groups(optimizer, None, roles, factors, self.targets())
            self.record = self._fixed.record()

    # -- events -----------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs: Any):
        super().on_init_end(args, state, control, model=model, **kwargs)  # wires the Trainer's hooks
        if model is not None:
            factors, how = self.rates(args.learning_rate)
            agree(tied_rate_problems(embedding_parameters(model), factors, how), EmbeddingLRError,
                  "EmbeddingLRGuard options conflict with the model:")

    def _problems(self, args: Any, model: Any, optimizer: Any) -> tuple[dict, dict, list[str]]:
        """``(roles, factors, problems)``: the trainable embedding/head parameters the optimizer holds, their
        factors, and why they cannot be split (this rank's view; the caller agrees on it)."""
        inner = unwrap_optimizer(optimizer)
        in_opt = {id(p) for g in inner.param_groups for p in g["params"]}
        roles = {r: [(n, p) for n, p in ps if id(p) in in_opt] for r, ps in embedding_parameters(model).items()}
        factors, how = self.rates(args.learning_rate)
        problems = tied_rate_problems(roles, factors, how)
        mine = {id(p) for ps in roles.values() for _, p in ps}
        problems += [f"optimizer group {i} ({type(inner).__name__} with relative_step=True) "
                     f"computes its own step size and ignores the group's lr, so the embeddings' LR would have no "
                     f"effect; create it with relative_step=False and an lr (the Trainer's optim='adafactor' does), "
                     f"or remove EmbeddingLRGuard"
                     for i, g in enumerate(inner.param_groups)
                     if g.get("relative_step") and any(id(p) in mine for p in g["params"])]
        return roles, factors, problems

    def _absent(self, roles: dict) -> bool:
        """Handle ``when_absent`` when no embedding/head parameter is trained; True then."""
        if any(roles.values()):
            return False
        msg = ("no embedding or output-head parameter is being trained, so there is nothing to give its own LR; "
               "if you meant to train them, add them to the trainable modules (modules_to_save, "
               "target_modules or trainable_token_indices) and load adapters with is_trainable=True")
        if self.options["when_absent"] == "raise":
            agree([msg], EmbeddingLRError)
        if self.options["when_absent"] == "warn":
            self.note(msg, "warning")
        return True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs: Any):
        """Check everything and plan the split; the groups change at the first step (other guards see the
        Trainer's own layout at train begin). DeepSpeed: check the split made at the optimizer's creation."""
        self._merge()
        self._plan, self._step_lrs = None, {}
        if model is None or optimizer is None:
            return
        if engine() == "deepspeed":
            self._deepspeed_train_begin(args, state, model, optimizer, lr_scheduler)
            return
        problems = sharded_optimizer_problems(model, optimizer)
        roles, factors, more = self._problems(args, model, optimizer)
        agree(problems + more, EmbeddingLRError, "EmbeddingLRGuard cannot run; nothing was changed:")
        if self._absent(roles):
            return
        self._optimizer, self._scheduler = optimizer, lr_scheduler
        self._plan = (roles, factors, self.targets())
        self._ensure_split()  # validates the scheduler too; undone at once so train begin sees the usual layout
        self._check_recorded(args, state, self.split.groups)
        self._describe(args, self.split, unwrap_optimizer(optimizer).param_groups)
        self._merge()

    def _deepspeed_train_begin(self, args, state, model, optimizer, lr_scheduler) -> None:
        live = unwrap_optimizer(optimizer).param_groups  # DeepSpeed's: the Trainer's group dicts, flat params
        if self._fixed is None:
            if self._created:  # the Trainer's optimizer holds no trainable embedding/head parameter
                self._absent({})
                return
            if self._absent(embedding_parameters(model)):
                return
            cfg = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
            why = ("the DeepSpeed config has an \"optimizer\" section: DeepSpeed builds its own optimizer from it "
                   "and the Trainer's optimizer, where this guard adds the groups, is never created; remove that "
                   "section (the Trainer then creates the optimizer from optim/learning_rate/weight_decay and "
                   "DeepSpeed keeps its groups and their LRs), or remove EmbeddingLRGuard"
                   if "optimizer" in cfg else
                   "this optimizer was not created by the Trainer's create_optimizer() during train() (passed in "
                   "with optimizers=, or left from an earlier train()); let the Trainer create it, or remove "
                   "EmbeddingLRGuard")
            agree([f"DeepSpeed flattens each optimizer param group into one partition when it wraps the optimizer, "
                   f"so the embeddings can only get their own group when the optimizer is created, but {why}"],
                  EmbeddingLRError, "EmbeddingLRGuard cannot run; nothing was changed:")
        roles = [g.get(ROLE_KEY) for g in live[self._fixed.base_groups:]]
        agree([] if roles == [g["role"] for g in self._fixed.groups] else
              [f"DeepSpeed's optimizer has the param groups {[g.get(ROLE_KEY) for g in live]}, not the Trainer's "
               f"{self._fixed.base_groups} plus {[g['role'] for g in self._fixed.groups]} made at its creation (a "
               f"create_optimizer() that builds a new optimizer each call?); let create_optimizer() return "
               f"self.optimizer when it is set, or remove EmbeddingLRGuard"],
              EmbeddingLRError, "EmbeddingLRGuard cannot run:")
        self._optimizer, self._scheduler = optimizer, lr_scheduler
        self._check_recorded(args, state, self._fixed.groups)
        self._describe(args, self._fixed, live)

    def _describe(self, args: Any, split: Split, live: list) -> None:
        """One note per added group; a warning where a ratio compounds with a source group's own LR."""
        added, base = live[split.base_groups:], live
        absolute = self.targets()
        for g, pg in zip(split.groups, added):
            self.note(f"{g['role']}: {', '.join(g['names'])} at {g['factor']:g} x the LR of param group "
                      f"{g['source']} (peak lr {peak_lr(pg):g})")
            source_lr = peak_lr(base[g["source"]])
            ratio = not (absolute.get(g["role"]) or (g["role"] == "tied" and absolute))
            if ratio and not math.isclose(source_lr, args.learning_rate, rel_tol=1e-6):
                self.note(f"{g['role']}: param group {g['source']} already runs at peak lr {source_lr:g}, not the "
                          f"Trainer's learning_rate {args.learning_rate:g} (an embedding LR of your own, e.g. axolotl's "
                          f"embedding_lr_scale / embedding_lr?); the ratio {g['factor']:g} compounds with it: effective "
                          f"peak lr {peak_lr(pg):g} ({g['factor']:g} x {source_lr:g}). To keep one of them, drop "
                          f"the other, or give EmbeddingLRGuard an absolute lr", "warning")

    def _ensure_split(self) -> None:
        if self.split is None and self._plan is not None:
            self.split = split_param_groups(self._optimizer, self._scheduler, *self._plan)
            self.record = self.split.record()

    def _merge(self) -> None:
        if self.split is not None:
            merge_param_groups(self._optimizer, self._scheduler, self.split)
            self.split = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs: Any):
        self._ensure_split()

    def on_step_end(self, args, state, control, **kwargs: Any):
        # Split only around optimizer.step() and the scheduler step: between steps (saves, evaluation, and a run
        # stopped by an exception or KeyboardInterrupt, which fires no event) the optimizer has the Trainer's own
        # layout, so optimizer.pt is written in it and a later train(resume_from_checkpoint=...) on the same
        # Trainer, which reuses the optimizer, can load it.
        self._merge()

    def on_epoch_end(self, args, state, control, **kwargs: Any):
        if control.should_save:
            self._merge()

    def _check_recorded(self, args, state, groups: list[dict[str, Any]]) -> None:
        if state.global_step <= 0:
            return
        path = os.path.join(checkpoint_dir(args.output_dir, state.global_step), SPLIT_FILE)
        if not os.path.isfile(path):
            return
        planned = {(g["role"], g["source"]): g["factor"] for g in groups}
        for g in read_json(path).get("groups", []):
            now = planned.get((g["role"], g.get("source")))
            if now is not None and abs(now - g["factor"]) > 1e-12 * max(1.0, abs(now)):
                self.note(f"{g['role']}: resumed run uses {now:g} x the LR, the checkpoint was trained with "
                          f"{g['factor']:g} x", "warning")

    def on_save(self, args, state, control, **kwargs: Any):
        ckpt = checkpoint_dir(args.output_dir, state.global_step)

        def write() -> None:
            if self._plan is None and self._fixed is None:  # no split this run: a record here is an earlier run's in a reused checkpoint dir
                replace_json(os.path.join(ckpt, SPLIT_FILE), None)
                return
            if self.split is not None:  # saved while split (should_save set after on_step_end): rewrite the files
                opt_path, sched_path = os.path.join(ckpt, OPTIMIZER), os.path.join(ckpt, SCHEDULER)
                inner = unwrap_optimizer(self._optimizer)
                if os.path.isfile(opt_path):
                    atomic_torch_save(base_layout_optimizer_state(inner.state_dict(), inner.param_groups,
                                                                  self.split), opt_path)
                if os.path.isfile(sched_path) and self._scheduler is not None:
                    atomic_torch_save(base_layout_scheduler_state(self._scheduler.state_dict(), self.split),
                                      sched_path)
            atomic_write_json(os.path.join(ckpt, SPLIT_FILE), self.record)

        # the Trainer's writer(s) write; every rank agrees on the outcome (a full disk stops all alike)
        self.write_into_checkpoint(args, ckpt, write, EmbeddingLRError,
                                   f"{ckpt} (optimizer/scheduler state, {SPLIT_FILE})")

    def on_train_end(self, args, state, control, **kwargs: Any):
        self._merge()
        # the run is over: keep no reference to its optimizer (parameters and their moments) or scheduler
        self._plan, self._fixed, self._optimizer, self._scheduler = None, None, None, None

    def on_optimizer_step(self, args, state, control, **kwargs: Any):
        if self.split is not None or self._fixed is not None:  # before the scheduler steps: this step's LRs
            self._step_lrs = group_lrs(self._optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        if not (self.options["log_lrs"] and self._step_lrs and logs and "learning_rate" in logs):
            return
        extra = {f"learning_rate/{role}": lr for role, lr in self._step_lrs.items()}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
