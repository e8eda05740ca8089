"""TiedWeightsGuard: checkpoints of models with tied embeddings save, store the tie once, and reload tied.

Answers field report R1: (a) a plain ``nn.Module`` with ``out_head.weight = tok_emb.weight`` crashes the Trainer's
save with safetensors' "Some tensors share memory"; (b) a Hugging Face model tied by hand while its config says
``tie_word_embeddings=False`` saves without ``lm_head.weight`` and reloads a random head.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from torch import nn

from ..core.io import read_json, replace_json
from ..checkpoint.saved import stored_groups
from ..core.ties import (
    TIES_FILE,
    broken_ties,
    declare_embedding_tie,
    declared_tie,
    describe_tie_change,
    dedupe_state_dict,
    find_tied_groups,
    restore_ties,
    stored_alike,
    ties_record,
    tied_now_untied_then,
    tied_then_untied_now,
)
from .base import Guard
from .._dist import agree, world_size
from ..core.head import stored_tensor_names
from ..errors import TiedWeightsError, TrainerGuardError
from ..files import CONFIG, checkpoint_dir

__all__ = ["TiedWeightsGuard"]


def _is_hf_or_peft(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = ()
    return isinstance(model, (PreTrainedModel, PeftModel))


def _is_peft(model: nn.Module | None) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def _plain_modules(model: nn.Module) -> list[nn.Module]:
    """The module whose ``state_dict`` the Trainer hands to ``safetensors.save_file`` (non-HF models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [] if _is_hf_or_peft(base) else [base]


class TiedWeightsGuard(Guard):
    """Untie/re-tie shared tensors around saves so every checkpoint stores a tie once and reloads it tied.

    What it does, by model kind:

    - Hugging Face model whose config declares the tie (Llama/Qwen2/Gemma tied, GPT-2): already saved once by
      transformers; the guard records the tie groups next to each checkpoint and checks them on resume.
    - Hugging Face model tied by hand, config says untied (R1b): with ``fix_config`` (default) sets
      ``config.tie_word_embeddings=True`` on the live model, logged, so checkpoints and ``save_model()`` reload the
      trained head with ``from_pretrained``.
    - Plain ``nn.Module`` (R1a): adds a ``state_dict`` post-hook that lists each shared storage once (the first
      registered name, e.g. ``tok_emb.weight``), so the Trainer's safetensors save succeeds with one copy; a load
      pre-hook fills the alias back in, so ``model.load_state_dict(file, strict=True)`` works on the guarded
      model. Fresh models load the file with ``strict=False`` (the only missing keys are the aliases, listed in
      ``trainer_guard_ties.json``).
    - After a resume, a tie split by the load is re-tied when both copies are equal, else a
      :class:`~trainer_guard.errors.TiedWeightsError` names them (nothing changed).

    Args:
        fix_config: set ``tie_word_embeddings=True`` when the embeddings are tied by identity but the config says
            otherwise (R1b). With ``False`` the guard only warns.
        restore: re-tie groups split by a load at train begin (values must be identical).
        write_record: write ``trainer_guard_ties.json`` (the tie groups) into every checkpoint.

    Raises:
        TiedWeightsError: on every rank, when a split tie's copies differ and the checkpoint cannot settle which
            is right, when a tie was split after a multi-process wrap (wire the Trainer with
            :func:`trainer_guard.guard`), or when ``trainer_guard_ties.json`` could not be written.

    Example:
        >>> from trainer_guard import TiedWeightsGuard
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[TiedWeightsGuard()])  # doctest: +SKIP
    """

    name = "tied_weights"

    def __init__(self, fix_config: bool = True, restore: bool = True, write_record: bool = True) -> None:
        super().__init__(fix_config=fix_config, restore=restore, write_record=write_record)
        self.groups: list[list[str]] = []  # of the model attached last
        # per model, the groups found when it was attached: a guard given to two Trainers must not re-tie one
        # model to the other's groups (weak keys: a finished run's model is not kept alive)
        self._groups_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # a weak set, not id()s: the id of a freed model is reused by the next one (a guard shared by a sweep's
        # runs would skip hooking the new model, and the R1a save crash would be back)
        self._hooked: weakref.WeakSet = weakref.WeakSet()

    # -- wiring ---------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> list[list[str]]:
        """Find the tie groups of ``model`` and make its saves safe (idempotent). Returns the groups."""
        self.groups = find_tied_groups(model)
        self._groups_of[model] = self.groups
        if not self.groups:
            return self.groups
        if self.options["fix_config"]:
            for msg in declare_embedding_tie(model):
                self.note(msg, "warning")
        elif _is_hf_or_peft(model):
            cfg = getattr(model, "config", None)
            if cfg is not None and getattr(cfg, "tie_word_embeddings", True) is False:
                self.note("embeddings are tied by identity but config.tie_word_embeddings=False: checkpoints will "
                          f"reload a random head; set {self.advise(fix_config=True)}", "warning")
        for module in _plain_modules(model):
            if module in self._hooked:
                continue
            groups = find_tied_groups(module)
            module.register_state_dict_post_hook(_drop_aliases(groups))
            module.register_load_state_dict_pre_hook(_fill_aliases(groups))
            self._hooked.add(module)
            self.note(f"{type(module).__name__}: state_dict lists each tied storage once "
                      f"({', '.join(a + ' -> ' + g[0] for g in groups for a in g[1:])})")
        return self.groups

    # -- hooks (trainer_guard.callbacks.hooks) ----------------------------------------------------------------
    def before_train(self, trainer: Any, resume_from_checkpoint: Any) -> None:
        """Re-tie a split tie before ``train(resume_from_checkpoint=...)`` loads anything: a split head is one more
        parameter, so the Trainer's optimizer load would fail before ``on_train_begin`` with "a parameter group
        that doesn't match the size of optimizer's group". Only groups the checkpoint stores once (kept name
        present, aliases absent) are re-tied here."""
        ckpt = resume_from_checkpoint
        if ckpt is True:
            from transformers.trainer_utils import get_last_checkpoint

            ckpt = get_last_checkpoint(trainer.args.output_dir)
        if isinstance(ckpt, (str, os.PathLike)) and os.path.isdir(ckpt):
            self._check_tie_change(trainer.model, os.fspath(ckpt))
            self._retie_before_load(trainer.model, os.fspath(ckpt))

    def _check_tie_change(self, model: nn.Module, ckpt: str) -> None:
        """An untied checkpoint resumed by a tied model: the load would write both trained tensors into one and the
        optimizer load fail; stop before either, naming the tie change and the two ways on (every rank)."""
        problems = []
        if not _is_peft(model):
            try:
                stored = stored_tensor_names(ckpt)
            except (OSError, TrainerGuardError):
                stored = None
            where = os.path.basename(os.path.normpath(ckpt))
            record = os.path.join(ckpt, TIES_FILE)
            try:  # a tie recorded at save was a tie, even stored under each name (FSDP2's FULL_STATE_DICT)
                recorded = read_json(record).get("groups", []) if os.path.isfile(record) else []
            except (OSError, ValueError):
                recorded = []
            changed = []
            for g in tied_now_untied_then(model, stored, recorded):
                try:  # no record of how it was saved: the same values under each name are one tie saved twice
                    alike = stored_alike(ckpt, g)
                except Exception:  # unreadable weights: the Trainer's load (or IntegrityGuard) reports them
                    alike = False
                if alike:
                    self.note(f"{where} stores the tie {g} under each name with the same values (a gathered save, "
                              f"e.g. FSDP's FULL_STATE_DICT): resumed tied")
                else:
                    changed.append(g)
            problems = [describe_tie_change(g, where, True, declared_tie(model)) for g in changed]
        agree(problems, TiedWeightsError, "TiedWeightsGuard: the tie of the model differs from the checkpoint's; "
                                          "nothing was loaded")

    def before_weights_load(self, trainer: Any, checkpoint: str, model: Any) -> None:
        """Trainer(model_init=...) builds a new model inside train(), after :meth:`before_train`: give that model
        the alias-filling load hook (a checkpoint stores each tie once) and its re-tie before it is loaded. (A model
        passed in is FSDP's / SageMaker's wrapped one: left as it was.)"""
        if model is None and trainer.model is not None:
            self.attach(trainer.model)
            if os.path.isdir(os.fspath(checkpoint)):
                self._retie_before_load(trainer.model, os.fspath(checkpoint))

    def _retie_before_load(self, model: nn.Module, ckpt: str) -> None:
        if _is_peft(model):
            return
        if os.path.isfile(os.path.join(ckpt, TIES_FILE)):
            stored = stored_tensor_names(ckpt) or set()
            recorded = read_json(os.path.join(ckpt, TIES_FILE)).get("groups", [])
        else:  # saved without this guard: its config.json says whether the embedding/head tie was stored once
            config = os.path.join(ckpt, CONFIG)
            try:
                stored = stored_tensor_names(ckpt) or set()
                recorded = tied_then_untied_now(model, stored, read_json(config) if os.path.isfile(config) else None)
            except (OSError, TrainerGuardError):  # unreadable: IntegrityGuard's (or the Trainer's load) to report
                return
        once = [g for g in broken_ties(model, recorded) if g[0] in stored and not stored.intersection(g[1:])]
        if once and self.options["restore"]:
            declared = declared_tie(model)  # False: the user's config says untied, and the re-tie overrides it
            for msg in restore_ties(model, once, stored):
                self.note(msg, "warning")
            if declared is False:
                where = os.path.basename(os.path.normpath(ckpt))
                for group in once:
                    self.note(describe_tie_change(group, where, False, False if self.options["fix_config"] else None),
                              "warning")
            self.attach(model)

    # -- events ---------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs: Any):
        super().on_init_end(args, state, control, model=model, **kwargs)  # wires the Trainer's hooks
        if model is not None:
            self.attach(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        if model is None:
            return
        recorded, stored = list(self._groups_of.get(model, ())), None
        if state.global_step > 0:
            ckpt = checkpoint_dir(args.output_dir, state.global_step)
            if os.path.isfile(os.path.join(ckpt, TIES_FILE)):
                recorded = read_json(os.path.join(ckpt, TIES_FILE)).get("groups", recorded)
            if not _is_peft(model):
                try:
                    stored = stored_tensor_names(ckpt)
                except (OSError, TrainerGuardError):
                    stored = None
        problem, msgs = None, []
        if recorded and broken_ties(model, recorded):
            if self.options["restore"]:
                if world_size() > 1:  # the model is wrapped by now: a swapped Parameter would leave DDP's buckets
                    problem = (f"tie groups {broken_ties(model, recorded)} were split by a load and the model is "
                               f"already wrapped for {world_size()} processes; wire the Trainer with "
                               f"trainer_guard.guard(trainer) so the tie is restored before the wrap")
                else:
                    try:
                        msgs = restore_ties(model, recorded, stored)
                    except TiedWeightsError as e:
                        problem = str(e)
            else:
                self.note(f"tie groups split since they were recorded: {broken_ties(model, recorded)}", "warning")
        if self.options["restore"]:  # on every rank, split or not (the record and the split are local): none hangs
            agree([problem] if problem else [], TiedWeightsError)
        for msg in msgs:
            self.note(msg, "warning")
        groups = self.attach(model)
        if groups:
            self.note(f"tied groups: {groups}")

    def on_save(self, args, state, control, model=None, **kwargs: Any):
        ckpt = checkpoint_dir(args.output_dir, state.global_step)
        path = os.path.join(ckpt, TIES_FILE)

        def write() -> bool:
            # An adapter checkpoint holds no base-model tensors: a record would name absent keys.
            record = (ties_record(self.groups, stored_groups(model, self.groups))
                      if self.options["write_record"] and self.groups and not _is_peft(model) else None)
            return replace_json(path, record)

        if self.write_into_checkpoint(args, ckpt, write, TiedWeightsError, path):
            self.note(f"removed {path}: an earlier run's tie record, not true of this model's checkpoint", "warning")


def _drop_aliases(groups: list[list[str]]):
    def hook(module, state_dict, prefix, local_metadata):
        dedupe_state_dict(state_dict, groups, prefix)

    return hook


def _fill_aliases(groups: list[list[str]]):
    def hook(module, state_dict, prefix, *args):
        for group in groups:
            kept = prefix + group[0]
            if kept in state_dict:
                for alias in group[1:]:
                    state_dict.setdefault(prefix + alias, state_dict[kept])

    return hook
