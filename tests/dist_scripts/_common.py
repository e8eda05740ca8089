"""Shared helpers for the scripts that tests/test_distributed.py runs under ``accelerate launch``.

- :func:`record_writes` logs every file this rank writes under a directory through Python's ``open``,
  ``torch.save`` or trainer_guard's atomic writes (not safetensors' own writer), so the test can assert which
  rank wrote what.
- :func:`dump` writes this rank's result JSON into the results directory (outside the training output).
- :func:`finish` ends every script without interpreter teardown (gloo threads left to it sometimes abort the process).
- :func:`stop_at` is a callback that stops training after a given step, like a preempted job.
"""

from __future__ import annotations

import builtins
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for conftest.make_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")

import torch  # noqa: E402

torch.set_num_threads(1)

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
WRITES: list[str] = []


def record_writes(root: str) -> None:
    """Append to :data:`WRITES` the path of every file this process writes under ``root``."""
    import trainer_guard.core.io as tio

    root = os.path.abspath(root)
    real_open, real_atomic = builtins.open, tio.atomic_write_bytes

    def _note(path) -> None:
        try:
            p = os.path.abspath(os.fspath(path))
        except TypeError:
            return
        if p.startswith(root + os.sep):
            WRITES.append(os.path.relpath(p, root))

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            _note(file)
        return real_open(file, mode, *a, **k)

    def atomic(path, data):
        _note(path)
        return real_atomic(path, data)

    real_save = torch.save

    def save(obj, f, *a, **k):  # the Trainer's optimizer/scheduler/RNG files (torch opens paths in C++)
        if isinstance(f, (str, os.PathLike)):
            _note(f)
        return real_save(obj, f, *a, **k)

    builtins.open = open_
    tio.atomic_write_bytes = atomic
    torch.save = save


def dump(results_dir: str, result: dict) -> None:
    """Write ``result`` (plus this rank's recorded writes) to ``results_dir/rank<r>.json``."""
    result = dict(result, rank=RANK, world_size=WORLD, writes=sorted(set(WRITES)))
    with open(os.path.join(results_dir, f"rank{RANK}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def finish() -> None:
    """Close the process group and leave without interpreter teardown (call after :func:`dump`).

    A run stopped inside a DDP step on purpose leaves the DDP reducer / gloo threads behind; left to interpreter
    teardown they sometimes abort the process ("terminate called without an active exception", exit -6) after the
    results were written, which fails the launch.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stop_at(step: int):
    """A ``TrainerCallback`` that stops training after ``step`` (after its checkpoint), like a preempted job."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return StopAt()


NUDGED = "model.layers.1.mlp.down_proj.weight"


def nudge(at: int = 2, target: str = NUDGED):
    """A ``TrainerCallback`` that, on rank 1 only, adds 1e-3 to one element of ``target`` after optimizer step ``at``
    (at ``on_step_end``, before a replica check placed after it): the replicas silently drift apart."""
    from transformers import TrainerCallback

    class Nudge(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if RANK == 1 and state.global_step == at:
                with torch.no_grad():
                    model.get_parameter(target)[0, 0] += 1e-3

    return Nudge()
