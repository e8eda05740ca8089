"""Rank-asymmetric failures and disagreements on 2 CPU ranks, one launch (tests/test_distributed_asym.py).

Usage:
    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/asym.py OUT RESULTS [TIMEOUT_S]

Scenarios, in order, each recorded per rank by :class:`_asym.Runner` (a hung scenario ends the launch):

- ``healthy``: every guard of configs/default.yaml (replica check every step and at train end), wired with
  ``trainer_guard.guard``, ``gradient_accumulation_steps=2``, ``save_total_limit=1``, ``load_best_model_at_end``
  (eval every save). Both ranks end alike; only rank 0 writes trainer_guard files.
- ``manifest_write_fails``: the manifest's background write fails on rank 0 only (ENOSPC).
- ``resume_wired_rank1_bad_load``: resuming ``healthy``'s best checkpoint, rank 1's load leaves one tensor
  different (wired: checked right after the load, before the DDP wrap).
- ``resume_unwired_rank1_after_wrap``: not wired; rank 1's weight changes after the DDP wrap, before the guards'
  train-begin check.
- ``resume_unwired_rank1_before_wrap``: not wired; rank 1's load differs, but DDP's wrap broadcasts rank 0's
  weights: no error, and both replicas train on equal weights.
- ``best_load_rank1_differs``: only ``ReplicaDivergenceGuard(at_train_end=True)``; rank 1's load of the best
  model at train end (``load_best_model_at_end``) leaves one tensor different.
- ``dtype_rank1_only``: ``DtypeGuard(mode="raise")`` where rank 1 alone holds a float64 weight (asym_sidecar.py).
- ``agreed_call``: :func:`trainer_guard._dist.agreed_call` with rank 0's call raising ``OSError``.
- ``div_*``: ``ReplicaDivergenceGuard.check`` on a small module whose rank 1 copy has an extra parameter, lacks
  one, holds one in another dtype, cannot be checksummed (a ``ValueError``), or is sharded (ZeRO-3 marker) on
  rank 1 only.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys

from _asym import Runner
from _common import RANK, record_writes
from asym_sidecar import dtype_rank1_only

import torch  # noqa: E402
from conftest import make_args  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import trainer_guard  # noqa: E402
import trainer_guard.callbacks.divergence as div_mod  # noqa: E402
import trainer_guard.core.io as tio  # noqa: E402
from trainer_guard import ReplicaDivergenceGuard  # noqa: E402
from trainer_guard._dist import agreed_call, barrier  # noqa: E402
from trainer_guard.core.divergence import model_checksums, model_fingerprint  # noqa: E402
from trainer_guard.errors import IntegrityError  # noqa: E402
from trainer_guard.tiny import tiny_dataset, tiny_model  # noqa: E402

CONFIG = trainer_guard.default_config_path()
TARGET = "model.layers.0.mlp.up_proj.weight"


def build(out: str, *, seed: int = 0, wire: bool = True, extra=(), full: bool = False, max_steps: int = 4,
          **overrides) -> Trainer:
    callbacks = trainer_guard.callbacks_from_yaml(CONFIG, replica_divergence={"every": 1, "at_train_end": True},
                                                  **overrides)
    model = tiny_model("llama-tied", seed=seed)
    kw = dict(max_steps=max_steps, save_steps=2)
    if full:
        kw.update(gradient_accumulation_steps=2, save_total_limit=1, load_best_model_at_end=True,
                  eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    # wire=False: the guards join after the Trainer was built, so they do not wire it themselves (at on_init_end)
    t = Trainer(model=model, args=make_args(out, **kw), train_dataset=tiny_dataset(32, 16, model.config.vocab_size),
                eval_dataset=tiny_dataset(8, 16, model.config.vocab_size, seed=1) if full else None,
                callbacks=list(extra) + (callbacks if wire else []))
    for cb in [] if wire else callbacks:
        t.add_callback(cb)
    return trainer_guard.guard(t) if wire else t


def fingerprint(model) -> str:
    return f"{model_fingerprint(model_checksums(model)):016x}"


def reports(t: Trainer) -> dict:
    return {type(cb).__name__: cb.report() for cb in t.callback_handler.callbacks if hasattr(cb, "report")}


def nudge(model) -> None:
    with torch.no_grad():
        model.get_parameter(TARGET)[0, 0] += 1e-3


# -- Trainer scenarios -------------------------------------------------------------------------------------------
def healthy(out: str) -> dict:
    t = build(out, full=True, max_steps=6)
    t.train()
    div = next(cb for cb in t.callback_handler.callbacks if isinstance(cb, ReplicaDivergenceGuard))
    best = t.state.best_model_checkpoint
    return {"step": t.state.global_step, "fingerprint": fingerprint(t.model), "best": best,
            "left": sorted(os.listdir(out)), "reports": reports(t), "divergence_checks": div.checks,
            "best_files": sorted(f for f in os.listdir(best) if f.startswith("trainer_guard")) if best else []}


def manifest_write_fails(out: str) -> dict:
    real = tio.atomic_write

    def atomic_write(path, write):
        if os.path.basename(os.fspath(path)) == "trainer_guard_manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return real(path, write)

    if RANK == 0:
        tio.atomic_write = atomic_write
    t = build(out)
    try:
        return _raise_with_step(t)()
    finally:
        tio.atomic_write = real


def _raise_with_step(t: Trainer):
    def run(**kw):
        try:
            t.train(**kw)
        except Exception as e:
            e._asym_info = {"step": t.state.global_step}
            raise
        return {"step": t.state.global_step, "fingerprint": fingerprint(t.model)}

    return run


def resume_wired_rank1_bad_load(out: str, best: str) -> dict:
    t = build(out, wire=False, max_steps=8)
    load = t._load_from_checkpoint

    def bad_load(*a, **k):
        r = load(*a, **k)
        if RANK == 1:
            nudge(t.model)
        return r

    t._load_from_checkpoint = bad_load
    trainer_guard.guard(t)
    return _raise_with_step(t)(resume_from_checkpoint=best)


class NudgeAtTrainBegin(TrainerCallback):
    """Rank 1 only: change one weight at train begin (after the DDP wrap), before the guards' checks."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if RANK == 1:
            nudge(model)


