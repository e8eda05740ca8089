"""One rank (rank 0, the writer) fails inside a guard's save-time work, or one rank alone sees a resume problem.

Usage (from tests/test_distributed_asym.py):
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/asym_sidecar.py OUT RESULTS SCENARIO[,...]

Scenarios (every guard of configs/default.yaml, tiny tied Llama, 2 CPU ranks):

- ``ties_write``: writing ``trainer_guard_ties.json`` fails on rank 0 (ENOSPC, the only rank that writes).
- ``trainable_write``: writing ``trainer_guard_trainable.json`` fails on rank 0 (ENOSPC).
- ``manifest_eio``: IntegrityGuard(verify="readback") cannot read the checkpoint's files back on rank 0 (EIO).
- ``head_unreadable``: HeadGuard finds the checkpoint's config.json unreadable on rank 0 (UsageError).
- ``dtype_rank1_only``: DtypeGuard(mode="raise"), rank 1 alone has a float64 norm weight (at Trainer init).
- ``untrained_rank1_only``: UntrainedTokensGuard(mode="raise"), rank 1 alone has never-trained embedding rows
  (zeroed after the DDP wrap: DDP's wrap broadcasts rank 0's weights, so this takes a change after it).
- ``resume_rank1_frozen``: a resume, wired with trainer_guard.guard(), where rank 1 alone froze the embeddings
  (its trainable set differs from the checkpoint's; rank 0's does not).

Every rank must end each scenario with the same trainer_guard error, in bounded time (see _asym.Runner).
"""

from __future__ import annotations

import errno
import os
import sys

from _asym import Runner
from _common import RANK, record_writes, stop_at

from conftest import make_args  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import trainer_guard  # noqa: E402
import trainer_guard.core.io as tio  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402

CONFIG = trainer_guard.default_config_path()


def build(out: str, seed: int = 0, wire: bool = True, extra=(), **overrides) -> Trainer:
    callbacks = trainer_guard.callbacks_from_yaml(CONFIG, **overrides)
    model = tiny_model("llama-tied", seed=seed)
    t = Trainer(model=model, args=make_args(out, max_steps=4, save_steps=2),
                train_dataset=tiny_dataset(32, 16, model.config.vocab_size), callbacks=list(extra) + callbacks)
    return trainer_guard.guard(t) if wire else t


def failing_write(basename: str):
    """On rank 0: atomic writes of ``basename`` fail as on a full disk."""
    real = tio.atomic_write

    def atomic_write(path, write):
        if os.path.basename(os.fspath(path)) == basename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return real(path, write)

    return real, atomic_write


def train_with_failing_write(out: str, basename: str) -> dict:
    real, fake = failing_write(basename)
    if RANK == 0:
        tio.atomic_write = fake
    t = build(out)
    try:
        t.train()
    finally:
        tio.atomic_write = real
    return {"step": t.state.global_step}


def manifest_eio(out: str) -> dict:
    import trainer_guard.checkpoint.reconcile as ck  # where the save-time readback calls file_checksums

    real = ck.file_checksums

    def eio(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "model.safetensors")

    if RANK == 0:
        ck.file_checksums = eio
    try:
        t = build(out, integrity={"verify": "readback"})
        t.train()
    finally:
        ck.file_checksums = real
    return {"step": t.state.global_step}


def head_unreadable(out: str) -> dict:
    import trainer_guard.callbacks.head as head_mod
    from trainer_guard.errors import UsageError

    real = head_mod.missing_head_problems

    def bad(directory):
        raise UsageError(f"{directory}/config.json: unreadable config (simulated); fix it or re-save the model")

    if RANK == 0:
        head_mod.missing_head_problems = bad
    try:
        t = build(out)
        t.train()
    finally:
        head_mod.missing_head_problems = real
    return {"step": t.state.global_step}


def resume_rank1_frozen(out: str) -> dict:
    build(out, extra=[stop_at(2)]).train()
    t = build(out, seed=1)
    if RANK == 1:
        t.model.model.embed_tokens.weight.requires_grad_(False)  # tied: the head freezes with it
    t.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    return {"step": t.state.global_step}


class ZeroRowsOnRank1(TrainerCallback):
    """Rank 1 only, at train begin (after the DDP wrap, before the guards): embedding rows 5-7 become untrained (0)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        if RANK == 1:
            with torch.no_grad():
                model.get_input_embeddings().weight[5:8] = 0


def untrained_rank1_only(out: str) -> dict:
    t = build(out, extra=[ZeroRowsOnRank1()], untrained_tokens={"mode": "raise"})
    t.train()
    return {"step": t.state.global_step}


def dtype_rank1_only(out: str) -> dict:
    """DtypeGuard(mode="raise"): rank 1 alone has a float64 norm weight when the Trainer is built."""
    import torch

    model = tiny_model("llama-tied")
    if RANK == 1:
        model.model.norm.weight.data = model.model.norm.weight.data.to(torch.float64)
    callbacks = trainer_guard.callbacks_from_yaml(CONFIG, dtype={"mode": "raise"})
    Trainer(model=model, args=make_args(out), train_dataset=tiny_dataset(32, 16, model.config.vocab_size),
            callbacks=callbacks)
    return {}


SCENARIOS = {
    "dtype_rank1_only": dtype_rank1_only,
    "untrained_rank1_only": untrained_rank1_only,
    "ties_write": lambda out: train_with_failing_write(out, "trainer_guard_ties.json"),
    "trainable_write": lambda out: train_with_failing_write(out, "trainer_guard_trainable.json"),
    "manifest_eio": manifest_eio,
    "head_unreadable": head_unreadable,
    "resume_rank1_frozen": resume_rank1_frozen,
}


def main(out: str, results: str, names: str, timeout: str = "90") -> None:
    record_writes(out)
    runner = Runner(results, float(timeout))
    for name in names.split(","):
        runner.run(name, lambda: SCENARIOS[name](os.path.join(out, name)))
    runner.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
