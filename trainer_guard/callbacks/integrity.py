"""IntegrityGuard: every checkpoint carries a manifest of what it stores, and a resume is checked against it.

Answers field report R1's wish "verify the saved model's integrity after every save", and the silent failures
around it: a head that reloads at random (R1b), a tensor the load skipped, a dtype that changed (R2).
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from .._dist import agree, gather, is_main_process
from ..checksum.disk import bytes_checksums
from ..core.sharding import agreed_sharded, is_dtensor, is_sharded, is_zero3
from ..core.checkpoint import (Verified, conversion_hint, plan_files_manifest, plan_manifests, plan_sharded_manifest,
                               sharded_model_sums, verify_against, verify_sharded, verify_zero3, zero3_entries,
                               zero3_model_sums)
from ..core.conversion import load_converted
from ..checkpoint.choose import candidate, pick_checkpoint
from ..checkpoint.contents import remove_stale, uncommit
from ..checkpoint.saved import peft_adapter_names
from ..checkpoint.manifest import MANIFEST_FILE, read_manifest
from ..checkpoint.writer import ManifestWriter
from ..errors import IntegrityError, TrainerGuardError
from ..files import checkpoint_dir, rank_files
from .base import Guard

__all__ = ["IntegrityGuard"]


class IntegrityGuard(Guard):
    """Write ``trainer_guard_manifest.json`` into each checkpoint; on resume, check the live model against it.

    At every save (``on_save``, after the Trainer wrote all files) the guard lists what the files hold (headers
    only), matches it with the tensors the model meant to save (PEFT: the adapter; Hugging Face: the state dict
    after tie dedupe), checksums them and writes the manifest atomically (main process only). On resume
    (``state.global_step > 0`` at train begin) it checksums the live model and compares it with the manifest of
    ``output_dir/checkpoint-<step>`` before step one: a head reloaded at random, a tensor the load skipped or a
    dtype change stops the run, naming the tensors. All ranks raise the same error. The check runs right after the
    weight load (any checkpoint path), before the optimizer load, and ``trainer.save_model(dir)`` gets a manifest,
    through the hooks of the Trainer the guard was given to (:mod:`trainer_guard.callbacks.hooks`; a guard added
    with ``add_callback`` after the Trainer was built needs ``trainer_guard.guard(trainer)``, else train begin).
    The manifest's write and fsync run on a background thread, joined (verdict agreed) at the next step.

    Sharded training (decided from the parameters, the same on every rank): under FSDP2 (DTensor parameters) every
    rank checksums its shards and the full tensors' checksums are combined across ranks (no tensor gathered); the
    writing rank checks them against the ``pytorch_model_fsdp_0/`` DCP metadata (``SHARDED_STATE_DICT``) or the
    ``model.safetensors`` (``FULL_STATE_DICT``) and writes the whole-checkpoint manifest (every ``.distcp``,
    ``.metadata``, ``optimizer_0/`` file by its bytes). A resume checks every file before anything loads (every rank
    stops alike) and compares the loaded shards' combined checksums with the manifest. Under DeepSpeed ZeRO-2 the
    parameters are whole on every rank: as without sharding, plus the ``global_step<N>/`` rank files by their
    bytes. ZeRO-3 partitions (no rank holds a tensor): the files by their bytes (rank files are pickles; nothing
    unpickles them) and the tensors of a gathered ``model.safetensors`` when the save wrote one, with which a
    resumed model is compared, each parameter's checksum combined from the ranks' partitions.

    Args:
        verify: what a save checks before the manifest is written. ``"manifest"`` (default): the files' headers
            against the model (every tensor saved, under its dtype and shape), checksums from memory: costs one
            pass over the saved tensors in memory. ``"readback"``: also re-reads the files and compares their
            checksums with memory (catches a corrupted write; about one more pass over the files). ``"off"``: no
            check; problems are logged as warnings and the manifest records what the files hold.
        check_resume: compare the resumed model with the checkpoint's manifest at train begin, and the best model
            that ``load_best_model_at_end`` loads with that checkpoint's manifest at train end.
        backend: checksum backend (``"auto"``: the fused Triton kernel when the model is on CUDA, else CPU).
        repair_load: before that comparison, load the tensors the Trainer's load skipped because the checkpoint
            stores them in transformers' converted layout (MoE experts and router, vision-language models' renamed
            weights: transformers issues #48805, #43701;
            :func:`trainer_guard.core.conversion.load_converted`), and say so. ``False``: only report them.
        fallback: with ``check_resume``, ``train(resume_from_checkpoint=True)`` resumes from the newest complete,
            verified checkpoint: a newer one whose save was interrupted (no manifest, its commit mark) or whose
            files differ from its manifest is skipped with a warning naming it and why. ``False``: stop instead.

    Raises:
        IntegrityError: a save wrote something other than the model (no manifest is written then), the manifest
            could not be written (raised at the next step or at train end), or a resumed model (or the best model
            loaded at train end) differs from its checkpoint's manifest.

    Example:
        >>> from trainer_guard import IntegrityGuard
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[IntegrityGuard()])  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
    """

    name = "integrity"

    def __init__(
        self,
        verify: Literal["off", "manifest", "readback"] = "manifest",
        check_resume: bool = True,
        backend: Literal["auto", "triton", "cpu"] = "auto",
        repair_load: bool = True,
        fallback: bool = True,
    ) -> None:
        super().__init__(verify=verify, check_resume=check_resume, backend=backend, repair_load=repair_load,
                         fallback=fallback)
        self.timings: list[dict[str, Any]] = []
        self._verified = False  # set when the wired load already checked this resume
        self._resume_path: str | None = None  # the checkpoint train() resumes from (for the train-begin check)
        self.writer = ManifestWriter()  # atomic + fsync in a background thread, joined at the next step
        self._said = set()  # notes given once per run
        self._writing = False  # a save's manifest write may be pending
        self._pending: tuple[str, list, dict] | None = None  # a save's manifests (+ files checksummed by their
        # ranks), written once every on_save has run
        self._before: dict[str, dict] = {}  # checkpoint dir saved into again -> its files before the save

    # -- save -----------------------------------------------------------------------------------------------
    def write_checkpoint_manifest(self, model, directory: str, global_step: int | None,
                                  background: bool = False, defer: bool = False, kind: str = "",
                                  sums: dict[str, int] | None = None,
                                  known: dict[str, tuple[int, int]] | None = None) -> list[str]:
        """Check ``directory`` against ``model`` and write its manifest; return the problems (none written then).

        With ``background`` the (atomic, fsynced) write runs in a thread, joined at the next step or train end;
        everything the manifest says of the tensors is computed before this returns. With ``defer`` the write
        waits for the guard's next event (every other callback's ``on_save`` files are written by then).
        ``kind``/``sums``: a sharded model (:meth:`_kind`) and, for DTensors, its combined full-tensor checksums;
        ``known``: files already checksummed by the ranks that wrote them (relative path -> ``(size, checksum)``).
        """
        t0 = time.perf_counter()
        if kind == "dtensor":
            plan = plan_sharded_manifest(model, directory, sums or {}, global_step=global_step,
                                         verify=self.options["verify"])
        elif kind == "partitioned":
            plan = plan_files_manifest(directory, global_step=global_step,
                                       partitions=zero3_entries(model, sums) if sums else None)
        else:
            plan = plan_manifests(model, directory, global_step=global_step, verify=self.options["verify"],
                                  backend=self.options["backend"])
        for w in plan.warnings:
            self.note(w, "warning")
        if plan.problems or not plan.writes:  # all or nothing: no save gets manifests for some adapters only
            return plan.problems
        if defer:
            self._pending = (directory, plan.writes, known or {})
        else:
            self.writer.submit_many(plan.writes, background=background, known=known)
        timing = {"step": global_step, "bytes": plan.nbytes, "seconds": time.perf_counter() - t0}
        self.timings.append(timing)
        count = sum(len(m["tensors"]) for _, m in plan.writes)
        where = "" if len(plan.writes) == 1 else f" in {len(plan.writes)} adapter directories"
        self.note(f"{os.path.basename(directory)}: checked, manifest of {count} tensors{where} "
                  f"({timing['bytes'] / 1e6:.1f} MB), verify={self.options['verify']}, "
                  f"{timing['seconds'] * 1e3:.0f} ms")
        return []

    def _kind(self, model) -> str:
        """How this run holds the model, the same on every rank (one all-gather of one bool; every rank calls it at
        the same event): ``"dtensor"`` (FSDP2: shards whose checksums combine across ranks), ``"partitioned"``
        (DeepSpeed ZeRO-3, FSDP1 flat parameters: no rank holds a tensor), ``""`` (whole tensors: one process, DDP,
        ZeRO-1/2). Read from the parameters, not from ``args.fsdp``/``args.deepspeed``."""
        if not agreed_sharded(model, what="IntegrityGuard"):
            return ""
        kind = "dtensor" if any(is_dtensor(p) for p in model.parameters()) else "partitioned"
        if kind == "partitioned":
            self._once("partitioned", "sharded parameters no rank holds whole (DeepSpeed ZeRO-3 / FSDP1): manifests "
                                      "list every file by its bytes (rank files included) and the tensors of a "
                                      "gathered model.safetensors, or else (ZeRO-3) the parameters' checksums combined "
                                      "from the ranks' partitions at the save; a resumed ZeRO-3 model is compared with "
                                      "those, its checksums combined from the ranks' partitions")
        return kind

    def _once(self, key: str, message: str, level: str = "info") -> None:
        if key not in self._said:
            self._said.add(key)
            self.note(message, level)

    def _flush(self) -> None:
        """Commit the pending save: remove the files an earlier save left in its directory (not written by this one:
        they would be loaded with it), then list every file and write the manifest, last, on the writer thread."""
        if self._pending is None:
            return
        (ckpt, writes, known), self._pending = self._pending, None
        stale = remove_stale(ckpt, self._before.pop(ckpt, {}))
        if stale:
            self.note(f"{os.path.basename(ckpt)}: removed {', '.join(stale)}: left in this directory by an earlier "
                      f"save (interrupted?) and not written by this one, they would have been resumed from", "warning")
        self.writer.submit_many(writes, background=True, known=known)

    def _before_save(self, args, state, control) -> None:
        """A save into a checkpoint directory that already exists: note its files (to find those the save does not
        rewrite) and take its commit mark away until the new one is written."""
        ckpt = checkpoint_dir(args.output_dir, state.global_step)
        if control.should_save and args.should_save and os.path.isdir(ckpt):
            self._before[ckpt] = uncommit(ckpt)

    def on_step_begin(self, args, state, control, **kwargs: Any):
        self._flush()

    def on_epoch_begin(self, args, state, control, **kwargs: Any):
        self._flush()

    def on_epoch_end(self, args, state, control, **kwargs: Any):
        self._flush()
        self._before_save(args, state, control)

    def on_save(self, args, state, control, model=None, **kwargs: Any):
        self._flush()
        ckpt = checkpoint_dir(args.output_dir, state.global_step)
        problems: list[str] = []
        if model is None:
            return
        kind = self._kind(model)  # every rank: on_save runs on all of them
        sums = None  # collectives, on every rank: the full tensors' checksums combined from the shards/partitions
        if kind == "dtensor" and not peft_adapter_names(model):  # a PEFT adapter is read from the files
            sums = sharded_model_sums(model, gather)
        elif kind == "partitioned" and any(is_zero3(p) for p in model.parameters()):
            sums = zero3_model_sums(model)  # recorded where no gathered model.safetensors holds the tensors
        known = self._own_files(ckpt, args) if kind else None  # a collective: every rank
        if args.should_save and os.path.isdir(ckpt):  # the Trainer's own writer(s): rank 0, or each node's first
            try:
                problems = self.write_checkpoint_manifest(model, ckpt, state.global_step, background=True,
                                                          defer=True, kind=kind, sums=sums, known=known)
            except Exception as e:  # an EIO reading the files back, a full disk: agreed below, no rank left waiting
                problems = [f"{type(e).__name__}: {e}"]
        agree(problems, IntegrityError,
              header=f"{ckpt} does not hold what the model holds; no manifest was written. Check the disk and the "
                     f"save path, then save again. Problems:")
        self._writing = True  # on every rank, so that every rank takes part in the join's verdict

    def _own_files(self, ckpt: str, args) -> dict[str, tuple[int, int]]:
        """Every rank checksums the shard files it wrote itself (``__<rank>_0.distcp``, ``zero_pp_rank_<rank>_*``,
        ``rng_state_<rank>.pth``), one all-gather: the writing rank then hashes only the rest, not what N ranks
        wrote (at a save, and at a resume before anything loads). A file that cannot be read here is left to the
        writing rank (which names it if it fails there too)."""
        mine: dict[str, tuple[int, int]] = {}
        rank = args.process_index
        if os.path.isdir(ckpt):
            rels = rank_files(ckpt, rank)
            paths = [os.path.join(ckpt, *r.split("/")) for r in rels]
            try:
                sums = bytes_checksums(paths)
                mine = {r: (os.path.getsize(p), sums[p]) for r, p in zip(rels, paths)}
            except (OSError, TrainerGuardError):
                mine = {}
        known: dict[str, tuple[int, int]] = {}
        for part in gather(mine):
            known.update(part or {})
        return known

    def _join_writer(self) -> None:
        """Wait for the background write (before the next save's rotation may delete its directory); all agree."""
        if not self._writing:
            return
        self._writing = False
        try:
            self.writer.join()
            problems = []
        except IntegrityError as e:
            problems = [str(e)]
        agree(problems, IntegrityError)

    def on_step_end(self, args, state, control, **kwargs: Any):
        self._flush()
        self._join_writer()
        self._before_save(args, state, control)

    def on_log(self, args, state, control, **kwargs: Any):
        # The Trainer's last log (train metrics) comes after the loop and before its train-end cleanup: the best
        # model load and, with save_total_limit=1, the rmtree of every checkpoint but the best one. A manifest
        # still being written into such a checkpoint then lands in a directory the rmtree is emptying, which it
        # cannot remove any more: a checkpoint-N holding only trainer_guard_manifest.json, which
        # train(resume_from_checkpoint=True) picks and fails on. Mid-run logs precede that step's save (the
        # previous save's write was joined at on_step_end), so this waits only at the end; every rank logs here.
        self._flush()
        self._join_writer()

    def on_train_end(self, args, state, control, model=None, **kwargs: Any):
        self._flush()
        self._join_writer()
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        if best and self._after_load() and model is not None:
            self.verify_resume(model, best, what="best model")  # the Trainer's _load_best_model ran just before

    # -- resume ---------------------------------------------------------------------------------------------
    def check_model(self, model, directory: str) -> list[str]:
        """Differences between the live ``model`` and the manifest(s) in ``directory`` (empty when none or equal).

        A PEFT model with several adapters is checked against the manifest of each adapter's directory.
        """
        result = verify_against(model, directory, backend=self.options["backend"])
        for w in result.warnings:
            self.note(w, "warning")
        return result.problems

    def _repair(self, model, ckpt: str, what: str) -> list[str]:
        """Load what the Trainer's load skipped (converted layout); return why that was refused, if it was."""
        try:
            done = load_converted(model, ckpt)
        except TrainerGuardError as e:  # unreadable files: the comparison that follows names them
            self.note(f"converted-layout tensors not loaded: {e}", "warning")
            return []
        except Exception as e:  # I/O error, out of memory: a problem on this rank, agreed on below (no rank hangs)
            return [f"loading the tensors stored in transformers' converted layout failed ({type(e).__name__}: "
                    f"{e}); the model may be partly loaded: do not train on it"]
        if done.loaded:
            self.note(f"{what}: loaded {len(done.loaded)} tensors the Trainer's load_state_dict(strict=False) skipped "
                      f"(stored in transformers' converted layout, transformers issues #48805, #43701): "
                      f"{', '.join(done.loaded[:4])}{', ...' if len(done.loaded) > 4 else ''}")
        return [f"not loaded from the converted layout: {p}" for p in done.problems]

    def _after_load(self) -> bool:
        """Whether a load (resume, best model) is followed by the repair and/or the comparison."""
        return bool(self.options["check_resume"] or self.options["repair_load"])

    def verify_resume(self, model, ckpt: str, step: int | None = None, what: str = "resumed model") -> None:
        """After the Trainer loaded ``ckpt`` into ``model`` (``what``: the resumed model, or the best model loaded at
        train end): load what it skipped (``repair_load``), then compare with ``ckpt``'s manifest (``check_resume``).
        Raises :class:`IntegrityError` on every rank on a difference."""
        kind = self._kind(model)  # every rank calls this method at the same event
        if not os.path.isdir(ckpt):
            self.note(f"{what} loaded, but {ckpt} does not exist; weights not verified", "warning")
            result = None
        elif kind == "partitioned":  # ZeRO-3: the partitions' checksums combined (a collective), compared with the
            # tensors of the checkpoint's gathered model.safetensors; FSDP1 flat parameters: nothing to compare
            zero3 = any(is_zero3(p) for p in model.parameters())
            result = (verify_zero3(model, ckpt, zero3_model_sums(model)) if zero3 and self.options["check_resume"]
                      else None)
            for w in (result.warnings if result else []):
                self.note(w, "warning")
            if result and not result.problems and result.checked:
                self.note(f"{what} matches {', '.join(result.checked)} (ZeRO-3 checksums combined from the ranks' "
                          f"partitions)")
            elif result and not result.problems:
                self.note(f"{what}: {os.path.basename(os.path.normpath(ckpt))} holds no tensors to compare the loaded "
                          f"partitions with (no gathered model.safetensors: set "
                          f"stage3_gather_16bit_weights_on_model_save in the DeepSpeed config); its files were "
                          f"checked by their bytes before the load")
        elif kind == "dtensor":  # the shards' combined checksums (a collective), compared with the manifest
            sums = sharded_model_sums(model, gather) if not peft_adapter_names(model) else {}
            result = verify_sharded(model, ckpt, sums) if self.options["check_resume"] else Verified([], [], [])
            for w in result.warnings:
                self.note(w, "warning")
            if not result.problems and result.checked:
                self.note(f"{what} matches {', '.join(result.checked)} (full tensors combined from the shards)")
        else:
            repaired = self._repair(model, ckpt, what) if self.options["repair_load"] else []
            if self.options["check_resume"]:
                result = verify_against(model, ckpt, backend=self.options["backend"])
                result = result._replace(problems=repaired + result.problems)
            else:  # repair_load alone: no comparison, only what the repair said
                result = Verified(repaired, [], [])
            for w in result.warnings:
                self.note(w, "warning")
            if not result.problems and result.checked:
                self.note(f"{what} matches {', '.join(result.checked)}")
                self._explain_tie_warning(model, ckpt)
        problems = list(result.problems) if result else []
        load = f"{type(model).__name__}.from_pretrained({ckpt!r})"
        hint = conversion_hint(model, problems, f"load the model with {load} before resuming from it"
                               if what == "resumed model" else f"drop load_best_model_at_end and load {load} instead")
        if hint:
            problems.append(hint)
        after = ("stopped before training on" if what == "resumed model" else
                 "the model in memory is not that checkpoint: do not save or use it")
        agree(problems, IntegrityError,
              header=f"The {what} does not match {os.path.join(ckpt, MANIFEST_FILE)}"
                     + ("" if step is None else f" (step {step})")
                     + f"; {after}. Load the checkpoint with the model class, config and dtype it "
                       "was saved with. Differences:")

    def _explain_tie_warning(self, model, ckpt: str) -> None:
        """After a verified load: transformers 5.23's Trainer warns "There were missing keys in the checkpoint model
        loaded: ['lm_head.weight']" for every tied model it resumes (the alias is stored once, under its tie). Say,
        next to it, that this one is expected and was checked."""
        try:
            from transformers import PreTrainedModel

            aliases = (read_manifest(ckpt) or {}).get("aliases", {})
        except Exception:  # nothing to explain (already verified; this is only a message)
            return
        if not isinstance(model, PreTrainedModel) or not isinstance(aliases, dict):
            return
        names = dict(model.named_parameters(remove_duplicate=False))
        tied = {a: k for a, k in aliases.items() if a in names and k in names and names[a] is names[k]}
        ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
        if not tied or (ignored and set(tied) == ignored):  # the Trainer re-ties those silently
            return
        self.note("the Trainer's warning 'There were missing keys in the checkpoint model loaded: "
                  f"{sorted(tied)}' is expected: " + "; ".join(f"{a} is stored once, as its tie {k}" for a, k in
                                                              sorted(tied.items()))
                  + ", and was restored through the tie (checked against the manifest)")  # INFO: nothing to do

    # -- hooks (trainer_guard.callbacks.hooks) ----------------------------------------------------------------
    def resolve_resume(self, trainer: Any, resume_from_checkpoint: Any) -> Any:
        """Before anything loads: check every file of the checkpoint against its manifest; for ``True``, resume from
        the newest complete, verified checkpoint (newer ones skipped with a warning; ``fallback=False`` stops)."""
        given = resume_from_checkpoint if isinstance(resume_from_checkpoint, (str, os.PathLike)) else None
        self._resume_path = os.fspath(given) if given is not None else None
        if resume_from_checkpoint in (None, False) or not self.options["check_resume"]:
            return None
        args = trainer.args
        first = candidate(args.output_dir, resume_from_checkpoint)
        known = self._own_files(first, args) if first else {}  # every rank reads what it wrote: a collective
        mine = None
        if args.should_save:  # the ranks that write checkpoints read the rest: one verdict per copy
            mine = pick_checkpoint(args.output_dir, resume_from_checkpoint, fallback=self.options["fallback"],
                                   known=known)
            for w in mine.warnings:
                self.note(w, "warning")
        seen = [v for v in gather(mine) if v is not None]
        errors = [v.error for v in seen if v.error]
        if errors:
            raise IntegrityError(errors[0])
        paths = sorted({v.path for v in seen if v.path})
        if len(paths) > 1:
            raise IntegrityError(f"the ranks that save checkpoints would resume from different ones ({', '.join(paths)}"
                                 f"): their copies of {args.output_dir} differ; pass resume_from_checkpoint=<path>")
        if paths:
            self._resume_path = paths[0]
        return paths[0] if paths else None

    def after_weights_load(self, trainer: Any, checkpoint: str, model: Any) -> None:
        """Check right after the Trainer loads the checkpoint's weights, before its optimizer load: catches a bad
        resume before the optimizer's own, less telling, errors, and works for any checkpoint path."""
        if self._after_load():
            self.verify_resume(trainer.model, os.fspath(checkpoint))
            self._verified = True

    def after_save_model(self, trainer: Any, output_dir: str) -> None:
        """A final ``trainer.save_model(dir)`` (no ``on_save`` event) gets a manifest too; on the main process only
        and with no collective: scripts often call save_model from the main process alone, and a rank waiting for
        the others would hang."""
        if is_sharded(trainer.model):  # its checksums need every rank, and scripts call save_model on one
            self._once("save_model", f"{output_dir}: trainer.save_model() of a sharded model gets no manifest (the "
                                     f"checkpoints do)")
            return
        if is_main_process() and os.path.isdir(output_dir):
            problems = self.write_checkpoint_manifest(trainer.model, output_dir, trainer.state.global_step)
            if problems:
                raise IntegrityError(f"{output_dir} does not hold what the model holds; no manifest was written. "
                                     f"Problems:\n  - " + "\n  - ".join(problems))

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        verified, self._verified = self._verified, False
        if verified or not self._after_load() or state.global_step <= 0 or model is None:
            return
        if self._resume_path:  # a load the hooks do not see (DeepSpeed's own): the checkpoint train() was given
            self.verify_resume(model, self._resume_path, state.global_step)
            return
        self.verify_resume(model, checkpoint_dir(args.output_dir, state.global_step), state.global_step)