def resume_unwired_rank1_after_wrap(healthy_out: str) -> dict:
    t = build(healthy_out, wire=False, max_steps=8, extra=[NudgeAtTrainBegin()])  # stops before writing anything
    return _raise_with_step(t)(resume_from_checkpoint=True)


def resume_unwired_rank1_before_wrap(out: str, best: str) -> dict:
    if RANK == 0:
        os.makedirs(out)
        shutil.copytree(best, os.path.join(out, os.path.basename(best)))
    barrier()
    t = build(out, wire=False, max_steps=8)
    load = t._load_from_checkpoint

    def bad_load(*a, **k):
        r = load(*a, **k)
        if RANK == 1:
            nudge(t.model)
        return r

    t._load_from_checkpoint = bad_load
    return _raise_with_step(t)(resume_from_checkpoint=True)


def best_load_rank1_differs(out: str) -> dict:
    """Only ReplicaDivergenceGuard(at_train_end=True); rank 1's load of the best model at train end differs."""
    model = tiny_model("llama-tied")
    guard = ReplicaDivergenceGuard(every=1, at_train_end=True)
    t = Trainer(model=model, args=make_args(out, max_steps=4, save_steps=2, load_best_model_at_end=True,
                                            eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4),
                train_dataset=tiny_dataset(32, 16, model.config.vocab_size),
                eval_dataset=tiny_dataset(8, 16, model.config.vocab_size, seed=1), callbacks=[guard])
    load = t._load_best_model

    def bad_load(*a, **k):
        r = load(*a, **k)
        if RANK == 1:
            nudge(t.model)
        return r

    t._load_best_model = bad_load
    info = _raise_with_step(t)()
    return dict(info, checks=guard.checks)


def agreed(out: str) -> dict:
    def write():
        if RANK == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(out, "x.json"))
        return "wrote"

    agreed_call(True, write, IntegrityError, "could not write the record:")
    return {}


# -- ReplicaDivergenceGuard with replicas that differ in structure -------------------------------------------------
def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def div_check(mutate) -> dict:
    model = small()
    if RANK == 1:
        mutate(model)
    guard = ReplicaDivergenceGuard(every=1)
    return {"fingerprint": guard.check(model, step=7), "report": guard.report()}


def _extra(m):
    m.register_parameter("extra", nn.Parameter(torch.zeros(3)))


def _missing(m):
    m[1].bias = None


def _dtype(m):
    m[0].weight.data = m[0].weight.data.to(torch.bfloat16)


def _zero3(m):
    m[0].weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks its partitioned parameters


def div_raises(mutate=None) -> dict:
    real = div_mod.model_checksums
    if RANK == 1:
        def broken(*a, **k):
            raise ValueError("simulated: numpy cannot view this buffer")

        div_mod.model_checksums = broken
    try:
        return div_check(lambda m: None)
    finally:
        div_mod.model_checksums = real


def main(out: str, results: str, timeout: str = "90") -> None:
    record_writes(out)
    runner = Runner(results, float(timeout))
    p = lambda name: os.path.join(out, name)  # noqa: E731
    h = runner.run("healthy", lambda: healthy(p("healthy")))
    runner.run("manifest_write_fails", lambda: manifest_write_fails(p("manifest_write_fails")))
    best = h.get("best")
    if best:
        runner.run("resume_wired_rank1_bad_load", lambda: resume_wired_rank1_bad_load(p("resume_wired"), best))
        runner.run("resume_unwired_rank1_after_wrap", lambda: resume_unwired_rank1_after_wrap(p("healthy")))
        runner.run("resume_unwired_rank1_before_wrap",
                   lambda: resume_unwired_rank1_before_wrap(p("resume_before_wrap"), best))
    runner.run("best_load_rank1_differs", lambda: best_load_rank1_differs(p("best_load")))
    runner.run("dtype_rank1_only", lambda: dtype_rank1_only(p("dtype")))
    runner.run("agreed_call", lambda: agreed(out))
    runner.run("div_equal", lambda: div_check(lambda m: None))
    runner.run("div_extra", lambda: div_check(_extra))
    runner.run("div_missing", lambda: div_check(_missing))
    runner.run("div_dtype", lambda: div_check(_dtype))
    runner.run("div_value_error", div_raises)  # these two hung before the fix: last, so they end the launch
    runner.run("div_zero3_rank1", lambda: div_check(_zero3))
    runner.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
