"""ReplicaDivergenceGuard: stop a data-parallel run whose replicas no longer hold the same weights.

DDP keeps replicas equal only if every rank applies every update identically; a rank that skipped a step, a
non-deterministic kernel or a bad GPU makes them drift apart silently (issue 7). Every ``every`` optimizer steps
each rank checksums its parameters (:mod:`trainer_guard.core.divergence`), the ranks all-gather one 64-bit
fingerprint each, and only on a mismatch the per-tensor checksums, so the error can name the first differing
tensors. Every rank raises the same error at the same step: no rank is left waiting in a collective.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from .._dist import gather, rank, world_size
from ..core.divergence import divergence_message, model_checksums, model_fingerprint, model_tensors
from ..core.sharding import is_sharded
from ..errors import ChecksumError, ReplicaDivergenceError
from .base import Guard

__all__ = ["ReplicaDivergenceGuard"]


class ReplicaDivergenceGuard(Guard):
    """All-gather each replica's model fingerprint every ``every`` steps; raise on every rank when they differ.

    Single-process runs compute nothing. Sharded runs (FSDP, DeepSpeed ZeRO-3), as the model's parameters show
    them (not ``TrainingArguments.fsdp``: accelerate may fall back to plain DDP), compare only the tensors every
    rank holds whole; with none (every parameter a shard) they are skipped with a note: their ranks hold
    different shards by design (see docs/DISTRIBUTED.md).

    Args:
        every: check after every ``every``-th optimizer step (``on_step_end``, before that step's save);
            ``0`` turns step checks off.
        at_train_end: also check once when training ends (before the user saves the final model; after the
            best model is loaded with ``load_best_model_at_end``, even when the last step was just checked).
        include_buffers: also compare buffers (running statistics, rotary caches).
        max_tensors: how many differing tensor names to list per diverged rank.
        backend: checksum backend passed to :func:`trainer_guard.checksum.checksums`.
        action: ``"raise"`` stops training with the error; ``"warn"`` logs it and goes on.

    Raises:
        ReplicaDivergenceError: on every rank, naming the diverged ranks and their first differing tensors.
        ChecksumError: on every rank, when any rank could not checksum its model (the rank and reason named), or
            when some ranks hold sharded parameters and others do not.

    Example:
        >>> from trainer_guard import ReplicaDivergenceGuard
        >>> guard = ReplicaDivergenceGuard(every=100)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[guard])  # doctest: +SKIP
        >>> # accelerate launch --multi_gpu --num_processes 8 train.py
    """

    name = "replica_divergence"

    def __init__(
        self,
        every: int = 0,
        at_train_end: bool = False,
        include_buffers: bool = False,
        max_tensors: int = 5,
        backend: Literal["auto", "triton", "cpu"] = "auto",
        action: Literal["raise", "warn"] = "raise",
    ) -> None:
        super().__init__(every=every, at_train_end=at_train_end, include_buffers=include_buffers,
                         max_tensors=max_tensors, backend=backend, action=action)
        self.checks = 0
        self.last_fingerprint: int | None = None
        self._last_step: int | None = None
        self._skip_noted = False

    @classmethod
    def _check_options(cls, options: dict[str, Any]) -> list[str]:
        problems = []
        if options["every"] < 0:
            problems.append(f"every: got {options['every']}; use 0 (off) or a positive number of steps")
        if options["max_tensors"] < 1:
            problems.append(f"max_tensors: got {options['max_tensors']}; use 1 or more")
        return problems

    def check(self, model: nn.Module, step: int | None = None) -> int | None:
        """Compare ``model`` across ranks now; every rank must call this at the same point.

        Returns:
            The agreed fingerprint, or ``None`` when there is nothing to compare (one process, sharded model).
        """
        if world_size() == 1:
            self._skip("a single process")
            return None
        # Whether this rank's model is sharded is local knowledge (read from what wraps it, not from the arguments):
        # it travels in the one gather below (error None = "holds shards"), so every rank decides to skip (or to
        # gather the per-tensor checksums) from the same values and none is left waiting. Sharded ranks compare the
        # tensors they hold whole (model_checksums leaves shards out); with none, there is nothing to compare.
        sums, fp, err = None, None, None if is_sharded(model) else ""
        if err == "" or model_tensors(model, self.options["include_buffers"]):
            try:
                sums = model_checksums(model, self.options["include_buffers"], self.options["backend"])
                fp = model_fingerprint(sums)
            except Exception as e:  # any failure on one rank is agreed on below: no rank hangs in the gather
                err = f"rank {rank()}: {type(e).__name__}: {e}"
        results = gather((fp, err))
        sharded = [r for r, (f, e) in enumerate(results) if e is None]
        if len(sharded) == len(results) and all(f is None for f, _ in results):
            self._skip("sharded parameters (FSDP/ZeRO-3)")
            return None
        self.checks += 1
        self._last_step = step
        errors = [e for _, e in results if e]
        plain = [r for r, (_, e) in enumerate(results) if e == ""]
        if sharded and plain:
            errors.append(f"rank {', '.join(map(str, sharded))}: hold{'s' if len(sharded) == 1 else ''} sharded "
                          f"parameters (FSDP/ZeRO-3), rank {', '.join(map(str, plain))} "
                          f"do{'es' if len(plain) == 1 else ''} not: the ranks did not wrap the model alike")
        if errors:
            at = f" at step {step}" if step is not None else ""
            raise ChecksumError(f"Replica divergence check could not run{at} (every rank stops here, none is left "
                                "waiting):\n  - " + "\n  - ".join(errors)
                                + "\nFix the tensor or device named above, or turn the check off with every=0.")
        fps = [f for f, _ in results]
        if len(set(fps)) == 1:
            self.last_fingerprint = fps[0]
            return fps[0]
        per_rank = gather(sums)  # only on a mismatch: names the tensors
        msg = divergence_message(step, fps, per_rank, self.options["max_tensors"])
        if self.options["action"] == "warn":
            self.note(msg, "warning")
            return None
        self.events.append(msg)
        raise ReplicaDivergenceError(msg)

    def _skip(self, why: str) -> None:
        if not self._skip_noted:
            self.note(f"replica check skipped: {why}, no replicas to compare")
            self._skip_noted = True

    def on_train_begin(self, args, state, control, **kwargs: Any):
        self._last_step = None

    def _run(self, args, model, step: int) -> None:
        self.check(model, step)  # sharded or not is read from the model in check(), never from args.fsdp

    def on_step_end(self, args, state, control, model=None, **kwargs: Any):
        every = self.options["every"]
        if model is not None and every and state.global_step % every == 0:
            self._run(args, model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs: Any):
        # With load_best_model_at_end every rank has just loaded the best checkpoint (after the last step's check):
        # that model is compared too. Decided from the arguments, the same on every rank (best_model_checkpoint is
        # set from a local os.path.exists).
        if model is not None and self.options["at_train_end"] and (
                self._last_step != state.global_step or args.load_best_model_at_end):
            self._run(args, model, state.global_step)
